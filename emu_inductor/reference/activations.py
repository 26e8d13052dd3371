"""MoE activations, written as eager torch ops in the activation dtype.

Eager bf16 rounds every intermediate, which is what vLLM's CUDA kernels do for
SiLU-and-mul (`bf16(bf16(silu(g)) * up)`); fused kernels reproduce these roundings.
The names, which are gated, and swigluoai's constants are `emu_inductor.spec.activations`
(the kernels read them there too); this module holds the eager functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..spec.activations import ACTIVATION_NAMES, SWIGLUOAI_ALPHA, SWIGLUOAI_LIMIT, check_activation, is_gated

__all__ = ["ACTIVATIONS", "apply_activation", "is_gated", "check_activation", "SWIGLUOAI_ALPHA", "SWIGLUOAI_LIMIT"]


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def gelu_and_mul(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return F.gelu(x[..., :d]) * x[..., d:]


def swigluoai(x: torch.Tensor) -> torch.Tensor:
    g = x[..., 0::2].clamp(max=SWIGLUOAI_LIMIT)
    u = x[..., 1::2].clamp(min=-SWIGLUOAI_LIMIT, max=SWIGLUOAI_LIMIT)
    return (u + 1) * (g * torch.sigmoid(g * SWIGLUOAI_ALPHA))


ACTIVATIONS = {
    "silu": silu_and_mul,
    "gelu": gelu_and_mul,
    "swigluoai": swigluoai,
    "silu_no_mul": F.silu,
    "gelu_no_mul": F.gelu,
    "relu2_no_mul": lambda x: torch.square(F.relu(x)),
}

if tuple(ACTIVATIONS) != ACTIVATION_NAMES:  # one list of names: spec's
    raise AssertionError(f"reference ACTIVATIONS {tuple(ACTIVATIONS)} != spec ACTIVATION_NAMES {ACTIVATION_NAMES}")


def apply_activation(x: torch.Tensor, activation: str) -> torch.Tensor:
    check_activation(activation)
    return ACTIVATIONS[activation](x)
