"""Where an MoE layer is, around two grouped GEMMs: the structure `recognize_moe` proves.

Given the second GEMM of a pair (its rows computed, through an elementwise activation,
from the first GEMM's output) this module finds, by role and shape only:

- `first`: the nearest grouped GEMM above the second one's rows, routed by the same top-k
  ids (`pair_of`), with as many experts;
- `act`: the nodes between the first GEMM's output and the second GEMM's rows that depend
  on that output (the activation). Usually its only tensor input is that output
  (`act_direct`); this project's reference skeleton also scatters GEMM1's rows back to
  slot order and gathers them again for GEMM2 (with group ends computed twice): then
  routing tensors are inputs too, and the activation is proven inside the body;
- `topk_ids`: the earliest 2-d integer tensor with one entry per gathered row on the
  integer chain above the group ends (`routing_candidates`: the router's top-k ids);
- `hidden`: the [T, H] float tensor nearest above the first GEMM's rows that does not
  depend on `topk_ids` (the rows are gathered from it);
- `output`: a [T, H2] tensor of the hidden dtype below the second GEMM (the combine's result); every
  candidate is tried, nearest first;
- `topk_weights`: the float [T, k] tensor nearest above `output` on a path that avoids
  the GEMMs (the router weights the combine applies);
- `body`: every node between (hidden, topk_ids, topk_weights) and `output`, the two GEMMs
  included (only their rows and group ends are followed: their weights are already
  proven by the GEMM fusion). A body that reads another graph input, or an intermediate
  used outside the body (other than by a size query), is refused: replacing it would
  change or recompute that use.

Nothing here evaluates anything; `moe.recognize_moe` does (probe routings and activations).
Cones are `Region`s (leaves, nodes in graph order, output), the shape `cone_key` and
the evaluators take.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Callable, Optional

import torch
from torch.fx import Node

from .asserts import feeds_only_asserts
from .shapes import concrete_shape

__all__ = ["GemmSite", "Region", "MoeRegion", "find_first_gemm", "find_moe_regions", "live_nodes", "cone",
           "is_size_query", "pair_of", "routing_candidates"]

#: how far the searches look (nodes visited); MoE plumbing is a few dozen nodes
_SEARCH = 600


@dataclasses.dataclass(frozen=True)
class GemmSite:
    """A grouped GEMM as the recogniser needs it: its rows operand, its group ends and
    its expert count (the caller knows the op's argument layout; this module does not)."""

    node: Node
    rows: Node
    offs: Node
    experts: int


@dataclasses.dataclass
class Region:
    leaves: list
    nodes: list
    output: Node


@dataclasses.dataclass
class MoeRegion:
    first: GemmSite
    second: GemmSite
    hidden: Node
    topk_ids: Node
    topk_weights: Node
    output: Node
    act: Region
    body: Region
    act_direct: bool = True  # the activation cone's only tensor input is GEMM1's output

    @property
    def top_k(self) -> int:
        return concrete_shape(_val(self.topk_ids))[1]


def _val(n):
    return n.meta.get("val") if isinstance(n, Node) else None


def _shape(n):
    """Hinted shape; None for non-tensors and for data-dependent sizes (no hint: rows picked
    by nonzero / a boolean mask), which no MoE region here is proven with."""
    v = _val(n)
    if not isinstance(v, torch.Tensor):
        return None
    try:
        return concrete_shape(v)
    except ValueError:
        return None


def _is_float(n) -> bool:
    v = _val(n)
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def _is_int(n) -> bool:
    v = _val(n)
    return isinstance(v, torch.Tensor) and not v.is_floating_point() and v.dtype != torch.bool


def _is_sym(n) -> bool:
    return isinstance(_val(n), (int, torch.SymInt, float, torch.SymFloat, bool, torch.SymBool))


def _inputs(n: Node, sites: dict) -> list:
    """The inputs a walk follows: a GEMM's rows and group ends only."""
    s = sites.get(n)
    return [s.rows, s.offs] if s is not None else list(n.all_input_nodes)


def _ancestors_bfs(start: Node, sites: dict, stop=frozenset(), limit: int = _SEARCH):
    """Ancestors of `start` (exclusive) nearest first, not walking past `stop` nodes."""
    seen, q, out = {start}, deque([start]), []
    while q and len(out) < limit:
        n = q.popleft()
        if n is not start and n in stop:
            continue
        for a in _inputs(n, sites):
            if a not in seen:
                seen.add(a)
                out.append(a)
                q.append(a)
    return out


def _depends_on(node: Node, target: Node, sites: dict, limit: int = 4 * _SEARCH) -> bool:
    seen, stack = {node}, [node]
    while stack and len(seen) < limit:
        for a in _inputs(stack.pop(), sites):
            if a is target:
                return True
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return False


def live_nodes(graph) -> set:
    """Nodes whose value is used: ancestors of the output and of impure nodes. Dead
    nodes (a QDQ the GEMM fusion replaced) are not uses that block a rewrite."""
    roots = [n for n in graph.nodes if n.op == "output" or (n.op == "call_function" and n.is_impure())]
    live, stack = set(roots), list(roots)
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in live:
                live.add(a)
                stack.append(a)
    return live


def cone(output: Node, inputs: list, sites: dict, leaf=None, follow_syms: bool = False
         ) -> tuple[Optional[Region], Optional[str]]:
    """The nodes between `inputs` and `output` (GEMMs followed through rows and ends only).
    Constants (get_attr, nodes without tensor inputs) and SymInt values are allowed
    leaves, and nodes `leaf(n)` accepts; any other graph input is a reason to refuse.
    `follow_syms`: SymInt-valued nodes are computed inside the cone instead of taking their
    hint (a loop's row counts are sizes of nonzero() results: no hint, data-dependent)."""
    inset = set(inputs)
    nodes, seen, stack = [], {output}, [output]
    leaves = list(inputs)
    while stack:
        n = stack.pop()
        if n in inset:
            continue
        if leaf is not None and n is not output and leaf(n):
            leaves.append(n)
            continue
        if n.op == "placeholder":
            if _is_sym(n):
                leaves.append(n)
                continue
            return None, f"it reads the graph input {n.name} {_describe(n)}, which is not hidden states or routing"
        if n.op == "get_attr":
            leaves.append(n)
            continue
        if n.op != "call_function":
            return None, f"{n.name} is a {n.op} node"
        if _is_sym(n) and n is not output and not follow_syms:
            leaves.append(n)
            continue
        nodes.append(n)
        if len(nodes) > _SEARCH:
            return None, f"more than {_SEARCH} nodes between the routing and {output.name}"
        for a in _inputs(n, sites):
            if a not in seen:
                seen.add(a)
                stack.append(a)
    for i in inputs:
        if i not in seen:
            return None, f"{i.name} does not reach {output.name}"
    order = {n: i for i, n in enumerate(output.graph.nodes)}
    nodes.sort(key=order.__getitem__)
    return Region(leaves, nodes, output), None


def _describe(n: Node) -> str:
    v = _val(n)
    return f"{v.dtype}{tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__


def find_first_gemm(second: GemmSite, site_of: Callable[[Node], Optional[GemmSite]]) -> Optional[GemmSite]:
    """The nearest grouped GEMM above `second`'s rows (None: `second` is no second GEMM)."""
    seen, q = {second.rows}, deque([second.rows])
    while q and len(seen) < _SEARCH:
        n = q.popleft()
        s = site_of(n)
        if s is not None:
            return s
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                q.append(a)
    return None


def _dependents(src: Node, end: Node) -> set:
    """Ancestors of `end` (inclusive) that depend on `src` (inclusive)."""
    anc, stack = {end}, [end]
    while stack and len(anc) < 4 * _SEARCH:
        for a in stack.pop().all_input_nodes:
            if a not in anc:
                anc.add(a)
                stack.append(a)
    dep = {src}
    for n in end.graph.nodes:  # topological order
        if n in anc and n is not src and any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    return dep


_SIZE_QUERIES = (torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.ops.aten.sym_stride.int,
                 torch.ops.aten.sym_storage_offset.default)


def is_size_query(n: Node) -> bool:
    """A node reading only a tensor's sizes (dynamic shapes): it does not need its values,
    so it does not keep a region from being replaced (the region's nodes it reads stay)."""
    return n.op == "call_function" and n.target in _SIZE_QUERIES


def _used_outside(region: Region, keep: Node, live: set) -> Optional[str]:
    inside = set(region.nodes)
    for n in region.nodes:
        if n is keep:
            continue
        for u in n.users:
            if u not in inside and u in live and not is_size_query(u) and not feeds_only_asserts(u):
                return f"{n.name} (inside the MoE) is also used by {u.name}"
    return None


def routing_candidates(site: GemmSite, order: Optional[dict] = None) -> list:
    """2-d integer tensors above `site`'s group ends with one entry per gathered row,
    earliest first (the router's top-k ids before any reshaped copy)."""
    if order is None:
        order = {n: i for i, n in enumerate(site.node.graph.nodes)}
    rows = _shape(site.rows)
    if rows is None:
        return []
    R = rows[0]
    # the routing chain is integer (or 1-d float, histc) tensors; 2-d float tensors are the
    # router's scores or hidden states: the walk stops there, so the previous layer's ids
    # (above this layer's router) are not candidates
    seen, q, cands = {site.offs}, deque([site.offs]), []
    while q and len(seen) < _SEARCH:
        n = q.popleft()
        shp = _shape(n) if _is_int(n) and _val(n).dim() == 2 else None
        if shp is not None and shp[0] * shp[1] == R:
            cands.append(n)
        if _is_float(n) and _val(n).dim() >= 2:
            continue
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                q.append(a)
    return sorted(cands, key=order.__getitem__)


def pair_of(second: GemmSite, site_of: Callable[[Node], Optional[GemmSite]]) -> Optional[GemmSite]:
    """The first GEMM of `second`'s MoE: the nearest grouped GEMM above its rows whose group
    ends come from the same routing tensor (a GEMM of the previous layer does not pair)."""
    first = find_first_gemm(second, site_of)
    if first is None:
        return None
    a, b = routing_candidates(first), routing_candidates(second)
    return first if a and b and a[0] is b[0] else None


def find_moe_regions(second: GemmSite, site_of: Callable[[Node], Optional[GemmSite]], live: set):
    """(list of MoeRegion candidates, nearest output first; reason when there is none)."""
    first = pair_of(second, site_of)
    if first is None:
        return [], "no grouped GEMM routed by the same top-k ids feeds the second GEMM's rows"
    if first.experts != second.experts:
        return [], f"the two grouped GEMMs have {first.experts} and {second.experts} experts"
    sites = {first.node: first, second.node: second}
    dep = _dependents(first.node, second.rows)
    # nodes not depending on GEMM1's output (routing) are leaves; constants stay inside
    act, why = cone(second.rows, [first.node], {}, leaf=lambda n: n not in dep and bool(n.all_input_nodes))
    if act is None:
        return [], f"between the GEMMs: {why}"
    if any(n in sites for n in act.nodes):
        return [], "another grouped GEMM sits between the two"
    if not act.nodes:
        return [], "no activation between the GEMMs"
    act_direct = all(lf is first.node or lf.op == "get_attr" or _is_sym(lf) for lf in act.leaves)
    if act_direct:
        why = _used_outside(act, second.rows, live)
        if why:
            return [], f"activation: {why}"

    # routing: a 2-d integer tensor with one entry per gathered row, above the group ends;
    # the earliest such (topk's ids rather than a reshaped copy), provided hidden states
    # not depending on it are found above the rows
    R, H1 = _shape(first.rows)
    order = {n: i for i, n in enumerate(second.node.graph.nodes)}
    cands = routing_candidates(first, order)
    if not cands:
        return [], f"no 2-d integer routing tensor with {R} entries (one per gathered row) above the group ends"
    ids = hidden = None
    for ids in cands:
        T, k = _shape(ids)
        hidden = next((n for n in _ancestors_bfs(first.rows, sites, stop={ids})
                       if _is_float(n) and _shape(n) == (T, H1) and _val(n).dtype == _val(first.rows).dtype
                       and not _depends_on(n, ids, sites)), None)
        if hidden is not None:
            break
    if hidden is None:
        return [], f"no [T={T}, {H1}] hidden-state tensor the first GEMM's rows are gathered from"
    H2 = _shape(second.node)[-1]
    outs, seen, q = [], {second.node}, deque([second.node])
    while q and len(seen) < 60:
        n = q.popleft()
        for u in n.users:
            if u not in seen and u in live:
                seen.add(u)
                q.append(u)
                if _is_float(u) and _shape(u) == (T, H2) and _val(u).dtype == _val(hidden).dtype:
                    outs.append(u)
    if not outs:
        return [], f"no {_val(hidden).dtype}[T={T}, {H2}] result below the second GEMM (no combine over the top-k)"
    outs.sort(key=order.__getitem__)
    found, reasons = [], []
    stop = set(sites) | {ids, hidden}
    for out in outs:
        tw = next((n for n in _ancestors_bfs(out, {}, stop=stop) if n not in sites and _is_float(n)
                   and _shape(n) == (T, k) and not _depends_on(n, second.node, {})), None)
        if tw is None:
            reasons.append(f"{out.name}: no router weights [T={T}, k={k}] reach the combine")
            continue
        body, why = cone(out, [hidden, ids, tw], sites)
        if body is None:
            reasons.append(f"{out.name}: {why}")
            continue
        if first.node not in body.nodes or second.node not in body.nodes:
            reasons.append(f"{out.name}: does not combine the GEMMs' rows")
            continue
        why = _used_outside(body, out, live)
        if why:
            reasons.append(f"{out.name}: {why}")
            continue
        found.append(MoeRegion(first, second, hidden, ids, tw, out, act, body, act_direct))
    return found, ("; ".join(reasons) if not found else None)
