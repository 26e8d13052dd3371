"""AMD Quark's torch MX path, re-written (amd-quark 0.13 installs here but `quark.torch`
does not import without onnx; its element kernel is a C++ extension): `fake_quantize_mx`
with `even_round` (fp32 bit add + mask, log2/floor/exp2), `x / scale` in fp32, the element
fake-quant of hw_emulation/csrc/mx/funcs.cuh ported to torch integer ops (RNE on the
shifted mantissa, +0.0 when the result rounds to zero, Inf/NaN passed through), `* scale`.
Weights: Quark's MXFP4 dequant (fp32 bits from the code, times 2^126; the E8M0 scale as
2 ** (u - 127), so byte 255 reads +inf). A linear (w_mxfp4_a_mxfp4, as vLLM's Quark path)
and an MoE with a per-expert Python loop over nonzero() rows and index_add_."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from emu_inductor.formats import quantize

from . import E, H, I, TOP_K, CorpusEntry, Variant, WeightVariant
from .data import gen, moe_weights, qtensor, tokens, weight

FP4_EBITS, FP4_MBITS, FP4_EMAX, FP4_MAX = 2, 1, 2, 6.0


def even_round(max_abs: torch.Tensor, mbits: int, emax: int) -> torch.Tensor:
    f32_min_normal = 2 ** (-127 + 1)
    max_abs_float32 = max_abs.to(torch.float32)
    nan_mask = torch.isnan(max_abs_float32)
    zero_mask = max_abs_float32 == 0
    as_int = max_abs_float32.view(torch.int32)
    val_to_add = 1 << (23 - mbits - 1)
    sign_exponent_mask = ((1 << (8 + 1)) - 1) << 23
    as_int = (as_int + val_to_add) & sign_exponent_mask
    out = as_int.view(torch.float32)
    out = out.masked_fill(zero_mask, f32_min_normal).masked_fill(nan_mask, float("nan"))
    return torch.exp2(torch.clamp(torch.floor(torch.log2(out)) - emax, min=-127, max=127))


def fake_quantize_to_low_precision_fp(x: torch.Tensor, ebits: int, mbits: int, max_norm: float) -> torch.Tensor:
    """funcs.cuh fake_quantize_element, elementwise on fp32 bit fields."""
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    exp = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    sign = bits >> 31
    new_bias = (1 << (ebits - 1)) - 1
    normal = exp != 0
    mant = torch.where(normal, mant | 0x800000, mant)
    mantissa_bits = 23 + normal.to(torch.int64)
    new_exp = exp - 127 + new_bias
    exp_shift = torch.where(new_exp > 0, torch.zeros_like(new_exp), 1 - new_exp)
    tail_bits = (23 - mbits + exp_shift).clamp(max=26)
    half = torch.ones_like(tail_bits) << (tail_bits - 1)
    tail = mant & ((torch.ones_like(tail_bits) << tail_bits) - 1)
    ret = mant >> tail_bits
    ret = torch.where(tail > half, ret + 1, torch.where(tail == half, ret + (ret & 1), ret))
    ret = torch.where(tail_bits > 25, torch.zeros_like(ret), ret)
    mant = ret << tail_bits
    carry = mant >= (torch.ones_like(mantissa_bits) << mantissa_bits)
    mant = torch.where(carry & normal, mant >> 1, mant)
    exp = exp + carry.to(torch.int64)
    absolute = ((exp << 23) + (mant & 0x7FFFFF)).to(torch.int32).view(torch.float32)
    absolute = torch.clamp(absolute, max=max_norm)
    out = (absolute.view(torch.int32).to(torch.int64) + (sign << 31)).to(torch.int32).view(torch.float32)
    out = torch.where(ret == 0, torch.zeros_like(out), out)
    return torch.where((bits >> 23) & 0xFF == 0xFF, x, out)


def fake_quantize_mx(input_tensor: torch.Tensor, block_size: int = 32) -> torch.Tensor:
    input_dtype = input_tensor.dtype
    shape = input_tensor.shape
    block_x = input_tensor.reshape(-1, shape[-1] // block_size, block_size)
    amax, _ = torch.max(torch.abs(block_x), dim=-1, keepdim=True)
    scale = even_round(amax, FP4_MBITS, FP4_EMAX)
    scale = scale.masked_fill(scale == 0.0, torch.finfo(torch.float32).eps)
    x = block_x.to(torch.float32) / scale
    out = fake_quantize_to_low_precision_fp(x.contiguous(), FP4_EBITS, FP4_MBITS, FP4_MAX)
    out = out * scale
    return out.reshape(shape).to(input_dtype)


def dq_mxfp4(x: torch.Tensor, scale: torch.Tensor, float_dtype: torch.dtype) -> torch.Tensor:
    lo, hi = x & 0x0F, x >> 4
    codes = torch.stack([lo, hi], dim=-1).flatten(-2).to(torch.int32)
    vals = (((codes & 0x7) << 22) | ((codes & 0x8) << 28)).view(torch.float32) * 2.0 ** 126
    s = 2 ** ((scale.to(torch.int16) - 127).to(torch.float32))
    vals = vals.reshape(*scale.shape, 32) * s.unsqueeze(-1)
    return vals.reshape(*x.shape[:-1], -1).to(float_dtype)


class QuarkMXFP4Linear(nn.Module):
    def __init__(self, w):
        super().__init__()
        q = quantize(w, "mxfp4", scale_mode="even")
        self.register_buffer("weight", q.qdata)
        self.register_buffer("weight_scale", q.scale)

    def act_qdq(self, x):
        return fake_quantize_mx(x)

    def dequantized_weights(self, dtype=torch.bfloat16):
        return {"weight": dq_mxfp4(self.weight, self.weight_scale, dtype)}

    def forward(self, x):
        return F.linear(fake_quantize_mx(x), dq_mxfp4(self.weight, self.weight_scale, x.dtype))

    def emu_view(self):
        return {"weight": qtensor("mxfp4", self.weight, self.weight_scale)}


class QuarkMXFP4MoE(nn.Module):
    def __init__(self, router, w13, w2):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False, dtype=router.dtype)
        self.gate.weight.data.copy_(router)
        for name, w in (("w13", w13), ("w2", w2)):
            q = quantize(w, "mxfp4", scale_mode="even")
            self.register_buffer(name + "_weight", q.qdata)
            self.register_buffer(name + "_weight_scale", q.scale)

    def route(self, x):
        w, ids = torch.topk(torch.softmax(self.gate(x).float(), dim=-1), TOP_K, dim=-1)
        return w / w.sum(-1, keepdim=True), ids

    def act_qdq(self, x):
        return fake_quantize_mx(x)

    def dequantized_weights(self, dtype=torch.bfloat16):
        return {n: dq_mxfp4(getattr(self, n + "_weight"), getattr(self, n + "_weight_scale"), dtype)
                for n in ("w13", "w2")}

    def forward(self, x):
        w, ids = self.route(x)
        w13 = dq_mxfp4(self.w13_weight, self.w13_weight_scale, x.dtype)
        w2 = dq_mxfp4(self.w2_weight, self.w2_weight_scale, x.dtype)
        out = torch.zeros(x.shape[0], H, dtype=torch.float32, device=x.device)
        for e in range(E):
            tok, slot = torch.nonzero(ids == e, as_tuple=True)
            h = fake_quantize_mx(x[tok]) @ w13[e].t()
            h = F.silu(h[:, :I]) * h[:, I:]
            y = fake_quantize_mx(h) @ w2[e].t()
            out.index_add_(0, tok, y.float() * w[tok, slot].unsqueeze(-1))
        return out.to(x.dtype)

    def emu_view(self):
        return {n: qtensor("mxfp4", getattr(self, n + "_weight"), getattr(self, n + "_weight_scale"))
                for n in ("w13", "w2")}


def make_linear(seed, dtype):
    g = gen(seed)
    return QuarkMXFP4Linear(weight(g, 2 * I, H, dtype=dtype)), (tokens(seed, 5, H, dtype),)


def make_moe(seed, dtype):
    g = gen(seed)
    m = QuarkMXFP4MoE(*moe_weights(g, E, H, I, dtype))
    return m, (tokens(seed, 5, H, dtype),)


_SRC = ("rewritten: amd-quark 0.13 hw_emulation_interface.fake_quantize_mx, quantization.utils.even_round, "
        "csrc/mx/funcs.cuh fake_quantize_element (read from the installed package)")
ENTRIES = [
    CorpusEntry(
        "quark_mxfp4_linear", "linear", "amd-quark", _SRC,
        Variant(WeightVariant("mxfp4", "q*2^e", e8m0_byte255="inf"),
                act={"fmt": "mxfp4", "scale_mode": "even", "signed_zero": "positive"}),
        make_linear, dtypes=(torch.bfloat16, torch.float32), expect_fused=True,
        fused_today="mxemu::linear with the activation QDQ: recognised as formats variant quark_hw (+0 where "
                    "an element rounds to zero, Inf blocks scaled by 2^127), which the kernels compute through "
                    "OpSpec act_signed_zero='positive', act_inf_amax='max'",
    ),
    CorpusEntry(
        "quark_mxfp4_moe", "moe", "amd-quark", _SRC,
        Variant(WeightVariant("mxfp4", "q*2^e", e8m0_byte255="inf"),
                act={"fmt": "mxfp4", "scale_mode": "even", "signed_zero": "positive"}),
        make_moe, compile_smoke=False,
        compile_note="default Dynamo config: nonzero() in the expert loop makes Dynamo skip the forward frame "
                     "(measured: 7 graphs, 28-51 s, no fusion: the GEMMs never share a graph with their decode); "
                     "left out of the compile test for time",
        fused_today="default config: nothing. With capture_scalar_outputs / capture_dynamic_output_shape_ops: one "
                    "graph, one mxemu::moe (tests/test_recognize_moe_loop_qdq.py): semantic_loop makes the 4+4 "
                    "per-expert F.linear over w13[e] / w2[e] two grouped GEMMs and proves fake_quantize_mx, written "
                    "per expert, the same row-local function for every expert (formats variant quark_hw), so the "
                    "grouped GEMMs carry it (w4a4); semantic_loop_moe proves the loop (nonzero rows, silu, fp32 "
                    "index_add_) mxemu::moe; equal to eager (measured bf16 2026-12-02, ~15 s to compile). Eager "
                    "cannot run an expert without rows (reshape(-1, ..) of 0 elements), the compiled layer can",
        plumbing="per-expert Python loop, nonzero(ids == e) rows, slicing gate/up, index_add_ fp32",
    ),
]
