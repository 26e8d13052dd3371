"""Which ATen ops a candidate cone may contain: the structural half of a proof.

Evaluation on probes shows that a cone agrees with a known variant on the probes. The
structural check is what lets that stand for every input: a weight cone built only from
elementwise ops, views and look-ups in small constant tables (a gather, or a product /
sum with a constant table over a one-hot dim: `one_hot(code).float() @ LUT`) computes each
output element from a fixed tuple of leaf elements (its code byte, its block's scale
byte, its expert's scale), so probes covering every byte value at every position under every scale byte
cover its whole domain. An activation cone may also reduce, but only over the last dim
(a block made by a reshape, or a small table dim) or over the whole tensor (per-tensor
scale). Anything data-dependent (sorting, random numbers, nonzero, data-indexed gathers
from data, writes at data-dependent positions) is refused before any evaluation.
Preallocated buffers filled by writes (`empty` + `copy` / `slice_scatter` /
`select_scatter`, `x[mask] = v` as `index_put`) are allowed when `buffers.check_buffers`
proves that no uninitialised element and no other position of the buffer being written
reaches the output.

Ops are named by their OpOverloadPacket (`aten.mul`, any overload), so `.Tensor` and
`.Scalar` forms are treated alike.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch.fx import Node

from .buffers import ALLOCATIONS, WRITES, check_buffers, index_put_problem
from .shapes import hint

__all__ = [
    "packet_name",
    "ELEMENTWISE",
    "LAYOUT",
    "CONSTRUCTORS",
    "ALLOCATIONS",
    "WRITES",
    "REDUCTIONS",
    "TABLE_LOOKUPS",
    "CONTRACTIONS",
    "SYMBOLIC",
    "op_kind",
    "check_weight_cone",
    "check_activation_cone",
    "value_preserving",
    "constant_nodes",
    "table_elements",
    "is_table_leaf",
    "MAX_LOOKUP",
]

aten = torch.ops.aten

#: Pointwise ops (elementwise with broadcasting, on values or bits). Casts included.
ELEMENTWISE = frozenset({
    "aten.abs", "aten.neg", "aten.add", "aten.sub", "aten.rsub", "aten.mul", "aten.div", "aten.reciprocal",
    "aten.sqrt", "aten.rsqrt", "aten.square", "aten.clamp", "aten.clamp_min", "aten.clamp_max", "aten.clip",
    "aten.minimum", "aten.maximum", "aten.fmax", "aten.fmin", "aten.where", "aten.eq", "aten.ne", "aten.lt",
    "aten.le", "aten.gt", "aten.ge", "aten.logical_and", "aten.logical_or", "aten.logical_not",
    "aten.logical_xor", "aten.bitwise_and", "aten.bitwise_or", "aten.bitwise_xor", "aten.bitwise_not",
    "aten.bitwise_left_shift", "aten.bitwise_right_shift", "aten.__lshift__", "aten.__rshift__",
    "aten.__and__", "aten.__or__", "aten.__xor__", "aten.floor", "aten.ceil", "aten.round", "aten.trunc",
    "aten.frac", "aten.sign", "aten.sgn", "aten.signbit", "aten.copysign", "aten.exp2", "aten.log2",
    "aten.exp", "aten.log", "aten.pow", "aten.isnan", "aten.isinf", "aten.isfinite", "aten.isposinf",
    "aten.isneginf", "aten.nan_to_num", "aten._to_copy", "prims.convert_element_type", "aten.clone",
    # a device copy: vLLM's `kE2M1ToFloat.to(device=a.device)` of a CPU table is one on a GPU
    # (it vanishes in a CPU graph); evaluation on the CPU makes it the identity
    "prims.device_put",
    "aten.remainder", "aten.fmod", "aten.floor_divide", "aten.frexp", "aten.ldexp", "aten.masked_fill",
    "aten.zeros_like", "aten.ones_like", "aten.full_like", "aten.alias", "aten.lift_fresh_copy",
    "aten.lift_fresh", "aten.fill", "aten.nextafter", "aten.mul_", "aten.heaviside",
})

#: Layout ops: each output element is one input element at a fixed index (no values made).
LAYOUT = frozenset({
    "aten.reshape", "aten.view", "aten._unsafe_view", "aten.permute", "aten.t", "aten.transpose",
    "aten.expand", "aten.unsqueeze", "aten.squeeze", "aten.slice", "aten.select", "aten.cat", "aten.stack",
    "aten.contiguous", "aten.repeat", "aten.flatten", "aten.unflatten", "aten.split", "aten.split_with_sizes",
    "aten.unbind", "aten.chunk", "aten.narrow", "aten.movedim", "aten.view_as_real",
})

#: Tensors made from literals alone (their values are constants of the graph).
CONSTRUCTORS = frozenset({
    "aten.full", "aten.arange", "aten.scalar_tensor", "aten.zeros", "aten.ones", "prims.iota",
    "aten._tensor_constant", "aten.tensor", "aten.new_zeros", "aten.new_ones", "aten.new_full",
})

#: Reductions (activation cones only; dims checked by `_reduction_ok`).
REDUCTIONS = frozenset({
    "aten.amax", "aten.amin", "aten.max", "aten.min", "aten.argmax", "aten.argmin", "aten.sum",
    "aten.any", "aten.all",
})

#: Gathers allowed when either the table or the index is a graph constant.
TABLE_LOOKUPS = frozenset({"aten.index", "aten.embedding", "aten.take", "aten.bucketize",
                           "aten.searchsorted", "aten.gather", "aten.index_select"})

#: Matrix products: allowed where one operand is a small constant table and the other's
#: contracted dim is a table dim (`_contraction_ok`): `one_hot(code).float() @ LUT`.
CONTRACTIONS = frozenset({"aten.mm", "aten.bmm"})

#: Integer shape arithmetic on SymInts (dynamic shapes).
SYMBOLIC = frozenset({"aten.sym_size", "aten.sym_numel", "aten.sym_stride"})
_PY_OPS = {operator.mul, operator.floordiv, operator.add, operator.sub, operator.truediv, operator.neg,
           operator.mod, operator.getitem}

#: Largest table (in elements) that counts as a "small constant table".
MAX_TABLE = 256
#: Largest look-up table in distinct elements (`table_elements`): a table indexed by a whole
#: packed byte that yields both of its FP4 values (256 x 2).
MAX_LOOKUP = 2 * MAX_TABLE
#: Largest last-dim reduction an activation cone may do (a block, or a grid of values).
MAX_REDUCED_DIM = 256


def packet_name(target) -> str:
    """`aten.mul` for aten.mul.Tensor; `operator.getitem` for Python operators."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target.overloadpacket._qualified_op_name).replace("::", ".")
    if isinstance(target, torch._ops.OpOverloadPacket):
        return str(target._qualified_op_name).replace("::", ".")
    mod = getattr(target, "__module__", "") or ""
    return f"{mod.split('.')[-1]}.{getattr(target, '__name__', repr(target))}"


def op_kind(node: Node) -> str:
    """elementwise | layout | constructor | alloc | write | reduction | lookup | contraction |
    symbolic | getitem | other."""
    if node.op != "call_function":
        return node.op
    t = node.target
    if t is operator.getitem:
        return "getitem"
    if t in _PY_OPS:
        return "symbolic"
    name = packet_name(t)
    for kind, names in (("elementwise", ELEMENTWISE), ("layout", LAYOUT), ("constructor", CONSTRUCTORS),
                        ("alloc", ALLOCATIONS), ("write", WRITES),
                        ("reduction", REDUCTIONS), ("lookup", TABLE_LOOKUPS), ("contraction", CONTRACTIONS),
                        ("symbolic", SYMBOLIC)):
        if name in names:
            return kind
    return "other"


def _val(n):
    return n.meta.get("val") if isinstance(n, Node) else None


def _numel(v) -> Optional[int]:
    if not isinstance(v, torch.Tensor):
        return None
    try:
        return int(v.numel())
    except Exception:  # symbolic numel
        return None


def _tensor_args(node: Node) -> list[Node]:
    out: list[Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda a: out.append(a) if isinstance(_val(a), torch.Tensor) else None)
    return out


def table_elements(v) -> Optional[int]:
    """The distinct elements a tensor value holds: its numel without broadcast (stride-0)
    dims, whose positions all read the same element (a 16-entry LUT expanded to [N, 16]
    for `torch.gather` holds 16). None for a non-tensor or a symbolic size."""
    if not isinstance(v, torch.Tensor):
        return None
    try:
        n = 1
        for size, stride in zip(v.shape, v.stride()):
            if stride != 0:
                n *= int(size)
        return n
    except Exception:  # symbolic sizes or strides
        return None


def is_table_leaf(node: Node) -> bool:
    """A float graph input small enough to be a look-up table (`MAX_LOOKUP` distinct
    elements, any rank: a [256, 2] byte -> value-pair table too); its values are read from
    the real inputs or hypothesised, and guarded (leaves.leaf_bindings)."""
    v = _val(node)
    if node.op != "placeholder" or not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.dim() == 0:
        return False
    n = table_elements(v)
    return n is not None and n <= MAX_LOOKUP


def _lookup_ok(node: Node, constant: set[Node]) -> Optional[str]:
    """A gather is a table look-up when the table is a small constant (LUT[code]) or the
    indices are constants (a fixed permutation of the data)."""
    name = packet_name(node.target)
    args = node.args
    if name in ("aten.bucketize", "aten.searchsorted"):
        bounds = args[1] if name == "aten.bucketize" else args[0]
        if isinstance(bounds, Node) and bounds in constant:
            return None
        return f"{name} with boundaries that are not graph constants ({getattr(bounds, 'name', bounds)})"
    if name == "aten.index":
        table, idx = args[0], [i for i in args[1] if i is not None]
    elif name == "aten.embedding":
        table, idx = args[0], [args[1]]
    elif name in ("aten.gather", "aten.index_select"):
        table, idx = args[0], [args[2]]
    else:  # take
        table, idx = args[0], [args[1]]
    if table in constant and (table_elements(_val(table)) or MAX_LOOKUP + 1) <= MAX_LOOKUP:
        return None
    if all(i in constant for i in idx if isinstance(i, Node)):
        return None
    return (f"{name} ({node.name}) gathers data with data-dependent indices; only look-ups in small "
            f"constant tables or constant-index gathers are allowed")


def _table_dim(n, d: int, constant: set[Node], depth: int = 0) -> bool:
    """True when dim `d` (negative, counted from the right as broadcasting aligns) of `n`
    is a table dim: every value along it comes from constants, or from data broadcast
    along it (size 1 there). The one-hot axis of `code.unsqueeze(-1) == arange(16)` is
    one: reducing over it reads one code per output element."""
    if n in constant or not isinstance(n, Node):
        return True
    v = _val(n)
    if not isinstance(v, torch.Tensor):
        return True
    if -d > v.dim():
        return True  # the dim does not exist here: broadcast
    size = v.shape[d]
    if isinstance(size, int) and size == 1:
        return True
    if depth > 64 or n.op != "call_function":
        return False
    kind = op_kind(n)
    if kind == "elementwise":
        return all(_table_dim(a, d, constant, depth + 1) for a in _tensor_args(n))
    name = packet_name(n.target)
    if name in ("aten.reshape", "aten.view", "aten._unsafe_view", "aten.expand") and isinstance(n.args[0], Node):
        src = _val(n.args[0])
        if not isinstance(src, torch.Tensor):
            return False
        if name == "aten.expand" and (-d > src.dim() or src.shape[d] == 1):
            return True
        # the dims from d rightwards unchanged: the same values along d
        if -d <= src.dim() and tuple(src.shape[d:]) == tuple(v.shape[d:]):
            return _table_dim(n.args[0], d, constant, depth + 1)
    return False


def _contraction_ok(node: Node, constant: set[Node]) -> Optional[str]:
    """mm / bmm computing a look-up: the second operand a small constant table, the first
    operand's contracted dim a table dim (one code per output element)."""
    a, t = node.args[0], node.args[1]
    if t in constant and (table_elements(_val(t)) or MAX_LOOKUP + 1) <= MAX_LOOKUP and _table_dim(a, -1, constant):
        return None
    return (f"{packet_name(node.target)} ({node.name}) is a matrix product of data; only a product with a small "
            f"constant table over a one-hot (table) dim is a look-up")


def _weight_reduction_ok(node: Node, constant: set[Node]) -> Optional[str]:
    """A weight cone may reduce only over table dims (`(one_hot(code) * LUT).sum(-1)`)."""
    v = _val(node.args[0])
    if not isinstance(v, torch.Tensor) or not v.dim():
        return f"reduction {node.name} of a weight"
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return f"reduction {node.name} over the whole weight"
    dims = [dims] if isinstance(dims, int) else list(dims)
    for d in dims:
        if not _table_dim(node.args[0], (d % v.dim()) - v.dim(), constant):
            return f"reduction {node.name} over dim {d} of the weight, which is not a table (one-hot) dim"
    return None


def _reduction_ok(node: Node) -> Optional[str]:
    v = _val(node.args[0])
    if not isinstance(v, torch.Tensor):
        return f"reduction {node.name} on a non-tensor"
    nd = v.dim()
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return None  # the whole tensor: a per-tensor scale
    if isinstance(dims, int):
        dims = [dims]
    dims = sorted({d % nd for d in dims}) if nd else []
    if dims == list(range(nd)):
        return None
    if dims == [nd - 1]:
        size = v.shape[-1]
        try:
            size = hint(size)  # a symbolic block (make_fx symbolic) takes its hint
        except ValueError:
            pass
        if isinstance(size, int) and size <= MAX_REDUCED_DIM:
            return None
        return f"reduction {node.name} over a last dim of size {size} (> {MAX_REDUCED_DIM}: not a block)"
    return f"reduction {node.name} over dims {dims} of a {nd}-d tensor (only the last dim or all dims)"


def value_preserving(node: Node) -> bool:
    """A layout op, clone or same-dtype cast: its values are its input's values."""
    if node.op != "call_function":
        return False
    kind = op_kind(node)
    if kind == "layout":
        return True
    name = packet_name(node.target)
    if name in ("aten.clone", "aten.alias", "aten.lift_fresh_copy", "aten._to_copy", "prims.convert_element_type",
                "prims.device_put"):
        src, out = _val(node.args[0]), _val(node)
        return isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.dtype == out.dtype
    return False


def constant_nodes(nodes, leaves_with_values: set[Node]) -> set[Node]:
    """Nodes of `nodes` (topo order) computed from constructors and known-value leaves only."""
    const: set[Node] = set(leaves_with_values)
    for n in nodes:
        if n.op == "get_attr":
            const.add(n)
        elif n.op == "call_function":
            ins = n.all_input_nodes
            if all(a in const or a.op == "get_attr" for a in ins) and op_kind(n) != "other":
                const.add(n)
    return const


def _check(nodes, allowed_kinds, constant: set[Node], side: str, output: Optional[Node]) -> Optional[str]:
    calls = [n for n in nodes if n.op == "call_function"]
    for n in nodes:
        if n.op != "call_function":
            continue
        kind = op_kind(n)
        if kind not in allowed_kinds:
            return f"{side} cone contains {packet_name(n.target)} ({n.name}), which is not an allowed {side} op"
        if kind == "lookup":
            why = _lookup_ok(n, constant)
            if why:
                return why
        if kind == "reduction":
            why = _reduction_ok(n) if side == "activation" else _weight_reduction_ok(n, constant)
            if why:
                return why
        if kind == "contraction":
            why = _contraction_ok(n, constant)
            if why:
                return why
        if packet_name(n.target) == "aten.index_put":
            why = index_put_problem(n)
            if why:
                return f"{side} cone: {why}"
    if calls and any(op_kind(n) in ("alloc", "write") for n in calls):
        why = check_buffers(calls, output if output is not None else calls[-1])
        if why:
            return f"{side} cone: {why}"
    return None


_WEIGHT_KINDS = {"elementwise", "layout", "constructor", "alloc", "write", "lookup", "contraction", "getitem",
                 "symbolic", "reduction"}


def check_weight_cone(nodes, constant: set[Node], output: Optional[Node] = None) -> Optional[str]:
    """None if the weight cone is elementwise/layout/constant look-ups only (buffers filled
    by writes included), else why not. `output`: the cone's output (default: last node)."""
    return _check(nodes, _WEIGHT_KINDS, constant, "weight", output)


def check_activation_cone(nodes, constant: set[Node], output: Optional[Node] = None) -> Optional[str]:
    """None if the activation cone is elementwise/layout/block reductions only, else why not."""
    return _check(nodes, _WEIGHT_KINDS, constant, "activation", output)
