"""Run-time guards a fusion relies on, inserted next to the fused op.

A float literal at a Tensor-typed argument of a traced pattern (`mul.Tensor(x, 1/6)`)
becomes a `FloatConst`: it also matches the f64[] graph input Dynamo makes of a Python
float global/attribute under `dynamic=True`; its value is unknown at compile time, so
the fused graph asserts it at run time (`_assert_async(c == 1/6)`). Likewise a check may
accept a float32 graph input as a known table (vLLM's module-global E2M1 LUT,
`guard_tensor_input`): the handler asserts its bits at run time. A changed value raises
instead of silently computing with the traced one.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch._inductor import pattern_matcher as pm

from .recorder import count

__all__ = ["FloatConst", "runtime_float_consts", "runtime_consts", "runtime_consts_reason", "assert_runtime_consts",
           "guard_tensor_input", "assert_runtime_tensors"]

aten = torch.ops.aten
prims = torch.ops.prims

RT_CONST_PREFIX = "_mxemu_float_const_"
_rt_const_ids = iter(range(1 << 62))


def _tensorified_float(node: torch.fx.Node) -> Optional[torch.fx.Node]:
    """The node itself when it is a tensor-ified Python float: a 0-d float64 graph input
    (`torch.compile(dynamic=True)` turns float globals/attributes such as a module's
    `_SIXTH = 1/6` into `f64[]` inputs), optionally `convert_element_type`d to a float
    dtype; else None."""
    inner = node
    if node.op == "call_function" and node.target is prims.convert_element_type.default:
        if len(node.args) < 2 or node.args[1] not in (torch.float32, torch.float64):
            return None
        inner = node.args[0]
        if not isinstance(inner, torch.fx.Node):
            return None
    if inner.op != "placeholder":
        return None
    v = inner.meta.get("val")
    if not isinstance(v, torch.Tensor) or v.dim() != 0 or v.dtype != torch.float64:
        return None
    return node


class FloatConst(pm.PatternExpr):
    """A float literal of the traced search function (1/6, 448, ...). Matches the same
    literal, or the tensor-ified form of a Python float (see `_tensorified_float`); the
    latter's value is unknown at compile time, so it is bound as a match kwarg and the
    handler adds a runtime assertion `node == value` next to the fused op (sound: a
    changed constant raises instead of silently computing with the traced value)."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value
        self.name = f"{RT_CONST_PREFIX}{next(_rt_const_ids)}"

    def __repr__(self):
        return f"FloatConst({self.value!r})"

    def pretty_print(self, pp) -> str:  # pragma: no cover - debugging aid
        return repr(self.value)

    def _match(self, node, ctx):
        if not isinstance(node, torch.fx.Node):
            if node == self.value:  # as for a literal pattern argument
                return pm.Match(ctx, self)
            return pm.FailedMatch("constant_args: {!r}!={!r}", node, self.value)
        if _tensorified_float(node) is None:
            return pm.FailedMatch("float constant {!r}: {} is not a tensor-ified Python float", self.value, node)
        return pm.Match(ctx, self, kwargs={self.name: (node, self.value)})

    def pattern_eq(self, other) -> bool:
        return super().pattern_eq(other) and self.value == other.value


def runtime_float_consts(pattern: pm.PatternExpr) -> pm.PatternExpr:
    """Turn every finite float literal at a Tensor-typed argument of an aten op (e.g.
    `mul.Tensor(x, 1/6)`) into a FloatConst."""
    seen = set()

    def walk(p):
        if id(p) in seen:
            return
        seen.add(id(p))
        if not isinstance(p, pm.CallFunction):
            return
        fn = p.fns[0] if p.fns else None
        schema = getattr(fn, "_schema", None)
        if schema is not None:
            new = list(p.args)
            changed = False
            for i, a in enumerate(new):
                if (type(a) is float and math.isfinite(a) and i < len(schema.arguments)
                        and isinstance(schema.arguments[i].type, torch.TensorType)):
                    new[i] = FloatConst(a)
                    changed = True
            if changed:
                p.args = tuple(new)
                p.flat_args_kwargs = p.flatten(p.args, p.kwargs)
        for a in p.flat_args_kwargs[0]:
            if isinstance(a, pm.PatternExpr):
                walk(a)

    walk(pattern)
    return pattern


def runtime_consts(match: pm.Match) -> list:
    """[(node, value)] of the tensor-ified float constants a match relies on."""
    return [v for k, v in match.kwargs.items() if k.startswith(RT_CONST_PREFIX)]


def runtime_consts_reason(match: pm.Match) -> Optional[str]:
    """A tensor-ified float stands for the literal only where it meets float32/float64
    operands (a 16-bit operand would round the scalar to its own dtype first)."""
    nodes = set(match.nodes)
    for node, value in runtime_consts(match):
        users = [u for u in node.users if u in nodes]
        for u in users:
            v = u.meta.get("val")
            if not isinstance(v, torch.Tensor) or v.dtype not in (torch.float32, torch.float64):
                return (f"float constant {value!r} is a graph input ({node.name}, dynamic=True) used in a "
                        f"{getattr(v, 'dtype', None)} op; only float32/float64 uses are matched")
    return None


def assert_runtime_consts(match: pm.Match, family: str, name: str) -> None:
    """Insert `_assert_async(node == value)` for each tensor-ified float the match relies on."""
    consts = runtime_consts(match)
    if not consts:
        return
    graph = match.graph
    anchor = match.output_node()
    for node, value in consts:
        # one assertion per (node, value)
        if any(u.target is aten.eq.Scalar and u.args[1] == value and
               any(w.target is aten._assert_async.msg for w in u.users) for u in node.users):
            continue
        msg = (f"mxemu: {family}/{name} was fused for the float constant {value!r}, which "
               f"torch.compile(dynamic=True) made a graph input; its value changed, recompile")
        with graph.inserting_before(anchor):
            eq = graph.call_function(aten.eq.Scalar, (node, value))
            val = node.meta.get("val")
            if val is not None:
                fm = detect_fake_mode([val])
                with (fm if fm is not None else contextlib.nullcontext()):
                    eq.meta["val"] = aten.eq.Scalar(val, value)
            asrt = graph.call_function(aten._assert_async.msg, (eq, msg))
            asrt.meta["val"] = None
        count(f"{family}.runtime_float_const")


def guard_tensor_input(match: pm.Match, node: torch.fx.Node, table: Sequence[float], what: str) -> None:
    """Called by a check that accepts a float32 graph input `node` (e.g. vLLM's module-global
    E2M1 LUT) as the constant `table` although its values are not visible at compile time:
    the handler then inserts a run-time assertion that the input equals `table` bit for bit
    (`assert_runtime_tensors`), so a changed table raises instead of computing with `table`."""
    guards = match.__dict__.setdefault("_mxemu_tensor_guards", [])
    key = (node, tuple(float(v) for v in table))
    if all((g[0], g[1]) != key for g in guards):
        guards.append((node, key[1], what))


def _float32_bits(table: Sequence[float]) -> list[int]:
    return torch.tensor(list(table), dtype=torch.float32).view(torch.int32).tolist()


def _call_with_meta(graph: torch.fx.Graph, op, args: tuple, kwargs: Optional[dict] = None,
                    fake_mode=None) -> torch.fx.Node:
    """graph.call_function(op, args, kwargs) with meta["val"] computed under `fake_mode`."""
    kwargs = kwargs or {}
    n = graph.call_function(op, args, kwargs)
    vals = torch.fx.node.map_arg((args, kwargs), lambda a: a.meta.get("val"))
    with (fake_mode if fake_mode is not None else contextlib.nullcontext()):
        n.meta["val"] = op(*vals[0], **vals[1])
    return n


_table_ids = iter(range(1 << 62))


def _table_node(graph: torch.fx.Graph, bits: list[int], device, fake_mode) -> torch.fx.Node:
    """The guard's reference table as a graph node: a constant int32 buffer registered on the
    graph's module (one get_attr: Inductor embeds it like any tensor constant), else -- no
    owning module -- a `cat` of one `full` per element (which costs Inductor ~10 ms of compile
    per element: seconds for a 512-entry table)."""
    gm = graph.owning_module
    if gm is not None:
        with unset_fake_temporarily():
            t = torch.tensor(bits, dtype=torch.int32, device=device)
        name = f"_mxemu_guard_table_{next(_table_ids)}"
        gm.register_buffer(name, t)
        node = graph.get_attr(name)
        node.meta["val"] = fake_mode.from_tensor(t) if fake_mode is not None else t
        return node
    parts = [_call_with_meta(graph, aten.full.default, ([1], b),
                             dict(dtype=torch.int32, layout=torch.strided, device=device, pin_memory=False),
                             fake_mode=fake_mode) for b in bits]
    return _call_with_meta(graph, aten.cat.default, (parts, 0), fake_mode=fake_mode)


def assert_runtime_tensors(match: pm.Match, family: str, name: str) -> list[str]:
    """For each guarded tensor input of the match (`guard_tensor_input`) insert
    `_assert_async(not(any(view(node, int32) != bits(table))), msg)` (one per input and table,
    shared by every match that relies on it); the table is a constant on the input's device
    (`_table_node`), so the check needs no sync beyond _assert_async's own. Returns explain()
    notes."""
    guards = getattr(match, "_mxemu_tensor_guards", ())
    notes = []
    if not guards:
        return notes
    graph = match.graph
    anchor = match.output_node()
    for node, table, what in guards:
        notes.append(f"guarded: {what} {node.name} is a graph input, asserted at run time to equal "
                     f"{list(table)}")
        if any(u.meta.get("mxemu_tensor_guard") == table for u in node.users):
            continue
        val = node.meta.get("val")
        fm = detect_fake_mode([val])
        msg = (f"mxemu: {family}/{name} was fused for the {what} {list(table)}, which is a graph input "
               f"({node.name}: a module global or buffer); its values changed, recompile")
        bits = _float32_bits(table)
        with graph.inserting_before(anchor):
            view = _call_with_meta(graph, aten.view.dtype, (node, torch.int32), fake_mode=fm)
            view.meta["mxemu_tensor_guard"] = table
            if val.dim() != 1:  # a table of another rank ([256, 2] byte -> value pairs): flat, as `table` is
                view = _call_with_meta(graph, aten.reshape.default, (view, [len(bits)]), fake_mode=fm)
            ref = _table_node(graph, bits, val.device, fm)
            # not(any(ne)): aten.all has a decomposition but no Inductor lowering post-grad
            ne = _call_with_meta(graph, aten.ne.Tensor, (view, ref), fake_mode=fm)
            bad = _call_with_meta(graph, aten.any.default, (ne,), fake_mode=fm)
            ok = _call_with_meta(graph, aten.logical_not.default, (bad,), fake_mode=fm)
            asrt = graph.call_function(aten._assert_async.msg, (ok, msg))
            asrt.meta["val"] = None
        count(f"{family}.runtime_tensor_guard")
    return notes
