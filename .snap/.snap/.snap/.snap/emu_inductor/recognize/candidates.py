"""Find candidate cones by their role around a GEMM node of a post-grad ATen graph.

weight cone      every ancestor of the GEMM's weight operand; its leaves are graph inputs
                 (parameters and buffers are placeholders post-grad) or attributes.
activation cone  from ONE float tensor x to the tensor q feeding the GEMM's activation
                 operand (through row gathers `q[order]` and layout ops that keep its
                 last-dim rows whole, e.g. leading-dim reshapes), with q
                 of x's shape and dtype; every other input of the cone is computed from
                 scalars (a global scale), small tables and literals only.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch.fx import Node

from .shapes import concrete_shape, hint
from .structure import MAX_TABLE, packet_name

__all__ = ["GEMM_OPERANDS", "Cone", "ActCone", "gemm_nodes", "operands", "weight_cone", "activation_cone",
           "ancestors", "cut"]

aten = torch.ops.aten

#: GEMM target -> (activation operand index, weight operand index).
GEMM_OPERANDS = {
    aten.mm.default: (0, 1),
    aten.addmm.default: (1, 2),
    aten.bmm.default: (0, 1),
    aten._grouped_mm.default: (0, 1),
}

#: Cones larger than this are not candidates (a whole model is not a dequant).
MAX_CONE_NODES = 400


@dataclasses.dataclass
class Cone:
    """A subgraph: `nodes` (call_function, topo order), `leaves` (its inputs, in order of
    first use), `output` (the node whose value the cone computes)."""

    nodes: list
    leaves: list
    output: Node


@dataclasses.dataclass
class ActCone(Cone):
    """An activation cone: `x` the quantized activation, `post` the layout nodes between
    the cone output and the GEMM operand (row gathers, leading-dim reshapes), outermost last."""

    x: Node = None
    post: tuple = ()


def _val(n):
    return n.meta.get("val") if isinstance(n, Node) else None


def gemm_nodes(graph: torch.fx.Graph) -> list[Node]:
    """The GEMM nodes the recogniser looks at, in graph order."""
    return [n for n in graph.nodes if n.op == "call_function" and n.target in GEMM_OPERANDS]


#: An mxemu::linear that a traced family fused weight-only: (activation, packed codes). Its
#: activation operand may still be a QDQ the semantic family can prove and take into the op.
FUSED_LINEAR = "mxemu.linear.default"


def operands(gemm: Node) -> tuple[Node, Node]:
    """(activation operand, weight operand) of a GEMM node."""
    if str(gemm.target) == FUSED_LINEAR:
        return gemm.args[0], gemm.args[1]
    if gemm.target not in GEMM_OPERANDS:
        raise ValueError(f"gemm_node: {gemm.name} is {gemm.target}, expected one of mm/addmm/bmm/_grouped_mm "
                         f"or mxemu::linear")
    ia, iw = GEMM_OPERANDS[gemm.target]
    return gemm.args[ia], gemm.args[iw]


def _order(graph) -> dict:
    return {n: i for i, n in enumerate(graph.nodes)}


def ancestors(out: Node, limit: int = MAX_CONE_NODES,
              stop: Optional[Callable[[Node], bool]] = None) -> Optional[set]:
    """All ancestors of `out` (inclusive); None if more than `limit` call nodes. `stop(n)`
    true: `n` is kept but not walked above (a leaf), unless it is `out` itself."""
    seen = {out}
    stack = [out]
    calls = 0
    while stack:
        n = stack.pop()
        if stop is not None and n is not out and stop(n):
            continue
        if n.op == "call_function":
            calls += 1
            if calls > limit:
                return None
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def _cone_from(members: set, output: Node, order: dict) -> Cone:
    calls = sorted((n for n in members if n.op == "call_function"), key=order.__getitem__)
    inside = set(calls)
    leaves: list = []
    for n in calls:
        for a in n.all_input_nodes:
            if a not in inside and a not in leaves:
                leaves.append(a)
    if output not in inside and output not in leaves:
        leaves.append(output)
    return Cone(calls, leaves, output)


def expert_slice(n: Node) -> bool:
    """`n` is `select(L, 0, e)` of a graph input L with a literal e: one expert's stored bytes
    (or scales) of a stack, which a loop decoding expert by expert (`deq(w13[e], s13[e])`)
    reads. The weight cone takes such a slice as its leaf: the decode of one expert is then
    the same function of its leaves as a single linear's (one proof, cached, for every e), and
    the fused op reads the slice, which "semantic_group" groups back into the stack."""
    if n.op != "call_function" or n.target is not aten.select.int or len(n.args) != 3:
        return False
    src, dim, e = n.args
    return isinstance(src, Node) and src.op in ("placeholder", "get_attr") and dim == 0 and isinstance(e, int)


_ONE_BYTE = {torch.uint8, torch.int8, torch.float8_e4m3fn, torch.float8_e5m2}


def gathered_rows(n: Node) -> bool:
    """`n` is `L[idx]` of a graph input L by one integer index tensor on dim 0 that is not
    computed from 1-byte graph inputs: each routed row's expert bytes / scales gathered
    before the decode (`deq(w13[ids], s13[ids])`). Such a gather is a leaf of the weight
    cone (not the router behind `idx`): the decode of the gathered rows is the same
    function of them as a stack's decode of its experts. A look-up `lut[code]` indexes by
    a value computed from the packed bytes and stays inside the cone."""
    if n.op != "call_function" or n.target is not aten.index.Tensor or len(n.args) != 2:
        return False
    src, idx = n.args
    if not isinstance(src, Node) or src.op not in ("placeholder", "get_attr") or not isinstance(idx, (list, tuple)) \
            or len(idx) != 1 or not isinstance(idx[0], Node):
        return False
    iv = _val(idx[0])
    if not isinstance(iv, torch.Tensor) or iv.dim() != 1 or iv.dtype not in (torch.int64, torch.int32):
        return False
    up = ancestors(idx[0])
    return up is not None and not any(a.op == "placeholder" and getattr(_val(a), "dtype", None) in _ONE_BYTE
                                       for a in up)


def _weight_ancestors(out: Node, limit: int = MAX_CONE_NODES) -> Optional[set]:
    """`ancestors(out)` not walking above expert slices (`expert_slice`) and routed-row
    gathers (`gathered_rows`), which are leaves."""
    return ancestors(out, limit, stop=lambda n: bool(expert_slice(n) or gathered_rows(n)))


def weight_cone(gemm: Node) -> tuple[Optional[Cone], Optional[str]]:
    """(cone, None) or (None, why there is no weight cone)."""
    _, w = operands(gemm)
    anc = _weight_ancestors(w)
    if anc is None:
        return None, f"weight operand {w.name} has more than {MAX_CONE_NODES} ancestors"
    if w.op != "call_function":
        return None, f"weight operand {w.name} is a graph input: no dequantization in this graph"
    slices = {n for n in anc if n is not w and (expert_slice(n) or gathered_rows(n))}
    cone = _cone_from(anc - slices, w, _order(w.graph))
    return cone, None


# --- activation side ------------------------------------------------------------------------


def _is_row_gather(n: Node) -> bool:
    if n.op != "call_function" or packet_name(n.target) != "aten.index":
        return False
    idx = n.args[1]
    return len(idx) == 1 and idx[0] is not None


def _is_lead_reshape(n: Node) -> bool:
    """A reshape/unsqueeze/squeeze that keeps the last dim (merges or splits leading dims)."""
    if n.op != "call_function" or packet_name(n.target) not in ("aten.reshape", "aten.view", "aten._unsafe_view",
                                                                 "aten.unsqueeze", "aten.squeeze"):
        return False
    a, b = _val(n.args[0]), _val(n)
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.dim() == 0 or b.dim() == 0:
        return False
    if a.dtype != b.dtype:
        return False
    if packet_name(n.target) == "aten.unsqueeze":
        return n.args[1] % (a.dim() + 1) != a.dim()
    return a.shape[-1] == b.shape[-1]


#: Layout ops that may carry the QDQ output to the GEMM operand, when together they keep rows.
_ROW_LAYOUT = ("aten.reshape", "aten.view", "aten._unsafe_view", "aten.unsqueeze", "aten.squeeze",
               "aten.permute", "aten.transpose")
_VIEWS = ("aten.reshape", "aten.view", "aten._unsafe_view")


def _concrete_arg(a):
    """A layout op's argument with symbolic sizes (SymInts, their nodes) at their hints."""
    if isinstance(a, (list, tuple)):
        return type(a)(_concrete_arg(x) for x in a)
    if isinstance(a, Node):
        a = _val(a)
    return hint(a) if isinstance(a, torch.SymInt) else a


def _keeps_rows(chain: list) -> bool:
    """True when the layout nodes `chain` (in graph order; the first one's input is the
    source) only regroup the source's last-dim rows: every last-dim row of the result is one
    row of the source, whole and in order (a leading-dim reshape, an unsqueeze before the
    last dim, a permute that leaves the last dim last, or any composition of them that does,
    like einsum's unsqueeze + permute + reshape). The row-wise QDQ then commutes with the
    chain, so the pass can apply the chain to the QDQ's input instead. Decided on a meta
    tensor as views (its strides), so it costs no data at any size."""
    try:
        src = concrete_shape(_val(chain[0].args[0]))
        if src is None or len(src) == 0:
            return False
        t = torch.empty(src, device="meta")
        for n in chain:
            args = [_concrete_arg(a) for a in n.args[1:]]
            t = t.view(*args) if packet_name(n.target) in _VIEWS else n.target(t, *args)
    except Exception:  # a reshape that is no view of the source, or sizes without hints
        return False
    K = src[-1]
    if t.dim() == 0 or t.shape[-1] != K or (K > 1 and t.stride(-1) != 1) or t.storage_offset() % K:
        return False
    if tuple(t.shape) == tuple(src) and t.is_contiguous():
        return False  # the identity (fake_quantize's movedim(-1, -1)): nothing to look through
    return all(st % K == 0 for sz, st in zip(t.shape[:-1], t.stride()[:-1]) if sz > 1)


def _row_layout(q: Node) -> list:
    """The longest run of layout nodes ending at `q` (nearest q first) that keeps rows
    (`_keeps_rows`) as a whole, though single nodes of it may not; [] when there is none."""
    run, n = [], q
    while (n.op == "call_function" and packet_name(n.target) in _ROW_LAYOUT and isinstance(n.args[0], Node)
           and isinstance(_val(n.args[0]), torch.Tensor) and _val(n.args[0]).dtype == _val(n).dtype):
        run.append(n)
        n = n.args[0]
    for k in range(len(run), 0, -1):
        if _keeps_rows(run[:k][::-1]):
            return run[:k]
    return []


def _small_or_scalar(n: Node) -> bool:
    v = _val(n)
    if isinstance(v, (int, float, bool, torch.SymInt, torch.SymFloat)):
        return True
    if isinstance(v, torch.Tensor):
        try:
            return int(v.numel()) <= MAX_TABLE
        except Exception:
            return False
    return v is None and n.op == "get_attr"


def _in_list(a, p) -> bool:
    return isinstance(a, (list, tuple)) and any(x is p or _in_list(x, p) for x in a)


def _size_arg(n: Node, p: Node) -> bool:
    """`n` reads the SymInt node `p` only inside list arguments (view / reshape / full
    sizes), never as a value: a symbolic size (a data-dependent row count), which the
    extracted cone takes as a leaf at its hint and `resize` rewrites with the row factor."""
    return isinstance(_val(p), torch.SymInt) and not any(a is p for a in n.args) and \
        p not in n.kwargs.values() and (_in_list(n.args, p) or _in_list(list(n.kwargs.values()), p))


def _value_ancestors(out: Node, limit: int = MAX_CONE_NODES) -> Optional[set]:
    """`ancestors(out)` not walking past sizes read as shape arguments (`_size_arg`)."""
    seen, stack, calls = {out}, [out], 0
    while stack:
        n = stack.pop()
        if n.op == "call_function":
            calls += 1
            if calls > limit:
                return None
        for a in n.all_input_nodes:
            if a not in seen and not _size_arg(n, a):
                seen.add(a)
                stack.append(a)
    return seen


_REDUCING = ("aten.amax", "aten.max", "aten.amin", "aten.min", "aten.sum", "aten.argmin", "aten.argmax")


def activation_cone(gemm: Node) -> tuple[Optional[ActCone], Optional[str]]:
    """(cone, None), (None, None) when the operand is not quantized at all (no cone with a
    reduction), or (None, why) when the operand has a shape the recogniser does not take."""
    a, _ = operands(gemm)
    post = []
    q = a
    while True:
        if _is_row_gather(q) or _is_lead_reshape(q):  # one node at a time (symbolic sizes too)
            post.append(q)
            q = q.args[0]
            continue
        run = _row_layout(q)
        if not run:
            break
        post.extend(run)
        q = run[-1].args[0]
    qv = _val(q)
    if not isinstance(qv, torch.Tensor) or not qv.is_floating_point():
        return None, f"activation operand {a.name} is not a float tensor"
    anc = ancestors(q)
    if anc is None:
        return None, f"activation {q.name} has more than {MAX_CONE_NODES} ancestors"
    order = _order(q.graph)
    try:
        qshape = concrete_shape(qv)
    except ValueError as e:  # data-dependent rows (nonzero / boolean-mask selection): no size hint
        return None, f"activation {q.name} has a data-dependent size the probes cannot follow ({e})"
    cands = [n for n in anc if n is not q and isinstance(_val(n), torch.Tensor) and _val(n).dtype == qv.dtype
             and concrete_shape(_val(n)) == qshape]
    cands.sort(key=order.__getitem__, reverse=True)  # closest to q first
    for x in cands:
        # descendants of x inside anc(q)
        below = {x}
        for n in sorted(anc, key=order.__getitem__):
            if n is not x and any(p in below for p in n.all_input_nodes):
                below.add(n)
        inside = below - {x}
        if q not in inside:
            continue
        side_ok = True
        side: set = set()
        for n in inside:
            for p in n.all_input_nodes:
                if p in below or _size_arg(n, p):
                    continue  # a size (a data-dependent row count): a leaf taking its hint
                sa = _value_ancestors(p)
                if sa is None or any(s.op in ("placeholder", "get_attr") and not _small_or_scalar(s) for s in sa):
                    side_ok = False
                    break
                side |= sa
            if not side_ok:
                break
        if not side_ok:
            continue
        members = inside | side
        if not any(packet_name(n.target) in _REDUCING for n in inside if n.op == "call_function"):
            continue  # no reduction between x and q: not a QDQ (maybe a larger cone is)
        cone = _cone_from(members, q, order)
        cone.leaves.remove(x)
        cone.leaves.insert(0, x)
        return ActCone(cone.nodes, cone.leaves, q, x=x, post=tuple(reversed(post))), None  # outermost last
    return None, None


def cut(cone: Cone, new_leaves) -> Cone:
    """The part of `cone` above `new_leaves`: what computes its output from them (and the
    other leaves). Used to read a derived node (e.g. 1/global_scale) as a leaf."""
    stop = set(new_leaves)
    members: set = set()
    stack = [cone.output]
    while stack:
        n = stack.pop()
        if n in members:
            continue
        members.add(n)
        if n in stop:
            continue
        stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(cone.output.graph.nodes)}
    inner = {n for n in members if n not in stop}
    out = _cone_from(inner, cone.output, order)
    for leaf in new_leaves:
        if leaf in members and leaf not in out.leaves:
            out.leaves.append(leaf)
    return out
