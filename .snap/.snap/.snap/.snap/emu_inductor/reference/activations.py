"""MoE activations, written as eager torch ops in the activation dtype.

Eager bf16 rounds every intermediate, which is what vLLM's CUDA kernels do for
SiLU-and-mul (`bf16(bf16(silu(g)) * up)`); fused kernels reproduce these roundings.
The names, which are gated, where gate and up sit, and swigluoai's constants are
`emu_inductor.spec.activations` (the kernels read them there too); this module holds the
eager functions, one per spec function, and builds every named activation from them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..spec.activations import (ACTIVATION_NAMES, ACTIVATION_SPECS, SWIGLUOAI_ALPHA, SWIGLUOAI_LIMIT,
                                check_activation, is_gated)

__all__ = ["ACTIVATIONS", "apply_activation", "is_gated", "check_activation", "split_gate_up", "SWIGLUOAI_ALPHA",
           "SWIGLUOAI_LIMIT"]


def split_gate_up(x: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) of a gated activation's input [..., 2I], by spec layout."""
    if layout == "interleaved":
        return x[..., 0::2], x[..., 1::2]
    if layout == "halves":
        d = x.shape[-1] // 2
        return x[..., :d], x[..., d:]
    raise ValueError(f"layout: unknown gate/up layout {layout!r}")


def _swigluoai(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    g = g.clamp(max=SWIGLUOAI_LIMIT)
    u = u.clamp(min=-SWIGLUOAI_LIMIT, max=SWIGLUOAI_LIMIT)
    return (u + 1) * (g * torch.sigmoid(g * SWIGLUOAI_ALPHA))


#: spec function -> (g, u) -> y, each op in the activation dtype
_GATED = {
    "silu": lambda g, u: F.silu(g) * u,
    "gelu": lambda g, u: F.gelu(g) * u,
    "swigluoai": _swigluoai,
}

#: spec function -> x -> y (the *_no_mul activations)
_ELEMENTWISE = {
    "silu": F.silu,
    "gelu": F.gelu,
    "relu2": lambda x: torch.square(F.relu(x)),
}


def _gated(function: str, layout: str):
    combine = _GATED[function]

    def act(x: torch.Tensor) -> torch.Tensor:
        return combine(*split_gate_up(x, layout))

    return act


def _build(name: str):
    s = ACTIVATION_SPECS[name]
    return _gated(s.function, s.gate_up) if s.gate_up is not None else _ELEMENTWISE[s.function]


ACTIVATIONS = {name: _build(name) for name in ACTIVATION_NAMES}

def apply_activation(x: torch.Tensor, activation: str) -> torch.Tensor:
    check_activation(activation)
    return ACTIVATIONS[activation](x)
