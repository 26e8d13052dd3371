"""Pattern family "linear": QDQ(x) @ dequant(W).T (+ bias) -> torch.ops.mxemu.linear.

The search pieces come from `emu_inductor.patterns` (the catalogue's styles for the
"linear" and "loop" GEMM forms), traced once per activation dtype (`passes.pieces`) and
composed as pattern expressions:

    mm(QDQ(x, a_gs), permute(DEQUANT(w, w_scale, w_alpha), [1, 0]))
    addmm(bias, QDQ(...), permute(DEQUANT(...), [1, 0]))

QDQ patterns are tried first (w4a4 before w4a16), so the biggest match wins. The
replacement computes the variant it matched (NVFP4 recipe = which reciprocal, MX scale
rounding) into the OpSpec string.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
from torch._inductor import pattern_matcher as pm
from torch._inductor.virtualized import V

from ..patterns import checks
from ..patterns import opaque as declared
from ..patterns.catalogue import dequant_styles_for, qdq_styles_for
from ..patterns.dequant import E2M1_LUT, DequantStyle
from .fingerprint import declarations_file
from .guards import register_family_pattern
from .matching import guard_eq, meta_val, sym_eq
from .opaque_ops import (opaque_dequant_piece, opaque_dequant_reason, opaque_dequant_style, opaque_qdq_piece,
                         opaque_qdq_reason, opaque_qdq_style, opaque_spec_fn)
from .pieces import dequant3_piece, dequant_piece, match_val, qdq_piece, scheme_pairs, spec_for, variant_name, weight_arg
from .registry import PACKED_DTYPES, register_pattern_family
from .runtime_guards import guard_tensor_input
from .surgery import with_users

log = logging.getLogger("emu_inductor.passes.linear")

aten = torch.ops.aten
FAMILY = "linear"

__all__ = ["LinearPatterns", "lut_reason", "LINEAR_DTYPES"]


def lut_reason(match, name="w_lut") -> Optional[str]:
    """A LUT must be the E2M1 table: a graph constant with those values, or a float32 [8]
    graph input (vLLM keeps it in a module global / buffer, `kE2M1ToFloat_handle.val`),
    accepted under a run-time assertion that it still holds those values (inserted by the
    handler, `runtime_guards.guard_tensor_input`). A readable real input with other values is rejected."""
    node = match.kwargs.get(name)
    if node is None:
        return None
    val = None
    while node.op == "call_function" and node.target in (aten.lift_fresh_copy.default, aten.clone.default) \
            and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    ref = torch.tensor(E2M1_LUT, dtype=torch.float32)

    def differs(v):
        return v.dtype != torch.float32 or v.numel() != 8 or not torch.equal(v.detach().cpu().reshape(-1), ref)

    if node.op == "get_attr":
        val = getattr(node.graph.owning_module, node.target, None)
        if not isinstance(val, torch.Tensor):
            return "LUT values are not known at compile time (cannot prove it is the E2M1 table)"
        return "LUT is not the E2M1 magnitude table" if differs(val) else None
    if node.op != "placeholder":
        return "LUT values are not known at compile time (cannot prove it is the E2M1 table)"
    fv = meta_val(node)
    if isinstance(fv, torch.Tensor) and fv.dtype == torch.float32 and fv.dim() == 1 and \
            isinstance(fv.shape[0], torch.SymInt) and guard_eq(fv.shape[0], 8):
        pass  # dynamic=True made its length symbolic: now guarded to be 8 (recompile otherwise)
    elif not isinstance(fv, torch.Tensor) or fv.dtype != torch.float32 or fv.dim() != 1 or \
            not isinstance(fv.shape[0], int) or fv.shape[0] != 8:
        return (f"LUT graph input {node.name} is {getattr(fv, 'dtype', None)} "
                f"{tuple(getattr(fv, 'shape', ()))}, expected a float32 [8] E2M1 table")
    try:  # the real input, when Inductor has it: a different table is rejected outright
        real = V.real_inputs
        phs = [n for n in node.graph.nodes if n.op == "placeholder"]
        idx = phs.index(node)
        if real is not None and idx < len(real):
            cand = real[idx]
            if isinstance(cand, torch.Tensor) and cand.shape == fv.shape and cand.dtype == fv.dtype and \
                    not isinstance(cand, torch._subclasses.FakeTensor):
                val = cand
    except Exception:
        val = None
    if val is not None and differs(val):
        return "LUT is not the E2M1 magnitude table"
    # values unknown (or known only now): fuse, asserting the table at run time
    guard_tensor_input(match, node, E2M1_LUT, "E2M1 LUT")
    return None



def _weight_reason(match, deq: DequantStyle, K) -> Optional[str]:
    return checks.check_weight(match_val(match, "w"), match_val(match, "w_scale"), match_val(match, "w_alpha"), deq.fmt, sym_eq,
                               batched=deq.batched, K=K, weight_dtype=deq.weight_dtype) or \
        (lut_reason(match) if deq.extra_inputs else None)


def _flatten_reason(match, x) -> Optional[str]:
    """For the N-d form mm(view(QDQ(x), shape), W.T): x is >= 3-d and the view only merges
    its leading dims ([prod(lead), K]). Any other view (one that regroups K) would let a
    block straddle rows, which the fused op cannot reproduce, so it is left alone."""
    if x is None:
        return "activation has no metadata"
    r = checks.check_activation_input(x, sym_eq, ndim=None)
    if r:
        return r
    if x.dim() < 3:
        return f"activation is {x.dim()}-d, expected >= 3-d before the flattening view"
    mm = match.output_node()
    view = mm.args[1] if mm.target == aten.addmm.default else mm.args[0]
    out = meta_val(view)
    lead = 1
    for d in x.shape[:-1]:
        lead = lead * d
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or not sym_eq(out.shape[1], x.shape[-1]) or \
            not sym_eq(out.shape[0], lead):
        return (f"the view between the activation QDQ and mm reshapes {tuple(x.shape)} to "
                f"{tuple(getattr(out, 'shape', ()))}, not [prod(leading dims), K]")
    return None



class LinearPatterns:
    """Registers the linear family into a PatternMatcherPass, lazily per activation dtype."""

    def __init__(self, pass_dict: Optional[pm.PatternMatcherPass] = None, *, styles=None, qdqs=None):
        self.pass_dict = pass_dict if pass_dict is not None else pm.PatternMatcherPass(pass_name="mxemu_linear")
        self.styles = styles if styles is not None else dequant_styles_for("linear")
        self.qdqs = qdqs if qdqs is not None else qdq_styles_for("linear")
        self._dtypes: set = set()

    def ensure(self, dtypes) -> None:
        for dt in dtypes:
            if dt == torch.float16:
                dt = torch.bfloat16  # the bf16 patterns take the 16-bit dtype as a KeywordArg
            if dt in self._dtypes or dt not in (torch.bfloat16, torch.float32):
                continue
            self._dtypes.add(dt)
            self._register_dtype(dt)

    def _register_dtype(self, dtype):
        for deq in self.styles:
            try:
                dpat = dequant_piece(deq, dtype)
            except Exception as e:  # a style that cannot trace for this dtype is skipped
                log.warning("mxemu linear: no %s pattern for %s: %r", deq.key, dtype, e)
                continue
            for q in scheme_pairs(deq, self.qdqs):
                try:
                    qpat = qdq_piece(q, dtype) if q is not None else pm.KeywordArg("x")
                except Exception as e:
                    log.warning("mxemu linear: no %s pattern for %s: %r", q.key, dtype, e)
                    continue
                self._register_pair(deq, q, dpat, qpat, dtype)
        self._register_opaque(dtype, first=len(self._dtypes) == 1)
        self._register_loop(dtype)

    def _register_loop(self, dtype):
        """gemm_style="loop" (Dynamo-unrolled): `a @ W[e].t()` per expert e, where W is ONE
        batched dequant and `a` one QDQ shared by every expert's mm. select(dequant(W), e)
        == dequant(w[e], s[e], alpha[e]) (the decode is elementwise per expert), so each
        per-expert mm becomes mxemu::linear on that expert's packed slice; the shared
        dequant/QDQ die once the last expert is rewritten. The torch.where masking around
        them stays as written (no whole-MoE match for this style)."""
        for deq in dequant_styles_for("loop"):
            try:
                dpat = with_users(dequant3_piece(deq, dtype), pm.MULTIPLE)
            except Exception as e:
                log.warning("mxemu linear: no loop %s pattern for %s: %r", deq.key, dtype, e)
                continue
            wt = pm.CallFunction(aten.permute.default,
                                 pm.CallFunction(aten.select.int, dpat, 0, pm.KeywordArg("e")), [1, 0])
            for q in scheme_pairs(deq, qdq_styles_for("loop")):
                try:
                    qpat = with_users(qdq_piece(q, dtype), pm.MULTIPLE) if q is not None else pm.KeywordArg("x")
                except Exception:
                    continue
                self._register_loop_pair(deq, q, qpat, wt)

    def _register_loop_pair(self, deq, q, qpat, wt):
        act = q.act if q is not None else None
        spec = spec_for(deq.fmt, act).to_str()
        name = f"loop_{deq.name}_{deq.fmt.name}{'_alpha' if deq.has_alpha else ''}_" + \
            (variant_name(spec) if q is not None else "a16")
        has_gs = q is not None and q.has_global_scale

        def check(match):
            x = match_val(match, "x")
            r = checks.check_activation_input(x, sym_eq)
            if r:
                return r
            adt = match.kwargs.get("act_dtype")
            if adt is not None and adt not in (torch.bfloat16, torch.float16):
                return f"activation dtype {adt} not supported"
            w = match_val(match, "w")
            r = checks.check_weight(w, match_val(match, "w_scale"), match_val(match, "w_alpha"), deq.fmt, sym_eq,
                                    batched=True, K=x.shape[-1], weight_dtype=deq.weight_dtype)
            if r:
                return r
            e = match.kwargs.get("e")
            if not isinstance(e, int) or not isinstance(w.shape[0], int) or not -w.shape[0] <= e < w.shape[0]:
                return f"loop-style expert index {e!r} is not a constant in [0, {w.shape[0]})"
            if has_gs:
                return checks.check_global_scale(match_val(match, "a_gs"), sym_eq)
            return None

        def replace(match):
            kw = match.kwargs
            e = kw["e"]
            args = [kw["x"], kw["w"], kw["w_scale"], kw.get("w_alpha"), kw.get("a_gs")]
            where = [a is not None for a in args]

            def repl(*vals):
                it = iter(vals)
                x, w, s, alpha, gs = [next(it) if p else None for p in where]
                if alpha is not None:
                    alpha = alpha.reshape(()) if alpha.numel() == 1 else alpha[e]
                return torch.ops.mxemu.linear(x, weight_arg(w[e]), s[e], alpha, gs, None, spec)

            match.replace_by_example(repl, [a for a in args if a is not None])

        register_family_pattern(pm.CallFunction(aten.mm.default, qpat, wt), self.pass_dict, family=FAMILY,
                                   name=name, check=check, replace=replace)

    def _register_pair(self, deq, q, dpat, qpat, dtype, reasons=(), spec_fn=None, fp6_layout="quark"):
        act = q.act if q is not None else None
        spec = spec_for(deq.fmt, act, fp6_layout=fp6_layout).to_str()
        name = f"{deq.name}_{deq.fmt.name}{'_alpha' if deq.has_alpha else ''}_" + \
            (f"{q.name}_" + variant_name(spec) if q is not None else "a16")
        wt = pm.CallFunction(aten.permute.default, dpat, [1, 0])
        has_gs = q is not None and q.has_global_scale

        def check(match, deq=deq, q=q, nd=False):
            x = match_val(match, "x")
            r = _flatten_reason(match, x) if nd else checks.check_activation_input(x, sym_eq)
            if r:
                return r
            adt = match.kwargs.get("act_dtype")
            if adt is not None and adt not in (torch.bfloat16, torch.float16):
                return f"activation dtype {adt} not supported"
            for fn in reasons:  # opaque calls: declaration constants, output metadata
                r = fn(match)
                if r:
                    return r
            r = _weight_reason(match, deq, x.shape[-1])
            if r:
                return r
            if has_gs:
                r = checks.check_global_scale(match_val(match, "a_gs"), sym_eq)
            return r

        def make_replace(with_bias, flatten=False):
            def replace(match):
                kw = match.kwargs
                args = [kw["x"], kw["w"], kw["w_scale"], kw.get("w_alpha"), kw.get("a_gs"), kw.get("bias")]
                present = [a for a in args if a is not None]
                where = [a is not None for a in args]
                sp = spec_fn(match) if spec_fn is not None else spec

                def repl(*vals):
                    it = iter(vals)
                    full = [next(it) if p else None for p in where]
                    x, w, s, alpha, gs, bias = full
                    if flatten:  # the view the user's graph applied after the QDQ, now before it
                        x = x.reshape(-1, x.shape[-1])
                    return torch.ops.mxemu.linear(x, weight_arg(w), s, alpha, gs, bias, sp)

                match.replace_by_example(repl, present)
            return replace

        mm_pat = pm.CallFunction(aten.mm.default, qpat, wt)
        register_family_pattern(mm_pat, self.pass_dict, family=FAMILY, name=name, check=check,
                                   replace=make_replace(False))
        addmm_pat = pm.CallFunction(aten.addmm.default, pm.KeywordArg("bias"), qpat, wt)
        register_family_pattern(addmm_pat, self.pass_dict, family=FAMILY, name=name + "_bias", check=check,
                                   replace=make_replace(True))
        if q is None:
            return  # weight-only: x is any tensor, the 2-d rule above already sees the view
        # N-d activations ([B, S, K], what F.linear gets inside transformers): the
        # decomposition flattens the QDQ'd tensor with a view to [B*S, K] before mm. The
        # QDQ pieces are shape-agnostic, so the same piece matches the N-d QDQ; the check
        # proves the view only merges leading dims (last dim kept = K), under which QDQ
        # along the last dim commutes with the flatten (blocks never cross rows).
        flat = pm.CallFunction([aten.reshape.default, aten.view.default], qpat, pm.Ignored())
        check_nd = functools.partial(check, nd=True)
        register_family_pattern(pm.CallFunction(aten.mm.default, flat, wt), self.pass_dict, family=FAMILY,
                                   name=name + "_nd", check=check_nd, replace=make_replace(False, flatten=True))
        register_family_pattern(pm.CallFunction(aten.addmm.default, pm.KeywordArg("bias"), flat, wt),
                                   self.pass_dict, family=FAMILY, name=name + "_nd_bias", check=check_nd,
                                   replace=make_replace(True, flatten=True))

    def _register_opaque(self, dtype, first: bool):
        """Declared opaque ops (emu_inductor.register_dequant_op / register_qdq_op) as
        pieces: opaque dequant x (traced QDQ | opaque QDQ | none), traced dequant x
        opaque QDQ. Opaque-only pairs are dtype-free: registered once."""
        odeqs = [(opaque_dequant_style(d, False), opaque_dequant_piece(d), d) for d in declared.dequant_ops()]
        oqdqs = [(opaque_qdq_style(q), opaque_qdq_piece(q), q) for q in declared.qdq_ops()]
        if not odeqs and not oqdqs:
            return
        for deq, dpat, d in odeqs:
            dreason = [functools.partial(opaque_dequant_reason, decl=d, batched=False)]
            for q in scheme_pairs(deq, self.qdqs + [o[0] for o in oqdqs]):
                oq = next((o for o in oqdqs if o[0] is q), None)
                if oq is not None or q is None:
                    if not first:
                        continue
                    qpat = oq[1] if oq is not None else pm.KeywordArg("x")
                    qreason = [functools.partial(opaque_qdq_reason, decl=oq[2])] if oq is not None else []
                    spec_fn = opaque_spec_fn(deq.fmt, oq[2] if oq else None, d.fp6_layout)
                else:
                    try:
                        qpat = qdq_piece(q, dtype)
                    except Exception as e:
                        log.warning("mxemu linear: no %s pattern for %s: %r", q.key, dtype, e)
                        continue
                    qreason, spec_fn = [], None
                self._register_pair(deq, q, dpat, qpat, dtype, reasons=dreason + qreason, spec_fn=spec_fn,
                                    fp6_layout=d.fp6_layout)
        if not oqdqs:
            return
        for deq in self.styles:
            try:
                dpat = dequant_piece(deq, dtype)
            except Exception:
                continue
            for q in scheme_pairs(deq, [o[0] for o in oqdqs]):
                if q is None:
                    continue
                oq = next(o for o in oqdqs if o[0] is q)
                self._register_pair(deq, q, dpat, oq[1], dtype,
                                    reasons=[functools.partial(opaque_qdq_reason, decl=oq[2])],
                                    spec_fn=opaque_spec_fn(deq.fmt, oq[2], "quark"))

    def apply(self, graph: torch.fx.Graph) -> int:
        dts = set()
        for n in graph.nodes:
            if n.op == "call_function" and n.target in (aten.mm.default, aten.addmm.default):
                v = n.meta.get("val")
                if v is not None:
                    dts.add(v.dtype)
        if not dts:
            return 0
        self.ensure(dts)
        return self.pass_dict.apply(graph)



# --- family registration ---------------------------------------------------------------------

#: Activation dtypes the linear family is traced for (one pattern set per dtype: the
#: final casts of the dequant and QDQ chains are dtype constants).
LINEAR_DTYPES = (torch.bfloat16, torch.float32)  # bf16 patterns also match fp16



def _init_family(pm_pass, input_device=None, dtypes=LINEAR_DTYPES):
    """Rules for the graph's GEMM dtypes only (per_dtype family: called again, into the same
    pass, for dtypes a later graph brings); one LinearPatterns per pass remembers what it built."""
    lp = getattr(pm_pass, "_mxemu_linear_patterns", None)
    if lp is None:
        lp = pm_pass._mxemu_linear_patterns = LinearPatterns(pm_pass)
    lp.ensure(dtypes)



def _register():
    decl = declarations_file(declared.fingerprint())
    register_pattern_family(
        FAMILY, _init_family, order=30, replace=True, files=[decl] if decl else (), per_dtype=True,
        # every traced dequant reads packed bytes; a declared opaque dequant op may not
        requires_dtypes=() if declared.dequant_ops() else PACKED_DTYPES,
        # Tracing this family's patterns costs seconds: skip it for graphs with no GEMM.
        anchors=(torch.ops.aten.mm, torch.ops.aten.addmm),
        description="QDQ(x) @ dequant(W).T (+bias) -> mxemu::linear (every dequant/QDQ style in emu_inductor.patterns)")



_register()
# a new declaration re-registers the family: fresh rules at the next pass run, new uuid
declared.add_listener(_register)
