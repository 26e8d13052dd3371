"""Opaque user ops (``emu_inductor.register_dequant_op`` / ``register_qdq_op``) as pattern
pieces: a call of a declared op matches however its arguments are spelled, stands for
a dequant / QDQ style of its format, and is checked against its declaration.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch._inductor import pattern_matcher as pm

from ..patterns.act_qdq import QDQStyle
from ..patterns.dequant import DequantStyle
from ..spec.compat import FUSED_MX_SCALE_MODES
from .matching import meta_val, sym_eq
from .pieces import match_val, spec_for

__all__ = ["bind_schema_args", "OpaqueCall", "requires_reason", "opaque_dequant_style", "opaque_qdq_style",
           "opaque_dequant_piece", "opaque_qdq_piece", "opaque_dequant_reason", "opaque_qdq_reason",
           "opaque_spec_fn"]


def bind_schema_args(node: torch.fx.Node) -> Optional[list]:
    """The values of every schema argument of an OpOverload call (defaults filled in),
    in schema order; None when the call cannot be bound."""
    op = node.target
    schema = getattr(op, "_schema", None)
    if schema is None:
        return None
    out = []
    args, kwargs = list(node.args), dict(node.kwargs)
    for i, a in enumerate(schema.arguments):
        if i < len(args) and not a.kwarg_only:
            out.append(args[i])
        elif a.name in kwargs:
            out.append(kwargs.pop(a.name))
        elif a.has_default_value():
            out.append(a.default_value)
        else:
            return None
    if kwargs or len(args) > len([a for a in schema.arguments if not a.kwarg_only]):
        return None
    return out


class OpaqueCall(pm._TargetExpr):
    """Matches a call of one opaque OpOverload however its arguments are spelled
    (positional, keyword, defaulted) and binds the arguments at `bind` {position: name}
    as match kwargs; `node_name` binds the call node itself (the check reads its other
    arguments and its output metadata)."""

    op = "call_function"

    def __init__(self, target, bind: dict, node_name: str, users=1):
        super().__init__(target, users)
        self.bind = dict(bind)
        self.node_name = node_name

    def __repr__(self):
        return f"OpaqueCall({self.fns[0]}, {self.bind})"

    def _match(self, node, ctx):
        if not self._match_fns(node):
            return pm.FailedMatch("function_mismatch: node={}, pattern={}", node, self)
        if not self._match_users(node, ctx):
            return pm.FailedMatch("multiple_users {}", self)
        vals = bind_schema_args(node)
        if vals is None:
            return pm.FailedMatch("opaque call {} cannot be bound to its schema", node)
        kwargs = {name: vals[pos] for pos, name in self.bind.items()}
        kwargs[self.node_name] = node
        m = pm.Match(ctx, self, kwargs=kwargs)
        m.nodes.append(node)
        m.targets[self] = node.target
        return m

    def find_anchor_nodes(self, ctx, searched):
        if self in ctx.pattern_to_node:
            yield ctx.pattern_to_node[self]

    def pattern_eq(self, other):
        return super().pattern_eq(other) and self.bind == other.bind and self.node_name == other.node_name


def requires_reason(node: torch.fx.Node, requires) -> Optional[str]:
    """None when every (position, constant) of a declaration holds at this call."""
    vals = bind_schema_args(node)
    if vals is None:
        return f"{node.target} call cannot be bound to its schema"
    for pos, want in requires:
        got = vals[pos] if pos < len(vals) else None
        if isinstance(got, torch.fx.Node) or got != want or type(got) is not type(want):
            return f"{node.target} argument {pos} is {got!r}; the declaration holds for {want!r} only"
    return None



def opaque_dequant_style(d, batched: bool) -> DequantStyle:
    """A DequantStyle stand-in for a declared dequant op (checks read fmt/batched/alpha)."""
    return DequantStyle(f"opaque[{d.op}]", d.fmt, None, d.alpha_arg is not None, batched)


def opaque_qdq_style(q) -> QDQStyle:
    return QDQStyle(f"opaque[{q.op}]", q.act, None, q.global_scale_arg is not None)


def opaque_dequant_piece(d) -> pm.PatternExpr:
    bind = {d.weight_arg: "w", d.scale_arg: "w_scale"}
    if d.alpha_arg is not None:
        bind[d.alpha_arg] = "w_alpha"
    return OpaqueCall(d.op, bind, "w_opaque")


def opaque_qdq_piece(q) -> pm.PatternExpr:
    bind = {q.input_arg: "x"}
    if q.global_scale_arg is not None:
        bind[q.global_scale_arg] = "a_gs"
    return OpaqueCall(q.op, bind, "x_opaque")



_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)



def opaque_dequant_reason(match, decl, batched: bool) -> Optional[str]:
    """The declared dequant call computes what the fused op's weight operand means: its
    declaration constants hold, its inputs are tensors, its output is the weight's
    dequantized shape [.., N, K] in a float dtype."""
    node = match.kwargs["w_opaque"]
    r = requires_reason(node, decl.requires)
    if r:
        return r
    for name in ("w", "w_scale", "w_alpha"):
        v = match.kwargs.get(name)
        if v is not None and not isinstance(v, torch.fx.Node):
            return f"{node.target}: {name} argument is the constant {v!r}, expected a tensor"
    out, w = meta_val(node), match_val(match, "w")
    if not isinstance(out, torch.Tensor) or w is None:
        return f"{node.target}: no tensor metadata"
    if out.dtype not in _FLOAT_DTYPES:
        return f"{node.target} returns {out.dtype}, expected bfloat16/float16/float32"
    nd = 3 if batched else 2
    if out.dim() != nd or w.dim() != nd:
        return f"{node.target} returns a {out.dim()}-d tensor from a {w.dim()}-d weight, expected {nd}-d"
    if w.dtype != torch.uint8:
        return f"{node.target}: weight is {w.dtype}, expected packed torch.uint8 ({decl.fmt.name})"
    if not all(sym_eq(out.shape[i], w.shape[i]) for i in range(nd - 1)) or \
            not sym_eq(out.shape[-1], decl.fmt.logical_size(w.shape[-1])):
        return (f"{node.target} output shape {tuple(out.shape)} is not the {decl.fmt.name} dequantized shape "
                f"of weight {tuple(w.shape)}")
    return None


def _call_mode(node, decl) -> Optional[str]:
    vals = bind_schema_args(node)
    return vals[decl.scale_mode_arg] if vals is not None else None


def opaque_qdq_reason(match, decl) -> Optional[str]:
    node = match.kwargs["x_opaque"]
    r = requires_reason(node, decl.requires)
    if r:
        return r
    out, x = meta_val(node), match_val(match, "x")
    if not isinstance(match.kwargs.get("x"), torch.fx.Node) or not isinstance(out, torch.Tensor) or x is None:
        return f"{node.target}: input is not a tensor"
    if out.dtype != x.dtype or out.dim() != x.dim() or \
            not all(sym_eq(a, b) for a, b in zip(out.shape, x.shape)):
        return (f"{node.target} returns {out.dtype} {tuple(out.shape)} for a {x.dtype} {tuple(x.shape)} input; "
                "a fake-quantize keeps shape and dtype")
    if decl.global_scale_arg is not None and not isinstance(match.kwargs.get("a_gs"), torch.fx.Node):
        return f"{node.target}: global scale argument is {match.kwargs.get('a_gs')!r}, expected a tensor"
    if decl.scale_mode_arg is not None:
        mode = _call_mode(node, decl)
        if mode not in FUSED_MX_SCALE_MODES:
            return f"{node.target}: scale mode {mode!r} is not a constant the fused ops support {FUSED_MX_SCALE_MODES}"
    return None


def opaque_spec_fn(fmt, qdecl, fp6_layout):
    """spec string per match: the QDQ's scale mode may come from the call."""
    def spec_fn(match):
        act = qdecl.act if qdecl is not None else None
        if qdecl is not None and qdecl.scale_mode_arg is not None:
            act = dataclasses.replace(act, scale_mode=_call_mode(match.kwargs["x_opaque"], qdecl))
        return spec_for(fmt, act, fp6_layout=fp6_layout).to_str()
    return spec_fn
