"""MoE activations, written as eager torch ops in the activation dtype.

Eager bf16 rounds every intermediate, which is what vLLM's CUDA kernels do for
SiLU-and-mul (`bf16(bf16(silu(g)) * up)`); fused kernels reproduce these roundings.
Gated activations take the GEMM1 output [..., 2I] and return [..., I]:
  silu / gelu: gate = first half, up = second half (vLLM SILU / GELU)
  swigluoai:   gate/up interleaved (even/odd columns), g = min(g, 7), u = clamp(u, +-7),
               (u + 1) * g * sigmoid(1.702 g)   (gpt-oss, vLLM SWIGLUOAI)
`*_no_mul` variants apply the function elementwise and keep the width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "apply_activation", "is_gated", "SWIGLUOAI_ALPHA", "SWIGLUOAI_LIMIT"]

SWIGLUOAI_ALPHA = 1.702
SWIGLUOAI_LIMIT = 7.0


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


def is_gated(activation: str) -> bool:
    return not activation.endswith("_no_mul")


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")


def apply_activation(x: torch.Tensor, activation: str) -> torch.Tensor:
    check_activation(activation)
    return ACTIVATIONS[activation](x)
