"""Pattern family "semantic_bmm" (order 88, before "semantic"): batched GEMMs over a stack
of expert weights, rewritten as the grouped GEMMs they are, so that "semantic" proves and
fuses them (`mxemu::grouped_mm`) and "semantic_moe" can prove the layer around them.

Two forms people write for MoE experts with `torch.bmm`:

- gathered experts: `bmm(a[B, M, K], W[ids])`, W the [E, K, N] expert stack and ids [B]
  integer expert ids (transformers' gpt-oss reference: every routed row with its expert's
  matrix, `W[ids]` materialised per row), or with the gathered weight first,
  `bmm(W[ids], a[B, K, M])` (transformers' own `batched_mm` experts over [E, N, K]
  weights), computed as the transposed product. Rows grouped by expert: a stable sort of
  ids orders the batches, group ends are the expert counts (scatter_add) summed up, and
  the result goes back to batch order through the inverse permutation;
- dense experts: `bmm(a[E, M, K], W[E, K, N])` (every row through every expert,
  microxcaling's dense MoE): batch e is expert e's group, group ends M, 2M, .., E*M.

Each batch's [M, K] x [K, N] product is the same dot products in either form (fp32
accumulation; the order inside a dot product is the GEMM contract's, as for any fused
GEMM). The rewrite is made only when the weight recogniser proves W's cone
(`recognize_weight`, the verdict "semantic" then reads from its cache): a bmm whose
weights are not proven stays a bmm, and explain() says why.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch._inductor import pattern_matcher as pm

from ..recognize import Rejection, recognize_weight
from .guards import register_family_pattern
from .recorder import record_candidate
from .registry import register_pattern_family
from .expert_groups import Builder
from .semantic import PackedWeightOperand
from .semantic_loop import unfusable_stack
from .expert_groups import node_val as _val

aten = torch.ops.aten
FAMILY = "semantic_bmm"

__all__ = ["FAMILY"]



def _static(*sizes) -> bool:
    return all(isinstance(s, int) for s in sizes)


def _gathered(w_node) -> Optional[tuple]:
    """(stack node, ids node) when the weight operand is `stack[ids]` (aten.index over the
    first dim with one 1-d integer index), else None."""
    if w_node.op != "call_function" or w_node.target is not aten.index.Tensor:
        return None
    base, idx = w_node.args[0], w_node.args[1]
    if not isinstance(base, torch.fx.Node) or len(idx) != 1 or not isinstance(idx[0], torch.fx.Node):
        return None
    bv, iv = _val(base), _val(idx[0])
    if not isinstance(bv, torch.Tensor) or not isinstance(iv, torch.Tensor) or bv.dim() != 3 or iv.dim() != 1:
        return None
    if iv.dtype not in (torch.int64, torch.int32):
        return None
    return base, idx[0]


def _form(anchor) -> tuple[Optional[tuple], Optional[str]]:
    """((kind, a, stack, ids or None, weight_first), None) or (None, reason). kind "gathered":
    one operand is stack[ids]; weight_first: `bmm(stack[ids], a)` (transformers'
    batched_mm experts with [E, N, K] weights: W[ids] @ x.unsqueeze(-1)), computed as
    the transposed product. kind "dense": `bmm(a, W)` with W the [E, K, N] stack."""
    if anchor.kwargs or len(anchor.args) != 2:
        return None, "bmm with extra arguments"
    x, y = anchor.args
    xv, yv = _val(x), _val(y)
    if not isinstance(xv, torch.Tensor) or not isinstance(yv, torch.Tensor) or xv.dim() != 3 or yv.dim() != 3:
        return None, "bmm operands without 3-d tensor values"
    if xv.dtype != yv.dtype or not xv.is_floating_point():
        return None, f"bmm of {xv.dtype} x {yv.dtype}"
    for first, (a, w) in ((False, (x, y)), (True, (y, x))):
        g = _gathered(w)
        if g is not None:
            stack, ids = g
            M = _val(a).shape[2 if first else 1]  # rows per batch: a[B, K, M] (first) or a[B, M, K]
            if not _static(M, *_val(stack).shape):
                return None, "gathered experts with symbolic sizes (rows per batch or expert stack)"
            return ("gathered", a, stack, ids, first), None
    if not _static(xv.shape[0], xv.shape[2], *yv.shape):  # rows per expert may be symbolic
        return None, "dense batched experts with a symbolic expert count or width"
    return ("dense", x, y, None, False), None


def looks_like_experts(anchor) -> bool:
    """Cheap structural test (no proof): a gathered stack[ids] operand, or a dense bmm whose
    second operand is computed from packed bytes with as many batches as the first."""
    form, _ = _form(anchor)
    if form is None:
        return False
    if form[0] == "gathered":
        return True
    return _val(form[1]).shape[0] == _val(form[2]).shape[0]


class ExpertBmm(pm.CallFunction):
    """aten.bmm in one of the expert forms (`_form`) whose stack is computed from packed
    bytes; other bmms (attention, activation x activation) do not match and leave no record."""

    def __init__(self):
        super().__init__(aten.bmm.default, pm.Ignored(), pm.Ignored())

    def _match(self, node, ctx):
        m = super()._match(node, ctx)
        if not pm.is_match(m):
            return m
        if not looks_like_experts(node):
            return pm.FailedMatch("{} is not a bmm over an expert stack", node)
        stack = _form(node)[0][2]
        if not pm.is_match(PackedWeightOperand()._match(stack, ctx)):
            return pm.FailedMatch("{}'s expert stack is not computed from packed bytes", node)
        return m


def _check(match) -> Optional[str]:
    anchor = match.output_node()
    form, why = _form(anchor)
    if form is None:
        return why
    kind, a, stack, ids, first = form
    if kind == "dense" and _val(a).shape[0] != _val(stack).shape[0]:
        return "batch count differs from the expert count"
    if kind == "gathered":
        # the weight recogniser reads the GEMM's [E, K, N] weight operand: a throwaway grouped
        # GEMM over the stack itself (the gather depends on the routing, not on the bytes)
        graph = anchor.graph
        with graph.inserting_before(anchor):
            b = graph.call_function(aten.permute.default, (stack, [0, 2, 1])) if first else stack
            probe = graph.call_function(aten._grouped_mm.default, (a, b))
        if first:
            b.meta["val"] = _val(stack).permute(0, 2, 1)
        try:
            w = recognize_weight(probe)
        finally:
            graph.erase_node(probe)
            if first:
                graph.erase_node(b)
    else:
        w = recognize_weight(anchor)
    if isinstance(w, Rejection):
        return f"expert weights not proven, bmm left as written: {w.reason}"
    if not w.kernel_supported:
        return f"expert weights recognised as {w.variant.name}, which the fused kernels do not compute"
    why = unfusable_stack(w, stack, {anchor.args[0 if first else 1] if kind == "gathered" else anchor})
    if why:
        return f"bmm left as written: {why}"
    match._mxemu_bmm = (form, w)
    return None


def _replace(match) -> None:
    anchor = match.output_node()
    (kind, a, stack, ids, first), w = match._mxemu_bmm
    graph = match.graph
    b = Builder(graph, anchor)
    gathered_w = anchor.args[0 if first else 1]
    if first:  # W[ids] @ a == (a^T @ W^T[ids])^T: rows a^T [B, M, K], stack W^T [E, K, N]
        a = b(aten.permute.default, a, [0, 2, 1])
        stack = b(aten.permute.default, stack, [0, 2, 1])
    av, sv = _val(a), _val(stack)
    E, K, N = (int(s) for s in sv.shape)
    M = av.shape[1]
    dev = av.device
    if kind == "dense" and E == 1:
        # one batch over one matrix is a dense linear (einsum("...k,nk->...n") and matmul of a
        # 3-d input broadcast over one weight become bmm with batch 1): an mm, which 'semantic'
        # fuses as mxemu::linear
        out = b(aten.mm.default, b(aten.reshape.default, a, [-1, K]), b(aten.reshape.default, stack, [K, N]))
        new = b(aten.reshape.default, out, [1, -1, N])
        how = "one batch over one weight matrix: a dense GEMM"
    elif kind == "dense":
        rows = b(aten.reshape.default, a, [-1, K])
        # group ends M, 2M, .., E*M
        m = M if isinstance(M, int) else b(aten.sym_size.int, a, 1)
        # prims.iota, not aten.arange: the post-grad graph is past decomposition, and torch
        # 2.11's Inductor has no lowering for arange.start_step (only a decomposition): a
        # rewritten graph holding one failed to compile on the H200 ("both a fallback and a
        # decomp for same op"). iota has a lowering in every supported torch.
        offs = b(torch.ops.prims.iota.default, E, start=m, step=m, dtype=torch.int32, device=dev,
                 requires_grad=False)
        out = b(aten._grouped_mm.default, rows, stack, offs)
        new = b(aten.reshape.default, out, [E, -1, N])
        how = f"dense over {E} experts: batch e is expert e's group of {M} rows"
    else:
        # ops with Inductor lowerings (the post-grad graph is past decomposition)
        key = ids if _val(ids).dtype == torch.int64 else b(torch.ops.prims.convert_element_type.default, ids,
                                                           torch.int64)
        srt = b(aten.sort.stable, key, stable=True, dim=0)
        order = b(operator.getitem, srt, 1)
        zeros = b(aten.full.default, [E], 0, dtype=torch.int64, layout=torch.strided, device=dev, pin_memory=False)
        per = b(aten.add.Tensor, b(aten.mul.Tensor, key, 0), M)  # M rows per batch, whatever the batch count
        counts = b(aten.scatter_add.default, zeros, 0, key, per)
        offs = b(aten.cumsum.default, counts, 0, dtype=torch.int32)
        rows = b(aten.reshape.default, b(aten.index.Tensor, a, [order]), [-1, K])
        out = b(aten._grouped_mm.default, rows, stack, offs)
        inv = b(operator.getitem, b(aten.sort.stable, order, stable=True, dim=0), 1)
        new = b(aten.index.Tensor, b(aten.reshape.default, out, [-1, M, N]), [inv])
        how = f"gathered experts stack[{ids.name}]: rows sorted by expert, results back in batch order"
        if first:
            new = b(aten.permute.default, new, [0, 2, 1])
            how += "; weight-first bmm computed transposed"
    new.meta.update({k: v for k, v in anchor.meta.items() if k != "val"})
    anchor.replace_all_uses_with(new)
    graph.erase_node(anchor)
    if kind == "gathered" and not gathered_w.users:  # the gather W[ids] is dead: 'semantic' must not see it
        graph.erase_node(gathered_w)
    op = "aten.mm" if out.target is aten.mm.default else "aten._grouped_mm"
    record_candidate(FAMILY, out, True, f"{op} (fused next by 'semantic')",
                     f"bmm as {'a dense' if op == 'aten.mm' else 'a grouped'} GEMM ({how}); weights proven: "
                     f"{w.describe()}", family=FAMILY, pattern=kind)


@register_pattern_family(FAMILY, order=88, anchors=(aten.bmm.default,),
                         description="bmm over proven expert weights (gathered W[ids] or dense) -> grouped GEMM")
def _init(pm_pass, input_device=None):
    register_family_pattern(ExpertBmm(), pm_pass, family=FAMILY, name="bmm", check=_check, replace=_replace)
