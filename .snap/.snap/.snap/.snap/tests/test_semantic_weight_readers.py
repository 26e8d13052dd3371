"""The most common user spellings of the weight decode that the kernels used to lack, now
fused by the "semantic" family through OpSpec's weight-reader fields: an `exp2(u - 127)`
E8M0 reader (byte 255 -> +inf; compressed-tensors, ModelOpt, transformers gpt-oss) and
compressed-tensors' NVFP4 `v * (s / gs)` (gs in the quantize direction). Compiled with
backend="mxemu": one mxemu::linear each, the reader in its spec, output equal to eager."""

import json
import re

import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from emu_inductor import _compat
from emu_inductor.formats import MXFP4, NVFP4, quantize

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _decode_e2m1(w):
    lut = torch.tensor(E2M1 + [-v for v in E2M1], device=w.device)
    c = torch.stack([w & 0xF, w >> 4], -1).reshape(w.shape[0], -1)
    return lut[c.long()]


class Exp2Reader(torch.nn.Module):
    """MXFP4 weights, scales read as exp2(u - 127) (weight-only)."""

    def __init__(self, K=64, N=64):
        super().__init__()
        torch.manual_seed(0)
        q = quantize(torch.randn(N, K), MXFP4)
        self.register_buffer("w", q.qdata)
        self.register_buffer("s", q.scale)

    def forward(self, x):
        sc = torch.exp2(self.s.float() - 127)  # fp32: byte 0 -> 2^-127, byte 255 -> inf
        w = (_decode_e2m1(self.w).reshape(self.w.shape[0], -1, 32) * sc.unsqueeze(-1)).reshape(self.w.shape[0], -1)
        return x @ w.to(x.dtype).t()


class CompressedTensorsNvfp4(torch.nn.Module):
    """NVFP4 w4a16 as compressed-tensors dequantizes it: v * (s / weight_global_scale)."""

    def __init__(self, K=64, N=48):
        super().__init__()
        torch.manual_seed(1)
        q = quantize(torch.randn(N, K), NVFP4)
        self.register_buffer("w", q.qdata)
        self.register_buffer("s", q.scale)
        self.register_buffer("gs", torch.tensor(448.0 * 6.0 / 2.7))

    def forward(self, x):
        v = _decode_e2m1(self.w).reshape(self.w.shape[0], -1, 16)
        w = (v * (self.s.float() / self.gs).unsqueeze(-1)).reshape(self.w.shape[0], -1)
        return torch.nn.functional.linear(x, w.to(x.dtype))


def _specs(code: str) -> list:
    return [json.loads(m) for m in re.findall(r"torch\.ops\.mxemu\.linear\.default\(.*'(\{.*?\})'\)", code)]


def _compile_and_check(model, expect):
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    counters.clear()
    torch._dynamo.reset()
    with _compat.inductor_caches_disabled(), torch.no_grad():
        out, code = run_and_get_code(torch.compile(model, backend="mxemu"), x)
        ref = model(x)
    code = "\n".join(code)
    assert counters["mxemu"]["semantic"] == 1, dict(counters["mxemu"])
    specs = _specs(code)
    assert len(specs) == 1 and "aten.mm" not in code, code[-3000:]
    for k, v in expect.items():
        assert specs[0][k] == v, specs[0]
    assert torch.equal(out, ref)


def test_exp2_e8m0_reader_fuses_with_inf_byte255():
    _compile_and_check(Exp2Reader(), {"weight_fmt": "mxfp4", "w_e8m0_byte255": "inf"})


def test_compressed_tensors_scale_over_global_fuses():
    _compile_and_check(CompressedTensorsNvfp4(), {"weight_fmt": "nvfp4", "w_scale_order": "s/g"})
