"""Pattern family "semantic_moe" (order 95, after "semantic"): whole MoE layers whose
pieces are proven, written in any spelling.

Anchor: the second of two `mxemu::grouped_mm` calls (fused from the user's GEMMs by the
"semantic" or "grouped_mm" family) whose rows are computed from the first one's output,
both routed by the same top-k ids (`SecondGroupedGemm`).
`emu_inductor.recognize.moe.recognize_moe` proves the activation between them and the
routing and combine around them by evaluation (docs/recognize.md); the two GEMMs must
use the same scheme (one OpSpec, one expert order) and mxemu::moe's default weight
reader. Then the whole region (routing prep, both GEMMs, activation, combine) becomes
one `mxemu::moe(hidden, w13, ..., topk_weights, topk_ids, a1_gs, a2_gs, None, spec)`.
Anything not proven leaves the two fused GEMMs as they are, and explain() records why
the whole-layer fusion did not happen.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch._inductor import pattern_matcher as pm

from ..ops.validate import check_moe_inputs
from ..recognize import Rejection
from ..recognize.moe import GemmSite, recognize_moe
from ..recognize.moe_region import is_size_query, live_nodes, pair_of
from ..spec import OpSpec
from .guards import register_family_pattern
from .recorder import count, record
from .registry import register_pattern_family
from .expert_groups import node_val as _val

FAMILY = "semantic_moe"

__all__ = ["FAMILY", "grouped_site"]

#: mxemu::grouped_mm(a, w, w_scale, w_alpha, offs, a_global_scale, spec[, bias])
_ARGS = (7, 8)



def grouped_site(node) -> Optional[GemmSite]:
    """The GemmSite of an mxemu::grouped_mm node (its bias, if any, is the op's own), else None."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" \
            or node.target is not torch.ops.mxemu.grouped_mm.default or len(node.args) not in _ARGS or node.kwargs:
        return None
    rows, w, offs = node.args[0], node.args[1], node.args[4]
    if not all(isinstance(n, torch.fx.Node) for n in (rows, w, offs)) or _val(w) is None:
        return None
    return GemmSite(node, rows, offs, int(_val(w).shape[0]))


class SecondGroupedGemm(pm.CallFunction):
    """mxemu::grouped_mm whose rows are computed from another grouped GEMM routed by the
    same top-k ids: the second GEMM of an MoE. First GEMMs (and a layer's GEMM1 fed by
    the previous layer's GEMM2) do not match, so they cost nothing and leave no record."""

    def _match(self, node, ctx):
        m = super()._match(node, ctx)
        if not pm.is_match(m):
            return m
        site = grouped_site(node)
        if site is None or pair_of(site, grouped_site) is None:
            return pm.FailedMatch("{} is not the second grouped GEMM of an MoE", node)
        return m


def _meta(n):
    v = _val(n)
    return None if v is None else torch.empty(v.shape, dtype=v.dtype, device="meta")


def _spec(verdict) -> tuple[Optional[str], Optional[str]]:
    """(mxemu::moe spec string, None) or (None, reason)."""
    g1, g2 = verdict.region.first.node, verdict.region.second.node
    s1, s2 = g1.args[6], g2.args[6]
    if not isinstance(s1, str) or not isinstance(s2, str):
        return None, "GEMM specs are not constants"
    o1, o2 = OpSpec.from_str(s1), OpSpec.from_str(s2)
    if o1 != o2:
        return None, f"GEMM1 ({o1.short_name()}) and GEMM2 ({o2.short_name()}) use different schemes"
    return dataclasses.replace(o1, activation=verdict.activation, router_weight_on_input=False).to_str(), None


def _bias(gemm):
    return gemm.args[7] if len(gemm.args) > 7 else None


def _moe_args(verdict, spec):
    r = verdict.region
    g1, g2 = r.first.node, r.second.node
    args = (r.hidden, g1.args[1], g1.args[2], g1.args[3], g2.args[1], g2.args[2], g2.args[3],
            r.topk_weights, r.topk_ids, g1.args[5], g2.args[5], None, spec)
    if _bias(g1) is None and _bias(g2) is None:
        return args
    return args + (_bias(g1), _bias(g2))  # per-expert biases, added as the grouped GEMMs added them


_REDUCTIONS = ("aten.amax", "aten.max", "aten.amin", "aten.min")


def _block_reduction_between(site) -> bool:
    """Whether a reduction (a QDQ's block amax) lies between the first GEMM's output and
    this GEMM's rows: only then is an unproven activation QDQ part of what the body proof
    compared (the router's softmax above the routing is not)."""
    first = pair_of(site, grouped_site)
    if first is None:
        return False
    anc, todo = {site.rows}, [site.rows]
    while todo and len(anc) < 2000:
        for a in todo.pop().all_input_nodes:
            if a not in anc and a is not first.node:
                anc.add(a)
                todo.append(a)
    dep = {first.node}
    for n in site.rows.graph.nodes:  # topological order
        if n in anc and any(a in dep for a in n.all_input_nodes):
            dep.add(n)
            if str(getattr(n.target, "_overloadpacket", "")) in _REDUCTIONS:
                return True
    return False


def _check(match) -> Optional[str]:
    anchor = match.output_node()
    site = grouped_site(anchor)
    if site is None:
        return "not a grouped GEMM of a known argument layout"
    v = recognize_moe(site, grouped_site, live=live_nodes(anchor.graph))
    count(f"{FAMILY}.check_ms", int(v.seconds * 1000))
    if isinstance(v, Rejection):
        hint = ""
        compared = "activation" in v.reason or "differ" in v.reason
        if compared and isinstance(anchor.args[6], str) and OpSpec.from_str(anchor.args[6]).act_kind == "none" \
                and _block_reduction_between(site):
            hint = (" (this GEMM fused weight-only: an activation QDQ the recogniser did not prove stays in the "
                    "graph and is part of what was compared)")
        return f"whole-layer mxemu::moe not proven (the GEMMs stay fused alone): {v.reason}{hint}"
    spec, why = _spec(v)
    if why:
        return f"whole-layer mxemu::moe not used (the GEMMs stay fused alone): {why}"
    x = _val(v.region.hidden)
    if x.dtype != torch.bfloat16:
        return f"hidden states are {x.dtype}; mxemu::moe is fused for bfloat16"
    args = [_meta(a) if isinstance(a, torch.fx.Node) else a for a in _moe_args(v, spec)]
    try:
        check_moe_inputs(*args[:12], OpSpec.from_str(spec), *args[13:])
    except (ValueError, TypeError) as e:
        return f"whole-layer mxemu::moe refused its arguments (the GEMMs stay fused alone): {e}"
    match._mxemu_moe = (v, spec)
    return None


def _erase_region(graph, nodes, keep) -> None:
    """Erase the region and the dead code hanging off it (decode / QDQ copies the GEMM
    fusion left without a use; the check made sure nothing live uses the region except
    size queries under dynamic shapes, which keep the nodes they read)."""
    doomed, stack = set(), list(nodes)
    while stack:
        n = stack.pop()
        if n not in doomed and not is_size_query(n):
            doomed.add(n)
            stack.extend(n.users)
    if keep in doomed:  # cannot happen for a region the check accepted; the guard restores the graph
        raise RuntimeError(f"the MoE region reaches its own replacement {keep.name}")
    for n in reversed(list(graph.nodes)):  # users before producers
        if n in doomed and not n.users:
            graph.erase_node(n)


def _replace(match) -> None:
    v, spec = match._mxemu_moe
    r = v.region
    graph = match.graph
    with graph.inserting_before(r.output):
        new = graph.call_function(torch.ops.mxemu.moe.default, _moe_args(v, spec))
    new.meta.update({k: x for k, x in r.output.meta.items() if k != "val"})
    new.meta["val"] = _val(r.output)
    r.output.replace_all_uses_with(new)
    _erase_region(graph, r.body.nodes, new)
    record(FAMILY, "moe", new, True, v.describe())


@register_pattern_family(FAMILY, order=95, anchors=(torch.ops.mxemu.grouped_mm,),
                         description="routing + 2 proven grouped GEMMs + activation + combine, "
                                     "proven by evaluation -> mxemu::moe")
def _init(pm_pass, input_device=None):
    for n in _ARGS:
        args = [pm.Ignored() for _ in range(n)]  # distinct objects: a repeated one must match one node
        register_family_pattern(SecondGroupedGemm(torch.ops.mxemu.grouped_mm.default, *args),
                                pm_pass, family=FAMILY, name="moe" if n == 7 else "moe_bias", check=_check,
                                replace=_replace)
