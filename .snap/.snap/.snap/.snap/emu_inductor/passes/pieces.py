"""Pattern pieces shared by the built-in families: each dequant / QDQ style of the
catalogue traced once per activation dtype, the OpSpec a pair stands for, and which
pairs exist (the one table, `emu_inductor.spec.compat`).

Pieces are composed as pattern expressions by the families (`linear`, `grouped_mm`),
so adding a style costs one trace, not one per combination.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch._inductor import pattern_matcher as pm

from ..patterns.act_qdq import QDQStyle
from ..patterns.dequant import DequantStyle, example_weight, is_gate_up
from ..spec.compat import is_compatible
from ..spec.opspec import OpSpec
from .matching import meta_val
from .surgery import build_pattern
from .tracing import tracing_context

__all__ = ["spec_for", "scheme_pairs", "qdq_piece", "dequant_piece", "dequant3_piece", "dtype_kwarg", "match_val",
           "weight_arg", "variant_name", "TRACE_K", "TRACE_N", "TRACE_M", "TRACE_E"]

#: Example sizes the pieces are traced on (shape-agnostic patterns: any size matches).
TRACE_K, TRACE_N, TRACE_M, TRACE_E = 64, 32, 8, 3


def spec_for(fmt, act, fp6_layout="quark", **kw) -> OpSpec:
    return OpSpec(
        weight_fmt=fmt.name,
        act_kind="none" if act is None else act.kind,
        act_fmt=act.fmt.name if act is not None and act.fmt is not None else None,
        act_scale_mode=act.scale_mode if act is not None else None,
        act_recipe=act.recipe if act is not None else None,
        act_rounding=act.rounding if act is not None else "rne",
        fp6_layout=fp6_layout,
        **kw,
    )


def scheme_pairs(deq: DequantStyle, qdqs: list[QDQStyle]) -> list[Optional[QDQStyle]]:
    """QDQ styles to pair with a dequant style (None = weight-only), QDQ first: the pairs
    of `spec.compat` (the fused ops implement those)."""
    return [q for q in qdqs if is_compatible(deq.fmt, q.act)] + [None]


def variant_name(spec: str) -> str:
    """The activation part of an OpSpec's short name ("anvfp4-vllm", "afp8"), for pattern names."""
    return OpSpec.from_str(spec).short_name().rsplit("_", 1)[0].split("_", 1)[1]


def match_val(match, name):
    """The FakeTensor (or constant) a match bound to `name`, None if unbound."""
    n = match.kwargs.get(name)
    return meta_val(n) if isinstance(n, torch.fx.Node) else n


def weight_arg(w):
    """Packed weights as the mxemu ops take them (uint8; fp8 codes viewed as bytes)."""
    return w.view(torch.uint8) if w.dtype != torch.uint8 else w


@functools.lru_cache(maxsize=None)
def qdq_piece(style: QDQStyle, dtype: torch.dtype, rows: int = TRACE_M, K: int = TRACE_K) -> pm.PatternExpr:
    with tracing_context():
        return _qdq_piece(style, dtype, rows, K)


def _qdq_piece(style, dtype, rows, K):
    x = torch.randn(rows, K).to(dtype)
    dk = dtype_kwarg(dtype)
    if style.has_global_scale:
        return build_pattern(lambda x, a_gs: style.fn(x, a_gs), [x, torch.ones((), dtype=torch.float32)],
                                ["x", "a_gs"], dtype_kwarg=dk)
    return build_pattern(lambda x: style.fn(x, None), [x], ["x"], dtype_kwarg=dk)


def dtype_kwarg(dtype):
    """bf16 patterns are traced once and serve fp16 too: the 16-bit activation dtype is a
    KeywordArg("act_dtype") (fp32 has different structure: its casts are no-ops)."""
    return (dtype, "act_dtype") if dtype == torch.bfloat16 else None


def _deq_argnames(style: DequantStyle) -> list[str]:
    names = ["w", "w_scale"]
    if style.has_alpha:
        names.append("w_alpha")
    return names + [f"w_{e}" for e in style.extra_inputs]


@functools.lru_cache(maxsize=None)
def dequant_piece(style: DequantStyle, dtype: torch.dtype) -> pm.PatternExpr:
    with tracing_context():
        return _dequant_piece(style, dtype)


def _dequant_piece(style, dtype):
    E = TRACE_E if style.batched else None
    w, s, alpha, extras = example_weight(style, TRACE_N, TRACE_K, E)
    names = _deq_argnames(style)
    args = [w, s] + ([alpha] if style.has_alpha else []) + [extras[e] for e in style.extra_inputs]

    def fn(*a):
        kw = {e: a[len(a) - len(style.extra_inputs) + i] for i, e in enumerate(style.extra_inputs)}
        return style.fn(a[0], a[1], a[2] if style.has_alpha else None, dtype, **kw)

    return build_pattern(fn, args, names, dtype_kwarg=dtype_kwarg(dtype))



@functools.lru_cache(maxsize=None)
def dequant3_piece(style: DequantStyle, dtype: torch.dtype) -> pm.PatternExpr:
    with tracing_context():
        w, s, alpha, _ = example_weight(style, TRACE_N, TRACE_K, TRACE_E)
        if is_gate_up(style):
            alpha = torch.ones(TRACE_E, 2, dtype=torch.float32)
        names = ["w", "w_scale"] + (["w_alpha"] if style.has_alpha else [])
        args = [w, s] + ([alpha] if style.has_alpha else [])

        def fn(*a):
            return style.fn(a[0], a[1], a[2] if style.has_alpha else None, dtype)

        # bf16 traces serve fp16 too (the 16-bit dtype is a KeywordArg); fp32 traces are exact
        return build_pattern(fn, args, names,
                                dtype_kwarg=(dtype, "act_dtype") if dtype == torch.bfloat16 else None)
