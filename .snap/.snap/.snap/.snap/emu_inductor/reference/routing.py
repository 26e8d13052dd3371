"""Router helpers: top-k over router logits. Weights fp32, ids int32 (vLLM convention)."""

from __future__ import annotations

import torch

__all__ = ["softmax_topk", "sigmoid_topk"]


def softmax_topk(router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True):
    """Softmax over experts in fp32, then top-k; renormalize makes the k weights sum to 1
    (Qwen3-MoE, Mixtral); without it they keep their softmax mass (DeepSeek-V2 style)."""
    if top_k < 1 or top_k > router_logits.shape[-1]:
        raise ValueError(f"top_k: expected 1..{router_logits.shape[-1]}, got {top_k}")
    probs = torch.softmax(router_logits.float(), dim=-1)
    w, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, ids.to(torch.int32)


def sigmoid_topk(router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True,
                 bias: "torch.Tensor | None" = None):
    """Sigmoid scores (DeepSeek-V3); `bias` (e_score_correction_bias) only steers the choice."""
    if top_k < 1 or top_k > router_logits.shape[-1]:
        raise ValueError(f"top_k: expected 1..{router_logits.shape[-1]}, got {top_k}")
    scores = torch.sigmoid(router_logits.float())
    choice = scores if bias is None else scores + bias.float()
    _, ids = torch.topk(choice, top_k, dim=-1)
    w = scores.gather(-1, ids)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, ids.to(torch.int32)
