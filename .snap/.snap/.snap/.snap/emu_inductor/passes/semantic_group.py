"""Pattern family "semantic_group" (order 97, after every fusing family): per-expert fused
GEMMs `mxemu::linear(rows_e, P[e], S[e], A[e], gs, None, spec)` over slices of the same
packed expert stack become one `mxemu::grouped_mm(cat(rows_e), P, S, A, ends, gs, spec)`.

This is the loop form whose per-expert GEMM decodes its own slice of the packed bytes
(vLLM's `torch_moe` test reference: `dequantize_to_dtype(w13[i], w13_scale[i], ...)` per
expert), which the traced and semantic families fuse one expert at a time. The fused ops
are already proven; grouping them changes nothing per row: each row meets its expert's
codes, scales and float scale under the same OpSpec (the activation QDQ, if the op
carries one, is row-wise and has the same global scale node), so the result rows are the
same dot products (GEMM contract). Group ends come from the row counts
(`full(rows_e, e)` + `scatter_add` + `cumsum`; symbolic and data-dependent counts work).
Refused (left as E ops) when an expert's rows are computed from another op of the group.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch._inductor import pattern_matcher as pm

from .guards import register_family_pattern
from .recorder import record_candidate
from .registry import register_pattern_family
from .expert_groups import Builder, expert_ordered_gemm, graph_order
from .semantic_loop import rows_depend_on
from .expert_groups import node_val as _val

aten = torch.ops.aten
FAMILY = "semantic_group"

__all__ = ["FAMILY"]

#: mxemu::linear(x, codes, scale, alpha, a_global_scale, bias, spec)
_LINEAR_ARGS = 7



def _slice_of(n) -> Optional[tuple]:
    """(stack, expert) when `n` is select(stack, 0, e) of a tensor with a static leading dim."""
    if not isinstance(n, torch.fx.Node) or n.op != "call_function" or n.target is not aten.select.int:
        return None
    stack, dim, e = n.args
    v = _val(stack)
    if dim != 0 or not isinstance(e, int) or not isinstance(v, torch.Tensor) or not isinstance(v.shape[0], int):
        return None
    return stack, e % v.shape[0]


def _key(n) -> Optional[tuple]:
    """((codes stack, scale stack, alpha stack or None, gs, spec), expert) of an expert's
    mxemu::linear, else None."""
    if n.target is not torch.ops.mxemu.linear.default or len(n.args) != _LINEAR_ARGS or n.kwargs:
        return None
    x, codes, scale, alpha, gs, bias, spec = n.args
    c, s = _slice_of(codes), _slice_of(scale)
    if c is None or s is None or c[1] != s[1] or bias is not None or not isinstance(spec, str):
        return None
    a = None
    if alpha is not None:
        a = _slice_of(alpha)
        if a is None or a[1] != c[1] or _val(a[0]).dim() != 1:
            return None
    E = _val(c[0]).shape[0]
    if _val(s[0]).shape[0] != E or (a is not None and _val(a[0]).shape[0] != E):
        return None
    xv = _val(x)
    if not isinstance(xv, torch.Tensor) or xv.dim() != 2:
        return None
    return (c[0], s[0], a[0] if a else None, gs, spec), c[1]


class ExpertLinear(pm.CallFunction):
    """An mxemu::linear over one expert's slice of a packed stack; others do not match."""

    def __init__(self):
        super().__init__(torch.ops.mxemu.linear.default, *[pm.Ignored() for _ in range(_LINEAR_ARGS)])

    def _match(self, node, ctx):
        m = super()._match(node, ctx)
        if pm.is_match(m) and _key(node) is None:
            return pm.FailedMatch("{} is not an expert slice", node)
        return m


def _group(anchor) -> list:
    key, _ = _key(anchor)
    group = []
    for n in anchor.graph.find_nodes(op="call_function", target=torch.ops.mxemu.linear.default):
        k = _key(n)
        if k is not None and k[0] == key:
            group.append((k[1], n))
    group.sort(key=lambda t: t[0])
    return group


def _check(match) -> Optional[str]:
    group = _group(match.output_node())
    if len(group) < 2:
        return "a single expert's GEMM: nothing to group"
    why = rows_depend_on(group)
    if why:
        return f"per-expert mxemu::linear left as they are: {why}"
    match._mxemu_group = group
    return None


def _replace(match) -> None:
    group = match._mxemu_group
    graph = match.graph
    order = graph_order(graph)
    last = max((n for _, n in group), key=order.__getitem__)
    b = Builder(graph, last)
    (codes, scale, alpha, gs, spec), _ = _key(last)
    E = int(_val(codes).shape[0])
    dev = _val(last.args[0]).device
    out = expert_ordered_gemm(b, group, E, dev, lambda rows, offs: b(torch.ops.mxemu.grouped_mm.default, rows,
                                                                      codes, scale, alpha, offs, gs, spec))
    for _, n in group:
        graph.erase_node(n)
    pm.stable_topological_sort(graph)  # users of earlier experts' ops now follow the grouped op
    record_candidate(FAMILY, out, True, "mxemu::grouped_mm",
                     f"{len(group)} per-expert mxemu::linear over {codes.name}[e] (experts "
                     f"{sorted({e for e, _ in group})} of {E}) as one grouped GEMM over the expert-ordered rows",
                     family=FAMILY, pattern="linears")


@register_pattern_family(FAMILY, order=97, anchors=(torch.ops.mxemu.linear,),
                         description="per-expert mxemu::linear over slices of one packed stack -> mxemu::grouped_mm")
def _init(pm_pass, input_device=None):
    register_family_pattern(ExpertLinear(), pm_pass, family=FAMILY, name="linears", check=_check, replace=_replace)
