"""The "semantic" pattern family end to end: layers whose emulation is spelled nothing like
emu_inductor.reference compile with backend="mxemu", each GEMM becomes one mxemu::linear
(proven by emu_inductor.recognize), and the outputs equal eager bit for bit."""

import torch
from torch._dynamo.utils import counters

from emu_inductor import _compat
from emu_inductor.formats import MXFP4, NVFP4, quantize

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def round_e2m1_where(y):
    a = y.abs()
    q = torch.where(a <= 0.25, 0.0, torch.where(a < 0.75, 0.5, torch.where(a <= 1.25, 1.0, torch.where(
        a < 1.75, 1.5, torch.where(a <= 2.5, 2.0, torch.where(a < 3.5, 3.0, torch.where(a <= 5.0, 4.0, 6.0)))))))
    return torch.copysign(q, y)


def lut_decode(w):
    lut = torch.tensor(E2M1 + [-v for v in E2M1], device=w.device)
    c = torch.stack([w & 0xF, w >> 4], -1).reshape(w.shape[0], -1)
    return lut[c.long()]


class NvfpVllm(torch.nn.Module):
    """NVFP4 w4a4, vLLM style: LUT buffer + sign where, s*alpha; QDQ s = e4m3(gs*(amax*(1/6))), x*(gs/s)."""
    def __init__(self, K, N, seed):
        super().__init__()
        torch.manual_seed(seed)
        q = quantize(torch.randn(N, K), NVFP4)
        self.register_buffer("w", q.qdata); self.register_buffer("s", q.scale)
        self.register_buffer("alpha", torch.tensor(0.0123)); self.register_buffer("gs", torch.tensor(37.5))

    def forward(self, x):
        c = torch.stack([self.w & 0xF, self.w >> 4], -1).reshape(self.w.shape[0], -1)
        mag = torch.tensor(E2M1, device=x.device)[(c & 7).long()]
        v = torch.where((c & 8) != 0, -mag, mag).reshape(c.shape[0], -1, 16)
        w = (v * (self.s.float() * self.alpha).unsqueeze(-1)).reshape(c.shape).to(x.dtype)
        xb = x.float().reshape(x.shape[0], -1, 16)
        amax = xb.abs().amax(-1, keepdim=True)
        s = torch.clamp(self.gs * (amax * (1.0 / 6.0)), -448.0, 448.0).to(torch.float8_e4m3fn).float()
        y = torch.clamp(xb * torch.where(s == 0, torch.zeros_like(s), self.gs / s), -6.0, 6.0)
        xq = (round_e2m1_where(y) * (s / self.gs)).reshape(x.shape).to(x.dtype)
        return xq @ w.t()


class MxfpFrexp(torch.nn.Module):
    """MXFP4 w4a4: exponent-bit E8M0 decode with its edge bytes; QDQ scale from frexp (floor)."""
    def __init__(self, K, N, seed):
        super().__init__()
        torch.manual_seed(seed)
        q = quantize(torch.randn(N, K), MXFP4)
        self.register_buffer("w", q.qdata); self.register_buffer("s", q.scale)

    def forward(self, x):
        u = self.s.to(torch.int32)
        sc = torch.where(u == 0, torch.full_like(u, 0x00400000), u << 23)
        sc = torch.where(u == 255, torch.full_like(u, 0x7FC00000), sc).view(torch.float32)
        w = (lut_decode(self.w).reshape(self.w.shape[0], -1, 32) * sc.unsqueeze(-1)).reshape(self.w.shape[0], -1)
        xb = x.float().reshape(x.shape[0], -1, 32)
        amax = xb.abs().amax(-1, keepdim=True)
        _, e = torch.frexp(amax)
        scale = torch.exp2(torch.clamp(e - 3, -127, 127).float())
        scale = torch.where(torch.isfinite(amax), scale, torch.nan)
        xq = (round_e2m1_where(xb * (1.0 / scale)) * scale).reshape(x.shape).to(x.dtype)
        return xq @ w.to(x.dtype).t()


class MxfpLog2(torch.nn.Module):
    """MXFP4 w4a4: bit-arithmetic E2M1 decode; QDQ scale exp2(floor(log2(amax)) - 2)."""
    def __init__(self, K, N, seed):
        super().__init__()
        torch.manual_seed(seed)
        q = quantize(torch.randn(N, K), MXFP4)
        self.register_buffer("w", q.qdata); self.register_buffer("s", q.scale)

    def forward(self, x):
        c = torch.stack([self.w & 0xF, self.w >> 4], -1).reshape(self.w.shape[0], -1).to(torch.int32)
        e, m, sg = (c >> 1) & 3, c & 1, (c >> 3) & 1
        mag = torch.where(e == 0, m.float() * 0.5, (1.0 + m.float() * 0.5) * torch.exp2((e - 1).float()))
        v = torch.where(sg == 1, -mag, mag)
        u = self.s.to(torch.int32)
        sc = torch.where(u == 0, 2.0 ** -127, (u << 23).view(torch.float32))
        sc = torch.where(u == 255, torch.nan, sc)
        w = (v.reshape(v.shape[0], -1, 32) * sc.unsqueeze(-1)).reshape(v.shape).to(x.dtype)
        xb = x.float().reshape(x.shape[0], -1, 32)
        amax = xb.abs().amax(-1, keepdim=True)
        ex = torch.clamp(torch.floor(torch.log2(amax)) - 2, -127, 127)
        scale = torch.exp2(torch.where(torch.isfinite(amax), ex, torch.nan))
        xq = (round_e2m1_where(xb / scale) * scale).reshape(x.shape).to(x.dtype)
        return xq @ w.t()


class NvfpWeightOnly(torch.nn.Module):
    """NVFP4 w4a16 compressed-tensors checkpoint read as v * (s * (1/gs)), with a bias."""
    def __init__(self, K, N, seed):
        super().__init__()
        torch.manual_seed(seed)
        q = quantize(torch.randn(N, K), NVFP4)
        self.register_buffer("w", q.qdata); self.register_buffer("s", q.scale)
        self.register_buffer("wgs", torch.tensor(81.0))
        self.register_buffer("bias", torch.randn(N).to(torch.bfloat16))

    def forward(self, x):
        v = lut_decode(self.w).reshape(self.w.shape[0], -1, 16)
        w = (v * (self.s.float() * (1.0 / self.wgs)).unsqueeze(-1)).reshape(self.w.shape[0], -1)
        return torch.nn.functional.linear(x, w.to(x.dtype), self.bias)  # addmm


class Stack(torch.nn.Module):
    def __init__(self, K=64):
        super().__init__()
        self.layers = torch.nn.ModuleList([NvfpVllm(K, K, 0), MxfpFrexp(K, K, 1), MxfpLog2(K, K, 2),
                                           NvfpWeightOnly(K, K, 3)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _compile(model, x):
    """Compile with backend="mxemu"; returns (output, op targets of the graph after the pass)."""
    from torch._inductor import config as inductor_config

    captured = []

    def record_graph(graph):  # runs after the post-grad passes, mxemu's included
        captured.append({str(n.target) for n in graph.nodes if n.op == "call_function"})

    with inductor_config.patch(post_grad_custom_post_pass=record_graph):
        torch._dynamo.reset()
        out = torch.compile(model, backend="mxemu")(x)
    return out, captured


def test_four_independent_spellings_fuse():
    model = Stack()
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    counters.clear()
    with _compat.inductor_caches_disabled():
        out, graphs = _compile(model, x)
    assert counters["mxemu"]["semantic"] == 4, dict(counters["mxemu"])
    assert counters["mxemu_patterns"]["semantic.linear.with_qdq"] == 3
    assert counters["mxemu_patterns"]["semantic.linear.weight_only"] == 1
    (targets,) = graphs
    assert "mxemu.linear.default" in targets and "aten.mm.default" not in targets
    assert torch.equal(out, model(x))


def test_unsupported_decode_is_left_alone_with_the_reason():
    class HighNibbleFirst(torch.nn.Module):
        """MXFP4 weights with element 2j in the high nibble (the kernels read it from the low
        one); scales 2^(u-127) by exp2 (byte 255 -> inf)."""

        def __init__(self):
            super().__init__()
            q = quantize(torch.randn(64, 64), MXFP4)
            self.register_buffer("w", q.qdata)
            self.register_buffer("s", q.scale)

        def forward(self, x):
            sc = torch.exp2(self.s.float() - 127.0)
            lut = torch.tensor(E2M1 + [-v for v in E2M1], device=self.w.device)
            v = lut[torch.stack([self.w >> 4, self.w & 0xF], -1).reshape(64, -1).long()]
            w = (v.reshape(64, -1, 32) * sc.unsqueeze(-1)).reshape(64, 64)
            return x @ w.to(x.dtype).t()

    from emu_inductor.passes import recording

    model = HighNibbleFirst()
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    counters.clear()
    with _compat.inductor_caches_disabled(), recording() as sink:
        out, graphs = _compile(model, x)
    assert counters["mxemu"]["semantic"] == 0 and "aten.mm.default" in graphs[0]
    reasons = [c.reason for c in sink.candidates if c.family == "semantic" and not c.fused]
    assert any("high-nibble-first" in r for r in reasons), reasons  # what explain() shows
    assert torch.equal(out, model(x))


class GroupedExperts(torch.nn.Module):
    """An MXFP4 expert GEMM: frexp QDQ, rows gathered by expert, torch._grouped_mm over
    experts decoded with bit arithmetic."""

    def __init__(self, E=2, N=32, K=64):
        super().__init__()
        q = quantize(torch.randn(E, N, K), MXFP4)
        self.register_buffer("w", q.qdata)
        self.register_buffer("s", q.scale)

    def forward(self, x, order, offs):
        E, N = self.w.shape[:2]
        c = torch.stack([self.w & 0xF, self.w >> 4], -1).reshape(E, N, -1).to(torch.int32)
        e, m, sg = (c >> 1) & 3, c & 1, (c >> 3) & 1
        mag = torch.where(e == 0, m.float() * 0.5, (1.0 + m.float() * 0.5) * torch.exp2((e - 1).float()))
        v = torch.where(sg == 1, -mag, mag)
        u = self.s.to(torch.int32)
        sc = torch.where(u == 0, 2.0 ** -127, (u << 23).view(torch.float32))
        sc = torch.where(u == 255, torch.nan, sc)
        w = (v.reshape(E, N, -1, 32) * sc.unsqueeze(-1)).reshape(E, N, -1).to(x.dtype)
        xb = x.float().reshape(x.shape[0], -1, 32)
        amax = xb.abs().amax(-1, keepdim=True)
        _, ex = torch.frexp(amax)
        scale = torch.where(torch.isfinite(amax), torch.exp2(torch.clamp(ex - 3, -127, 127).float()), torch.nan)
        xq = (round_e2m1_where(xb * (1.0 / scale)) * scale).reshape(x.shape).to(x.dtype)
        return torch._grouped_mm(xq[order], w.transpose(-2, -1), offs=offs)


def test_grouped_expert_gemm_fuses():
    model = GroupedExperts()
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    order = torch.randperm(16)
    offs = torch.tensor([8, 16], dtype=torch.int32)
    counters.clear()
    with _compat.inductor_caches_disabled():
        out, graphs = _compile(lambda x: model(x, order, offs), x)
    assert counters["mxemu_patterns"]["semantic.grouped_mm.with_qdq"] == 1, dict(counters["mxemu_patterns"])
    assert "mxemu.grouped_mm.default" in graphs[0]
    assert torch.equal(out, model(x, order, offs))
