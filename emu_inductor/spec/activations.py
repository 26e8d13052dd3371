"""The MoE activations by name: which exist, which are gated, and the constants of the
ones with parameters. The functions themselves are in `emu_inductor.reference.activations`
(eager torch) and `emu_inductor.kernels.render` (Triton source); both read these facts.

Gated activations take the GEMM1 output [..., 2I] and return [..., I]:
  silu / gelu: gate = first half, up = second half (vLLM SILU / GELU)
  swigluoai:   gate/up interleaved (even/odd columns), g = min(g, 7), u = clamp(u, +-7),
               (u + 1) * g * sigmoid(1.702 g)   (gpt-oss, vLLM SWIGLUOAI)
`*_no_mul` variants apply the function elementwise and keep the width.
"""

from __future__ import annotations

__all__ = ["ACTIVATION_NAMES", "is_gated", "check_activation", "SWIGLUOAI_ALPHA", "SWIGLUOAI_LIMIT"]

ACTIVATION_NAMES = ("silu", "gelu", "swigluoai", "silu_no_mul", "gelu_no_mul", "relu2_no_mul")

SWIGLUOAI_ALPHA = 1.702
SWIGLUOAI_LIMIT = 7.0


def is_gated(activation: str) -> bool:
    return not activation.endswith("_no_mul")


def check_activation(activation: str) -> None:
    if activation not in ACTIVATION_NAMES:
        raise ValueError(f"activation: unknown activation {activation!r}; expected one of {sorted(ACTIVATION_NAMES)}")
