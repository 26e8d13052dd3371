"""Shared machinery of the mxemu pattern families (linear_patterns, moe_patterns).

Builds shape-agnostic patterns from the plain search functions in
`emu_inductor.patterns`, registers them with a handler that checks preconditions and
records the outcome for explain(), and replaces a match by one `torch.ops.mxemu.*` call.

How a pattern is built (see /work/shared/spec/inductor_integration.md §2.6-2.9):
  1. trace the search function with `fwd_only` on small real example tensors (under a
     patched `torch.compiler.is_compiling`, so the reference's eager-only value checks
     are skipped exactly as they are when the user's code is compiled);
  2. normalise it the way Inductor normalised the user's graph before our post-grad
     pre-pass: aten canonicalisation, remove_noop_ops, constant_fold_uniform_value
     (zeros_like -> full), the early joint-graph patterns, view -> reshape;
  3. replace every shape argument (reshape/expand/full/empty sizes) and NaN fill
     constants by a sentinel that `fx_to_pattern` turns into `Ignored()`, so the same
     pattern matches static and dynamic shapes (extra checks verify the sizes instead);
  4. constant-only nodes (full, no tensor inputs) may be shared with other chains
     (Inductor CSEs them), so they match any number of users.
Every other constant (nibble masks, shifts, 1/6, 448, dtypes) stays exact: a near-miss
(wrong mask, other dtype) does not match. One exception: a float literal at a Tensor-typed
argument (`mul.Tensor(x, 1/6)`) also matches the f64[] graph input Dynamo makes of a
Python float global/attribute under `dynamic=True` (`FloatConst`); its value is unknown at
compile time, so the fused graph asserts it at run time (`_assert_async(c == 1/6)`).
Likewise a check may accept a float32 graph input as a known table (vLLM's module-global
E2M1 LUT, `guard_tensor_input`): the handler asserts its bits at run time.
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
from collections import Counter
from typing import Any, Callable, Optional, Sequence
from unittest import mock

import torch
from torch._inductor import pattern_matcher as pm

log = logging.getLogger("emu_inductor.passes.patterns")

aten = torch.ops.aten
prims = torch.ops.prims

__all__ = [
    "ANY",
    "trace_search",
    "build_pattern",
    "sym_eq",
    "record",
    "fake",
    "register_family_pattern",
    "replace_nodes_kwarg",
]


class _AnyShape:
    """Sentinel for burned-in shapes and NaN constants (becomes Ignored())."""

    def __repr__(self):
        return "ANY"


ANY = _AnyShape()


class _IdentityPermMarker:
    """Sentinel for a traced identity permutation (moveaxis(x, -1, -1) in a QDQ)."""

    def __repr__(self):
        return "IDENTITY_PERM"


IDENTITY_PERM = _IdentityPermMarker()


class IdentityDims(pm.PatternExpr):
    """Matches a permutation argument that is the identity of any rank ([0, 1], [0, 1, 2]).

    The QDQ pieces are traced on 2-d inputs, where `moveaxis(x, -1, -1)` leaves
    `permute(x, [0, 1])`; the same code on a [B, S, K] activation leaves [0, 1, 2]. Matching
    "the identity" instead of the traced literal lets one trace serve every rank, while a
    real reordering (which would move the block axis) still fails the match."""

    def _match(self, node, ctx):
        if isinstance(node, (list, tuple)) and all(isinstance(d, int) for d in node) and \
                list(node) == list(range(len(node))):
            return pm.Match(ctx, self)
        return pm.FailedMatch("permutation {} is not the identity", node)

    def __repr__(self):
        return "IdentityDims()"

    def pretty_print(self, pp):
        return "IdentityDims()"

# op -> positions (ints) or kwarg names of size arguments
_SHAPE_ARGS: dict[Any, tuple] = {
    aten.reshape.default: (1,),
    aten.view.default: (1,),
    aten.expand.default: (1,),
    aten.full.default: (0,),
    aten.empty.memory_format: (0,),
    aten.zeros.default: (0,),
    aten.ones.default: (0,),
    aten.new_zeros.default: (1,),
    aten.new_empty.default: (1,),
    aten.new_full.default: (1,),
    aten.empty_strided.default: (0, 1),
    aten.slice.Tensor: (2, 3),  # start/end: sizes (row counts, the gate/up split point)
}

# Numbers that may be symbolic in the user's graph (sizes): ignored in these args.
_SIZE_SCALAR_ARGS: dict[Any, tuple] = {
    aten.arange.default: (0,),
    aten.arange.start: (0, 1),
    prims.iota.default: (0,),
}


def _normalise(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    from torch._inductor.fx_passes.joint_graph import (
        canonicalize_aten_ir_passes,
        constant_fold_uniform_value,
        early_patterns,
    )
    from torch._inductor.fx_passes.post_grad import remove_noop_ops, view_to_reshape

    canonicalize_aten_ir_passes(gm)
    remove_noop_ops(gm.graph)
    constant_fold_uniform_value(gm)
    early_patterns.apply(gm.graph)
    view_to_reshape(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


@contextlib.contextmanager
def tracing_context():
    """Outside any compile's fake mode, with is_compiling() True (skips eager checks)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from ..ops.library import pattern_tracing

    with torch._guards.tracing(None), unset_fake_temporarily(), mock.patch(
        "torch.compiler.is_compiling", return_value=True
    ), pattern_tracing():
        yield


def trace_search(fn: Callable, args: Sequence[Any]) -> torch.fx.GraphModule:
    """fwd_only + the normalisation Inductor applied to the user's graph."""
    with tracing_context():
        gm = pm.fwd_only(fn, list(args))
        if any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
               and n.target._schema.is_mutable for n in gm.graph.nodes):
            # in-place user code (y[idx] = v, masked assignment): the user's graph is
            # functionalized by AOTAutograd, so functionalize the pattern as well
            gm = pm.fwd_only(torch.func.functionalize(fn, remove="mutations"), list(args))
        return _normalise(gm)


def _sentinelise(gm: torch.fx.GraphModule) -> None:
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        args = list(n.args)
        changed = False
        for pos in _SHAPE_ARGS.get(n.target, ()):
            if pos < len(args):
                args[pos] = ANY
                changed = True
        if n.target is aten.permute.default and len(args) > 1 and isinstance(args[1], (list, tuple)) and \
                list(args[1]) == list(range(len(args[1]))):
            args[1] = IDENTITY_PERM
            changed = True
        for pos in _SIZE_SCALAR_ARGS.get(n.target, ()):
            if pos < len(args):
                args[pos] = ANY
                changed = True
        for i, a in enumerate(args):
            if isinstance(a, float) and math.isnan(a):
                args[i] = ANY
                changed = True
        if changed:
            n.args = tuple(args)


def _free_constant_users(pattern: pm.PatternExpr, gm: torch.fx.GraphModule) -> None:
    """Nodes with no tensor inputs (full, empty) may be CSE'd across chains: MULTIPLE users."""
    seen = set()

    def walk(p):
        if id(p) in seen:
            return
        seen.add(id(p))
        if isinstance(p, pm.CallFunction):
            flat = list(p.flat_args_kwargs[0])
            if p.fns and p.fns[0] in (aten.full.default, aten.empty.memory_format, aten.zeros.default):
                if not any(isinstance(a, pm.PatternExpr) and not isinstance(a, pm.Ignored) for a in flat):
                    p.users = pm.MULTIPLE
            for a in flat:
                if isinstance(a, pm.PatternExpr):
                    walk(a)

    walk(pattern)


class _DtypeMarker:
    def __repr__(self):
        return "ACT_DTYPE"


def build_pattern(fn: Callable, args: Sequence[Any], argnames: Sequence[str],
                  scalar_workaround: Optional[dict] = None,
                  dtype_kwarg: Optional[tuple] = None) -> pm.PatternExpr:
    """A shape-agnostic pattern for `fn` traced on `args` (placeholders named `argnames`);
    `scalar_workaround` {name: value} turns literal numbers equal to value into KeywordArgs."""
    gm = trace_search(fn, args)
    _sentinelise(gm)
    marker = None
    if dtype_kwarg is not None:  # (dtype, name): that dtype literal becomes KeywordArg(name)
        marker = _DtypeMarker()
        for n in gm.graph.nodes:
            n.args = tuple(marker if a is dtype_kwarg[0] else a for a in n.args)
            n.kwargs = {k: (marker if v is dtype_kwarg[0] else v) for k, v in n.kwargs.items()}
    pat = pm.fx_to_pattern(gm, ignore_types=(_AnyShape, torch.device), argnames=list(argnames),
                           scalar_workaround=scalar_workaround)
    _free_constant_users(pat, gm)
    runtime_float_consts(pat)
    replace_literal(pat, IDENTITY_PERM, IdentityDims)
    if marker is not None:
        replace_nodes_kwarg(pat, marker, dtype_kwarg[1])
    if isinstance(pat, pm.CallFunction):
        pat.users = 1  # as a piece inside a bigger pattern, its result has one user
    return pat


def relax_users(pattern: pm.PatternExpr) -> pm.PatternExpr:
    """Let every inner node of `pattern` have extra users (e.g. the sym_size a dynamic
    shape reads off a reshape). Nodes still used elsewhere survive the replacement
    (Match.erase_nodes only erases dead nodes), so this trades a possible duplicate
    computation for matching; use it only where no large intermediate can be kept alive."""
    seen = set()

    def walk(p, top):
        if id(p) in seen:
            return
        seen.add(id(p))
        if isinstance(p, pm.CallFunction):
            if not top:
                p.users = pm.MULTIPLE
            for a in p.flat_args_kwargs[0]:
                if isinstance(a, pm.PatternExpr):
                    walk(a, False)

    walk(pattern, True)
    return pattern


def replace_nodes_kwarg(pattern: pm.PatternExpr, value: Any, name: str) -> pm.PatternExpr:
    """Turn every literal argument equal to `value` into KeywordArg(name) (e.g. a spec string)."""
    return replace_literal(pattern, value, lambda: pm.KeywordArg(name))


def replace_literal(pattern: pm.PatternExpr, value: Any, make: Callable[[], pm.PatternExpr]) -> pm.PatternExpr:
    """Turn every literal argument equal to `value` into the pattern `make()`."""
    seen = set()

    def sub(a):
        if a is value or (isinstance(a, str) and isinstance(value, str) and a == value):
            return make()
        if isinstance(a, (list, tuple)):
            return type(a)(sub(x) for x in a)
        if isinstance(a, pm.PatternExpr):
            walk(a)
        return a

    def walk(p):
        if id(p) in seen:
            return
        seen.add(id(p))
        if isinstance(p, pm.CallFunction):
            p.args = tuple(sub(a) for a in p.args)
            p.kwargs = {k: sub(v) for k, v in p.kwargs.items()}
            p.flat_args_kwargs = p.flatten(p.args, p.kwargs)
            for a in p.flat_args_kwargs[0]:
                if isinstance(a, pm.PatternExpr):
                    walk(a)

    walk(pattern)
    return pattern


# --- Python float constants that Dynamo turned into graph inputs ------------------------------------

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
                from torch._guards import detect_fake_mode

                fm = detect_fake_mode([val])
                with (fm if fm is not None else contextlib.nullcontext()):
                    eq.meta["val"] = aten.eq.Scalar(val, value)
            asrt = graph.call_function(aten._assert_async.msg, (eq, msg))
            asrt.meta["val"] = None
        count(f"{family}.runtime_float_const")


# --- tensor graph inputs whose values a pattern relies on (a LUT held in a buffer/global) ---------


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


def assert_runtime_tensors(match: pm.Match, family: str, name: str) -> list[str]:
    """For each guarded tensor input of the match (`guard_tensor_input`) insert
    `_assert_async(not(any(view(node, int32) != bits(table))), msg)` (one per input and table,
    shared by every match that relies on it); the table is built in-graph from `full`s, so
    it lowers on any device and needs no sync beyond _assert_async's own. Returns explain()
    notes."""
    guards = getattr(match, "_mxemu_tensor_guards", ())
    notes = []
    if not guards:
        return notes
    from torch._guards import detect_fake_mode

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
            parts = [_call_with_meta(graph, aten.full.default, ([1], b),
                                     dict(dtype=torch.int32, layout=torch.strided, device=val.device,
                                          pin_memory=False), fake_mode=fm) for b in bits]
            ref = _call_with_meta(graph, aten.cat.default, (parts, 0), fake_mode=fm)
            # not(any(ne)): aten.all has a decomposition but no Inductor lowering post-grad
            ne = _call_with_meta(graph, aten.ne.Tensor, (view, ref), fake_mode=fm)
            bad = _call_with_meta(graph, aten.any.default, (ne,), fake_mode=fm)
            ok = _call_with_meta(graph, aten.logical_not.default, (bad,), fake_mode=fm)
            asrt = graph.call_function(aten._assert_async.msg, (ok, msg))
            asrt.meta["val"] = None
        count(f"{family}.runtime_tensor_guard")
    return notes


# --- symbolic helpers ---------------------------------------------------------------------


def fake(node_or_val):
    """FakeTensor (or SymInt/py value) of a matched node."""
    if isinstance(node_or_val, torch.fx.Node):
        return node_or_val.meta.get("val")
    return node_or_val


def sym_eq(a, b) -> bool:
    """a == b provable without guarding or specialising (SymInts stay symbolic)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    try:
        return bool(statically_known_true(a == b))
    except Exception:  # pragma: no cover - defensive
        return False


def guard_eq(a, b) -> bool:
    """a == b, specialising a symbolic size to its current value when that is what it is:
    the comparison installs a shape-env guard (Dynamo checks it on every call and recompiles
    when it fails), so use it only for sizes that are constants in practice (a LUT's 8)."""
    if sym_eq(a, b):
        return True
    try:
        return bool(a == b)  # SymBool -> guard on the hint's answer
    except Exception:  # pragma: no cover - no hint: cannot decide, leave the graph alone
        return False


# --- recording for explain() -----------------------------------------------------------------

RECORDS: list[dict] = []
_MAX_RECORDS = 1000


def record(family: str, pattern: str, node: Optional[torch.fx.Node], fused: bool, reason: str = "") -> None:
    """Record a candidate: to the infra recorder when present, else to RECORDS; log it."""
    entry = {"family": family, "pattern": pattern, "node": getattr(node, "name", None), "fused": fused,
             "reason": reason}
    try:  # the backend's explain() recorder (attaches to the candidate being checked)
        from .recorder import record_candidate

        record_candidate(family, node, fused, None, reason, family=family, pattern=pattern)
    except Exception as e:  # pragma: no cover - recording must never break a compile
        log.debug("mxemu: record_candidate failed: %r", e)
    RECORDS.append(entry)
    del RECORDS[:-_MAX_RECORDS]
    log.debug("mxemu %s/%s at %s: %s%s", family, pattern, entry["node"], "fused" if fused else "left as written",
              f" ({reason})" if reason else "")


def count(name: str, n: int = 1) -> None:
    """counters["mxemu_patterns"][name]: which pattern variant fused (the family totals are
    counted by MxemuPass into counters["mxemu"] / counters["inductor"]["mxemu_<family>"])."""
    from torch._dynamo.utils import counters

    counters["mxemu_patterns"][name] += n


def register_family_pattern(
    pattern: pm.PatternExpr,
    pass_dict,
    *,
    family: str,
    name: str,
    check: Callable[[pm.Match], Optional[str]],
    replace: Callable[[pm.Match], None],
) -> None:
    """Register `pattern`: `check(match)` returns None to fuse or a reason to leave it;
    `replace(match)` rewrites the graph."""

    def extra_check(match: pm.Match) -> bool:
        try:
            reason = runtime_consts_reason(match) or check(match)
        except Exception as e:  # an internal error must never break the user's compile
            log.warning("mxemu %s/%s: precondition check failed with %r; left as written", family, name, e)
            reason = f"internal error in the check: {e!r}"
        if reason is not None:
            record(family, name, match.output_node(), False, reason)
            return False
        return True

    def handler(match: pm.Match, *args, **kwargs):
        anchor = match.output_node()
        assert_runtime_consts(match, family, name)
        notes = assert_runtime_tensors(match, family, name)
        replace(match)
        count(f"{family}.{name}")
        if notes:  # explain(): the fusion holds only while the guarded inputs keep their values
            record(family, name, anchor, True, "; ".join(notes))

    pm.register_graph_pattern(pattern, extra_check=extra_check, pass_dict=pass_dict)(handler)
    # MxemuPass reads the pattern name for explain() from the entry
    entries = pass_dict.patterns[(pattern.op, pattern.fns[0])] if isinstance(pattern, pm.CallFunction) else []
    if entries:
        try:
            entries[-1]._mxemu_pattern_name = f"{family}/{name}"
        except Exception:
            pass


def ops_histogram(graph: torch.fx.Graph) -> Counter:
    return Counter(str(n.target) for n in graph.nodes if n.op == "call_function")


def getitem(x, i):  # pragma: no cover - helper used in traced replacement fns
    return operator.getitem(x, i)


# --- opaque user ops (emu_inductor.register_dequant_op / register_qdq_op) ----------------------


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


def with_users(pattern: pm.PatternExpr, users) -> pm.PatternExpr:
    """A shallow copy of `pattern` whose top node may have `users` users (cached pieces
    are shared between patterns and must not be mutated)."""
    import copy

    p = copy.copy(pattern)
    if isinstance(p, pm._TargetExpr):
        p.users = users
    return p


def substitute(pattern: pm.PatternExpr, subs: dict) -> pm.PatternExpr:
    """A copy of `pattern` with KeywordArg(name) replaced by subs[name] (sub-patterns)."""
    memo: dict = {}

    def sub(a):
        if isinstance(a, pm.KeywordArg) and a.name in subs:
            return subs[a.name]
        if isinstance(a, (list, tuple)):
            return type(a)(sub(x) for x in a)
        if isinstance(a, pm.CallFunction):
            return walk(a)
        return a

    def walk(p):
        if id(p) in memo:
            return memo[id(p)]
        import copy

        q = copy.copy(p)
        memo[id(p)] = q
        q.args = tuple(sub(a) for a in p.args)
        q.kwargs = {k: sub(v) for k, v in p.kwargs.items()}
        q.flat_args_kwargs = q.flatten(q.args, q.kwargs)
        return q

    return walk(pattern) if isinstance(pattern, pm.CallFunction) else sub(pattern)


def declarations_file(text: str) -> Optional[str]:
    """A file whose name and contents are the declarations' fingerprint: families list it
    in `files`, so the pass uuid (and the FX-cache key) changes with the declarations."""
    import hashlib
    import os
    import tempfile

    if not text:
        return None
    h = hashlib.sha256(text.encode()).hexdigest()[:24]
    d = os.path.join(tempfile.gettempdir(), f"emu_inductor_opaque_{os.getuid() if hasattr(os, 'getuid') else 0}")
    path = os.path.join(d, f"{h}.txt")
    try:
        os.makedirs(d, exist_ok=True)
        if not os.path.isfile(path):
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        return path
    except OSError:  # pragma: no cover
        return None
