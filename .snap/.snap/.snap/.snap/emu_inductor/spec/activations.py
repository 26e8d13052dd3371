"""The MoE activations by name, as data: which function each applies, whether it is gated,
and where a gated one reads gate and up in GEMM1's output. The functions themselves are
in `emu_inductor.reference.activations` (eager torch) and `emu_inductor.kernels.render`
(Triton source); both read these facts.

Gated activations take the GEMM1 output [..., 2I] and return [..., I]. Two facts make one:
  function   silu / gelu: fn(g) * u;  swigluoai: g = min(g, 7), u = clamp(u, +-7),
             (u + 1) * g * sigmoid(1.702 g)   (gpt-oss, vLLM SWIGLUOAI)
  gate_up    "halves": gate = first half, up = second half (vLLM SILU / GELU);
             "interleaved": gate = even columns, up = odd columns (gpt-oss stores its
             gate_up_proj so; vLLM's SWIGLUOAI reads it so)
so `silu_interleaved` is transformers' gpt-oss MXFP4 path without the clamp and alpha,
`silu(h[..., ::2]) * h[..., 1::2]`. Only the column order differs from `silu`: the kernels
read other weight rows, the epilogue is the same op for op.
`*_no_mul` variants apply the function elementwise and keep the width.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

__all__ = ["ACTIVATION_NAMES", "ACTIVATION_SPECS", "ActivationSpec", "GATE_UP_LAYOUTS", "is_gated", "gate_up_layout",
           "activation_function", "check_activation", "SWIGLUOAI_ALPHA", "SWIGLUOAI_LIMIT"]

SWIGLUOAI_ALPHA = 1.702
SWIGLUOAI_LIMIT = 7.0

#: where a gated activation finds gate and up in GEMM1's [..., 2I] output
GATE_UP_LAYOUTS = ("halves", "interleaved")


@dataclasses.dataclass(frozen=True)
class ActivationSpec:
    """function: "silu" | "gelu" | "swigluoai" | "relu2" (gated: how g and u combine;
    elementwise: the function); gate_up: a GATE_UP_LAYOUTS entry, None when not gated."""

    function: str
    gate_up: Optional[str]


#: name -> facts. The order is the registry's (names added later go last, so the ones that
#: exist keep their place in every listing derived from it).
ACTIVATION_SPECS = {
    "silu": ActivationSpec("silu", "halves"),
    "gelu": ActivationSpec("gelu", "halves"),
    "swigluoai": ActivationSpec("swigluoai", "interleaved"),
    "silu_no_mul": ActivationSpec("silu", None),
    "gelu_no_mul": ActivationSpec("gelu", None),
    "relu2_no_mul": ActivationSpec("relu2", None),
    "silu_interleaved": ActivationSpec("silu", "interleaved"),
    "gelu_interleaved": ActivationSpec("gelu", "interleaved"),
}

ACTIVATION_NAMES = tuple(ACTIVATION_SPECS)

for _n, _s in ACTIVATION_SPECS.items():  # the facts agree with each other
    if _s.gate_up not in GATE_UP_LAYOUTS + (None,) or (_s.gate_up is None) != _n.endswith("_no_mul"):
        raise AssertionError(f"activation {_n!r}: inconsistent facts {_s}")


def check_activation(activation: str) -> None:
    if activation not in ACTIVATION_SPECS:
        raise ValueError(f"activation: unknown activation {activation!r}; expected one of {sorted(ACTIVATION_NAMES)}")


def is_gated(activation: str) -> bool:
    return not activation.endswith("_no_mul")


def gate_up_layout(activation: str) -> Optional[str]:
    """"halves" / "interleaved" for a gated activation, None for an elementwise one."""
    check_activation(activation)
    return ACTIVATION_SPECS[activation].gate_up


def activation_function(activation: str) -> str:
    check_activation(activation)
    return ACTIVATION_SPECS[activation].function
