"""Pattern family "semantic_loop_moe" (order 98, after "semantic_group"): an MoE written as a
Python loop over experts becomes one `mxemu::moe` where its pieces are proven.

By the time this family runs, the loop's per-expert GEMMs are two `mxemu::grouped_mm`
over expert-ordered rows ("semantic_loop" groups F.linear over slices W[e] of a decoded
stack, "semantic_group" per-expert mxemu::linear over slices of the packed bytes; "semantic"
fuses and proves the weights), while the row selection (`nonzero(ids == e)`, the one-hot
mask's `torch.where`, a boolean mask), the per-expert activations and the combine
(`index_add_`, masked assignment, `scatter_add_`) stay unrolled. `recognize.moe_loop` finds
the layer's roles around the second GEMM (hidden states, top-k ids, router weights, the
combined result) and `recognize.moe.recognize_moe_region` proves, by evaluating the whole
unrolled body on probe GEMMs and probe routings (empty experts, repeated experts, every row
on one expert, zero weights, and hidden states holding every 16-bit pattern for the
activation), that it computes mxemu::moe with one activation and one k-sum order: the same
routing for every expert, expert e's rows meeting expert e's slice of each stack, the
activation, the router weight and the combine into one output. Then the region becomes
`mxemu::moe(hidden, w13, ..., topk_weights, topk_ids, a1_gs, a2_gs, None, spec)` (arguments
and spec as "semantic_moe" builds them). Anything not proven leaves the two grouped GEMMs as
they are and explain() records the reason. An activation QDQ written per expert is taken into
the grouped GEMMs by "semantic_loop" when it is proven the same row-local function for every
expert (`recognize.expert_qdq`); otherwise it stays in the loop, and this family refuses the
layer with semantic_loop's reason.

Run-time assertions about the loop's row counts (`u0 != 0`, which stock Inductor adds for
a reshape of nonzero-selected rows) go with the region: mxemu::moe needs none of them, so
routings with an empty expert run.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch._inductor import pattern_matcher as pm

from ..ops.validate import check_moe_inputs
from ..recognize import Rejection
from ..recognize.moe import recognize_moe_region
from ..recognize.moe_loop import assertion_only, find_loop_moe_region, is_loop_rows
from ..recognize.moe_region import find_first_gemm, live_nodes
from ..recognize.shapes import hint
from ..spec import OpSpec
from .guards import register_family_pattern
from .recorder import count, record
from .registry import register_pattern_family
from .semantic_loop import LOOP_QDQ
from .semantic_moe import _ARGS, _meta, _moe_args, _spec, grouped_site
from .expert_groups import node_val as _val

FAMILY = "semantic_loop_moe"

__all__ = ["FAMILY"]



class LoopSecondGemm(pm.CallFunction):
    """mxemu::grouped_mm whose rows are computed from another grouped GEMM whose rows are a
    loop's expert-ordered `cat`: the second GEMM of a loop MoE. Others (vectorized layers,
    which "semantic_moe" handles, and first GEMMs) do not match and leave no record."""

    def _match(self, node, ctx):
        m = super()._match(node, ctx)
        if not pm.is_match(m):
            return m
        site = grouped_site(node)
        first = find_first_gemm(site, grouped_site) if site is not None else None
        if first is None or not is_loop_rows(first) or not is_loop_rows(site):
            return pm.FailedMatch("{} is not the second grouped GEMM of a loop MoE", node)
        return m


def _hinted(v) -> bool:
    try:
        return all(isinstance(hint(d), int) for d in v.shape)
    except ValueError:  # a data-dependent (nonzero-selected) row count
        return False


_REDUCTIONS = ("aten.amax", "aten.max", "aten.amin", "aten.min")


def _qdq_left(site, stop: set) -> Optional[torch.fx.Node]:
    """A block reduction (an activation QDQ's amax) among the ancestors of a weight-only
    grouped GEMM's rows, not walking past `stop` or float tensors with a size hint (the
    whole hidden states / a QDQ applied before the loop): a QDQ written per expert."""
    if not isinstance(site.node.args[6], str) or OpSpec.from_str(site.node.args[6]).act_kind != "none":
        return None
    seen, todo = {site.rows}, [site.rows]
    while todo and len(seen) < 4000:
        n = todo.pop()
        if str(getattr(n.target, "_overloadpacket", "")) in _REDUCTIONS:
            return n
        for a in n.all_input_nodes:
            if a in seen or a in stop:
                continue
            seen.add(a)
            v = _val(a)
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 2 and _hinted(v):
                continue  # a tensor with a size hint: outside the per-expert part
            todo.append(a)
    return None


def _check(match) -> Optional[str]:
    anchor = match.output_node()
    site = grouped_site(anchor)
    first = find_first_gemm(site, grouped_site)
    for s in (first, site):
        r = _qdq_left(s, {first.node})
        if r is not None:
            why = s.rows.meta.get(LOOP_QDQ) or "not taken into the grouped GEMM"
            return (f"whole-layer mxemu::moe not formed (the grouped GEMMs stay fused alone): an activation QDQ "
                    f"written per expert ({r.name}, a block reduction above {s.node.name}'s rows) is not in the "
                    f"weight-only grouped GEMM: {why}")
    region, why = find_loop_moe_region(site, grouped_site, live_nodes(anchor.graph))
    if region is None:
        return f"whole-layer mxemu::moe not found (the grouped GEMMs stay fused alone): {why}"
    v = recognize_moe_region(region)
    count(f"{FAMILY}.check_ms", int(v.seconds * 1000))
    if isinstance(v, Rejection):
        hint = ""
        if any(isinstance(n.args[6], str) and OpSpec.from_str(n.args[6]).act_kind == "none"
               for n in (region.first.node, region.second.node)) and "differ" in v.reason:
            # _qdq_left found no per-expert QDQ above, so this is only a possibility to name
            hint = (" (a GEMM is fused weight-only: if the layer fake-quantizes activations in a form not "
                    "recognised, that QDQ is still in the loop and part of what was compared)")
        return f"whole-layer mxemu::moe not proven (the grouped GEMMs stay fused alone): {v.reason}{hint}"
    spec, why = _spec(v)
    if why:
        return f"whole-layer mxemu::moe not used (the grouped GEMMs stay fused alone): {why}"
    x = _val(region.hidden)
    if x.dtype != torch.bfloat16:
        return f"hidden states are {x.dtype}; mxemu::moe is fused for bfloat16"
    args = [_meta(a) if isinstance(a, torch.fx.Node) else a for a in _moe_args(v, spec)]
    try:
        check_moe_inputs(*args[:12], OpSpec.from_str(spec), *args[13:])
    except (ValueError, TypeError) as e:
        return f"whole-layer mxemu::moe refused its arguments (the grouped GEMMs stay fused alone): {e}"
    match._mxemu_loop_moe = (v, spec)
    return None


def _erase(graph, nodes, keep) -> None:
    """Erase the loop (and what hangs off it: size queries of its rows, the assertions about
    its row counts, decode copies left without a use). The check made sure nothing else live
    uses it."""
    asserts = assertion_only(graph)
    doomed, stack = set(), list(nodes)
    while stack:
        n = stack.pop()
        if n not in doomed:
            doomed.add(n)
            stack.extend(n.users)
    if keep in doomed or any(u.op == "output" for n in doomed for u in n.users):
        raise RuntimeError(f"the MoE loop reaches its own replacement {keep.name}")
    for n in reversed(list(graph.nodes)):  # users before producers
        if (n in doomed or n in asserts) and not n.users:
            if n in asserts and n not in doomed and not any(a in doomed for a in n.all_input_nodes):
                continue  # an assertion about something else
            graph.erase_node(n)


def _replace(match) -> None:
    v, spec = match._mxemu_loop_moe
    r = v.region
    graph = match.graph
    with graph.inserting_before(r.output):
        new = graph.call_function(torch.ops.mxemu.moe.default, _moe_args(v, spec))
    new.meta.update({k: x for k, x in r.output.meta.items() if k != "val"})
    new.meta["val"] = _val(r.output)
    r.output.replace_all_uses_with(new)
    _erase(graph, r.body.nodes, new)
    record(FAMILY, "loop_moe", new, True, v.describe() + " (per-expert loop)")


@register_pattern_family(FAMILY, order=98, anchors=(torch.ops.mxemu.grouped_mm,),
                         description="per-expert loop MoE (routing + 2 proven grouped GEMMs + activation + combine, "
                                     "proven by evaluation) -> mxemu::moe")
def _init(pm_pass, input_device=None):
    for n in _ARGS:
        args = [pm.Ignored() for _ in range(n)]
        register_family_pattern(LoopSecondGemm(torch.ops.mxemu.grouped_mm.default, *args), pm_pass, family=FAMILY,
                                name="loop_moe" if n == 7 else "loop_moe_bias", check=_check, replace=_replace)
