"""Which activation quantization goes with which weight format: the one table.

The named schemes (`spec.schemes.SCHEMES`), the pattern pairing of dequant and QDQ
styles (`passes.pieces.scheme_pairs`) and the declared opaque QDQ ops all ask this
module; nothing else keeps a list of pairs.

An activation is named by its element format ("nvfp4", "mxfp4", ...) for block QDQ, or
"fp8" for one per-tensor E4M3 scale (vLLM's `a_fp8`). NVFP4 activations go only with
NVFP4 weights, MX activations only with MX weights. The fused kernels implement the MX
activation scale modes in `FUSED_MX_SCALE_MODES` ("rceil_log2" and "even_fp4" exist in
the reference only; "floor_log2", microxcaling's floor(log2) in the activation dtype, is
rendered from the formats' exact per-binade thresholds). Their MX activation QDQ renders
every `formats` zero sign (signed_zero keep / lt0 / le0 / positive), the Inf-block rules
in `FUSED_MX_INF_AMAX` (formats.scales.INF_AMAX_MODES; "exponent" for the scale modes in
`FUSED_MX_EXPONENT_MODES` only) and every byte-0 multiplier (formats BYTE0_INVERSE_MODES).
"""

from __future__ import annotations

from typing import Optional

__all__ = ["ACT_FOR_WEIGHT", "FUSED_MX_SCALE_MODES", "FUSED_MX_INF_AMAX", "FUSED_MX_EXPONENT_MODES", "act_name",
           "is_compatible", "incompatibility"]

#: weight format name -> activation names the fused ops take with it.
ACT_FOR_WEIGHT: dict[str, tuple[str, ...]] = {
    "nvfp4": ("nvfp4", "fp8"),
    "mxfp4": ("mxfp4", "mxfp6_e3m2", "mxfp6_e2m3", "fp8"),
    "mxfp6_e3m2": ("mxfp6_e3m2", "fp8"),
    "mxfp6_e2m3": ("mxfp6_e2m3",),
    "mxfp8_e4m3": ("mxfp8_e4m3",),
    "mxfp8_e5m2": (),
}

#: MX activation scale modes the generated kernels implement.
FUSED_MX_SCALE_MODES = ("even", "floor", "rceil", "ceil", "floor_log2")
#: MX activation Inf-block rules (formats inf_amax) the generated kernels implement: an Inf
#: amax (or one the "even" rounding carries past 2^127) gives byte 255 / 255 / 254, or
#: ("exponent", torchao 0.18's FLOOR/CEIL/EVEN) counts as 2^128: byte 128 - emax + 127.
FUSED_MX_INF_AMAX = ("nan", "nan_or_overflow", "max", "exponent")
#: the scale modes whose "exponent" Inf rule the kernels render (the exponent-field rules)
FUSED_MX_EXPONENT_MODES = ("floor", "ceil", "even")


def act_name(act) -> str:
    """"fp8" for a per-tensor fp8 ActQuant, else its element format's name."""
    return "fp8" if act.kind == "fp8_tensor" else act.fmt.name


def is_compatible(weight_fmt, act) -> bool:
    """True when weights in `weight_fmt` (a BlockFormat) and activations quantized as
    `act` (an ActQuant, None = weight-only) form a pair the fused ops implement."""
    if act is None:
        return True
    if act_name(act) not in ACT_FOR_WEIGHT.get(weight_fmt.name, ()):
        return False
    if act.kind == "block":
        if act.fmt.is_mx != weight_fmt.is_mx:
            return False
        if act.fmt.is_mx and act.scale_mode not in FUSED_MX_SCALE_MODES:
            return False
        if act.fmt.is_mx and getattr(act, "inf_amax", "nan") not in FUSED_MX_INF_AMAX:
            return False
        if act.fmt.is_mx and getattr(act, "inf_amax", "nan") == "exponent" and \
                act.scale_mode not in FUSED_MX_EXPONENT_MODES:
            return False
        if not act.fmt.is_mx and (getattr(act, "signed_zero", "keep"), getattr(act, "inf_amax", "nan"),
                                  getattr(act, "byte0_inverse", "pow2")) != ("keep", "nan", "pow2"):
            return False  # NVFP4 recipes fix their own zero sign
    return True


def incompatibility(weight_fmt, act) -> Optional[str]:
    """None, or why the pair is not in the table (for error messages)."""
    if is_compatible(weight_fmt, act):
        return None
    return (f"{act_name(act)} activations (scale mode {getattr(act, 'scale_mode', None)!r}) do not go with "
            f"{weight_fmt.name} weights; allowed: {ACT_FOR_WEIGHT.get(weight_fmt.name, ())}")
