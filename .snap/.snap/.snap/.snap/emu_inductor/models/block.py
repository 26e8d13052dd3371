"""EmulatedMoEBlock: drop-in replacement for a transformers sparse MoE block.

It keeps the HF block's call signature and return type (`forward(hidden_states)` ->
tensor, or `(tensor, router_scores)` for GPT-OSS), keeps HF's own router module (so the
top-k ids and weights are HF's, bit for bit, and transformers' router-logit recorders
still see it) and HF's shared-expert modules under their original names, and runs the
routed experts through `emu_inductor.reference` (QuantizedExperts).

A router that is a plain Linear (logits only; the routing math lived in the replaced
block's forward) comes with a `routing` recipe (adapters.RoutingRecipe) applied to its
logits. In training mode the input jitter of Mixtral / PhiMoE blocks
(`hidden_states *= U(1 - j, 1 + j)`, in place, before routing) is applied as HF does.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..reference import QuantizedExperts

__all__ = ["EmulatedMoEBlock"]


class EmulatedMoEBlock(nn.Module):
    def __init__(self, *, architecture: str, router_attr: str, router: nn.Module, experts: QuantizedExperts,
                 shared: Optional[str] = None, shared_modules: Optional[dict] = None,
                 returns_router_scores: bool = False, original_class: str = "", routing=None,
                 input_jitter_noise: float = 0.0):
        super().__init__()
        self.architecture = architecture
        self.router_attr = router_attr
        self.add_module(router_attr, router)
        self.experts = experts
        self.shared = shared
        for name, mod in (shared_modules or {}).items():
            self.add_module(name, mod)
        self.returns_router_scores = returns_router_scores
        self.original_class = original_class
        self.routing = routing
        self.input_jitter_noise = float(input_jitter_noise)
        self.calibrating = False

    def extra_repr(self) -> str:
        return f"architecture={self.architecture}, replaces={self.original_class}, scheme={self.experts.scheme.name}"

    def route(self, x2d: torch.Tensor):
        """HF's router: (router_logits, topk_weights, topk_ids)."""
        router = getattr(self, self.router_attr)
        if self.routing is None:
            return router(x2d)
        logits = router(x2d)
        weights, ids = self.routing(logits, x2d.dtype)
        return logits, weights, ids

    def forward(self, hidden_states: torch.Tensor):
        if self.training and self.input_jitter_noise > 0:  # HF's training-time jitter, in place as HF does
            j = self.input_jitter_noise
            hidden_states *= torch.empty_like(hidden_states).uniform_(1.0 - j, 1.0 + j)
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        _, topk_weights, topk_ids = self.route(x)
        # HF routers return int64 ids (torch.topk); vLLM's convention, and the form the
        # mxemu `moe` pattern is traced with, is int32. Values are unchanged.
        topk_ids = topk_ids.to(torch.int32)
        if self.calibrating:
            self.experts.calibrate_(x, topk_weights, topk_ids)
        out = self.experts(x, topk_weights, topk_ids)
        if self.shared == "deepseek":
            out = out + self.shared_experts(x)
        elif self.shared == "qwen2":
            out = out + F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        out = out.reshape(shape)
        if self.returns_router_scores:
            return out, topk_weights
        return out
