"""Where an MoE layer written as a Python loop over experts is, around its two grouped GEMMs.

The loop form (`for e in range(E): rows = where(ids == e); y = W2[e](act(W13[e](x[rows])));
out.index_add_(0, tok, y * w[tok, slot])`) reaches this point with its per-expert GEMMs
already grouped ("semantic_loop" / "semantic_group": rows of every expert concatenated in
expert order, `cat`, each expert's result a slice of the grouped output) while the row
selection, the per-expert activations and the combine stay unrolled, with data-dependent
row counts (sizes of `nonzero` results, no hint). `moe_region.find_moe_regions` reads the
vectorized forms, whose gathered rows have a hinted size; this module finds the same roles
for the loop form, by role and shape only:

- `first`: the nearest grouped GEMM above the second one's rows, whose rows are a `cat`
  of per-expert rows (the loop families' expert-ordered rows);
- `topk_ids`: the nearest 2-d integer tensor above the first GEMM's rows that is not
  itself computed, through integer ops, from another one (a one-hot mask's slice
  `one_hot(ids).permute(2, 1, 0)[e]` is computed from the ids; a previous layer's ids
  lie above float hidden states, where the integer walk stops); the second GEMM's nearest
  one must be the same tensor;
- `hidden`, `topk_weights`, `output`: as in `moe_region` (the output a [T, H] tensor of
  the hidden dtype below the second GEMM that every per-expert slice of its result reaches:
  the whole combine, not the partial sum after expert 0);
- `body`: every node between (hidden, ids, weights) and the output, the row counts
  (SymInt nodes) computed inside it, so that probe routings with other row counts (empty
  experts included) evaluate.

Nodes that only feed run-time assertions about the loop's row counts (`_assert_scalar`
of `u0 != 0`, `sym_constrain_range`) are not uses outside the body: they check what the
unrolled loop needed, and go with it (`assertion_only`).

Nothing here evaluates anything: `moe.recognize_moe_region` proves the region found.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Optional

import torch
from torch.fx import Node

from .asserts import assertion_only
from .moe_region import GemmSite, MoeRegion, Region, cone, find_first_gemm, is_size_query
from .shapes import hint

__all__ = ["find_loop_moe_region", "loop_routing", "assertion_only", "is_loop_rows"]

_SEARCH = 600
#: [T, k] float candidates tried as the router weights, nearest the combine first
_TW_TRIES = 8


def _val(n):
    return n.meta.get("val") if isinstance(n, Node) else None


def _hinted(n) -> Optional[tuple]:
    v = _val(n)
    if not isinstance(v, torch.Tensor):
        return None
    try:
        return tuple(hint(s) for s in v.shape)
    except ValueError:  # a data-dependent size
        return None


def _is_int2d(n) -> bool:
    v = _val(n)
    return (isinstance(v, torch.Tensor) and v.dim() == 2 and not v.is_floating_point() and v.dtype != torch.bool
            and _hinted(n) is not None)


def _is_float(n) -> bool:
    v = _val(n)
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def is_loop_rows(site: GemmSite) -> bool:
    """Whether the GEMM's rows are the loop families' expert-ordered `cat` of per-expert rows."""
    r = site.rows
    return r.op == "call_function" and r.target is torch.ops.aten.cat.default


def _int_ancestors(n: Node, limit: int = _SEARCH) -> set:
    """Ancestors of `n` through the routing's integer plumbing (the walk stops at float
    tensors of 2 or more dims: scores and hidden states)."""
    seen, stack = set(), [n]
    while stack and len(seen) < limit:
        for a in stack.pop().all_input_nodes:
            if a in seen:
                continue
            seen.add(a)
            v = _val(a)
            if not (isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 2):
                stack.append(a)
    return seen


def loop_routing(site: GemmSite, sites: dict) -> Optional[Node]:
    """The top-k ids the GEMM's rows are selected by: the nearest 2-d integer tensor above
    its rows (GEMMs in `sites` followed through their rows and ends only) not computed from
    another such tensor by integer ops; None if there is none."""
    seen, q, cands = {site.rows}, deque([site.rows]), []
    while q and len(seen) < _SEARCH:
        n = q.popleft()
        s = sites.get(n)
        for a in ([s.rows, s.offs] if s is not None else n.all_input_nodes):
            if a not in seen:
                seen.add(a)
                q.append(a)
                if _is_int2d(a):
                    cands.append(a)
    for c in cands:
        up = _int_ancestors(c)
        if not any(o in up for o in cands if o is not c):
            return c
    return None


def _ancestors(n: Node, sites: dict, limit: int) -> list:
    seen, q, out = {n}, deque([n]), []
    while q and len(out) < limit:
        m = q.popleft()
        s = sites.get(m)
        for a in ([s.rows, s.offs] if s is not None else m.all_input_nodes):
            if a not in seen:
                seen.add(a)
                out.append(a)
                q.append(a)
    return out


def _used_outside(region: Region, keep: Node, live: set, asserts: set) -> Optional[str]:
    inside = set(region.nodes)
    for n in region.nodes:
        if n is keep:
            continue
        for u in n.users:
            if u not in inside and u in live and u not in asserts and not is_size_query(u):
                return f"{n.name} (inside the MoE loop) is also used by {u.name}"
    return None


def find_loop_moe_region(second: GemmSite, site_of: Callable[[Node], Optional[GemmSite]], live: set
                         ) -> tuple[Optional[MoeRegion], str]:
    """(the MoeRegion of the loop around `second`, "") or (None, why not)."""
    first = find_first_gemm(second, site_of)
    if first is None:
        return None, "no grouped GEMM feeds the second GEMM's rows"
    if not is_loop_rows(first):
        return None, "the first GEMM's rows are not a loop's per-expert rows"
    if first.experts != second.experts:
        return None, f"the two grouped GEMMs have {first.experts} and {second.experts} experts"
    sites = {first.node: first, second.node: second}
    ids = loop_routing(first, {})
    if ids is None:
        return None, "no 2-d integer top-k ids select the first GEMM's rows"
    if loop_routing(second, sites) is not ids:
        return None, f"the second GEMM's rows are not selected by {ids.name}, the first GEMM's routing"
    T, k = _hinted(ids)
    H1, dtype = hint(_val(first.rows).shape[-1]), _val(first.rows).dtype
    hidden = None
    for n in _ancestors(first.rows, {}, _SEARCH):
        # the nearest [T, H1] tensor not computed from the ids (the gathered rows are)
        if _is_float(n) and _hinted(n) == (T, H1) and _val(n).dtype == dtype \
                and ids not in set(_ancestors(n, {}, 4 * _SEARCH)):
            hidden = n
            break
    if hidden is None:
        return None, f"no [T={T}, {H1}] {dtype} hidden states the first GEMM's rows are gathered from"
    H2 = hint(_val(second.node).shape[-1])
    parts = [u for u in second.node.users if u in live]
    budget = 60 + 30 * second.experts
    outs, seen, q = [], {second.node}, deque([second.node])
    while q and len(seen) < budget:
        n = q.popleft()
        for u in n.users:
            if u not in seen and u in live:
                seen.add(u)
                q.append(u)
                if _is_float(u) and _hinted(u) == (T, H2) and _val(u).dtype == _val(hidden).dtype:
                    outs.append(u)
    order = {n: i for i, n in enumerate(second.node.graph.nodes)}
    outs = [o for o in sorted(outs, key=order.__getitem__) if set(parts) <= set(_ancestors(o, {}, 4 * _SEARCH))]
    if not outs:
        return None, (f"no {_val(hidden).dtype}[T={T}, {H2}] result below the second GEMM that every expert's "
                      f"rows reach (no combine over all experts)")
    out = outs[0]
    stop = {first.node, second.node, ids, hidden}
    tws = [n for n in _ancestors(out, {}, 4 * _SEARCH) if n not in stop and _is_float(n) and _hinted(n) == (T, k)
           and second.node not in set(_ancestors(n, {}, 4 * _SEARCH))]
    if not tws:
        return None, f"no router weights [T={T}, k={k}] reach the combine {out.name}"
    # nearest first; a [T, k] float computed per expert from the weights (`w * (ids == e)`, whose
    # sum over the slots is the expert's weight) is nearer than the weights themselves, and its
    # body would reach the router: the first candidate whose body is closed is the router weights
    body, first_why = None, None
    for tw in tws[:_TW_TRIES]:
        body, why = cone(out, [hidden, ids, tw], sites, follow_syms=True)
        if body is not None:
            break
        first_why = first_why or why
    if body is None:
        return None, f"{out.name}: {first_why}"
    if first.node not in body.nodes or second.node not in body.nodes:
        return None, f"{out.name} does not combine the GEMMs' rows"
    why = _used_outside(body, out, live, assertion_only(out.graph))
    if why:
        return None, why
    act = Region([first.node], [], second.rows)  # proven inside the body (act_direct=False)
    return MoeRegion(first, second, hidden, ids, tw, out, act, body, act_direct=False), ""
