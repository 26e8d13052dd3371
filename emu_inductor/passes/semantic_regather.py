"""Pattern family "semantic_regather" (order 92, after "semantic", before "semantic_gate_up"
and "semantic_moe"): an `mxemu::grouped_mm` over bytes gathered per batch,
`grouped_mm(rows, P[idx], S[idx], A[idx] or A, ends M, 2M, .., gs, spec)` (a bmm over
`deq(w13[ids], s13[ids])`: each routed row's expert bytes gathered BEFORE the decode, which
"semantic_bmm" turns into its dense form, one group of M rows per gathered batch) is the
same GEMM over the stacks themselves with batch b's rows in expert idx[b]'s group: rows
stable-sorted by idx, group ends from the counts, results back by the inverse permutation.
Each output row is the same dot products with the same expert's bytes under the same
OpSpec (the activation QDQ the op carries is row-local, or per tensor: invariant under a
row permutation), so only the order of rows changes. The op then reads the stack once
per expert instead of one gathered copy per row, and "semantic_moe" sees the top-k ids
behind the group ends.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch._inductor import pattern_matcher as pm

from .expert_groups import Builder
from .guards import register_family_pattern
from .recorder import record_candidate
from .registry import register_pattern_family
from .expert_groups import node_val as _val

aten = torch.ops.aten
FAMILY = "semantic_regather"

__all__ = ["FAMILY"]

#: mxemu::grouped_mm(a, w, w_scale, w_alpha, offs, a_global_scale, spec) -- no bias
_ARGS = 7



def _gather(n) -> Optional[tuple]:
    """(source, idx) when `n` is `source[idx]` (one 1-d integer index on dim 0), else None."""
    if not isinstance(n, torch.fx.Node) or n.op != "call_function" or n.target is not aten.index.Tensor:
        return None
    src, idx = n.args
    if not isinstance(src, torch.fx.Node) or len(idx) != 1 or not isinstance(idx[0], torch.fx.Node):
        return None
    iv = _val(idx[0])
    if not isinstance(iv, torch.Tensor) or iv.dim() != 1 or iv.dtype not in (torch.int64, torch.int32):
        return None
    return src, idx[0]


def _even_ends(offs) -> Optional[int]:
    """M when `offs` is M, 2M, .., B*M (B groups of M rows, M a literal) as semantic_bmm
    writes it (`prims.iota(B, start=M, step=M)`) or as `arange(M, B*M + 1, M)`, else None."""
    if not isinstance(offs, torch.fx.Node):
        return None
    if offs.target is torch.ops.prims.iota.default:
        start, step = offs.kwargs.get("start"), offs.kwargs.get("step")
    elif offs.target is aten.arange.start_step:
        start, _, step = offs.args[:3]
    else:
        return None
    if not all(isinstance(v, int) for v in (start, step)) or start != step or step <= 0:
        return None
    return step


def _form(node) -> Optional[tuple]:
    """(P, S, A or None, A gathered?, idx, M) of a grouped GEMM over gathered bytes, else None."""
    if node.target is not torch.ops.mxemu.grouped_mm.default or len(node.args) != _ARGS or node.kwargs:
        return None
    rows, codes, scale, alpha, offs, _, spec = node.args
    c, s = _gather(codes), _gather(scale)
    M = _even_ends(offs)
    if c is None or s is None or c[1] is not s[1] or M is None or not isinstance(spec, str):
        return None
    idx = c[1]
    B = _val(idx).shape[0]
    if not isinstance(B, int) or _val(offs).shape[0] != B or _val(rows).shape[0] != B * M:
        return None
    a, a_gathered = alpha, False
    if alpha is not None:
        g = _gather(alpha)
        if g is not None and g[1] is idx:
            a, a_gathered = g[0], True
        elif _val(alpha).dim() != 0:  # a per-batch scale not gathered by idx
            return None
    E = _val(c[0]).shape[0]
    if _val(s[0]).shape[0] != E or (a_gathered and _val(a).shape[0] != E):
        return None
    return c[0], s[0], a, a_gathered, idx, M


class GatheredBytesGemm(pm.CallFunction):
    def __init__(self):
        super().__init__(torch.ops.mxemu.grouped_mm.default, *[pm.Ignored() for _ in range(_ARGS)])

    def _match(self, node, ctx):
        m = super()._match(node, ctx)
        if pm.is_match(m) and _form(node) is None:
            return pm.FailedMatch("{} is not a grouped GEMM over gathered bytes", node)
        return m


def _check(match) -> Optional[str]:
    return None if _form(match.output_node()) is not None else "not a grouped GEMM over gathered bytes"


def _replace(match) -> None:
    node = match.output_node()
    P, S, A, _, idx, M = _form(node)
    rows, codes, scale, _, offs, gs, spec = node.args
    graph = match.graph
    b = Builder(graph, node)
    E = int(_val(P).shape[0])
    K, N = _val(rows).shape[1], _val(node).shape[1]
    dev = _val(rows).device
    key = idx if _val(idx).dtype == torch.int64 else b(torch.ops.prims.convert_element_type.default, idx, torch.int64)
    order = b(operator.getitem, b(aten.sort.stable, key, stable=True, dim=0), 1)
    zeros = b(aten.full.default, [E], 0, dtype=torch.int64, layout=torch.strided, device=dev, pin_memory=False)
    per = b(aten.add.Tensor, b(aten.mul.Tensor, key, 0), M)
    ends = b(aten.cumsum.default, b(aten.scatter_add.default, zeros, 0, key, per), 0, dtype=torch.int32)
    sorted_rows = b(aten.reshape.default, b(aten.index.Tensor, b(aten.reshape.default, rows, [-1, M, K]), [order]),
                    [-1, K])
    out = b(torch.ops.mxemu.grouped_mm.default, sorted_rows, P, S, A, ends, gs, spec)
    inv = b(operator.getitem, b(aten.sort.stable, order, stable=True, dim=0), 1)
    new = b(aten.reshape.default, b(aten.index.Tensor, b(aten.reshape.default, out, [-1, M, N]), [inv]), [-1, N])
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    for g in (codes, scale, node.args[3]):
        if isinstance(g, torch.fx.Node) and not g.users:
            graph.erase_node(g)
    record_candidate(FAMILY, out, True, "mxemu::grouped_mm",
                     f"grouped GEMM over bytes gathered by {idx.name} ({codes.name}, {scale.name}) as one over the "
                     f"stacks {P.name}, {S.name}: rows sorted by expert, results back in batch order",
                     family=FAMILY, pattern="gathered_bytes")


@register_pattern_family(FAMILY, order=92, anchors=(torch.ops.mxemu.grouped_mm,),
                         description="grouped GEMM over per-row gathered bytes -> one over the expert stacks")
def _init(pm_pass, input_device=None):
    register_family_pattern(GatheredBytesGemm(), pm_pass, family=FAMILY, name="gathered_bytes", check=_check,
                            replace=_replace)
