"""Track leading leaf dims ("factors") through a cone so it can be evaluated at other sizes.

A weight cone of a real MoE layer holds E x N x K elements (128 x 1536 x 2048 for Qwen3's
w13): far too much to evaluate on probes at compile time. A row-wise activation QDQ has
a token count that may be symbolic. Both are *factors*: a leaf dim (experts, rows,
tokens) that every op of the cone carries along as a whole, never mixing two of its
slices. Such a cone is the same function slice by slice, so it can be evaluated with
the factor at another size (1-4 experts, thousands of probe rows) once every literal
size that stems from the factor is rewritten.

`plan(...)` propagates each factor through the cone on the real (hinted) shapes. A
factor lives in one dim of each tensor as `(dim, inner, outer)`: that dim's size is
outer * S * inner, with the factor the middle digit (a flatten of [E, N, K/2] keeps E as
the outer digit of one dim). An op that slices, reduces, selects along, or merges the
factor's digit with data that lacks it loses the factor: it stays at its real size.
The plan lists every shape argument to rewrite; `Plan.resized_args` applies new sizes.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import torch
from torch.fx import Node

from .shapes import concrete_shape, hint
from .structure import op_kind, packet_name

__all__ = ["Plan", "plan"]

Info = dict  # fid -> (dim, inner, outer)


@dataclasses.dataclass
class Plan:
    """Where each factor goes and which shape arguments mention it."""

    sizes: dict  # fid -> real size S
    lost: set  # fids that cannot be resized
    why_lost: dict  # fid -> first node that lost it (for explain)
    shape_rewrites: list  # (node, arg index, position in the list, tuple of fids)
    slice_ends: list  # slice nodes over a factor dim whose end must follow the new size
    out_info: Info  # factors of the cone output

    def resizable(self, fid) -> bool:
        return fid in self.sizes and fid not in self.lost

    def resized_args(self, node: Node, args: tuple, new_sizes: dict) -> tuple:
        """`args` of `node` with factor-derived sizes replaced for `new_sizes` (fid -> S')."""
        args = list(args)
        for n, ai, pos, fids in self.shape_rewrites:
            if n is not node:
                continue
            lst = list(args[ai])
            old = lst[pos]
            if isinstance(old, int) and old == -1:
                continue
            orig = hint(old) if not isinstance(old, Node) else hint(old.meta["val"])
            num = orig
            for f in fids:
                num = num // self.sizes[f] * new_sizes.get(f, self.sizes[f])
            lst[pos] = num
            args[ai] = lst
        for n in self.slice_ends:
            if n is node and len(args) > 3:
                args[3] = sys.maxsize
        return tuple(args)


def _strides(shape) -> list[int]:
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= s
    return list(reversed(out))


class _Lost(Exception):
    pass


def _norm(d: int, nd: int) -> int:
    return d % nd if nd else 0


def plan(nodes: list[Node], output: Node, leaf_factors: dict[Node, dict[int, str]]) -> Plan:
    """Propagate the factors `leaf_factors` (leaf -> {dim: fid}) through `nodes` (topo order).

    Sizes are the leaves' real (hinted) sizes; a fid used on several leaves must have the
    same size on each, else it is lost at once. A leaf dim that holds several factors
    flattened (experts stored 2-d as [E*N, K/2]) is given as a tuple of (fid, size), outer
    digit first, whose sizes multiply to the dim's size.
    """
    sizes: dict = {}
    lost: set = set()
    why: dict = {}
    info: dict[Node, Info] = {}
    rewrites: list = []
    slice_ends: list = []

    def lose(fids, node, reason):
        for f in fids:
            if f not in lost:
                lost.add(f)
                why[f] = f"{node.name}: {reason}"

    for leaf, dims in leaf_factors.items():
        shp = concrete_shape(leaf.meta.get("val"))
        inf: Info = {}
        for d, f in dims.items():
            digits = ((f, shp[d]),) if isinstance(f, str) else tuple(f)
            if math.prod(s for _, s in digits) != shp[d]:
                raise ValueError(f"leaf_factors: {leaf.name} dim {d} has size {shp[d]}, not {digits}")
            for k, (f, s) in enumerate(digits):
                if f in sizes and sizes[f] != s:
                    lose([f], leaf, "leaves disagree on its size")
                sizes.setdefault(f, s)
                inner = math.prod(s2 for _, s2 in digits[k + 1:])
                inf[f] = (d, inner, shp[d] // (s * inner))
        info[leaf] = inf

    def shape(n):
        return concrete_shape(n.meta.get("val")) if isinstance(n, Node) else None

    def merge_at(contribs: dict, node) -> Info:
        """contribs: out dim -> list of (factor dict or {} for plain data)."""
        out: Info = {}
        for od, cs in contribs.items():
            keys = {tuple(sorted(c.items())) for c in cs}
            if len(keys) > 1:
                lose({f for c in cs for f in c}, node, "merged with data that lacks it")
                continue
            for f, (inner, outer) in cs[0].items():
                out[f] = (od, inner, outer)
        return out

    # full/zeros/ones (one value everywhere) and empty (written before read: buffers.py)
    # outputs -> index of their size argument: any size fits
    uniform: dict = {}

    def elementwise(node, out_shape, inputs=None) -> Info:
        contribs: dict = {}
        uses = []
        for a in (node.all_input_nodes if inputs is None else inputs):
            ts = shape(a)
            if ts is None:
                continue
            if a in uniform:
                uses.append((a, len(out_shape) - len(ts), ts))
                continue
            a_inf = info.get(a, {})
            off = len(out_shape) - len(ts)
            by_dim: dict = {}
            for f, (d, inner, outer) in a_inf.items():
                by_dim.setdefault(d, {})[f] = (inner, outer)
            for j, s in enumerate(ts):
                od = j + off
                fs = by_dim.get(j, {})
                if s == 1 and not fs:
                    continue  # broadcast
                if fs and s != out_shape[od]:
                    lose(fs, node, "broadcast along it")
                    continue
                contribs.setdefault(od, []).append(fs)
        out = merge_at(contribs, node)
        # a uniform constant broadcast against a factor dim follows the factor's new size
        for a, off, ts in uses:
            for f, (od, _, _) in out.items():
                j = od - off
                if 0 <= j < len(ts) and ts[j] != 1:
                    # every factor of that dim (a buffer over rows_total = E*N*G holds several)
                    key = (a, uniform[a], j)
                    at = next((i for i, r in enumerate(rewrites) if r[:3] == key), None)
                    if at is None:
                        rewrites.append(key + ((f,),))
                    elif f not in rewrites[at][3]:
                        rewrites[at] = key + (rewrites[at][3] + (f,),)
        return out

    for node in nodes:
        if node.op != "call_function":
            continue
        inputs = node.all_input_nodes
        in_f = set().union(*[set(info.get(a, {})) for a in inputs]) if inputs else set()
        if packet_name(node.target) in ("aten.full", "aten.zeros", "aten.ones", "aten.empty") and \
                all(isinstance(a.meta.get("val"), torch.SymInt) for a in inputs) and \
                not any(isinstance(a, Node) for a in node.args[1:]):  # symbolic sizes only, a constant value
            uniform[node] = 0
            info[node] = {}
            continue
        if packet_name(node.target) in ("aten.new_empty", "aten.new_zeros", "aten.new_ones", "aten.new_full"):
            uniform[node] = 1  # the tensor argument gives only dtype and device
            info[node] = {}
            continue
        if not in_f:
            info[node] = {}
            continue
        out_shape = shape(node)
        name = packet_name(node.target)
        kind = op_kind(node)
        x = node.args[0] if node.args else None
        xi = info.get(x, {}) if isinstance(x, Node) else {}
        xs = shape(x) if isinstance(x, Node) else None
        try:
            if kind == "getitem":
                src = node.args[0]
                info[node] = info.get(src, {})  # tuple parts share the tuple's factor dims
                continue
            if name in ("aten.sym_size", "aten.sym_numel", "aten.sym_stride"):
                info[node] = {}
                continue
            if out_shape is None and name not in ("aten.frexp", "aten.max", "aten.min", "aten.split",
                                                  "aten.split_with_sizes", "aten.chunk", "aten.unbind"):
                lose(in_f, node, "non-tensor result")
                continue
            if kind == "elementwise" and name != "aten.frexp":
                info[node] = elementwise(node, out_shape)
            elif name == "aten.copy":  # src broadcast into dst's shape; dst's values unused
                info[node] = elementwise(node, out_shape, [node.args[1]])
            elif name == "aten.slice_scatter":  # a factor along the written dim is lost by the broadcast rule
                info[node] = elementwise(node, out_shape, [node.args[0], node.args[1]])
            elif name == "aten.index_put":  # a masked fill (buffers.index_put_problem): elementwise
                if len(shape(node.args[1][0])) != len(out_shape):
                    raise _Lost("index_put with a mask over leading dims")
                info[node] = elementwise(node, out_shape)
            elif name == "aten.select_scatter":
                dim = _norm(node.args[2], len(out_shape))
                base, src = node.args[0], node.args[1]
                bi = {} if base in uniform else info.get(base, {})
                si = {f: (d + (d >= dim), i, o) for f, (d, i, o) in info.get(src, {}).items()}
                if any(d == dim for d, _, _ in bi.values()) or \
                        (base not in uniform and any(bi.get(f) != v for f, v in si.items())) or \
                        any(f not in si for f in bi):
                    raise _Lost("select_scatter mixes it with data that lacks it")
                info[node] = si if base in uniform else bi
                if base in uniform:
                    for f, (d, _, _) in si.items():
                        rewrites.append((base, uniform[base], d, (f,)))
            elif name == "aten.frexp":
                info[node] = dict(xi)
            elif name in ("aten.reshape", "aten.view", "aten._unsafe_view"):
                if len(node.args) > 1 and isinstance(node.args[1], torch.dtype):  # view.dtype
                    same_width = node.meta["val"].dtype.itemsize == x.meta["val"].dtype.itemsize
                    if not same_width and any(d == len(xs) - 1 for d, _, _ in xi.values()):
                        raise _Lost("a dtype view changes its width")
                    info[node] = dict(xi)
                    continue
                st_in, st_out = _strides(xs), _strides(out_shape)
                new: Info = {}
                for f, (d, inner, outer) in xi.items():
                    S = sizes[f]
                    T = st_in[d] * inner
                    od = None
                    for k in range(len(out_shape) - 1, -1, -1):
                        if out_shape[k] > 1 and st_out[k] * out_shape[k] >= S * T:
                            od = k
                            break
                    if od is None or T % st_out[od] or (st_out[od] * out_shape[od]) % (S * T):
                        lose([f], node, "a reshape splits it")
                        continue
                    i2 = T // st_out[od]
                    new[f] = (od, i2, out_shape[od] // (S * i2))
                info[node] = new
                by_pos: dict = {}
                for f, (od, _, _) in new.items():
                    by_pos.setdefault(od, []).append(f)
                for od, fs in by_pos.items():
                    rewrites.append((node, 1, od, tuple(fs)))
            elif name == "aten.view_as_real":
                raise _Lost("view_as_real")
            elif name == "aten.permute":
                perm = [_norm(p, len(xs)) for p in node.args[1]]
                info[node] = {f: (perm.index(d), i, o) for f, (d, i, o) in xi.items()}
            elif name == "aten.t":
                info[node] = {f: ((1 - d) if len(xs) == 2 else d, i, o) for f, (d, i, o) in xi.items()}
            elif name == "aten.transpose":
                a, b = _norm(node.args[1], len(xs)), _norm(node.args[2], len(xs))
                info[node] = {f: (b if d == a else a if d == b else d, i, o) for f, (d, i, o) in xi.items()}
            elif name == "aten.expand":
                off = len(out_shape) - len(xs)
                info[node] = {f: (d + off, i, o) for f, (d, i, o) in xi.items()}
                by_pos = {}
                for f, (d, _, _) in xi.items():
                    by_pos.setdefault(d + off, []).append(f)
                for od, fs in by_pos.items():
                    rewrites.append((node, 1, od, tuple(fs)))
            elif name == "aten.unsqueeze":
                u = _norm(node.args[1], len(xs) + 1)
                info[node] = {f: (d + (d >= u), i, o) for f, (d, i, o) in xi.items()}
            elif name == "aten.squeeze":
                dims = node.args[1] if len(node.args) > 1 else [k for k, s in enumerate(xs) if s == 1]
                dims = [dims] if isinstance(dims, int) else list(dims)
                dims = sorted({_norm(d, len(xs)) for d in dims if xs[_norm(d, len(xs))] == 1})
                if any(d in dims for d, _, _ in xi.values()):
                    raise _Lost("squeezed")
                info[node] = {f: (d - sum(k < d for k in dims), i, o) for f, (d, i, o) in xi.items()}
            elif name == "aten.slice":
                dim = _norm(node.args[1] if len(node.args) > 1 else 0, len(xs))
                start = node.args[2] if len(node.args) > 2 else None
                end = node.args[3] if len(node.args) > 3 else None
                step = node.args[4] if len(node.args) > 4 else 1
                on = [f for f, (d, _, _) in xi.items() if d == dim]
                if on:
                    full = (start in (None, 0)) and step == 1 and (end is None or (isinstance(end, int) and end >= xs[dim]))
                    if not full:
                        raise _Lost("sliced along it")
                    slice_ends.append(node)
                info[node] = dict(xi)
            elif name == "aten.select":
                dim = _norm(node.args[1], len(xs))
                if any(d == dim for d, _, _ in xi.values()):
                    raise _Lost("selected along it")
                info[node] = {f: (d - (d > dim), i, o) for f, (d, i, o) in xi.items()}
            elif name in ("aten.cat", "aten.stack"):
                tensors = node.args[0]
                nd = len(shape(tensors[0]))
                dim = _norm(node.args[1] if len(node.args) > 1 else 0, nd + (name == "aten.stack"))
                contribs: dict = {}
                for t in tensors:
                    by_dim: dict = {}
                    for f, (d, i, o) in info.get(t, {}).items():
                        by_dim.setdefault(d, {})[f] = (i, o)
                    for j in range(nd):
                        od = j + (name == "aten.stack" and j >= dim)
                        fs = by_dim.get(j, {})
                        if name == "aten.cat" and j == dim:
                            if fs:
                                lose(fs, node, "concatenated along it")
                            continue
                        contribs.setdefault(od, []).append(fs)
                info[node] = merge_at(contribs, node)
            elif name in ("aten.split", "aten.split_with_sizes", "aten.chunk", "aten.unbind"):
                dim = _norm(node.args[2] if len(node.args) > 2 else (node.args[1] if name == "aten.unbind" and len(node.args) > 1 else 0), len(xs))
                if any(d == dim for d, _, _ in xi.values()):
                    raise _Lost("split along it")
                if name == "aten.unbind":
                    info[node] = {f: (d - (d > dim), i, o) for f, (d, i, o) in xi.items()}
                else:
                    info[node] = dict(xi)
            elif name == "aten.index":
                idx = list(node.args[1])
                real = [(p, t) for p, t in enumerate(idx) if t is not None]
                if len(real) != 1:
                    raise _Lost("multi-tensor indexing")
                p, t = real[0]
                if any(d == p for d, _, _ in xi.values()):
                    raise _Lost("gathered along it")
                tsh = shape(t)
                out: Info = {}
                for f, (d, i, o) in xi.items():
                    out[f] = (d if d < p else d + len(tsh) - 1, i, o)
                for f, (d, i, o) in info.get(t, {}).items():
                    out[f] = (p + d, i, o)
                info[node] = out
            elif name == "aten.embedding":
                if xi:
                    raise _Lost("embedding table carries it")
                info[node] = dict(info.get(node.args[1], {}))
            elif name in ("aten.bucketize",):
                info[node] = dict(xi)
            elif name == "aten.searchsorted":
                info[node] = dict(info.get(node.args[1], {}))
            elif kind == "contraction":  # a table look-up (structure._contraction_ok): rows carried
                if info.get(node.args[1], {}):
                    raise _Lost("in a matrix product's table operand")
                if any(d == len(xs) - 1 for d, _, _ in xi.values()):
                    raise _Lost("contracted over")
                info[node] = dict(xi)
            elif kind == "reduction":
                nd = len(xs)
                dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
                keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
                if dims is None or (isinstance(dims, (list, tuple)) and not dims):
                    raise _Lost("reduced over")
                dims = [dims] if isinstance(dims, int) else list(dims)
                dims = sorted({_norm(d, nd) for d in dims})
                if any(d in dims for d, _, _ in xi.values()):
                    raise _Lost("reduced over")
                info[node] = {f: (d if keep else d - sum(k < d for k in dims), i, o) for f, (d, i, o) in xi.items()}
            else:
                raise _Lost(f"{name} is not tracked")
        except _Lost as e:
            lose(in_f, node, str(e))
            info[node] = {}
    out_info = info.get(output, {})
    for f in sizes:
        if f not in lost and f not in out_info:
            lost.add(f)
            why[f] = "does not reach the output"
    return Plan(sizes, lost, why, rewrites, slice_ends, out_info)

