"""Pattern family "linear": QDQ(x) @ dequant(W).T (+ bias) -> torch.ops.mxemu.linear.

The search pieces come from `emu_inductor.patterns` (dequant styles, QDQ styles, GEMM
forms). Each piece is traced once per activation dtype and the pieces are composed as
pattern expressions, so adding a style costs one trace, not one per combination:

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

from ..patterns import checks
from ..patterns import opaque as _opaque
from ..patterns.act_qdq import QDQStyle, act_compatible, fp8_static_styles, qdq_styles, vllm_torch_styles
from ..patterns.dequant import E2M1_LUT, DequantStyle, dequant_styles, example_weight
from ..ops import library as _ops_library  # noqa: F401  (registers torch.ops.mxemu.*)
from ..spec.opspec import OpSpec
from . import _mx_match as mx

log = logging.getLogger("emu_inductor.passes.linear")

aten = torch.ops.aten
FAMILY = "linear"

__all__ = ["LinearPatterns", "spec_for", "qdq_piece", "dequant_piece", "scheme_pairs"]

_K, _N, _M = 64, 32, 8


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


# Which activation formats go with which weight format (the schemes that exist).
_ACT_FOR_WEIGHT = {
    "nvfp4": ("nvfp4", "fp8"),
    "mxfp4": ("mxfp4", "mxfp6_e3m2", "mxfp6_e2m3", "fp8"),
    "mxfp6_e3m2": ("mxfp6_e3m2", "fp8"),
    "mxfp6_e2m3": ("mxfp6_e2m3",),
    "mxfp8_e4m3": ("mxfp8_e4m3",),
    "mxfp8_e5m2": (),
}
_MX_MODES = ("even", "floor", "rceil")


def scheme_pairs(deq: DequantStyle, qdqs: list[QDQStyle]) -> list[Optional[QDQStyle]]:
    """QDQ styles to pair with a dequant style (None = weight-only), QDQ first."""
    allowed = _ACT_FOR_WEIGHT.get(deq.fmt.name, ())
    out = []
    for q in qdqs:
        a = q.act
        name = "fp8" if a.kind == "fp8_tensor" else a.fmt.name
        if name not in allowed or not act_compatible(a, deq.fmt) and a.kind == "block":
            continue
        if a.kind == "block" and a.fmt.is_mx and a.scale_mode not in _MX_MODES:
            continue
        if name == "nvfp4" and deq.fmt.name != "nvfp4":
            continue
        out.append(q)
    return out + [None]


# --- pieces ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def qdq_piece(style: QDQStyle, dtype: torch.dtype, rows: int = _M, K: int = _K) -> pm.PatternExpr:
    with mx.tracing_context():
        return _qdq_piece(style, dtype, rows, K)


def _qdq_piece(style, dtype, rows, K):
    x = torch.randn(rows, K).to(dtype)
    dk = _dtype_kwarg(dtype)
    if style.has_global_scale:
        return mx.build_pattern(lambda x, a_gs: style.fn(x, a_gs), [x, torch.ones((), dtype=torch.float32)],
                                ["x", "a_gs"], dtype_kwarg=dk)
    return mx.build_pattern(lambda x: style.fn(x, None), [x], ["x"], dtype_kwarg=dk)


def _dtype_kwarg(dtype):
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
    with mx.tracing_context():
        return _dequant_piece(style, dtype)


def _dequant_piece(style, dtype):
    E = 3 if style.batched else None
    w, s, alpha, extras = example_weight(style, _N, _K, E)
    names = _deq_argnames(style)
    args = [w, s] + ([alpha] if style.has_alpha else []) + [extras[e] for e in style.extra_inputs]

    def fn(*a):
        kw = {e: a[len(a) - len(style.extra_inputs) + i] for i, e in enumerate(style.extra_inputs)}
        return style.fn(a[0], a[1], a[2] if style.has_alpha else None, dtype, **kw)

    return mx.build_pattern(fn, args, names, dtype_kwarg=_dtype_kwarg(dtype))


# --- checks and replacement ---------------------------------------------------------------------


def _val(match, name):
    n = match.kwargs.get(name)
    return mx.fake(n) if isinstance(n, torch.fx.Node) else n


def lut_reason(match, name="w_lut") -> Optional[str]:
    """A LUT must be the E2M1 table: a graph constant with those values, or a float32 [8]
    graph input (vLLM keeps it in a module global / buffer, `kE2M1ToFloat_handle.val`),
    accepted under a run-time assertion that it still holds those values (inserted by the
    handler, `mx.guard_tensor_input`). A readable real input with other values is rejected."""
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
    fv = mx.fake(node)
    if isinstance(fv, torch.Tensor) and fv.dtype == torch.float32 and fv.dim() == 1 and \
            isinstance(fv.shape[0], torch.SymInt) and mx.guard_eq(fv.shape[0], 8):
        pass  # dynamic=True made its length symbolic: now guarded to be 8 (recompile otherwise)
    elif not isinstance(fv, torch.Tensor) or fv.dtype != torch.float32 or fv.dim() != 1 or \
            not isinstance(fv.shape[0], int) or fv.shape[0] != 8:
        return (f"LUT graph input {node.name} is {getattr(fv, 'dtype', None)} "
                f"{tuple(getattr(fv, 'shape', ()))}, expected a float32 [8] E2M1 table")
    try:  # the real input, when Inductor has it: a different table is rejected outright
        from torch._inductor.virtualized import V

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
    mx.guard_tensor_input(match, node, E2M1_LUT, "E2M1 LUT")
    return None


def _weight_reason(match, deq: DequantStyle, K) -> Optional[str]:
    return checks.check_weight(_val(match, "w"), _val(match, "w_scale"), _val(match, "w_alpha"), deq.fmt, mx.sym_eq,
                               batched=deq.batched, K=K, weight_dtype=deq.weight_dtype) or \
        (lut_reason(match) if deq.extra_inputs else None)


def _flatten_reason(match, x) -> Optional[str]:
    """For the N-d form mm(view(QDQ(x), shape), W.T): x is >= 3-d and the view only merges
    its leading dims ([prod(lead), K]). Any other view (one that regroups K) would let a
    block straddle rows, which the fused op cannot reproduce, so it is left alone."""
    if x is None:
        return "activation has no metadata"
    r = checks.check_activation_input(x, mx.sym_eq, ndim=None)
    if r:
        return r
    if x.dim() < 3:
        return f"activation is {x.dim()}-d, expected >= 3-d before the flattening view"
    mm = match.output_node()
    view = mm.args[1] if mm.target == aten.addmm.default else mm.args[0]
    out = mx.fake(view)
    lead = 1
    for d in x.shape[:-1]:
        lead = lead * d
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or not mx.sym_eq(out.shape[1], x.shape[-1]) or \
            not mx.sym_eq(out.shape[0], lead):
        return (f"the view between the activation QDQ and mm reshapes {tuple(x.shape)} to "
                f"{tuple(getattr(out, 'shape', ()))}, not [prod(leading dims), K]")
    return None


def _weight_arg(w):
    return w.view(torch.uint8) if w.dtype != torch.uint8 else w


# --- opaque user ops ---------------------------------------------------------------------------


def opaque_dequant_style(d, batched: bool) -> DequantStyle:
    """A DequantStyle stand-in for a declared dequant op (checks read fmt/batched/alpha)."""
    return DequantStyle(f"opaque[{d.op}]", d.fmt, None, d.alpha_arg is not None, batched)


def opaque_qdq_style(q) -> QDQStyle:
    return QDQStyle(f"opaque[{q.op}]", q.act, None, q.global_scale_arg is not None)


def opaque_dequant_piece(d) -> pm.PatternExpr:
    bind = {d.weight_arg: "w", d.scale_arg: "w_scale"}
    if d.alpha_arg is not None:
        bind[d.alpha_arg] = "w_alpha"
    return mx.OpaqueCall(d.op, bind, "w_opaque")


def opaque_qdq_piece(q) -> pm.PatternExpr:
    bind = {q.input_arg: "x"}
    if q.global_scale_arg is not None:
        bind[q.global_scale_arg] = "a_gs"
    return mx.OpaqueCall(q.op, bind, "x_opaque")


_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def opaque_dequant_reason(match, decl, batched: bool) -> Optional[str]:
    """The declared dequant call computes what the fused op's weight operand means: its
    declaration constants hold, its inputs are tensors, its output is the weight's
    dequantized shape [.., N, K] in a float dtype."""
    node = match.kwargs["w_opaque"]
    r = mx.requires_reason(node, decl.requires)
    if r:
        return r
    for name in ("w", "w_scale", "w_alpha"):
        v = match.kwargs.get(name)
        if v is not None and not isinstance(v, torch.fx.Node):
            return f"{node.target}: {name} argument is the constant {v!r}, expected a tensor"
    out, w = mx.fake(node), _val(match, "w")
    if not isinstance(out, torch.Tensor) or w is None:
        return f"{node.target}: no tensor metadata"
    if out.dtype not in _FLOAT_DTYPES:
        return f"{node.target} returns {out.dtype}, expected bfloat16/float16/float32"
    nd = 3 if batched else 2
    if out.dim() != nd or w.dim() != nd:
        return f"{node.target} returns a {out.dim()}-d tensor from a {w.dim()}-d weight, expected {nd}-d"
    if w.dtype != torch.uint8:
        return f"{node.target}: weight is {w.dtype}, expected packed torch.uint8 ({decl.fmt.name})"
    if not all(mx.sym_eq(out.shape[i], w.shape[i]) for i in range(nd - 1)) or \
            not mx.sym_eq(out.shape[-1], decl.fmt.logical_size(w.shape[-1])):
        return (f"{node.target} output shape {tuple(out.shape)} is not the {decl.fmt.name} dequantized shape "
                f"of weight {tuple(w.shape)}")
    return None


def _call_mode(node, decl) -> Optional[str]:
    vals = mx.bind_schema_args(node)
    return vals[decl.scale_mode_arg] if vals is not None else None


def opaque_qdq_reason(match, decl) -> Optional[str]:
    node = match.kwargs["x_opaque"]
    r = mx.requires_reason(node, decl.requires)
    if r:
        return r
    out, x = mx.fake(node), _val(match, "x")
    if not isinstance(match.kwargs.get("x"), torch.fx.Node) or not isinstance(out, torch.Tensor) or x is None:
        return f"{node.target}: input is not a tensor"
    if out.dtype != x.dtype or out.dim() != x.dim() or \
            not all(mx.sym_eq(a, b) for a, b in zip(out.shape, x.shape)):
        return (f"{node.target} returns {out.dtype} {tuple(out.shape)} for a {x.dtype} {tuple(x.shape)} input; "
                "a fake-quantize keeps shape and dtype")
    if decl.global_scale_arg is not None and not isinstance(match.kwargs.get("a_gs"), torch.fx.Node):
        return f"{node.target}: global scale argument is {match.kwargs.get('a_gs')!r}, expected a tensor"
    if decl.scale_mode_arg is not None:
        mode = _call_mode(node, decl)
        if mode not in _MX_MODES:
            return f"{node.target}: scale mode {mode!r} is not a constant the fused ops support {_MX_MODES}"
    return None


def opaque_spec_fn(fmt, qdecl, fp6_layout):
    """spec string per match: the QDQ's scale mode may come from the call."""
    import dataclasses

    def spec_fn(match):
        act = qdecl.act if qdecl is not None else None
        if qdecl is not None and qdecl.scale_mode_arg is not None:
            act = dataclasses.replace(act, scale_mode=_call_mode(match.kwargs["x_opaque"], qdecl))
        return spec_for(fmt, act, fp6_layout=fp6_layout).to_str()
    return spec_fn


class LinearPatterns:
    """Registers the linear family into a PatternMatcherPass, lazily per activation dtype."""

    def __init__(self, pass_dict: Optional[pm.PatternMatcherPass] = None, *, styles=None, qdqs=None):
        self.pass_dict = pass_dict if pass_dict is not None else pm.PatternMatcherPass(pass_name="mxemu_linear")
        self.styles = styles if styles is not None else dequant_styles(batched=False)
        self.qdqs = qdqs if qdqs is not None else qdq_styles() + fp8_static_styles() + vllm_torch_styles()
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
        from .moe_patterns import dequant3_piece  # late: moe_patterns imports this module

        for deq in dequant_styles(batched=True):
            try:
                dpat = mx.with_users(dequant3_piece(deq, dtype), pm.MULTIPLE)
            except Exception as e:
                log.warning("mxemu linear: no loop %s pattern for %s: %r", deq.key, dtype, e)
                continue
            wt = pm.CallFunction(aten.permute.default,
                                 pm.CallFunction(aten.select.int, dpat, 0, pm.KeywordArg("e")), [1, 0])
            for q in scheme_pairs(deq, qdq_styles()):
                try:
                    qpat = mx.with_users(qdq_piece(q, dtype), pm.MULTIPLE) if q is not None else pm.KeywordArg("x")
                except Exception:
                    continue
                self._register_loop_pair(deq, q, qpat, wt)

    def _register_loop_pair(self, deq, q, qpat, wt):
        act = q.act if q is not None else None
        spec = spec_for(deq.fmt, act).to_str()
        name = f"loop_{deq.name}_{deq.fmt.name}{'_alpha' if deq.has_alpha else ''}_" + \
            (OpSpec.from_str(spec).short_name().rsplit("_", 1)[0].split("_", 1)[1] if q is not None else "a16")
        has_gs = q is not None and q.has_global_scale

        def check(match):
            x = _val(match, "x")
            r = checks.check_activation_input(x, mx.sym_eq)
            if r:
                return r
            adt = match.kwargs.get("act_dtype")
            if adt is not None and adt not in (torch.bfloat16, torch.float16):
                return f"activation dtype {adt} not supported"
            w = _val(match, "w")
            r = checks.check_weight(w, _val(match, "w_scale"), _val(match, "w_alpha"), deq.fmt, mx.sym_eq,
                                    batched=True, K=x.shape[-1], weight_dtype=deq.weight_dtype)
            if r:
                return r
            e = match.kwargs.get("e")
            if not isinstance(e, int) or not isinstance(w.shape[0], int) or not -w.shape[0] <= e < w.shape[0]:
                return f"loop-style expert index {e!r} is not a constant in [0, {w.shape[0]})"
            if has_gs:
                return checks.check_global_scale(_val(match, "a_gs"), mx.sym_eq)
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
                return torch.ops.mxemu.linear(x, _weight_arg(w[e]), s[e], alpha, gs, None, spec)

            match.replace_by_example(repl, [a for a in args if a is not None])

        mx.register_family_pattern(pm.CallFunction(aten.mm.default, qpat, wt), self.pass_dict, family=FAMILY,
                                   name=name, check=check, replace=replace)

    def _register_pair(self, deq, q, dpat, qpat, dtype, reasons=(), spec_fn=None, fp6_layout="quark"):
        act = q.act if q is not None else None
        spec = spec_for(deq.fmt, act, fp6_layout=fp6_layout).to_str()
        name = f"{deq.name}_{deq.fmt.name}{'_alpha' if deq.has_alpha else ''}_" + \
            (f"{q.name}_" + OpSpec.from_str(spec).short_name().rsplit("_", 1)[0].split("_", 1)[1] if q is not None else "a16")
        wt = pm.CallFunction(aten.permute.default, dpat, [1, 0])
        has_gs = q is not None and q.has_global_scale

        def check(match, deq=deq, q=q, nd=False):
            x = _val(match, "x")
            r = _flatten_reason(match, x) if nd else checks.check_activation_input(x, mx.sym_eq)
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
                r = checks.check_global_scale(_val(match, "a_gs"), mx.sym_eq)
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
                    return torch.ops.mxemu.linear(x, _weight_arg(w), s, alpha, gs, bias, sp)

                match.replace_by_example(repl, present)
            return replace

        mm_pat = pm.CallFunction(aten.mm.default, qpat, wt)
        mx.register_family_pattern(mm_pat, self.pass_dict, family=FAMILY, name=name, check=check,
                                   replace=make_replace(False))
        addmm_pat = pm.CallFunction(aten.addmm.default, pm.KeywordArg("bias"), qpat, wt)
        mx.register_family_pattern(addmm_pat, self.pass_dict, family=FAMILY, name=name + "_bias", check=check,
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
        mx.register_family_pattern(pm.CallFunction(aten.mm.default, flat, wt), self.pass_dict, family=FAMILY,
                                   name=name + "_nd", check=check_nd, replace=make_replace(False, flatten=True))
        mx.register_family_pattern(pm.CallFunction(aten.addmm.default, pm.KeywordArg("bias"), flat, wt),
                                   self.pass_dict, family=FAMILY, name=name + "_nd_bias", check=check_nd,
                                   replace=make_replace(True, flatten=True))

    def _register_opaque(self, dtype, first: bool):
        """Declared opaque ops (emu_inductor.register_dequant_op / register_qdq_op) as
        pieces: opaque dequant x (traced QDQ | opaque QDQ | none), traced dequant x
        opaque QDQ. Opaque-only pairs are dtype-free: registered once."""
        odeqs = [(opaque_dequant_style(d, False), opaque_dequant_piece(d), d) for d in _opaque.dequant_ops()]
        oqdqs = [(opaque_qdq_style(q), opaque_qdq_piece(q), q) for q in _opaque.qdq_ops()]
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


def _init_family(pm_pass, input_device=None):
    LinearPatterns(pm_pass).ensure(LINEAR_DTYPES)


def _register():
    from .registry import register_pattern_family

    decl = mx.declarations_file(_opaque.fingerprint())
    register_pattern_family(
        FAMILY, _init_family, order=30, replace=True, files=[decl] if decl else (),
        # Tracing this family's patterns costs seconds: skip it for graphs with no GEMM.
        anchors=(torch.ops.aten.mm, torch.ops.aten.addmm),
        description="QDQ(x) @ dequant(W).T (+bias) -> mxemu::linear (every dequant/QDQ style in emu_inductor.patterns)")


_register()
# a new declaration re-registers the family: fresh rules at the next pass run, new uuid
_opaque.add_listener(_register)
