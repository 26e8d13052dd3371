"""microsoft/microxcaling's MX quantizer, re-written (not on PyPI): `_quantize_mx` Python
path — block amax and `floor(log2(amax + FP32_MIN_NORMAL * (amax == 0)))` in the input
dtype, minus emax, NaN above 127 / clamp below -127, `A / 2**shared_exp`,
`_quantize_elemwise_core` (private exponent by floor(log2|A|), shift, round "nearest" =
sign * floor(|A| + 0.5) or "even", shift back, saturate), `A * 2**shared_exp`.
A linear with round="even" (the MX spec rounding) and an MoE with the
default round="nearest" computed densely over all experts (bmm over the expert axis) and
combined through a dense [T, E] routing matrix built with scatter."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from emu_inductor.formats import quantize

from . import E, H, I, TOP_K, CorpusEntry, Variant, WeightVariant
from .data import gen, moe_weights, qtensor, tokens, weight

FP32_MIN_NORMAL = 2 ** (-126)
# ElemFormat.fp4: ebits, mbits (sign and implicit bit included), emax, max_norm
FP4_PARAMS = (2, 3, 2, 6.0)
# mx/formats.py _get_format_params for the other MX elements, by emu_inductor format name
ELEM_PARAMS = {"mxfp4": FP4_PARAMS, "mxfp6_e2m3": (2, 5, 2, 7.5), "mxfp6_e3m2": (3, 4, 4, 28.0),
               "mxfp8_e4m3": (4, 5, 8, 448.0), "mxfp8_e5m2": (5, 4, 15, 57344.0)}


def _round_mantissa(A, round="nearest"):
    if round == "even":
        absA = torch.abs(A)
        maskA = ((absA - 0.5) % 2 == torch.zeros_like(A)).type(A.dtype)
        return torch.sign(A) * (torch.floor(absA + 0.5) - maskA)
    return torch.sign(A) * torch.floor(torch.abs(A) + 0.5)


def _quantize_elemwise_core(A, bits, exp_bits, max_norm, round="nearest", saturate_normals=True):
    private_exp = torch.floor(torch.log2(torch.abs(A) + (A == 0).type(A.dtype)))
    min_exp = -(2 ** (exp_bits - 1)) + 2
    private_exp = private_exp.clip(min=min_exp)
    out = A * (2 ** (bits - 2)) / (2 ** private_exp)
    out = _round_mantissa(out, round)
    out = out / (2 ** (bits - 2)) * (2 ** private_exp)
    if saturate_normals:
        out = torch.clamp(out, min=-max_norm, max=max_norm)
    return out


def _shared_exponents(A, axis):
    shared_exp = torch.max(torch.abs(A), dim=axis, keepdim=True)[0]
    return torch.floor(torch.log2(shared_exp + FP32_MIN_NORMAL * (shared_exp == 0).type(shared_exp.dtype)))


def _quantize_mx(A, scale_bits=8, block_size=32, round="nearest", params=FP4_PARAMS):
    ebits, mbits, emax, max_norm = params
    shape = A.shape
    A = A.reshape(*shape[:-1], shape[-1] // block_size, block_size)
    shared_exp = _shared_exponents(A, -1) - emax
    scale_emax = 2 ** (scale_bits - 1) - 1
    shared_exp = torch.where(shared_exp > scale_emax, torch.full_like(shared_exp, float("nan")), shared_exp)
    shared_exp = torch.where(shared_exp < -scale_emax, torch.full_like(shared_exp, -scale_emax), shared_exp)
    A = A / (2 ** shared_exp)
    A = _quantize_elemwise_core(A, mbits, ebits, max_norm, round=round)
    A = A * (2 ** shared_exp)
    return A.reshape(shape)


def _mx_weight(w):
    q = quantize(w, "mxfp4", scale_mode="floor")
    return q.qdata, q.scale


def dequant_mxfp4(packed, scale_u8, dtype):
    """Values and E8M0 exponents as microxcaling's users keep them: an E2M1 table per nibble."""
    table = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                         device=packed.device)
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2).long()
    v = table[codes].reshape(*scale_u8.shape, 32)
    s = torch.exp2(scale_u8.float() - 127.0)
    s = torch.where(scale_u8 == 255, torch.full_like(s, float("nan")), s)
    return (v * s.unsqueeze(-1)).reshape(*packed.shape[:-1], -1).to(dtype)


class MXLinear(nn.Module):
    def __init__(self, w, round="even"):
        super().__init__()
        self.round = round
        for name, t in zip(("weight_q", "weight_e8m0"), _mx_weight(w)):
            self.register_buffer(name, t)

    def act_qdq(self, x):
        return _quantize_mx(x, round=self.round)

    def dequantized_weights(self, dtype=torch.bfloat16):
        return {"weight": dequant_mxfp4(self.weight_q, self.weight_e8m0, dtype)}

    def forward(self, x):
        return F.linear(self.act_qdq(x), dequant_mxfp4(self.weight_q, self.weight_e8m0, x.dtype))

    def emu_view(self):
        return {"weight": qtensor("mxfp4", self.weight_q, self.weight_e8m0)}


class MXDenseMoE(nn.Module):
    def __init__(self, router, w13, w2, round="nearest"):
        super().__init__()
        self.round = round
        self.router = nn.Linear(H, E, bias=False, dtype=router.dtype)
        self.router.weight.data.copy_(router)
        for name, t in zip(("w13_q", "w13_e8m0", "w2_q", "w2_e8m0"), (*_mx_weight(w13), *_mx_weight(w2))):
            self.register_buffer(name, t)

    def route(self, x):
        w, ids = torch.topk(torch.softmax(self.router(x).float(), dim=-1), TOP_K, dim=-1)
        return w / w.sum(-1, keepdim=True), ids

    def act_qdq(self, x):
        return _quantize_mx(x, round=self.round)

    def dequantized_weights(self, dtype=torch.bfloat16):
        return {"w13": dequant_mxfp4(self.w13_q, self.w13_e8m0, dtype),
                "w2": dequant_mxfp4(self.w2_q, self.w2_e8m0, dtype)}

    def forward(self, x):
        T = x.shape[0]
        w, ids = self.route(x)
        dense = torch.zeros(T, E, dtype=torch.float32, device=x.device).scatter(1, ids, w)  # [T, E]
        w13 = dequant_mxfp4(self.w13_q, self.w13_e8m0, x.dtype)
        w2 = dequant_mxfp4(self.w2_q, self.w2_e8m0, x.dtype)
        xe = self.act_qdq(x).unsqueeze(0).expand(E, T, H)
        h = torch.bmm(xe, w13.transpose(1, 2))  # [E, T, 2I]
        g, u = h.chunk(2, dim=-1)
        h = self.act_qdq(F.silu(g) * u)
        y = torch.bmm(h, w2.transpose(1, 2))  # [E, T, H]
        out = (y.float() * dense.t().unsqueeze(-1)).sum(dim=0)
        return out.to(x.dtype)

    def emu_view(self):
        return {"w13": qtensor("mxfp4", self.w13_q, self.w13_e8m0), "w2": qtensor("mxfp4", self.w2_q, self.w2_e8m0)}


def make_linear(seed, dtype):
    g = gen(seed)
    return MXLinear(weight(g, 2 * I, H, dtype=dtype)), (tokens(seed, 5, H, dtype),)


def make_moe(seed, dtype):
    g = gen(seed)
    m = MXDenseMoE(*moe_weights(g, E, H, I, dtype))
    return m, (tokens(seed, 5, H, dtype),)


_SRC = "rewritten: microxcaling mx/mx_ops.py _quantize_mx, mx/elemwise_ops.py _quantize_elemwise_core (Python path)"
# formats' named variants "microxcaling" / "microxcaling_even": floor_log2 scales, lt0 zeros and the
# element rounding computed in the input dtype (rounding "microxcaling_nearest" / "microxcaling_even":
# floor(RN_dtype(|a| + 0.5)), where the dtype's largest value below half the smallest subnormal rounds
# up; tests/test_formats_microxcaling.py checks them against this file on every bf16 value)
ENTRIES = [
    CorpusEntry(
        "microxcaling_mx_linear", "linear", "microxcaling", _SRC + ", round='even'",
        Variant(WeightVariant("mxfp4"), act={"fmt": "mxfp4", "variant": "microxcaling_even"}),
        make_linear, dtypes=(torch.bfloat16, torch.float32), expect_fused=True,
        fused_today="bf16 and fp32: mxemu::linear with the activation QDQ (variant microxcaling_even: "
                    "floor_log2, act_rounding microxcaling_even, act_signed_zero lt0)",
    ),
    CorpusEntry(
        "microxcaling_mx_moe", "moe", "microxcaling", _SRC + ", round='nearest' (default)",
        Variant(WeightVariant("mxfp4"), act={"fmt": "mxfp4", "variant": "microxcaling"}),
        make_moe, compile_smoke=False,
        compile_note="compiles to one graph (measured 18-25 s); left out of the compile test for time",
        fused_today="two mxemu::grouped_mm (measured bf16 2026-12-02, output equal to eager): 'semantic_bmm' "
                    "rewrites each dense bmm over [E, T, H] as a grouped GEMM with ends T, 2T, .. once the expert "
                    "decode is proven, 'semantic' fuses it; the second carries the activation QDQ (variant "
                    "microxcaling: act_rounding microxcaling_nearest, floor_log2, lt0), the first is weight-only "
                    "(its QDQ runs before the expand over E and stays as written); no mxemu::moe: dense routing "
                    "(every token through every expert, [T, E] weights) has no top-k ids for it",
        plumbing="dense over all experts: expand + bmm over E, chunk(2), dense [T,E] routing by scatter, sum over E",
    ),
]
