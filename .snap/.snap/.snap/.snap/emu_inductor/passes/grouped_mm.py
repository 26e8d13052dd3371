"""Pattern family "grouped_mm" (runs first, order 10): expert GEMMs over dequantized weights.

A grouped GEMM over dequantized experts,
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

The gathered bmm form (`gemm_style="bmm"`) becomes the same op over expert-sorted rows.
The dequant / QDQ styles are the catalogue's for the "grouped_mm" GEMM form.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
from torch._inductor import pattern_matcher as pm

from ..patterns import checks
from ..patterns import opaque as declared
from ..patterns.catalogue import dequant_styles_for, qdq_styles_for
from ..patterns.dequant import is_gate_up
from ..patterns.gemm import bmm_gathered
from .fingerprint import declarations_file
from .guards import register_family_pattern
from .matching import meta_val, sym_eq
from .opaque_ops import (opaque_dequant_piece, opaque_dequant_reason, opaque_dequant_style, opaque_qdq_piece,
                         opaque_qdq_reason, opaque_qdq_style, opaque_spec_fn)
from .pieces import (TRACE_E, TRACE_K, TRACE_N, dequant3_piece, match_val, qdq_piece, scheme_pairs, spec_for,
                     variant_name, weight_arg)
from .registry import PACKED_DTYPES, register_pattern_family
from .surgery import build_pattern, substitute
from .tracing import tracing_context

log = logging.getLogger("emu_inductor.passes.moe")

aten = torch.ops.aten
FAMILY = "grouped_mm"

__all__ = ["register_grouped_mm_patterns", "bias_reason", "bmm_as_grouped"]


def _gate_up_reason(alpha, w) -> Optional[str]:
    """[E, 2] gate/up global scales: one float32 pair per expert. The matched
    repeat_interleave feeds a broadcast against the [E, N, K/block] scales, so its
    repeat count is N/2 (any other count would not broadcast)."""
    if alpha is None or w is None:
        return "gate/up global scales have no metadata"
    if alpha.dtype != torch.float32:
        return f"gate/up global scales are {alpha.dtype}, expected float32"
    if alpha.dim() != 2 or not sym_eq(alpha.shape[1], 2) or not sym_eq(alpha.shape[0], w.shape[0]):
        return f"gate/up global scales have shape {tuple(alpha.shape)}, expected [E={w.shape[0]}, 2]"
    return None


def _grouped_check(deq, q, act_dtypes=(torch.bfloat16,)):
    def check(match):
        a = match_val(match, "x")
        r = checks.check_activation_input(a, sym_eq, dtypes=act_dtypes)
        if r:
            return r
        w = match_val(match, "w")
        alpha = match_val(match, "w_alpha")
        if is_gate_up(deq):
            r = _gate_up_reason(alpha, w)
            if r:
                return r
            alpha = None
        r = checks.check_weight(w, match_val(match, "w_scale"), alpha, deq.fmt, sym_eq,
                                batched=True, K=a.shape[-1], weight_dtype=deq.weight_dtype)
        if r:
            return r
        if "key" in match.kwargs:  # bmm style: W[key] per row
            key = match_val(match, "key")
            if not isinstance(key, torch.Tensor) or key.dtype not in (torch.int32, torch.int64) or key.dim() != 1:
                return (f"bmm-style expert index is {getattr(key, 'dtype', None)} "
                        f"{getattr(key, 'dim', lambda: '?')()}-d, expected 1-d int32/int64 (a mask gathers differently)")
            if not sym_eq(key.shape[0], a.shape[0]):
                return f"{key.shape[0]} expert indices for {a.shape[0]} rows"
            if q is not None and q.has_global_scale:
                return checks.check_global_scale(match_val(match, "a_gs"), sym_eq)
            return None
        offs = match_val(match, "offs")
        if offs is None or offs.dtype != torch.int32 or offs.dim() != 1:
            return f"offsets are {getattr(offs, 'dtype', None)}, expected 1-d int32"
        if not sym_eq(offs.shape[0], w.shape[0]):
            return f"{offs.shape[0]} offsets for {w.shape[0]} experts"
        if q is not None and q.has_global_scale:
            return checks.check_global_scale(match_val(match, "a_gs"), sym_eq)
        return None
    return check


def _full_value(node, what: str, dtype, shape):
    """(None, reason) unless `node` is a constant aten.full of `dtype` and `shape`; returns
    (fill value, None)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or node.target is not aten.full.default:
        target = getattr(node, "target", None) if isinstance(node, torch.fx.Node) else type(node).__name__
        return None, f"{what} is not a constant torch.full block (it is {target}); its values are unknown"
    val = meta_val(node)
    if val is None or val.dtype != dtype:
        return None, f"{what} is {getattr(val, 'dtype', None)}, expected {dtype} like the activations"
    if val.dim() != len(shape) or not all(sym_eq(a, b) for a, b in zip(val.shape, shape) if b is not None):
        return None, f"{what} has shape {tuple(val.shape)}, expected {tuple('*' if b is None else b for b in shape)}"
    fill = node.args[1] if len(node.args) > 1 else node.kwargs.get("fill_value")
    if isinstance(fill, torch.fx.Node) or not isinstance(fill, (int, float, bool)):
        return None, f"{what} has a non-constant fill value"
    return fill, None


def bias_reason(name: str, b, dtype, E, N) -> Optional[str]:
    """A per-expert bias operand is [E, N] in the activation dtype (sizes may be symbolic)."""
    if not isinstance(b, torch.Tensor):
        return f"{name} has no tensor metadata"
    if b.dtype != dtype:
        return f"{name} is {b.dtype}, expected {dtype} like the activations"
    if b.dim() != 2 or not sym_eq(b.shape[0], E) or not sym_eq(b.shape[1], N):
        return f"{name} has shape {tuple(b.shape)}, expected [E={E}, N={N}]"
    return None


def _bias_pad_reason(match) -> Optional[str]:
    """The K extension really adds exactly `bias` to every row's accumulator: a ones column
    at the position of the bias column, zero blocks of one width after both, activation dtype."""
    kw = match.kwargs
    a, w, bias = match_val(match, "x"), match_val(match, "w"), match_val(match, "bias")
    if a is None or w is None or bias is None:
        return "biased grouped GEMM operands have no metadata"
    dt = a.dtype
    R, E, N = a.shape[0], w.shape[0], w.shape[1]
    if kw.get("bias_dim") not in (-1, 2):
        return f"bias is unsqueezed at dim {kw.get('bias_dim')!r}, expected the last (K) dim"
    r = bias_reason("bias", bias, dt, E, N)
    if r:
        return r
    one, r = _full_value(kw.get("a_one"), "activation ones column", dt, (R, 1))
    if r:
        return r
    if one != 1:
        return f"activation pad column is full({one!r}), expected full(1): the bias would be scaled"
    zpa = meta_val(kw.get("a_pad"))
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
        variant_name(spec) if q else "a16")
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
                    return torch.ops.mxemu.grouped_mm(x, weight_arg(w), s, alpha, offs, gs, sp, bias)
                return torch.ops.mxemu.grouped_mm(x, weight_arg(w), s, alpha, offs, gs, sp)

            match.replace_by_example(repl, [a for a in args if a is not None])

        register_family_pattern(pat, pm_pass, family=FAMILY, name=base + suffix,
                                   check=bias_check if biased else check, replace=replace)
        n += 1
    return n


@functools.lru_cache(maxsize=None)
def _bmm_form() -> pm.PatternExpr:
    """squeeze(bmm(unsqueeze(A, 1), permute(index(W, [key]), [0, 2, 1])), 1) with A, W, key
    KeywordArgs (the reference's gemm_style="bmm", emu_inductor.patterns.gemm.bmm_gathered)."""
    with tracing_context():
        return build_pattern(bmm_gathered, [torch.randn(6, TRACE_K).bfloat16(),
                                            torch.randn(TRACE_E, TRACE_N, TRACE_K).bfloat16(),
                                            torch.randint(0, TRACE_E, (6,))], ["A", "W", "key"])


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
        variant_name(spec) if q else "a16")
    pat = substitute(_bmm_form(), {"A": qpat if qpat is not None else pm.KeywordArg("x"), "W": dpat})
    check = _grouped_check(deq, q, act_dtypes=(torch.bfloat16, torch.float16))

    def replace(match):
        kw = match.kwargs
        args = [kw["x"], kw["key"], kw["w"], kw["w_scale"], kw.get("w_alpha"), kw.get("a_gs")]
        where = [a is not None for a in args]

        def repl(*vals):
            it = iter(vals)
            x, key, w, s, alpha, gs = [next(it) if p else None for p in where]
            return bmm_as_grouped(x, key, weight_arg(w), s, alpha, None, gs, spec)

        match.replace_by_example(repl, [a for a in args if a is not None])

    register_family_pattern(pat, pm_pass, family=FAMILY, name=name, check=check, replace=replace)
    return 1


def register_grouped_mm_patterns(pm_pass, dtypes=(torch.bfloat16,)) -> int:
    n = 0
    qdqs = qdq_styles_for("grouped_mm")  # with static fp8: vLLM w_mxfp4_a_fp8 GEMM1 (input_scale)
    odeqs = [(opaque_dequant_style(d, True), opaque_dequant_piece(d), d) for d in declared.dequant_ops()]
    oqdqs = [(opaque_qdq_style(q), opaque_qdq_piece(q), q) for q in declared.qdq_ops()]
    for dtype in dtypes:
        for deq in dequant_styles_for("grouped_mm"):
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



# --- family registration -----------------------------------------------------------------------------


def _init_grouped(pm_pass, input_device=None):
    register_grouped_mm_patterns(pm_pass)


def _register():
    decl = declarations_file(declared.fingerprint())
    register_pattern_family(
        FAMILY, _init_grouped, order=10, replace=True, anchors=(torch.ops.aten._grouped_mm, torch.ops.aten.bmm),
        files=[decl] if decl else (),
        # every traced dequant reads packed bytes; a declared opaque dequant op may not
        requires_dtypes=() if declared.dequant_ops() else PACKED_DTYPES,
        description="_grouped_mm(QDQ(a)[order], dequant(W).transpose) -> mxemu::grouped_mm (stage 1)")


_register()
# a new opaque declaration re-registers the family: fresh rules at the next pass run, new uuid
declared.add_listener(_register)
