"""Activation QDQ written once per expert in an MoE loop: is it one QDQ over all the rows?

A per-expert loop (`for e: y_e = F.linear(qdq(x[rows_e]), W[e])`) quantizes each expert's
rows on their own. When the loop's GEMMs become one grouped GEMM over the concatenated
rows, the QDQ can go into the grouped GEMM (w4a4) only if applying it per expert equals
applying it once to the concatenation. That holds when (1) every expert's QDQ is the same
function: the same variant proven by evaluation (`recognize_activation`), with the same
global-scale node and the same guarded constants, and (2) that function is row-local:
each output row depends on its own input row only (the rows are a `resize` factor of the
cone: no op reduces over, slices, or mixes them), and the variant quantizes per block
(MX, NVFP4 with a global scale that is a graph scalar) or per tensor with a static scale.
A per-tensor *dynamic* scale (amax over each expert's rows) is not row-local: the rows of
expert e would be scaled by an amax over expert e's rows, which one QDQ over the
concatenation does not compute.

The per-expert rows are selected by `nonzero` (data-dependent counts: unbacked symbols
without a size hint). The cone is evaluated at an assumed row count
(`shapes.assumed_sizes`), which is sound because (2) says the value does not depend on it;
the recogniser resizes the row factor freely anyway.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.fx import Node

from .api import recognize_activation
from .candidates import activation_cone, operands
from .resize import plan
from .shapes import assumed_sizes, unhinted_symbols
from .verdict import ActVerdict, Rejection

__all__ = ["recognize_expert_activations", "ASSUMED_ROWS"]

#: The row count a data-dependent per-expert row count is evaluated at (an odd size unlike
#: the block sizes and widths, so no reshape of the cone could take rows for another dim)
ASSUMED_ROWS = 13


def _val(n):
    return n.meta.get("val") if isinstance(n, Node) else None


def _row_symbols(gemms) -> dict:
    syms: set = set()
    for g in gemms:
        v = _val(operands(g)[0])
        if isinstance(v, torch.Tensor) and v.dim():
            syms |= unhinted_symbols(v.shape[0])
    return {s: ASSUMED_ROWS for s in syms}


def _same(a: ActVerdict, b: ActVerdict) -> Optional[str]:
    """Why two experts' verdicts are not the same function, else None."""
    if a.variant != b.variant:
        return f"{a.variant.name} vs {b.variant.name}"
    if a.global_scale is not b.global_scale or a.global_value != b.global_value:
        gs = [v.global_scale.name if v.global_scale is not None else v.global_value for v in (a, b)]
        return f"global scale {gs[0]} vs {gs[1]}"
    if {(g.node, tuple(g.values)) for g in a.guards} != {(g.node, tuple(g.values)) for g in b.guards}:
        return "different constants assumed for their inputs"
    return None


def _rows_apart(gemm: Node) -> Optional[str]:
    """Why the QDQ cone of `gemm`'s activation may mix its rows (a structural fact: the
    rows are not a `resize` factor of the cone), else None (also when there is no cone)."""
    cone, why = activation_cone(gemm)
    if cone is None:
        return None  # not quantized (or no cone the recogniser takes: it says why)
    xv = _val(cone.x)
    if not isinstance(xv, torch.Tensor) or xv.dim() != 2:
        return f"the quantized tensor {cone.x.name} is not 2-d rows"
    p = plan(cone.nodes, cone.output, {cone.x: {0: "rows"}})
    if not p.resizable("rows"):
        return f"its rows are not kept apart ({p.why_lost.get('rows', 'lost')}: a scale over the expert's own rows)"
    return None


def _row_local_variant(v: ActVerdict) -> Optional[str]:
    if v.variant.kind == "fp8_tensor" and not v.variant.static:
        return "a per-tensor dynamic scale (amax over the expert's own rows)"
    if v.variant.kind not in ("mx", "nvfp4", "fp8_tensor"):
        return f"{v.variant.name} is not a block or static per-tensor quantization"
    return None


def recognize_expert_activations(gemms: list) -> tuple[Optional[list], str]:
    """`gemms`: one GEMM node per expert (expert order; aten.mm or mxemu::linear). Returns
    ([ActVerdict per expert], "") when every expert's activation operand is the same
    row-local QDQ, ([], "") when none is quantized, (None, why) otherwise."""
    if not gemms:
        raise ValueError("gemms: expected one GEMM node per expert, got none")
    with assumed_sizes(_row_symbols(gemms)):
        for g in gemms:  # structure first: the near miss is named even where no variant matches
            why = _rows_apart(g)
            if why:
                return None, (f"the activation QDQ written per expert is not row-local at {g.name}: {why}; one QDQ "
                              f"over every expert's rows would compute another function")
        verdicts = []
        for i, g in enumerate(gemms):
            v = recognize_activation(g)
            if isinstance(v, Rejection):
                return None, f"the activation QDQ of the GEMM {g.name} (the {i}-th expert's) is not proven: {v.reason}"
            verdicts.append(v)
        quantized = [v.variant.kind != "none" for v in verdicts]
        if not any(quantized):
            return [], ""
        if not all(quantized):
            i = quantized.index(not quantized[0])
            return None, (f"{gemms[i].name}'s activation is {verdicts[i].variant.name}, {gemms[0].name}'s "
                          f"{verdicts[0].variant.name}: not one QDQ for every expert")
        for g, v in zip(gemms[1:], verdicts[1:]):
            why = _same(verdicts[0], v)
            if why:
                return None, (f"the experts quantize their rows differently ({gemms[0].name} vs {g.name}: {why}): "
                              f"not one QDQ over all rows")
        for g, v in zip(gemms, verdicts):
            why = _row_local_variant(v)
            if why:
                return None, (f"the activation QDQ written per expert is not row-local at {g.name}: {why}; one QDQ "
                              f"over every expert's rows would compute another function")
    return verdicts, ""
