"""Near misses: layers one detail away from an emu_inductor variant, which a matcher must
leave alone (and explain why). Each names its nearest variant; the eager test proves a
probe separates them."""

from __future__ import annotations

import functools

import torch

from . import H, I, CorpusEntry, Variant, WeightVariant
from . import vllm_style as V
from .data import gen, tokens, weight
from .respellings import MX_FLOOR, make_chunk_moe
from .spellings import SpelledMXLinear


def _spelled(K=H, **slots):
    # NaN/Inf blocks as the floor variant gives them (spellings.NONFINITE), so the named
    # detail is the only difference
    def make(seed, dtype):
        g = gen(seed)
        m = SpelledMXLinear(weight(g, 2 * I, K, dtype=dtype), nonfinite="nan", **slots)
        return m, (tokens(seed, 5, K, dtype),)
    return make


def nvfp4_qdq_bf16_scale(x, gs, block=16):
    """vLLM's torch QDQ, but the block scale product formed in bf16 (the activation dtype)."""
    m, n = x.shape
    xb = x.reshape(m, n // block, block)
    vmax = xb.abs().amax(dim=-1, keepdim=True)
    s = (gs.to(x.dtype) * (vmax * (1.0 / 6.0))).float()
    s = torch.clamp(s, -448.0, 448.0).to(torch.float8_e4m3fn).float()
    inv = V.get_reciprocal(s * V.get_reciprocal(gs))
    q = V.cast_to_fp4(torch.clamp(xb.float() * inv, -6.0, 6.0).reshape(m, n))
    return (q.reshape(m, n // block, block) * (s / gs)).reshape(m, n).to(x.dtype)


class Bf16ScaleVllmLinear(V.VllmNVFP4Linear):
    def act_qdq(self, x):
        return nvfp4_qdq_bf16_scale(x, self.input_global_scale)


def make_bf16_scale(seed, dtype):
    g = gen(seed)
    m = Bf16ScaleVllmLinear(weight(g, 2 * I, H, dtype=dtype), tokens(seed + 50, 8, H, dtype))
    return m, (tokens(seed, 5, H, dtype),)


def _near(name, reason, make, part, variant=MX_FLOOR, kind="linear", dtypes=(torch.bfloat16,), smoke=False,
          fused_today="nothing"):
    return CorpusEntry(f"near_{name}", kind, "near-miss", "written here", variant, make, near_miss=reason,
                       near_part=part, dtypes=dtypes, compile_smoke=smoke, fused_today=fused_today)


ENTRIES = [
    _near("tie_half_up", "E2M1 ties rounded toward +inf (floor(y + 0.5)), not to even",
          _spelled(round="half_up"), "act", smoke=True),
    _near("nibble_swap", "element 2j read from the HIGH nibble (low/high swapped)",
          _spelled(unpack="swapped"), "weights", smoke=True),
    _near("block24", "activation blocks of 24 elements (weights still 32); K = 96", _spelled(K=96, block=24), "act",
          smoke=True),
    _near("emax1", "block exponent floor(log2 amax) - 1 instead of - 2 (E2M1 emax)", _spelled(emax=1), "act",
          smoke=True),
    _near("e8m0_bias128", "E8M0 weight scale decoded as 2^(u - 128)", _spelled(wscale="bias128"), "weights",
          smoke=True),
    _near("nvfp4_bf16_scale", "NVFP4 block scale gs * (amax * 1/6) computed in bf16 instead of fp32",
          make_bf16_scale, "act", smoke=True,
          fused_today="mxemu::linear with act_kind none (the vLLM weight side, correctly; the bf16-scale QDQ is left)",
          variant=Variant(WeightVariant("nvfp4", "q*(s*a)"), act={"fmt": "nvfp4", "recipe": "vllm_torch"},
                          act_global="static")),
    _near("moe_tie_half_up", "the chunk(2) reference-skeleton MoE with ties rounded toward +inf",
          functools.partial(make_chunk_moe, round="half_up"), "act", kind="moe"),
]
