"""Respellings of the same math that a semantic matcher must fuse: each entry changes one
slot of an MXFP4 w4a4 linear (floor scale, RNE; base = stack unpack, 8-entry LUT + sign
where, exp2 scale, exponent bits, x / 2^e, where-chain rounding) or one piece of vLLM's
NVFP4 torch QDQ, or the gate/up split of an MoE. All are bit-identical to the named
emu_inductor variant on every input of the stated dtype (the eager tests check it)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from emu_inductor.formats import quantize

from . import E, H, I, TOP_K, CorpusEntry, Variant, WeightVariant
from . import vllm_style as V
from .data import gen, moe_weights, qtensor, tokens, weight
from .spellings import (EMAX, SpelledMXLinear, apply_div, decode_lut8_where, exp_frexp, round_where_chain,
                        unpack_stack, wscale_exp2)

MX_FLOOR = Variant(WeightVariant("mxfp4"), act={"fmt": "mxfp4", "scale_mode": "floor"})


def _spelled(**slots):
    def make(seed, dtype):
        g = gen(seed)
        return SpelledMXLinear(weight(g, 2 * I, H, dtype=dtype), **slots), (tokens(seed, 5, H, dtype),)
    return make


def _entry(name, what, dtypes=(torch.bfloat16, torch.float32), smoke=True, **slots):
    # the linear respellings give a NaN block for a NaN/Inf amax, as the floor variant does
    # (spellings.NONFINITE); without that guard the same code is no variant on such blocks
    # and is left unfused (tests/test_semantic_respellings.py)
    return CorpusEntry(f"resp_{name}", "linear", "respelling", f"written here: {what}", MX_FLOOR,
                       _spelled(nonfinite="nan", **slots), dtypes=dtypes, compile_smoke=smoke, expect_fused=True,
                       fused_today="one mxemu::linear with the activation QDQ (semantic; mxfp4 floor, rne), bf16 "
                                   "and fp32, 2-8 s per compile")


# --- NVFP4: vLLM's torch QDQ with one piece respelled ----------------------------------


def cast_to_fp4_where(x):
    a = x.abs()
    q = torch.where(a <= 0.25, 0.0, torch.where(a < 0.75, 0.5, torch.where(a <= 1.25, 1.0, torch.where(
        a < 1.75, 1.5, torch.where(a <= 2.5, 2.0, torch.where(a < 3.5, 3.0, torch.where(a <= 5.0, 4.0, 6.0)))))))
    return torch.copysign(q, x)


def reciprocal_where(t):
    return torch.where(t == 0, torch.full_like(t, 1e-8), 1.0 / t)


def nvfp4_qdq_respelled(x, gs, block=16):
    m, n = x.shape
    xb = x.reshape(m, n // block, block)
    vmax = xb.abs().amax(dim=-1, keepdim=True).float()
    s = torch.clamp(gs * (vmax * (1.0 / 6.0)), -448.0, 448.0).to(torch.float8_e4m3fn).float()
    inv = reciprocal_where(s * reciprocal_where(gs))
    q = cast_to_fp4_where(torch.clamp(xb.float() * inv, -6.0, 6.0))
    return (q * (s / gs)).reshape(m, n).to(x.dtype)


class RespelledVllmLinear(V.VllmNVFP4Linear):
    def act_qdq(self, x):
        return nvfp4_qdq_respelled(x, self.input_global_scale)

    def dequantized_weights(self, dtype=torch.bfloat16):  # LUT of 16 signed values instead of LUT * where
        p = self.weight_packed
        lut = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                           device=p.device)
        codes = torch.stack([p & 0xF, p >> 4], -1).flatten(-2).long()
        v = lut[codes].reshape(p.shape[0], -1, 16)
        s = self.weight_scale.float() * self.weight_global_scale
        return {"weight": (v * s.unsqueeze(-1)).reshape(p.shape[0], -1).to(dtype)}

    def forward(self, x):
        return F.linear(self.act_qdq(x), self.dequantized_weights(x.dtype)["weight"])


def make_vllm_resp(seed, dtype):
    g = gen(seed)
    m = RespelledVllmLinear(weight(g, 2 * I, H, dtype=dtype), tokens(seed + 50, 8, H, dtype))
    return m, (tokens(seed, 5, H, dtype),)


# --- MoE: emu_inductor's own reference skeleton, gate/up by chunk(2, -1) --------------


class ChunkedMXMoE(nn.Module):
    """argsort + index_add counts + cumsum offsets, torch._grouped_mm, chunk(2, -1) split,
    scatter back, view(T, k, H) weighted fp32 sum: the reference skeleton but for chunk."""

    def __init__(self, router, w13, w2, **slots):
        super().__init__()
        self.router = nn.Linear(H, E, bias=False, dtype=router.dtype)
        self.router.weight.data.copy_(router)
        self.lin13 = SpelledMXLinear(w13.reshape(E * 2 * I, H), **slots)
        self.lin2 = SpelledMXLinear(w2.reshape(E * H, I), **slots)

    def route(self, x):
        w, ids = torch.topk(torch.softmax(self.router(x).float(), dim=-1), TOP_K, dim=-1)
        return w / w.sum(-1, keepdim=True), ids.to(torch.int32)

    def act_qdq(self, x):
        return self.lin13.act_qdq(x)

    def dequantized_weights(self, dtype=torch.bfloat16):
        return {"w13": self.lin13.dequantized_weights(dtype)["weight"].reshape(E, 2 * I, H),
                "w2": self.lin2.dequantized_weights(dtype)["weight"].reshape(E, H, I)}

    def forward(self, x):
        T = x.shape[0]
        w, ids = self.route(x)
        W = self.dequantized_weights(x.dtype)
        key = ids.reshape(-1).long()
        order = torch.argsort(key, stable=True)
        counts = torch.zeros(E, dtype=torch.int32, device=x.device).index_add(
            0, key, torch.ones_like(key, dtype=torch.int32))
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        rows = x.repeat_interleave(TOP_K, dim=0)[order]
        c1 = torch._grouped_mm(self.lin13.act_qdq(rows), W["w13"].transpose(-2, -1), offs=offs)
        gate, up = c1.chunk(2, dim=-1)
        c3 = torch._grouped_mm(self.lin2.act_qdq(F.silu(gate) * up), W["w2"].transpose(-2, -1), offs=offs)
        y = torch.empty_like(c3)
        y[order] = c3
        return (y.reshape(T, TOP_K, H).float() * w.unsqueeze(-1)).sum(dim=1).to(x.dtype)

    def emu_view(self):
        v13, v2 = self.lin13.emu_view()["weight"], self.lin2.emu_view()["weight"]
        return {"w13": qtensor("mxfp4", v13.qdata.reshape(E, 2 * I, -1), v13.scale.reshape(E, 2 * I, -1)),
                "w2": qtensor("mxfp4", v2.qdata.reshape(E, H, -1), v2.scale.reshape(E, H, -1))}


def make_chunk_moe(seed, dtype, **slots):
    g = gen(seed)
    m = ChunkedMXMoE(*moe_weights(g, E, H, I, dtype),
                     **slots)
    return m, (tokens(seed, 5, H, dtype),)


# --- MoE: torchtitan's token routing over 3-d packed experts ----------------------------


def mx_dequant_experts(q, s, dtype):
    """[E, N, K/2] codes, [E, N, K/32] E8M0 bytes -> [E, N, K] (stack unpack, LUT + sign where, exp2)."""
    v = decode_lut8_where(unpack_stack(q)).reshape(*s.shape, 32) * wscale_exp2(s).unsqueeze(-1)
    return v.reshape(*q.shape[:-1], -1).to(dtype)


def mx_qdq_rows(x):
    """MXFP4 floor/RNE QDQ of [R, K] rows: frexp exponent, x / 2^e, where-chain rounding; a
    block holding NaN or Inf becomes NaN (as the variant's does)."""
    xb = x.reshape(x.shape[0], -1, 32)
    amax = xb.abs().amax(dim=-1, keepdim=True).float()
    e = (exp_frexp(amax) - EMAX).clamp(-127, 127)
    q = round_where_chain(apply_div(xb.float(), e))
    s = torch.where(torch.isfinite(amax), torch.exp2(e.float()), torch.nan)
    return (q * s).reshape(x.shape).to(x.dtype)


class TitanSortedMXMoE(nn.Module):
    """torchtitan's token routing: argsort of the flat expert ids, scatter_add_ counts and
    cumsum offsets, rows x[order // k]; torch._grouped_mm over experts held as 3-d packed
    MXFP4 [E, N, K/2]; chunk(2, -1); router-weighted rows index_add_ into fp32."""

    def __init__(self, router, w13, w2):
        super().__init__()
        self.router = nn.Linear(H, E, bias=False, dtype=router.dtype)
        self.router.weight.data.copy_(router)
        q13, q2 = quantize(w13, "mxfp4", scale_mode="floor"), quantize(w2, "mxfp4", scale_mode="floor")
        self.register_buffer("w13", q13.qdata)
        self.register_buffer("w13_scale", q13.scale)
        self.register_buffer("w2", q2.qdata)
        self.register_buffer("w2_scale", q2.scale)

    def route(self, x):
        w, ids = torch.topk(torch.softmax(self.router(x).float(), dim=-1), TOP_K, dim=-1)
        return w / w.sum(-1, keepdim=True), ids

    def act_qdq(self, x):
        return mx_qdq_rows(x)

    def dequantized_weights(self, dtype=torch.bfloat16):
        return {"w13": mx_dequant_experts(self.w13, self.w13_scale, dtype),
                "w2": mx_dequant_experts(self.w2, self.w2_scale, dtype)}

    def forward(self, x):
        T = x.shape[0]
        w, ids = self.route(x)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
        offs = torch.cumsum(counts, dim=0).to(torch.int32)
        tok = order // TOP_K
        W = self.dequantized_weights(x.dtype)
        h = torch._grouped_mm(mx_qdq_rows(x[tok]), W["w13"].transpose(-2, -1), offs=offs)
        gate, up = h.chunk(2, dim=-1)
        y = torch._grouped_mm(mx_qdq_rows(F.silu(gate) * up), W["w2"].transpose(-2, -1), offs=offs)
        out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
        out.index_add_(0, tok, y.float() * w.reshape(-1)[order].unsqueeze(-1))
        return out.to(x.dtype)

    def emu_view(self):
        return {"w13": qtensor("mxfp4", self.w13, self.w13_scale), "w2": qtensor("mxfp4", self.w2, self.w2_scale)}


def make_titan_moe(seed, dtype):
    g = gen(seed)
    return TitanSortedMXMoE(*moe_weights(g, E, H, I, dtype)), (tokens(seed, 5, H, dtype),)


ENTRIES = [
    _entry("unpack_strided", "nibbles into out[..., 0::2] / out[..., 1::2]", unpack="strided"),
    _entry("unpack_repeat_shift", "repeat_interleave(2) >> (arange % 2) * 4", unpack="repeat_shift"),
    _entry("decode_lut16", "16-entry signed LUT indexed by the code", decode="lut16"),
    _entry("decode_bits", "(1 + m/2) * 2^(e-1), subnormal m/2, sign by where", decode="bits"),
    _entry("decode_fp32_bits", "code bits placed in an fp32 pattern, times 2^126 (Quark style)", decode="fp32_bits"),
    _entry("wscale_ldexp", "E8M0 byte by ldexp(1, u - 127) instead of exp2", wscale="ldexp"),
    _entry("e8m0_frexp", "block exponent by torch.frexp(amax).exponent - 1", scale_exp="frexp"),
    _entry("e8m0_floor_log2", "block exponent by floor(log2(amax)) in fp32 (exact for bf16-valued amax only)",
           dtypes=(torch.bfloat16,), scale_exp="floor_log2"),
    # was near_floor_log2_fp32: on fp32 inputs an amax one ulp below 2^k gets exponent k, which
    # is not the floor variant but is formats' floor_log2 (log2 rounded in the input dtype,
    # microxcaling's rule); measured: fused as floor_log2 in fp32, as floor in bf16
    CorpusEntry("resp_e8m0_floor_log2_fp32", "linear", "respelling",
                "written here: block exponent by floor(log2(amax)) in fp32 on fp32 inputs (= scale_mode floor_log2)",
                Variant(WeightVariant("mxfp4"), act={"fmt": "mxfp4", "scale_mode": "floor_log2"}),
                _spelled(nonfinite="nan", scale_exp="floor_log2"), dtypes=(torch.float32,), expect_fused=True,
                fused_today="one mxemu::linear with the activation QDQ: floor_log2 in fp32; in bf16 (the compile "
                            "test's dtype) the same code is the floor variant"),
    _entry("apply_mul_recip", "x * (1 / 2^e) instead of x / 2^e (bit-equal: power of two)", apply="mul_recip"),
    _entry("apply_ldexp", "torch.ldexp(x, -e)", apply="ldexp"),
    _entry("round_bucketize", "torch.bucketize over the E2M1 midpoints plus an even-tie fix", round="bucketize"),
    _entry("round_torch_round", "torch.round (RNE) on the value divided by its E2M1 step", round="torch_round"),
    _entry("all_slots", "strided unpack, bit decode, ldexp scale, frexp exponent, ldexp apply, bucketize",
           unpack="strided", decode="bits", wscale="ldexp", scale_exp="frexp", apply="ldexp",
           round="bucketize"),
    CorpusEntry(
        "resp_vllm_nvfp4_where", "linear", "respelling",
        "written here: vLLM's torch NVFP4 QDQ with a torch.where chain + copysign instead of masked "
        "assignment * sign, where() reciprocal guard, a 16-entry signed LUT for weights",
        Variant(WeightVariant("nvfp4", "q*(s*a)"), act={"fmt": "nvfp4", "recipe": "vllm_ref"}, act_global="static"),
        make_vllm_resp, dtypes=(torch.bfloat16, torch.float32), expect_fused=True,
        fused_today="one mxemu::linear with the NVFP4 vllm_ref activation QDQ (semantic), bf16 and fp32",
    ),
    CorpusEntry(
        "resp_moe_chunk", "moe", "respelling",
        "written here: emu_inductor's reference MoE skeleton with gate/up by chunk(2, -1) (issue 8: loses mxemu::moe)",
        MX_FLOOR, make_chunk_moe,
        plumbing="argsort + index_add counts/cumsum + torch._grouped_mm, chunk(2), scatter back, view(T,k,H) fp32 sum",
        fused_today="two mxemu::grouped_mm, weight-only (semantic): the experts' [E*N, K/2] / [E*N, K/32] bytes are "
                    "read as [E, N, ..] through a reshape; its activation QDQ (SpelledMXLinear: exponent bits of a "
                    "NaN amax, clamped) gives -0.0 where every known variant gives NaN ('NaN in a normal block'), "
                    "so the QDQ stays in the graph and the whole layer is not one mxemu::moe",
    ),
    CorpusEntry(
        "resp_moe_titan", "moe", "respelling",
        "written here: torchtitan's MoE token routing (argsort, scatter_add_ counts, cumsum offsets, x[order // k]) "
        "over 3-d packed MXFP4 experts, frexp + where-chain QDQ, index_add_ combine in fp32",
        MX_FLOOR, make_titan_moe, expect_fused=True, fused_today="mxemu::moe (semantic_moe)",
        plumbing="argsort + scatter_add_ counts/cumsum + x[order // k] + torch._grouped_mm, chunk(2), index_add_ fp32",
    ),
]
