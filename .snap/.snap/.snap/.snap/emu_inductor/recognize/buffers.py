"""Preallocated buffers in a cone: `empty` (or a computed tensor) filled by writes.

Code that dequantizes into a buffer (`out = torch.empty(...); out[..., ::2] = lo;
out[..., 1::2] = hi`, `x[mask] = 0.0`) reaches the post-grad graph in functional form:
an allocation, views of it as the destinations of `aten.copy(dst, src)` (src broadcast
and cast to dst's shape; dst's values are not read), and `slice_scatter` /
`select_scatter` / `index_put` producing each new version of the buffer. Such a cone is
still elementwise in (code, scale byte, float scale) per output element when

  * every element the cone reads from the buffer was written first (an allocation's
    memory is uninitialised: reading it would make the output depend on whatever was
    there, which no probe can cover);
  * no value written into a buffer is computed from that same buffer (a write that
    reads another position of the buffer it is building makes an output element a
    function of other output elements' inputs);
  * a version is read as a value only when complete and when no later write changes
    it (after that point reads of it are reads of an ordinary tensor).

`check_buffers` proves the first two by tracking, per buffer version, which elements
are defined: a bool mask whose size-1 dims stand for "the same along this dim", so the
usual interleave (`[..., ::2]` then `[..., 1::2]`) costs a mask of one row. Writes at
data-dependent positions (`index_put` with a boolean mask) are accepted only as the
elementwise masked fill they are (one value, mask of the base's shape), never into a
partially written buffer.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
from torch.fx import Node

__all__ = ["ALLOCATIONS", "WRITES", "check_buffers", "index_put_problem"]

#: Allocations whose elements are undefined until written.
ALLOCATIONS = frozenset({"aten.empty", "aten.new_empty", "aten.empty_like", "aten.empty_strided",
                         "aten.new_empty_strided", "aten.empty_permuted"})
#: Writes in functional form (the post-grad graph has no in-place ops).
WRITES = frozenset({"aten.copy", "aten.slice_scatter", "aten.select_scatter", "aten.index_put"})
#: Views through which a buffer's region is addressed (as a write's destination or base).
_VIEWS = frozenset({"aten.slice", "aten.select", "aten.alias"})
_SCATTERS = {"aten.slice_scatter": "aten.slice", "aten.select_scatter": "aten.select"}
#: Largest definedness mask tracked (elements); larger partial writes are refused.
MAX_MASK = 1 << 22


def _name(node: Node) -> str:
    from .structure import packet_name  # structure imports this module

    return packet_name(node.target) if node.op == "call_function" else node.op


def _val(n):
    return n.meta.get("val") if isinstance(n, Node) else None


class _Refuse(Exception):
    pass


def _static(x, what: str, node: Node) -> int:
    if isinstance(x, int):
        return x
    raise _Refuse(f"{node.name} ({_name(node)}) has a symbolic {what}; the elements it writes cannot be checked")


def _shape(node: Node) -> tuple:
    v = _val(node)
    if not isinstance(v, torch.Tensor):
        raise _Refuse(f"{node.name} ({_name(node)}) has no tensor value")
    return tuple(v.shape)


def _dim(d, nd):
    return d % nd if nd else 0


def _slice_args(node: Node, nd: int):
    a = node.args
    dim = _dim(a[1] if len(a) > 1 else node.kwargs.get("dim", 0), nd)
    start = a[2] if len(a) > 2 else node.kwargs.get("start")
    end = a[3] if len(a) > 3 else node.kwargs.get("end")
    step = a[4] if len(a) > 4 else node.kwargs.get("step", 1)
    return dim, start, end, step


def _full_slice(size, start, end, step) -> bool:
    return start in (None, 0) and step == 1 and (end is None or end == sys.maxsize or
                                                 (isinstance(end, int) and isinstance(size, int) and end >= size))


def _expand(mask: torch.Tensor, shape: tuple, dims, node: Node) -> torch.Tensor:
    """`mask` materialised along `dims` (to `shape`'s sizes there)."""
    want = [(_static(shape[d], f"size in dim {d}", node) if d in dims else mask.shape[d]) for d in range(len(shape))]
    if list(mask.shape) == want:
        return mask
    n = 1
    for s in want:
        n *= s
    if n > MAX_MASK:
        raise _Refuse(f"{node.name} ({_name(node)}) writes part of a buffer of more than {MAX_MASK} elements "
                      f"in a pattern too large to check")
    return mask.expand(want).clone()


def _slice_region(node: Node, shape: tuple, dim, start, end, step):
    """(index along dim, whether the region is the whole dim) for a slice with these args."""
    if _full_slice(shape[dim], start, end, step):
        return slice(None), True
    size = _static(shape[dim], f"size in dim {dim}", node)
    s = _static(0 if start is None else start, "slice start", node)
    e = _static(size if end is None else min(end, sys.maxsize), "slice end", node)
    st = _static(step, "slice step", node)
    return slice(s, e, st), False


class _Buf:
    """A buffer version or a view of one: its root (allocation, or the tensor first
    written into), its definedness mask, and the version a view looks into."""

    def __init__(self, root: Node, mask: torch.Tensor, version: Node):
        self.root, self.mask, self.version = root, mask, version


def index_put_problem(node: Node) -> Optional[str]:
    """None if this `index_put` is an elementwise masked fill (`x[mask] = v` with a bool
    mask over the base's dims and one value), else why it is not allowed."""
    base, indices, values = node.args[0], node.args[1], node.args[2]
    idx = [i for i in indices if i is not None]
    bv, iv, vv = _val(base), [_val(i) for i in idx], _val(values)
    if (len(idx) == 1 and len(indices) == 1 and isinstance(iv[0], torch.Tensor) and iv[0].dtype == torch.bool
            and isinstance(bv, torch.Tensor) and tuple(iv[0].shape) == tuple(bv.shape)
            and isinstance(vv, torch.Tensor) and vv.numel() == 1):
        return None
    return (f"{node.name} (aten.index_put) writes through index tensors (dtypes "
            f"{[getattr(v, 'dtype', None) for v in iv]}, values of shape {tuple(getattr(vv, 'shape', ()))}): only "
            f"a masked fill x[mask] = scalar with a bool mask of x's shape is elementwise")


def check_buffers(nodes, output: Node) -> Optional[str]:
    """None if every buffer the cone allocates or writes is read only where written
    (see the module doc), else the reason, naming the node."""
    try:
        _check(nodes, output)
    except _Refuse as e:
        return str(e)
    return None


def _check(nodes, output: Node) -> None:
    nodes = [n for n in nodes if n.op == "call_function"]
    later: set = set()  # versions a later write uses as its base (through views)
    for n in reversed(nodes):
        name = _name(n)
        if name in _SCATTERS or (name in _VIEWS and n in later):
            later.add(n.args[0])
    bufs: dict = {}
    deps: dict = {}  # value node -> the nodes its values were computed from (buffer roots included)

    def value_read(a: Node, user: Node) -> frozenset:
        b = bufs.get(a)
        if b is None:
            return deps.get(a, frozenset()) | {a}
        if not bool(b.mask.all()):
            raise _Refuse(f"{user.name} ({_name(user)}) reads {a.name}, a buffer from {b.root.name} "
                          f"({_name(b.root)}) that is not fully written: its uninitialised elements would "
                          f"reach the output")
        if b.version in later:
            raise _Refuse(f"{user.name} ({_name(user)}) reads {a.name} (buffer {b.root.name}) while later writes "
                          f"still change that buffer (a write that reads another position of the buffer it "
                          f"builds, or a read before the buffer is final)")
        return deps.get(b.root, frozenset()) | {b.root}

    def buffer_of(base: Node) -> _Buf:
        b = bufs.get(base)
        if b is not None:
            return b
        # a write into a computed tensor: that tensor becomes the buffer, fully defined
        deps.setdefault(base, value_read(base, base))
        return _Buf(base, torch.ones([1] * len(_shape(base)), dtype=torch.bool), base)

    for n in nodes:
        name = _name(n)
        if name in ALLOCATIONS:
            bufs[n] = _Buf(n, torch.zeros([1] * len(_shape(n)), dtype=torch.bool), n)
            continue
        if name in _VIEWS and n.args and n.args[0] in bufs:
            b = bufs[n.args[0]]
            shape = _shape(n.args[0])
            if name == "aten.alias":
                m = b.mask
            elif name == "aten.slice":
                dim, start, end, step = _slice_args(n, len(shape))
                region, whole = _slice_region(n, shape, dim, start, end, step)
                m = b.mask if whole else _expand(b.mask, shape, {dim}, n)
                idx = [slice(None)] * len(shape)
                idx[dim] = region if m.shape[dim] > 1 else slice(None)
                m = m[tuple(idx)]
            else:  # select
                dim = _dim(n.args[1], len(shape))
                i = _static(n.args[2], "select index", n)
                m = b.mask.select(dim, i if b.mask.shape[dim] > 1 else 0)
            bufs[n] = _Buf(b.root, m, b.version)
            continue
        if name == "aten.copy":
            deps[n] = value_read(n.args[1], n)  # dst's values are not read, buffer or not
            continue
        if name in _SCATTERS:
            base, src = n.args[0], n.args[1]
            b = buffer_of(base)
            shape = _shape(base)
            nd = len(shape)
            if name == "aten.slice_scatter":
                dim, start, end, step = _slice_args(_Shifted(n), nd)
                region, whole = _slice_region(n, shape, dim, start, end, step)
                src_dims = list(range(nd))
            else:
                dim = _dim(n.args[2], nd)
                region, whole = _static(n.args[3], "select index", n), False
                src_dims = [d for d in range(nd) if d != dim]
            sb = bufs.get(src)
            if sb is not None and sb.root is b.root:
                # a nested write (buf[0, ::2] = v): src must be a version of exactly this region
                _same_region(n, src, base)
                src_mask = sb.mask
            else:
                read = value_read(src, n)
                if b.root in read:
                    raise _Refuse(f"{n.name} ({name}) writes values computed from buffer {b.root.name} into that "
                                  f"same buffer (a write that reads another position of the buffer it builds)")
                deps[b.root] = deps.get(b.root, frozenset()) | read
                src_mask = torch.ones([1] * len(src_dims), dtype=torch.bool)
            need = {dim} if not whole else set()
            need |= {d for d, s in zip(src_dims, src_mask.shape) if s > 1}
            m = _expand(b.mask, shape, need, n)
            if m is b.mask:
                m = m.clone()
            idx = [slice(None)] * nd
            idx[dim] = region if m.shape[dim] > 1 else slice(None)
            m[tuple(idx)] = src_mask
            if bool(m.all()):
                m = torch.ones([1] * nd, dtype=torch.bool)
            bufs[n] = _Buf(b.root, m, n)
            continue
        # any other op reads its tensor inputs as values
        read = frozenset()
        for a in n.all_input_nodes:
            read |= value_read(a, n)
        deps[n] = read
    if output in bufs:
        value_read(output, output)


def _same_region(scatter: Node, src: Node, base: Node) -> None:
    """A nested write's src is the scatter of a view of `base` taken with the same region
    arguments as `scatter` (so each element goes back where it came from)."""
    view_name = _SCATTERS[_name(scatter)]
    v = src
    while _name(v) in _SCATTERS or _name(v) == "aten.alias":
        v = v.args[0]
    same = _name(v) == view_name and v.args[0] is base
    if same:
        nd = len(_shape(base))
        if view_name == "aten.slice":
            va, sa = _slice_args(v, nd), _slice_args(_Shifted(scatter), nd)
            same = va[0] == sa[0] and _norm_slice(va[1:]) == _norm_slice(sa[1:])
        else:
            same = _dim(v.args[1], nd) == _dim(scatter.args[2], nd) and v.args[2] == scatter.args[3]
    if not same:
        raise _Refuse(f"{scatter.name} ({_name(scatter)}) writes a view of its own buffer taken from another "
                      f"region ({v.name}): a write that reads another position of the buffer it builds")


class _Shifted:
    """A slice_scatter's arguments seen as a slice's (its src argument dropped)."""

    def __init__(self, node: Node):
        self.args = (node.args[0],) + tuple(node.args[2:])
        self.kwargs = node.kwargs
        self.name, self.op, self.target = node.name, node.op, node.target


def _norm_slice(t):
    start, end, step = t
    return (0 if start is None else start, sys.maxsize if end is None else end, step)
