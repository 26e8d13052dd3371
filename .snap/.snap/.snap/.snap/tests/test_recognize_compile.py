"""Recognition inside a real torch.compile: the post-grad graph Inductor hands its custom
pre-pass (FakeTensor metadata, parameters and buffers as placeholders, views as reshape)."""

import torch
from torch._inductor import config as inductor_config

from emu_inductor.formats import MXFP4, NVFP4, quantize
from emu_inductor.recognize import ActVerdict, WeightVerdict, gemm_nodes, recognize_activation, recognize_weight

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


class TwoLayers(torch.nn.Module):
    """An NVFP4 linear in vLLM's spelling (LUT buffer, sign by where, alpha buffer, x*(gs/s)
    QDQ) and an MXFP4 linear dequantized with exp2 and QDQ'd by the reference."""

    def __init__(self, K=64, N=64):
        super().__init__()
        q = quantize(torch.randn(N, K), NVFP4)
        self.register_buffer("w1", q.qdata)
        self.register_buffer("s1", q.scale)
        self.register_buffer("a1", torch.tensor(0.0123))
        self.register_buffer("gs", torch.tensor(37.5))
        self.register_buffer("lut", torch.tensor(E2M1))
        m = quantize(torch.randn(N, N), MXFP4)
        self.register_buffer("w2", m.qdata)
        self.register_buffer("s2", m.scale)

    def forward(self, x):
        c = torch.stack([self.w1 & 0xF, self.w1 >> 4], -1).reshape(self.w1.shape[0], -1)
        mag = self.lut[(c & 7).long()]
        v = torch.where((c & 8) != 0, -mag, mag).reshape(c.shape[0], -1, 16)
        w1 = (v * (self.s1.float() * self.a1).unsqueeze(-1)).reshape(c.shape).to(x.dtype)
        xb = x.float().reshape(x.shape[0], -1, 16)
        amax = xb.abs().amax(-1, keepdim=True)
        s = torch.clamp(self.gs * (amax * (1.0 / 6.0)), -448.0, 448.0).to(torch.float8_e4m3fn).float()
        y = torch.clamp(xb * torch.where(s == 0, torch.zeros_like(s), self.gs / s), -6.0, 6.0)
        a = y.abs()
        q = torch.where(a <= 0.25, 0.0, torch.where(a < 0.75, 0.5, torch.where(a <= 1.25, 1.0, torch.where(
            a < 1.75, 1.5, torch.where(a <= 2.5, 2.0, torch.where(a < 3.5, 3.0, torch.where(a <= 5.0, 4.0, 6.0)))))))
        xq = (torch.copysign(q, y) * (s / self.gs)).reshape(x.shape).to(x.dtype)
        h = xq @ w1.t()
        c2 = torch.stack([self.w2 & 0xF, self.w2 >> 4], -1).reshape(self.w2.shape[0], -1)
        lut16 = torch.tensor(E2M1 + [-v for v in E2M1], device=x.device)
        sc = torch.exp2(self.s2.float() - 127)
        w2 = (lut16[c2.long()].reshape(c2.shape[0], -1, 32) * sc.unsqueeze(-1)).reshape(c2.shape).to(x.dtype)
        return h @ w2.t()


def test_recognition_in_the_post_grad_pass():
    seen = []

    def hook(graph):
        for g in gemm_nodes(graph):
            seen.append((recognize_weight(g), recognize_activation(g)))

    model = TwoLayers()
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with inductor_config.patch(post_grad_custom_pre_pass=hook, fx_graph_cache=False):
        torch._dynamo.reset()
        out = torch.compile(model)(x)
    torch.testing.assert_close(out, model(x), rtol=0.02, atol=0.02)
    assert len(seen) == 2
    (w1, a1), (w2, a2) = seen
    assert isinstance(w1, WeightVerdict), w1.reason
    assert w1.variant.fmt == "nvfp4" and w1.kernel_supported and w1.alpha is not None
    assert [g.node.op for g in w1.guards] == ["placeholder"] and list(w1.guards[0].values) == E2M1  # LUT buffer
    assert isinstance(a1, ActVerdict), a1.reason
    assert a1.variant.recipe == "vllm" and a1.global_scale is not None
    assert isinstance(w2, WeightVerdict), w2.reason
    # exp2(u - 127): byte 255 -> inf, byte 0 -> 2^-127: recognised, read by OpSpec(w_e8m0_byte255="inf")
    assert (w2.variant.e8m0_byte255, w2.variant.e8m0_byte0) == ("inf", "pow2") and w2.kernel_supported
    assert w2.variant.spec_fields["w_e8m0_byte255"] == "inf"
    assert isinstance(a2, ActVerdict) and a2.variant.kind == "none"
