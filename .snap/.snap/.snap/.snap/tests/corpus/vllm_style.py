"""vLLM's torch NVFP4 emulation (re-written from nvfp4_emulation_utils as documented in
/work/shared/spec/vllm_reference.md §4; vLLM does not install on this CPU):
`break_fp4_bytes` (LUT + sign where), `dequantize_to_dtype` (fp32(e4m3) * global, dequant
direction), `ref_nvfp4_quant` (get_reciprocal zero guard, masked-assignment E2M1 rounding),
dequant `q * (s / gs)`. A dense linear as `run_nvfp4_emulations` does it, and an MoE as
vLLM's test helper `torch_moe` does it: a per-expert boolean row mask, masked assignment,
combine by view(T, k, H) * weights summed in the activation dtype; softmax top-k without
renormalization."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from emu_inductor.formats import quantize

from . import E, H, I, TOP_K, CorpusEntry, Variant, WeightVariant
from .data import gen, moe_weights, qtensor, tokens, weight

FLOAT4_E2M1_MAX = 6.0
FLOAT8_E4M3_MAX = 448.0
kE2M1ToFloat = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float32)


def break_fp4_bytes(a, dtype):
    m, n = a.shape
    a = a.flatten()
    high = (a & 0xF0) >> 4
    low = a & 0x0F
    combined = torch.stack((low, high), dim=1).flatten()
    signs = (combined & 0x08).to(torch.bool)
    abs_vals = (combined & 0x07).to(torch.long)
    kE2M1 = kE2M1ToFloat.to(device=a.device)  # the module-level table, on the weight's device
    values = kE2M1[abs_vals] * torch.where(signs, -1.0, 1.0)
    return values.reshape(m, n * 2).to(dtype=dtype)


def dequantize_to_dtype(tensor_fp4, tensor_sf, global_scale, dtype, block_size=16):
    m, packed_k = tensor_fp4.shape
    k = packed_k * 2
    tensor_f32 = break_fp4_bytes(tensor_fp4, torch.float32)
    tensor_f32 = tensor_f32.reshape(m, k // block_size, block_size)
    tensor_sf = tensor_sf.view(torch.float8_e4m3fn)
    tensor_sf_dtype = tensor_sf.to(torch.float32) * global_scale
    out = (tensor_f32 * tensor_sf_dtype.unsqueeze(-1)).reshape(m, k)
    return out.to(dtype)


def get_reciprocal(x):
    if isinstance(x, torch.Tensor):
        return 1.0 / (x + (x == 0).to(x.dtype) * 1e8)
    return 1.0 / x if x != 0 else 0.0


def cast_to_fp4(x):
    sign = torch.sign(x)
    x = torch.abs(x)
    x[(x >= 0.0) & (x <= 0.25)] = 0.0
    x[(x > 0.25) & (x < 0.75)] = 0.5
    x[(x >= 0.75) & (x <= 1.25)] = 1.0
    x[(x > 1.25) & (x < 1.75)] = 1.5
    x[(x >= 1.75) & (x <= 2.5)] = 2.0
    x[(x > 2.5) & (x < 3.5)] = 3.0
    x[(x >= 3.5) & (x <= 5.0)] = 4.0
    x[x > 5.0] = 6.0
    return x * sign


def ref_nvfp4_quant(x, global_scale, block_size):
    assert global_scale.dtype == torch.float32
    assert x.ndim == 2
    m, n = x.shape
    x = torch.reshape(x, (m, n // block_size, block_size))
    vec_max = torch.max(torch.abs(x), dim=-1, keepdim=True)[0].to(torch.float32)
    scale = global_scale * (vec_max * get_reciprocal(FLOAT4_E2M1_MAX))
    scale = torch.clamp(scale, -FLOAT8_E4M3_MAX, FLOAT8_E4M3_MAX).to(torch.float8_e4m3fn)
    scale = scale.to(torch.float32)
    output_scale = get_reciprocal(scale * get_reciprocal(global_scale))
    scaled_x = x.to(torch.float32) * output_scale
    clipped_x = torch.clamp(scaled_x, -6.0, 6.0).reshape(m, n)
    return cast_to_fp4(clipped_x), scale.squeeze(-1)


def ref_nvfp4_quant_dequant(x, global_scale, block_size=16):
    m, n = x.shape
    q, s = ref_nvfp4_quant(x, global_scale, block_size)
    out = q.reshape(m, n // block_size, block_size) * (s.unsqueeze(-1) / global_scale)
    return out.reshape(m, n).to(x.dtype)


# --- MXFP4 (vLLM's torch twin of Quark's HIP kernels, tests/quantization/reference_mxfp4.py):
# everything in the 16-bit activation dtype, on its bit patterns ------------------------


def e8m0_to_half(scale, half_dtype):
    return (2.0 ** ((scale.to(torch.int16) - 127).to(torch.float))).to(half_dtype)


def upcast_fp4_to_bf16(val):
    codes = torch.zeros(*val.shape[:-1], val.shape[-1] * 2, dtype=torch.uint8, device=val.device)
    codes[..., ::2] = val & 0x0F
    codes[..., 1::2] = (val >> 4) & 0x0F
    c = codes.to(torch.int32)
    sign, e, m = c >> 3, (c >> 1) & 3, c & 1
    exp = torch.where(e == 0, m * 126, e - 1 + 127)  # b0001 is 0.5 = 2^-1, b0000 is 0
    mant = torch.where(e == 0, torch.zeros_like(m), m << 6)
    return ((sign << 15) | (exp << 7) | mant).to(torch.uint16).view(torch.bfloat16)


def dq_mxfp4_torch(x, scale, float_dtype=torch.bfloat16):
    v = upcast_fp4_to_bf16(x).reshape(*x.shape[:-1], -1, 32)
    return (v * e8m0_to_half(scale, torch.bfloat16)[..., None]).reshape(*x.shape[:-1], -1).to(float_dtype)


def bf16_to_fp4_simulate(v):
    """RNE to E2M1 on bf16 bits: significand shifted by the E2M1 step's exponent."""
    b = v.view(torch.int16).to(torch.int32) & 0xFFFF
    sign, exp, mant = b >> 15, (b >> 7) & 0xFF, b & 0x7F
    sig = torch.where(exp > 0, mant | 0x80, mant)
    e = torch.where(exp > 0, exp - 127, torch.full_like(exp, -126))
    k = e.clamp(min=0) - 1  # E2M1 step 2^k: 0.5 below 2, 1 in [2, 4), 2 from 4
    shift = (6 + e.clamp(min=0) - e).clamp(max=15)
    r = sig >> shift
    rem = sig & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    r = r + ((rem > half) | ((rem == half) & ((r & 1) == 1))).to(torch.int32)
    out = torch.clamp(r.to(torch.float32) * torch.exp2(k.to(torch.float32)), max=6.0).to(torch.bfloat16)
    return torch.where(sign == 1, -out, out)


def qdq_mxfp4_torch(x, scale_calculation_mode="even"):
    half_dtype = x.dtype
    x = x.reshape(*x.shape[:-1], -1, 32)
    block_max = torch.max(torch.abs(x), dim=-1).values
    bits = (block_max.view(torch.int16).to(torch.int32) & 0xFFFF) + (1 << 5)  # round to 1 mantissa bit
    block_max = (bits & (0x1FF << 7)).to(torch.uint16).view(half_dtype)
    scale_exp = 127 + torch.floor(torch.log2(block_max.float())).clamp(min=-300).to(torch.int32) - 2
    scale = (2.0 ** (torch.clamp(scale_exp, 0, 254) - 127)).to(half_dtype)
    x = x / scale[..., None]
    x_fp4 = bf16_to_fp4_simulate(x) * scale[..., None]
    return x_fp4.reshape(*x_fp4.shape[:-2], -1)


class VllmMXFP4Linear(nn.Module):
    """vLLM's OCP-MX emulation of w_mxfp4_a_mxfp4 for a linear: dequant the weight to the
    activation dtype, QDQ the activation, plain matmul."""

    def __init__(self, w):
        super().__init__()
        q = quantize(w, "mxfp4", scale_mode="even")
        self.register_buffer("weight", q.qdata)
        self.register_buffer("weight_scale", q.scale)

    def act_qdq(self, x):
        return qdq_mxfp4_torch(x)

    def dequantized_weights(self, dtype=torch.bfloat16):
        return {"weight": dq_mxfp4_torch(self.weight, self.weight_scale, dtype)}

    def forward(self, x):
        return F.linear(qdq_mxfp4_torch(x), dq_mxfp4_torch(self.weight, self.weight_scale, x.dtype))

    def emu_view(self):
        return {"weight": qtensor("mxfp4", self.weight, self.weight_scale)}


def _checkpoint(w, gs_quant_dir):
    q = quantize(w, "nvfp4", recipe="vllm", global_scale=gs_quant_dir)
    return q.qdata, q.scale


class VllmNVFP4Linear(nn.Module):
    def __init__(self, w, x_calib):
        super().__init__()
        wgs = 2688.0 / w.abs().amax().float()
        packed, scale = _checkpoint(w, wgs)
        self.register_buffer("weight_packed", packed)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_global_scale", 1.0 / wgs)  # vLLM keeps the dequant direction
        self.register_buffer("input_global_scale", 2688.0 / x_calib.abs().amax().float())

    def act_qdq(self, x):
        return ref_nvfp4_quant_dequant(x, self.input_global_scale, 16)

    def dequantized_weights(self, dtype=torch.bfloat16):
        return {"weight": dequantize_to_dtype(self.weight_packed, self.weight_scale, self.weight_global_scale, dtype)}

    def forward(self, x):
        w = dequantize_to_dtype(self.weight_packed, self.weight_scale, self.weight_global_scale, x.dtype)
        return F.linear(self.act_qdq(x), w)

    def emu_view(self):
        return {"weight": qtensor("nvfp4", self.weight_packed, self.weight_scale, self.weight_global_scale),
                "a1_global": self.input_global_scale}


class VllmNVFP4MoE(nn.Module):
    def __init__(self, router, w13, w2, x_calib):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False, dtype=router.dtype)
        self.gate.weight.data.copy_(router)
        for name, w in (("w13", w13), ("w2", w2)):
            gs = 2688.0 / w.abs().amax(dim=(1, 2)).float()  # per expert
            parts = [_checkpoint(w[e], gs[e]) for e in range(E)]
            self.register_buffer(name, torch.stack([p[0] for p in parts]))
            self.register_buffer(name + "_scale", torch.stack([p[1] for p in parts]))
            self.register_buffer(name + "_alpha", 1.0 / gs)
        amax = x_calib.abs().amax().float()
        self.register_buffer("a1_gscale", 2688.0 / amax)
        self.register_buffer("a2_gscale", 2688.0 / (amax / 4))

    def route(self, x):
        score = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        return torch.topk(score, TOP_K)

    def act_qdq(self, x):
        return ref_nvfp4_quant_dequant(x, self.a1_gscale, 16)

    def dequantized_weights(self, dtype=torch.bfloat16):
        return {n: torch.stack([dequantize_to_dtype(getattr(self, n)[e], getattr(self, n + "_scale")[e],
                                                     getattr(self, n + "_alpha")[e], dtype) for e in range(E)])
                for n in ("w13", "w2")}

    def forward(self, a):
        B, D = a.shape
        topk_weight, topk_ids = self.route(a)
        a = a.view(B, -1, D).repeat(1, TOP_K, 1).reshape(-1, D)
        out = torch.zeros(B * TOP_K, H, dtype=a.dtype, device=a.device)
        topk_weight = topk_weight.view(-1)
        topk_ids = topk_ids.view(-1)
        a1 = ref_nvfp4_quant_dequant(a, self.a1_gscale, 16)
        for i in range(E):
            mask = topk_ids == i
            w1 = dequantize_to_dtype(self.w13[i], self.w13_scale[i], self.w13_alpha[i], a.dtype)
            w2 = dequantize_to_dtype(self.w2[i], self.w2_scale[i], self.w2_alpha[i], a.dtype)
            h = a1[mask] @ w1.transpose(0, 1)
            d = h.shape[-1] // 2
            h = F.silu(h[..., :d]) * h[..., d:]
            out[mask] = ref_nvfp4_quant_dequant(h, self.a2_gscale, 16) @ w2.transpose(0, 1)
        return (out.view(B, -1, H) * topk_weight.view(B, -1, 1).to(out.dtype)).sum(dim=1)

    def emu_view(self):
        return {"w13": qtensor("nvfp4", self.w13, self.w13_scale, self.w13_alpha),
                "w2": qtensor("nvfp4", self.w2, self.w2_scale, self.w2_alpha),
                "a1_global": self.a1_gscale, "a2_global": self.a2_gscale}


def make_linear(seed, dtype):
    g = gen(seed)
    m = VllmNVFP4Linear(weight(g, 2 * I, H, dtype=dtype), tokens(seed + 50, 8, H, dtype))
    return m, (tokens(seed, 5, H, dtype),)


def make_mx_linear(seed, dtype):
    g = gen(seed)
    return VllmMXFP4Linear(weight(g, 2 * I, H, dtype=dtype)), (tokens(seed, 5, H, dtype),)


def make_moe(seed, dtype):
    g = gen(seed)
    m = VllmNVFP4MoE(*moe_weights(g, E, H, I, dtype),
                     tokens(seed + 50, 8, H, dtype))
    return m, (tokens(seed, 5, H, dtype),)


_SRC = "rewritten: vLLM nvfp4_emulation_utils torch path (ref_nvfp4_quant, dequantize_to_dtype, break_fp4_bytes)"
ENTRIES = [
    CorpusEntry(
        "vllm_nvfp4_linear", "linear", "vllm", _SRC,
        Variant(WeightVariant("nvfp4", "q*(s*a)"),
                act={"fmt": "nvfp4", "recipe": "vllm_torch"}, act_global="static"),
        make_linear, dtypes=(torch.bfloat16, torch.float32), expect_fused=True,
        fused_today="one mxemu::linear with the activation QDQ: the traced vllm_lut weight pattern fuses the GEMM "
                    "weight-only, then the semantic family proves the QDQ (NVFP4 recipe vllm_torch: vllm_ref with "
                    "the zero sign of sign(y) * R(|y|)) and takes it into the op; bf16 and fp32",
    ),
    CorpusEntry(
        "vllm_mxfp4_linear", "linear", "vllm",
        "rewritten: vLLM tests/quantization/reference_mxfp4.py (qdq_mxfp4_torch / dq_mxfp4_torch, the torch "
        "twin of Quark's HIP kernels that vLLM's OCP-MX emulation calls), bf16 bit arithmetic",
        Variant(WeightVariant("mxfp4", "q*2^e", e8m0_byte255="inf"),
                act={"fmt": "mxfp4", "scale_mode": "even"}),
        make_mx_linear,
        fused_today="mxemu::linear weight-only (the zeros buffer + slice writes of upcast_fp4_to_bf16 are "
                    "accepted); the activation QDQ differs from every variant on a block whose amax is the dtype "
                    "max: its 1-mantissa-bit round-up overflows to Inf and int32(floor(log2(inf))) is undefined "
                    "(x86 gives INT_MIN: scale 2^-127, outputs 6*2^-127), so it is left as written",
    ),
    CorpusEntry(
        "vllm_nvfp4_moe", "moe", "vllm", _SRC + ", tests torch_moe",
        Variant(WeightVariant("nvfp4", "q*(s*a)"),
                act={"fmt": "nvfp4", "recipe": "vllm_ref", "signed_zero": "lt0"}, act_global="static"),
        make_moe, compile_note="boolean-mask row selection a1[mask] / out[mask] = ... is data-dependent "
                               "(measured: 5 graphs, 17-33 s, no fusion: each expert's GEMM lands in another "
                               "graph than its dequant); left out of the compile test for time",
        fused_today="default config: nothing. With the capture flags: one graph; 8 mxemu::linear (one per expert "
                    "and GEMM: each dequantizes w13[i] of the packed bytes, the traced vllm_lut pattern), "
                    "weight-only, grouped by semantic_group into two mxemu::grouped_mm; no mxemu::moe: semantic_loop_moe "
                    "refuses it because GEMM2's activation QDQ is written per expert and semantic_group (unlike "
                    "semantic_loop) does not take a per-expert QDQ into the grouped GEMM; and even then its combine "
                    "(bf16 product with the bf16-rounded weights, summed over view(T, k, H) in bf16) differs from "
                    "mxemu::moe's fp32 sum: verified by the body proof on the same plumbing (repeated rows, boolean "
                    "mask, masked assignment) over a dequantized stack with a proven per-expert QDQ, where both "
                    "QDQs go into the GEMMs: 351 of 1024 values differ on a probe routing; measured bf16 2026-12-02",
        compile_smoke=False,
        plumbing="repeat rows, per-expert boolean mask, masked assignment, view(T,k,H)*w summed in bf16; no renorm",
    ),
]
