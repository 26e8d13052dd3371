"""Pattern families for expert GEMMs and whole MoE layers (staged).

Stage 1, family "grouped_mm" (runs first): a grouped GEMM over dequantized experts,
optionally with the activation QDQ in front, becomes one `mxemu::grouped_mm`:

    _grouped_mm(QDQ(a)[order], DEQUANT(w, w_scale, w_alpha).transpose(-2, -1), offs)
    _grouped_mm(QDQ(a),        DEQUANT(...).transpose(-2, -1), offs)      (rows pre-sorted)
    _grouped_mm(a,             DEQUANT(...).transpose(-2, -1), offs)      (weight-only)
 -> mxemu::grouped_mm(a[order] | a, w, w_scale, w_alpha, offs, a_gs, spec)

A single grouped GEMM (a partial match) keeps this fused form.

Biased form (per-expert GEMM bias, `reference.moe.grouped_bias_operands`, GPT-OSS): K is
extended by a ones column + zero columns in the activations and the bias column + zero
columns in the weights, so the bf16 grouped GEMM's fp32 accumulator adds the bias before
its one rounding:

    _grouped_mm(cat([QDQ(a), ONES, ZA], 1)[order], cat([DEQ(w), bias.unsqueeze(-1), ZW], 2)
                .transpose(-2, -1), offs)
 -> mxemu::grouped_mm(a[order], w, w_scale, w_alpha, offs, a_gs, spec, bias)

The check proves the padding (`_bias_pad_reason`): ONES is a constant full(1) [R, 1] and
ZA / ZW constant full(0) blocks [R, p] / [E, N, p] of the activation dtype, the bias
[E, N] of the activation dtype; anything else stays as written (explain() says why).

Stage 2, family "moe": the MoE structure around two stage-1 GEMMs (routing prep ->
GEMM1 -> activation -> GEMM2 -> top-k combine, as `emu_inductor.patterns.moe` writes
it) becomes one `mxemu::moe`. The two GEMMs' spec strings are KeywordArgs: one pattern
per (activation, router weight on input, expert_map) serves every scheme; the check
requires both GEMMs to use the same scheme. With biased stage-1 GEMMs (both carrying a
per-expert bias) the same structure becomes `mxemu::moe(..., w13_bias, w2_bias)`.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
from torch._inductor import pattern_matcher as pm

from ..ops import library as _ops_library  # noqa: F401  (registers torch.ops.mxemu.*)
from ..spec.opspec import OpSpec
from ..patterns import checks
from ..patterns.act_qdq import fp8_static_styles, qdq_styles
from ..patterns.dequant import DequantStyle, dequant_styles, example_weight
from ..patterns.moe import TRACE_NUM_EXPERTS, moe_grouped_structure
from . import _mx_match as mx
from ..patterns import opaque as _opaque
from .linear_patterns import (_weight_arg, opaque_dequant_piece, opaque_dequant_reason, opaque_dequant_style,
                              opaque_qdq_piece, opaque_qdq_reason, opaque_qdq_style, opaque_spec_fn, qdq_piece,
                              scheme_pairs, spec_for)

log = logging.getLogger("emu_inductor.passes.moe")

aten = torch.ops.aten

__all__ = ["register_grouped_mm_patterns", "register_moe_patterns", "MOE_ACTIVATIONS"]

_K, _N, _E = 64, 32, 3


def _val(match, name):
    n = match.kwargs.get(name)
    return mx.fake(n) if isinstance(n, torch.fx.Node) else n


# --- stage 1: grouped GEMM -----------------------------------------------------------------------


def gate_up_styles() -> list[DequantStyle]:
    """NVFP4 experts with separate gate/up global scales [E, 2] (the reference's
    `dequantize_experts` expands them with repeat_interleave(N // 2, dim=1))."""
    from ..formats import FORMATS
    from ..reference.moe import dequantize_experts

    fmt = FORMATS["nvfp4"]

    def fn(w, scale, alpha, dtype):
        return dequantize_experts(w, scale, fmt, alpha, dtype)

    return [DequantStyle("reference_gate_up", fmt, fn, True, True)]


def _is_gate_up(style: DequantStyle) -> bool:
    return style.name.endswith("_gate_up")


@functools.lru_cache(maxsize=None)
def dequant3_piece(style: DequantStyle, dtype: torch.dtype) -> pm.PatternExpr:
    with mx.tracing_context():
        w, s, alpha, _ = example_weight(style, _N, _K, _E)
        if _is_gate_up(style):
            alpha = torch.ones(_E, 2, dtype=torch.float32)
        names = ["w", "w_scale"] + (["w_alpha"] if style.has_alpha else [])
        args = [w, s] + ([alpha] if style.has_alpha else [])

        def fn(*a):
            return style.fn(a[0], a[1], a[2] if style.has_alpha else None, dtype)

        # bf16 traces serve fp16 too (the 16-bit dtype is a KeywordArg); fp32 traces are exact
        return mx.build_pattern(fn, args, names,
                                dtype_kwarg=(dtype, "act_dtype") if dtype == torch.bfloat16 else None)


def _gate_up_reason(alpha, w) -> Optional[str]:
    """[E, 2] gate/up global scales: one float32 pair per expert. The matched
    repeat_interleave feeds a broadcast against the [E, N, K/block] scales, so its
    repeat count is N/2 (any other count would not broadcast)."""
    if alpha is None or w is None:
        return "gate/up global scales have no metadata"
    if alpha.dtype != torch.float32:
        return f"gate/up global scales are {alpha.dtype}, expected float32"
    if alpha.dim() != 2 or not mx.sym_eq(alpha.shape[1], 2) or not mx.sym_eq(alpha.shape[0], w.shape[0]):
        return f"gate/up global scales have shape {tuple(alpha.shape)}, expected [E={w.shape[0]}, 2]"
    return None


def _grouped_check(deq, q, act_dtypes=(torch.bfloat16,)):
    def check(match):
        a = _val(match, "x")
        r = checks.check_activation_input(a, mx.sym_eq, dtypes=act_dtypes)
        if r:
            return r
        w = _val(match, "w")
        alpha = _val(match, "w_alpha")
        if _is_gate_up(deq):
            r = _gate_up_reason(alpha, w)
            if r:
                return r
            alpha = None
        r = checks.check_weight(w, _val(match, "w_scale"), alpha, deq.fmt, mx.sym_eq,
                                batched=True, K=a.shape[-1], weight_dtype=deq.weight_dtype)
        if r:
            return r
        if "key" in match.kwargs:  # bmm style: W[key] per row
            key = _val(match, "key")
            if not isinstance(key, torch.Tensor) or key.dtype not in (torch.int32, torch.int64) or key.dim() != 1:
                return (f"bmm-style expert index is {getattr(key, 'dtype', None)} "
                        f"{getattr(key, 'dim', lambda: '?')()}-d, expected 1-d int32/int64 (a mask gathers differently)")
            if not mx.sym_eq(key.shape[0], a.shape[0]):
                return f"{key.shape[0]} expert indices for {a.shape[0]} rows"
            if q is not None and q.has_global_scale:
                return checks.check_global_scale(_val(match, "a_gs"), mx.sym_eq)
            return None
        offs = _val(match, "offs")
        if offs is None or offs.dtype != torch.int32 or offs.dim() != 1:
            return f"offsets are {getattr(offs, 'dtype', None)}, expected 1-d int32"
        if not mx.sym_eq(offs.shape[0], w.shape[0]):
            return f"{offs.shape[0]} offsets for {w.shape[0]} experts"
        if q is not None and q.has_global_scale:
            return checks.check_global_scale(_val(match, "a_gs"), mx.sym_eq)
        return None
    return check


def _full_value(node, what: str, dtype, shape):
    """(None, reason) unless `node` is a constant aten.full of `dtype` and `shape`; returns
    (fill value, None)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or node.target is not aten.full.default:
        target = getattr(node, "target", None) if isinstance(node, torch.fx.Node) else type(node).__name__
        return None, f"{what} is not a constant torch.full block (it is {target}); its values are unknown"
    val = mx.fake(node)
    if val is None or val.dtype != dtype:
        return None, f"{what} is {getattr(val, 'dtype', None)}, expected {dtype} like the activations"
    if val.dim() != len(shape) or not all(mx.sym_eq(a, b) for a, b in zip(val.shape, shape) if b is not None):
        return None, f"{what} has shape {tuple(val.shape)}, expected {tuple('*' if b is None else b for b in shape)}"
    fill = node.args[1] if len(node.args) > 1 else node.kwargs.get("fill_value")
    if isinstance(fill, torch.fx.Node) or not isinstance(fill, (int, float, bool)):
        return None, f"{what} has a non-constant fill value"
    return fill, None


def _bias_reason(name: str, b, dtype, E, N) -> Optional[str]:
    """A per-expert bias operand is [E, N] in the activation dtype (sizes may be symbolic)."""
    if not isinstance(b, torch.Tensor):
        return f"{name} has no tensor metadata"
    if b.dtype != dtype:
        return f"{name} is {b.dtype}, expected {dtype} like the activations"
    if b.dim() != 2 or not mx.sym_eq(b.shape[0], E) or not mx.sym_eq(b.shape[1], N):
        return f"{name} has shape {tuple(b.shape)}, expected [E={E}, N={N}]"
    return None


def _bias_pad_reason(match) -> Optional[str]:
    """The K extension really adds exactly `bias` to every row's accumulator: a ones column
    at the position of the bias column, zero blocks of one width after both, activation dtype."""
    kw = match.kwargs
    a, w, bias = _val(match, "x"), _val(match, "w"), _val(match, "bias")
    if a is None or w is None or bias is None:
        return "biased grouped GEMM operands have no metadata"
    dt = a.dtype
    R, E, N = a.shape[0], w.shape[0], w.shape[1]
    if kw.get("bias_dim") not in (-1, 2):
        return f"bias is unsqueezed at dim {kw.get('bias_dim')!r}, expected the last (K) dim"
    r = _bias_reason("bias", bias, dt, E, N)
    if r:
        return r
    one, r = _full_value(kw.get("a_one"), "activation ones column", dt, (R, 1))
    if r:
        return r
    if one != 1:
        return f"activation pad column is full({one!r}), expected full(1): the bias would be scaled"
    zpa = mx.fake(kw.get("a_pad"))
    p = zpa.shape[1] if isinstance(zpa, torch.Tensor) and zpa.dim() == 2 else None
    if p is None:
        return "activation zero padding is not [R, p]"
    zero, r = _full_value(kw.get("a_pad"), "activation zero padding", dt, (R, p))
    if r:
        return r
    if zero != 0:
        return f"activation padding is full({zero!r}), expected zeros"
    zero, r = _full_value(kw.get("w_pad"), "weight zero padding", dt, (E, N, p))
    if r:
        return r
    if zero != 0:
        return f"weight padding is full({zero!r}), expected zeros"
    return None


def _bias_forms(apat, gather: bool, dpat) -> tuple[pm.PatternExpr, pm.PatternExpr]:
    """(activation operand, weight operand) of the K-extended grouped GEMM."""
    acat = pm.CallFunction(aten.cat.default, [apat, pm.KeywordArg("a_one"), pm.KeywordArg("a_pad")], 1)
    if gather:
        acat = pm.CallFunction(aten.index.Tensor, acat, [pm.KeywordArg("order")])
    wcat = pm.CallFunction(aten.cat.default, [dpat, pm.CallFunction(aten.unsqueeze.default, pm.KeywordArg("bias"),
                                                                     pm.KeywordArg("bias_dim")),
                                              pm.KeywordArg("w_pad")], 2)
    return acat, pm.CallFunction(aten.permute.default, wcat, [0, 2, 1])


def _register_grouped(pm_pass, deq, dpat, q, qpat, *, reasons=(), spec_fn=None, fp6_layout="quark") -> int:
    """_grouped_mm(QDQ(a)[order] | QDQ(a) | a, DEQ.transpose(-2, -1), offs) -> mxemu::grouped_mm."""
    wt = pm.CallFunction(aten.permute.default, dpat, [0, 2, 1])
    act = q.act if q is not None else None
    spec = spec_for(deq.fmt, act, fp6_layout=fp6_layout).to_str()
    base = f"{deq.name}_{deq.fmt.name}{'_alpha' if deq.has_alpha else ''}_" + (
        OpSpec.from_str(spec).short_name().rsplit("_", 1)[0].split("_", 1)[1] if q else "a16")
    if q is None:
        forms = [("", pm.KeywordArg("x"), False)]
    else:
        forms = [("_gather", pm.CallFunction(aten.index.Tensor, qpat, [pm.KeywordArg("order")]), True),
                 ("", qpat, False)]
    base_check = _grouped_check(deq, q)

    def check(match):
        for fn in reasons:
            r = fn(match)
            if r:
                return r
        return base_check(match)

    def bias_check(match):
        return _bias_pad_reason(match) or check(match)

    # biased (K-extended) forms: the activation is gathered after the cat, so the
    # weight-only variant has an explicit gather too
    a_in = qpat if q is not None else pm.KeywordArg("x")
    bias_forms = [("_bias_gather", a_in, True), ("_bias", a_in, False)]
    variants = [(suffix, apat, gather, False) for suffix, apat, gather in forms] + [
        (suffix, apat, gather, True) for suffix, apat, gather in bias_forms]
    n = 0
    for suffix, apat, gather, biased in variants:
        if biased:
            aop, wop = _bias_forms(apat, gather, dpat)
            pat = pm.CallFunction(aten._grouped_mm.default, aop, wop, pm.KeywordArg("offs"))
        else:
            pat = pm.CallFunction(aten._grouped_mm.default, apat, wt, pm.KeywordArg("offs"))

        def replace(match, gather=gather):
            kw = match.kwargs
            sp = spec_fn(match) if spec_fn is not None else spec
            args = [kw["x"], kw.get("order"), kw["w"], kw["w_scale"], kw.get("w_alpha"), kw["offs"],
                    kw.get("a_gs"), kw.get("bias")]
            where = [a is not None for a in args]

            def repl(*vals):
                it = iter(vals)
                x, order, w, s, alpha, offs, gs, bias = [next(it) if p else None for p in where]
                if order is not None:
                    x = x[order]
                if bias is not None:
                    return torch.ops.mxemu.grouped_mm(x, _weight_arg(w), s, alpha, offs, gs, sp, bias)
                return torch.ops.mxemu.grouped_mm(x, _weight_arg(w), s, alpha, offs, gs, sp)

            match.replace_by_example(repl, [a for a in args if a is not None])

        mx.register_family_pattern(pat, pm_pass, family="grouped_mm", name=base + suffix,
                                   check=bias_check if biased else check, replace=replace)
        n += 1
    return n


@functools.lru_cache(maxsize=None)
def _bmm_form() -> pm.PatternExpr:
    """squeeze(bmm(unsqueeze(A, 1), permute(index(W, [key]), [0, 2, 1])), 1) with A, W, key
    KeywordArgs (the reference's gemm_style="bmm", emu_inductor.patterns.gemm.bmm_gathered)."""
    from ..patterns.gemm import bmm_gathered

    with mx.tracing_context():
        return mx.build_pattern(bmm_gathered, [torch.randn(6, _K).bfloat16(), torch.randn(_E, _N, _K).bfloat16(),
                                               torch.randint(0, _E, (6,))], ["A", "W", "key"])


def bmm_as_grouped(x, key, w, s, alpha, offs_unused, gs, spec):
    """Row r of the result = QDQ(x[r]) @ dequant(w[key[r]]).T, computed by one
    mxemu::grouped_mm over the rows sorted by expert (QDQ is row-wise, so sorting first
    is exact; aten.index wraps negative keys, so does remainder)."""
    E = w.shape[0]
    g = torch.remainder(key.to(torch.int64), E)
    order = torch.argsort(g, stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=key.device).index_add(
        0, g, torch.ones_like(g, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    y_sorted = torch.ops.mxemu.grouped_mm(x[order], w, s, alpha, offs, gs, spec)
    return y_sorted[torch.argsort(order)]


def _register_bmm(pm_pass, deq, dpat, q, qpat) -> int:
    """gemm_style="bmm": every row gathers its expert's dequantized weight -> mxemu::grouped_mm
    over expert-sorted rows (stage 1 only; see docs/patterns.md)."""
    act = q.act if q is not None else None
    spec = spec_for(deq.fmt, act).to_str()
    name = f"bmm_{deq.name}_{deq.fmt.name}{'_alpha' if deq.has_alpha else ''}_" + (
        OpSpec.from_str(spec).short_name().rsplit("_", 1)[0].split("_", 1)[1] if q else "a16")
    pat = mx.substitute(_bmm_form(), {"A": qpat if qpat is not None else pm.KeywordArg("x"), "W": dpat})
    check = _grouped_check(deq, q, act_dtypes=(torch.bfloat16, torch.float16))

    def replace(match):
        kw = match.kwargs
        args = [kw["x"], kw["key"], kw["w"], kw["w_scale"], kw.get("w_alpha"), kw.get("a_gs")]
        where = [a is not None for a in args]

        def repl(*vals):
            it = iter(vals)
            x, key, w, s, alpha, gs = [next(it) if p else None for p in where]
            return bmm_as_grouped(x, key, _weight_arg(w), s, alpha, None, gs, spec)

        match.replace_by_example(repl, [a for a in args if a is not None])

    mx.register_family_pattern(pat, pm_pass, family="grouped_mm", name=name, check=check, replace=replace)
    return 1


def register_grouped_mm_patterns(pm_pass, dtypes=(torch.bfloat16,)) -> int:
    n = 0
    qdqs = qdq_styles() + fp8_static_styles()  # static fp8: vLLM w_mxfp4_a_fp8 GEMM1 (input_scale)
    odeqs = [(opaque_dequant_style(d, True), opaque_dequant_piece(d), d) for d in _opaque.dequant_ops()]
    oqdqs = [(opaque_qdq_style(q), opaque_qdq_piece(q), q) for q in _opaque.qdq_ops()]
    for dtype in dtypes:
        for deq in gate_up_styles() + dequant_styles(batched=True):
            try:
                dpat = dequant3_piece(deq, dtype)
            except Exception as e:
                log.warning("mxemu grouped_mm: no %s pattern for %s: %r", deq.key, dtype, e)
                continue
            for q in scheme_pairs(deq, qdqs):
                try:
                    qpat = qdq_piece(q, dtype) if q is not None else None
                except Exception as e:
                    log.warning("mxemu grouped_mm: no %s pattern for %s: %r", q.key, dtype, e)
                    continue
                n += _register_grouped(pm_pass, deq, dpat, q, qpat)
                try:
                    n += _register_bmm(pm_pass, deq, dpat, q, qpat)
                except Exception as e:
                    log.warning("mxemu grouped_mm: no bmm pattern for %s/%s: %r", deq.key, q and q.key, e)
            # traced dequant x declared opaque QDQ
            for q in scheme_pairs(deq, [o[0] for o in oqdqs]):
                if q is None:
                    continue
                oq = next(o for o in oqdqs if o[0] is q)
                n += _register_grouped(pm_pass, deq, dpat, q, oq[1],
                                       reasons=[functools.partial(opaque_qdq_reason, decl=oq[2])],
                                       spec_fn=opaque_spec_fn(deq.fmt, oq[2], "quark"))
        # declared opaque dequant x (traced QDQ | opaque QDQ | none)
        for deq, dpat, d in odeqs:
            dreason = [functools.partial(opaque_dequant_reason, decl=d, batched=True)]
            for q in scheme_pairs(deq, qdqs + [o[0] for o in oqdqs]):
                oq = next((o for o in oqdqs if o[0] is q), None)
                if oq is not None:
                    qpat, qreason = oq[1], [functools.partial(opaque_qdq_reason, decl=oq[2])]
                    spec_fn = opaque_spec_fn(deq.fmt, oq[2], d.fp6_layout)
                elif q is None:
                    qpat, qreason, spec_fn = None, [], None
                else:
                    try:
                        qpat = qdq_piece(q, dtype)
                    except Exception:
                        continue
                    qreason, spec_fn = [], None
                n += _register_grouped(pm_pass, deq, dpat, q, qpat, reasons=dreason + qreason, spec_fn=spec_fn,
                                       fp6_layout=d.fp6_layout)
    return n


# --- stage 2: whole MoE ----------------------------------------------------------------------------

MOE_ACTIVATIONS = ("silu", "gelu", "swigluoai", "silu_no_mul", "gelu_no_mul", "relu2_no_mul")
_SPEC1 = OpSpec("nvfp4", "block", "nvfp4", None, "vllm").to_str()
_SPEC2 = OpSpec("nvfp4", "block", "nvfp4", None, "vllm_ref").to_str()
_MOE_ARGS = ["hidden_states", "topk_weights", "topk_ids", "expert_map", "w13", "w13_scale", "w13_alpha", "a1_gs",
             "w2", "w2_scale", "w2_alpha", "a2_gs", "w13_bias", "w2_bias"]


def _moe_example(activation, with_map, bias=False):
    from ..reference.activations import is_gated

    E, H, I, T, k = TRACE_NUM_EXPERTS, 32, 16, 4, 2
    N1 = 2 * I if is_gated(activation) else I
    x = torch.randn(T, H).to(torch.bfloat16)
    tw = torch.rand(T, k)
    ids = torch.randint(0, E, (T, k), dtype=torch.int32)
    emap = torch.arange(E, dtype=torch.int32) if with_map else None
    u8 = torch.uint8
    w13, s13 = torch.zeros(E, N1, H // 2, dtype=u8), torch.ones(E, N1, H // 16).to(torch.float8_e4m3fn)
    w2, s2 = torch.zeros(E, H, I // 2, dtype=u8), torch.ones(E, H, I // 16).to(torch.float8_e4m3fn)
    one = torch.ones(E)
    g = torch.ones(())
    b13 = torch.zeros(E, N1, dtype=torch.bfloat16) if bias else None
    b2 = torch.zeros(E, H, dtype=torch.bfloat16) if bias else None
    return [x, tw, ids, emap, w13, s13, one, g, w2, s2, one.clone(), g.clone(), b13, b2]


@functools.lru_cache(maxsize=None)
def moe_structure_pattern(activation: str, rwoi: bool, with_map: bool, bias: bool = False) -> pm.PatternExpr:
    with mx.tracing_context():
        args = _moe_example(activation, with_map, bias)
        names = [n for n, a in zip(_MOE_ARGS, args) if a is not None]
        present = [a for a in args if a is not None]

        def fn(*vals):
            it = iter(vals)
            full = [next(it) if a is not None else None for a in args]
            x, tw, ids, emap, w13, s13, a13, g1, w2, s2, a2, g2, b13, b2 = full

            def gemm1(a, offs):
                if b13 is not None:
                    return torch.ops.mxemu.grouped_mm(a, w13, s13, a13, offs, g1, _SPEC1, b13)
                return torch.ops.mxemu.grouped_mm(a, w13, s13, a13, offs, g1, _SPEC1)

            def gemm2(a, offs):
                if b2 is not None:
                    return torch.ops.mxemu.grouped_mm(a, w2, s2, a2, offs, g2, _SPEC2, b2)
                return torch.ops.mxemu.grouped_mm(a, w2, s2, a2, offs, g2, _SPEC2)

            return moe_grouped_structure(x, tw, ids, emap, gemm1, gemm2, E=TRACE_NUM_EXPERTS,
                                         activation=activation, apply_router_weight_on_input=rwoi)

        pat = mx.build_pattern(fn, present, names, scalar_workaround={"num_experts": TRACE_NUM_EXPERTS})
    mx.replace_nodes_kwarg(pat, _SPEC1, "spec1")
    mx.replace_nodes_kwarg(pat, _SPEC2, "spec2")
    # routing prep is shared with shape computations under dynamic shapes (sym_size
    # users); the big tensors (dequantized weights) were already absorbed by stage 1
    return mx.relax_users(pat)


def _moe_bias_reason(match) -> Optional[str]:
    x, w13 = _val(match, "hidden_states"), _val(match, "w13")
    E = w13.shape[0]
    return _bias_reason("w13_bias", _val(match, "w13_bias"), x.dtype, E, w13.shape[1]) or \
        _bias_reason("w2_bias", _val(match, "w2_bias"), x.dtype, E, x.shape[-1])


def _moe_check(activation, rwoi, with_map, bias=False):
    def check(match):
        kw = match.kwargs
        s1, s2 = kw.get("spec1"), kw.get("spec2")
        if not isinstance(s1, str) or not isinstance(s2, str):
            return "GEMM specs are not constants"
        o1, o2 = OpSpec.from_str(s1), OpSpec.from_str(s2)
        if o1 != o2:
            return f"GEMM1 ({o1.short_name()}) and GEMM2 ({o2.short_name()}) use different schemes"
        x = _val(match, "hidden_states")
        r = checks.check_activation_input(x, mx.sym_eq, dtypes=(torch.bfloat16,))
        if r:
            return r
        w13, w2 = _val(match, "w13"), _val(match, "w2")
        E = kw.get("num_experts")
        if not mx.sym_eq(w13.shape[0], E) or not mx.sym_eq(w2.shape[0], E):
            return f"expert count {E} of the routing does not match the weights ({w13.shape[0]}, {w2.shape[0]})"
        ids, tw = _val(match, "topk_ids"), _val(match, "topk_weights")
        if ids.dtype not in (torch.int32, torch.int64) or ids.dim() != 2:
            return f"topk_ids are {ids.dtype} {ids.dim()}-d, expected 2-d int32/int64"
        if not tw.is_floating_point() or tw.dim() != 2:
            return f"topk_weights are {tw.dtype}, expected a 2-d float tensor"
        if rwoi and not mx.sym_eq(ids.shape[1], 1):
            return "router weight on input needs top_k == 1"
        if with_map:
            em = _val(match, "expert_map")
            if em.dtype not in (torch.int32, torch.int64) or em.dim() != 1:
                return f"expert_map is {em.dtype} {em.dim()}-d, expected 1-d int"
        fmt_k = o1.scheme().weight_fmt
        if not mx.sym_eq(fmt_k.logical_size(w13.shape[-1]), x.shape[-1]):
            return "w13's K does not match the hidden size"
        if bias:
            return _moe_bias_reason(match)
        return None
    return check


def register_moe_patterns(pm_pass, activations=MOE_ACTIVATIONS, rwoi_activations=("silu",)) -> int:
    n = 0
    combos = [(a, rwoi, with_map, bias) for bias in (False, True) for a in activations
              for rwoi in ((False, True) if a in rwoi_activations else (False,)) for with_map in (False, True)]
    for activation, rwoi, with_map, bias in combos:
        try:
            pat = moe_structure_pattern(activation, rwoi, with_map, bias)
        except Exception as e:
            log.warning("mxemu moe: no structure pattern for %s/%s/%s/%s: %r", activation, rwoi, with_map,
                        bias, e)
            continue

        def replace(match, activation=activation, rwoi=rwoi, with_map=with_map):
            kw = match.kwargs
            o = OpSpec.from_str(kw["spec1"])
            import dataclasses

            spec = dataclasses.replace(o, activation=activation, router_weight_on_input=rwoi).to_str()
            names = ["hidden_states", "w13", "w13_scale", "w13_alpha", "w2", "w2_scale", "w2_alpha",
                     "topk_weights", "topk_ids", "a1_gs", "a2_gs", "expert_map", "w13_bias", "w2_bias"]
            args = [kw.get(nm) for nm in names]
            where = [a is not None for a in args]

            def repl(*vals):
                it = iter(vals)
                x, w13, s13, a13, w2, s2, a2, tw, ids, g1, g2, em, b13, b2 = [
                    next(it) if p else None for p in where]
                if b13 is not None or b2 is not None:
                    return torch.ops.mxemu.moe(x, w13, s13, a13, w2, s2, a2, tw, ids, g1, g2, em, spec,
                                               b13, b2)
                return torch.ops.mxemu.moe(x, w13, s13, a13, w2, s2, a2, tw, ids, g1, g2, em, spec)

            match.replace_by_example(repl, [a for a in args if a is not None])

        name = f"{activation}{'_rwoi' if rwoi else ''}{'_expert_map' if with_map else ''}{'_bias' if bias else ''}"
        mx.register_family_pattern(pat, pm_pass, family="moe", name=name,
                                   check=_moe_check(activation, rwoi, with_map, bias), replace=replace)
        n += 1
    return n


# --- family registration -----------------------------------------------------------------------------


def _init_grouped(pm_pass, input_device=None):
    register_grouped_mm_patterns(pm_pass)


def _init_moe(pm_pass, input_device=None):
    register_moe_patterns(pm_pass)


def _register():
    from .registry import register_pattern_family

    decl = mx.declarations_file(_opaque.fingerprint())
    register_pattern_family(
        "grouped_mm", _init_grouped, order=10, replace=True, anchors=(torch.ops.aten._grouped_mm, torch.ops.aten.bmm),
        files=[decl] if decl else (),
        description="_grouped_mm(QDQ(a)[order], dequant(W).transpose) -> mxemu::grouped_mm (stage 1)")
    register_pattern_family(
        "moe", _init_moe, order=20, replace=True, anchors=(torch.ops.mxemu.grouped_mm,),
        description="routing + mxemu::grouped_mm x2 + activation + combine -> mxemu::moe (stage 2)")


_register()
# a new opaque declaration re-registers the families: fresh rules at the next pass run, new uuid
_opaque.add_listener(_register)
