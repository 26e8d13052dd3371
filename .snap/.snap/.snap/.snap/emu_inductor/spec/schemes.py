"""Emulation schemes: which format the weights use and how activations are fake-quantized.

Names follow vLLM/Quark's OCP_MX_Scheme (`w_mxfp4_a_mxfp4`, ...) plus NVFP4 w4a4/w4a16.
Activation QDQ of the MX schemes defaults to the "even" scale (AMD Quark, which vLLM's
MX emulation calls); NVFP4 activations use the "vllm" recipe with one fp32 global scale
per layer (quantize direction), as vLLM's emulation does.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from ..formats import FORMATS, BlockFormat
from .compat import incompatibility

__all__ = ["Scheme", "SCHEMES", "get_scheme", "ActQuant"]


@dataclasses.dataclass(frozen=True)
class ActQuant:
    """How an activation is fake-quantized before a GEMM.

    kind "block": per-row blocks along K in `fmt` (MX scale_mode or NVFP4 recipe).
    kind "fp8_tensor": one dynamic per-tensor E4M3 scale (vLLM's `a_fp8` schemes).
    signed_zero / inf_amax / byte0_inverse (MX only; formats.QDQOptions): the sign of
    elements that round to zero, the scale of Inf / overflowing blocks and the multiplier
    that scales a byte-0 block (NVFP4 recipes fix their own).
    """

    kind: str
    fmt: Optional[BlockFormat] = None
    scale_mode: Optional[str] = None
    recipe: Optional[str] = None
    rounding: str = "rne"
    signed_zero: str = "keep"
    inf_amax: str = "nan"
    byte0_inverse: str = "pow2"


@dataclasses.dataclass(frozen=True)
class Scheme:
    name: str
    weight_fmt: BlockFormat
    act: Optional[ActQuant]  # None: weight-only (activations stay in their dtype)

    @property
    def weight_only(self) -> bool:
        return self.act is None

    def with_act(self, **changes) -> "Scheme":
        """The same scheme with activation-QDQ options changed (e.g. scale_mode="floor")."""
        if self.act is None:
            raise ValueError(f"scheme: {self.name} is weight-only; it has no activation options")
        return dataclasses.replace(self, act=dataclasses.replace(self.act, **changes))


def _mx_act(fmt_name: str) -> ActQuant:
    return ActQuant("block", FORMATS[fmt_name], scale_mode="even")


_NVFP4_ACT = ActQuant("block", FORMATS["nvfp4"], recipe="vllm")
_FP8_ACT = ActQuant("fp8_tensor")

SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("nvfp4_w4a4", FORMATS["nvfp4"], _NVFP4_ACT),
        Scheme("nvfp4_w4a16", FORMATS["nvfp4"], None),
        Scheme("w_mxfp4", FORMATS["mxfp4"], None),
        Scheme("w_mxfp4_a_mxfp4", FORMATS["mxfp4"], _mx_act("mxfp4")),
        Scheme("w_mxfp4_a_mxfp6_e3m2", FORMATS["mxfp4"], _mx_act("mxfp6_e3m2")),
        Scheme("w_mxfp4_a_mxfp6_e2m3", FORMATS["mxfp4"], _mx_act("mxfp6_e2m3")),
        Scheme("w_mxfp6_e3m2", FORMATS["mxfp6_e3m2"], None),
        Scheme("w_mxfp6_e2m3", FORMATS["mxfp6_e2m3"], None),
        Scheme("w_mxfp6_e3m2_a_mxfp6_e3m2", FORMATS["mxfp6_e3m2"], _mx_act("mxfp6_e3m2")),
        Scheme("w_mxfp6_e2m3_a_mxfp6_e2m3", FORMATS["mxfp6_e2m3"], _mx_act("mxfp6_e2m3")),
        Scheme("w_mxfp4_a_fp8", FORMATS["mxfp4"], _FP8_ACT),
        Scheme("w_mxfp6_e3m2_a_fp8", FORMATS["mxfp6_e3m2"], _FP8_ACT),
        Scheme("w_mxfp8_e4m3", FORMATS["mxfp8_e4m3"], None),
        Scheme("w_mxfp8_e4m3_a_mxfp8_e4m3", FORMATS["mxfp8_e4m3"], _mx_act("mxfp8_e4m3")),
    )
}
for _s in SCHEMES.values():  # every named scheme is a pair of the one compatibility table
    if _s.act is not None and incompatibility(_s.weight_fmt, _s.act):
        raise AssertionError(f"scheme {_s.name}: {incompatibility(_s.weight_fmt, _s.act)}")

ALIASES = {
    "nvfp4": "nvfp4_w4a4",
    "mxfp4": "w_mxfp4_a_mxfp4",
    "mxfp4_w4a4": "w_mxfp4_a_mxfp4",
    "mxfp4_w4a16": "w_mxfp4",
    "mxfp8": "w_mxfp8_e4m3",
}


def get_scheme(scheme: "Scheme | str") -> Scheme:
    if isinstance(scheme, Scheme):
        return scheme
    if isinstance(scheme, str):
        name = ALIASES.get(scheme.lower(), scheme.lower())
        if name in SCHEMES:
            return SCHEMES[name]
    raise ValueError(
        f"scheme: unknown scheme {scheme!r}; expected one of {sorted(SCHEMES)} "
        f"or an alias {sorted(ALIASES)}"
    )
