"""The MoE structure around the two expert GEMMs, as written by
`emu_inductor.reference.moe_emulated(gemm_style="grouped_mm")`.

`moe_grouped_structure` mirrors that function op for op, with the two GEMMs (QDQ +
dequant + grouped GEMM) abstracted as callables `gemm1(a_sorted, offs)` and
`gemm2(a_sorted, offs)`: the passes substitute the already fused `mxemu::grouped_mm`
calls, so the second stage matches routing prep -> GEMM1 -> activation -> GEMM2 ->
combine and collapses it into one `mxemu::moe`.
"""

from __future__ import annotations

import torch

from ..reference.activations import apply_activation

__all__ = ["moe_grouped_structure", "TRACE_NUM_EXPERTS"]

#: An expert count that appears nowhere else in the traced graph, so every int equal to
#: it can be turned into a KeywordArg("num_experts") (checked against the weights).
TRACE_NUM_EXPERTS = 11


def _expert_gemm_grouped(a_rows, key, E, gemm):
    valid = (key < E).unsqueeze(-1)
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(E + 1, dtype=torch.int32, device=key.device)
    counts = counts.index_add(0, key, torch.ones_like(key, dtype=torch.int32))
    offs = torch.cumsum(counts[:E], 0, dtype=torch.int32)
    y_sorted = gemm(a_rows[order], offs)
    y = torch.empty_like(y_sorted)
    y[order] = y_sorted
    return torch.where(valid, y, torch.zeros_like(y))


def moe_grouped_structure(hidden_states, topk_weights, topk_ids, expert_map, gemm1, gemm2, *, E: int,
                          activation: str, apply_router_weight_on_input: bool):
    T, H = hidden_states.shape
    dtype = hidden_states.dtype
    top_k = topk_ids.shape[1]
    ids = topk_ids.reshape(-1).long()
    local = expert_map.long()[ids] if expert_map is not None else ids
    key = torch.where(local >= 0, local, torch.full_like(local, E))
    w_flat = topk_weights.reshape(-1)
    x_rows = hidden_states.repeat_interleave(top_k, dim=0)
    if apply_router_weight_on_input:
        x_rows = x_rows * w_flat.to(dtype).unsqueeze(-1)
    c1 = _expert_gemm_grouped(x_rows, key, E, gemm1)
    c2 = apply_activation(c1, activation)
    c3 = _expert_gemm_grouped(c2, key, E, gemm2)
    H_out = c3.shape[-1]
    c3 = c3.reshape(T, top_k, H_out).to(torch.float32)
    if not apply_router_weight_on_input:
        c3 = c3 * topk_weights.to(torch.float32).unsqueeze(-1)
    return c3.sum(dim=1).to(dtype)
