"""Element rounding, encoding and decoding, in plain torch ops on fp32 bit patterns.

Everything here traces under torch.compile without graph breaks: no `.item()`, no
data-dependent Python branches, no float8 casts (their saturation changed between
torch releases, and Triton's interpreter truncates them), no `log2` (inexact in narrow
dtypes). Powers of two are built from exponent bits, so every scaling is exact.
"""

from __future__ import annotations

import torch

from .spec import ElementSpec

__all__ = [
    "ROUNDING_MODES",
    "pow2",
    "round_to_element",
    "encode",
    "decode",
]

ROUNDING_MODES = ("rne", "half_away")

_F32_EXP_MASK = 0x7F800000


def pow2(e: torch.Tensor) -> torch.Tensor:
    """2**e as fp32 for an int32 tensor e in [-126, 127], built from exponent bits (exact)."""
    return ((e + 127) << 23).to(torch.int32).view(torch.float32)


def _floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) for non-negative fp32 a, from the exponent field (exact).

    fp32 zero and subnormals give -127; callers clamp to their own minimum exponent.
    """
    return ((a.view(torch.int32) >> 23) & 0xFF) - 127


def round_to_element(
    y: torch.Tensor,
    elem: ElementSpec,
    *,
    rounding: str = "rne",
    saturate: bool = True,
) -> torch.Tensor:
    """Round fp32 `y` to the nearest value of `elem`, returned as fp32 values.

    rounding: "rne" (ties to even; torchao, ml_dtypes, vLLM, Quark HIP) or "half_away"
    (ties away from zero; microxcaling's default "nearest", Quark's Triton path).
    saturate: magnitudes beyond the largest normal (Inf included) clamp to it, as every
    MX/NVFP4 quantizer does. With saturate=False, types that have Inf or NaN (E4M3,
    E5M2) follow the IEEE overflow rule instead (Inf where the type has one, else NaN),
    which is ml_dtypes' cast behaviour; FP4/FP6 have neither and always saturate.
    NaN stays NaN. The sign is kept, so -0.0 and tiny negatives give -0.0.
    """
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding: got {rounding!r}, expected one of {ROUNDING_MODES}")
    y = y.to(torch.float32)
    a = y.abs()
    saturate = saturate or not (elem.has_inf or elem.nan_codes)
    if saturate:
        a = torch.clamp(a, max=elem.max_normal)  # NaN propagates through clamp
    # Quantum of the binade holding a: 2^(max(e, emin) - mbits). Subnormals share emin.
    e = torch.clamp(_floor_log2(a), min=elem.emin, max=elem.emax + 1)
    n = a * pow2(elem.mbits - e)  # exact: a scaled into [0, 2^(mbits+1))
    if rounding == "rne":
        r = torch.round(n)  # round-half-to-even
    else:
        f = torch.floor(n)
        r = f + (n - f >= 0.5).to(torch.float32)  # n - f is exact; no n + 0.5 double rounding
    v = r * pow2(e - elem.mbits)
    if not saturate:
        overflow = v > elem.max_normal
        special = float("inf") if elem.has_inf else float("nan")
        v = torch.where(overflow, torch.full_like(v, special), v)
    return torch.copysign(v, y)


def encode(v: torch.Tensor, elem: ElementSpec) -> torch.Tensor:
    """Codes (uint8, in the low `elem.bits` bits) of fp32 values that are already on the
    element grid (the output of `round_to_element`).

    NaN becomes the type's NaN code (E4M3 0x7F, E5M2 0x7E) or, for FP4/FP6, which have
    no NaN, a signed zero (ml_dtypes' choice); in block formats the block scale carries
    the NaN. Inf becomes E5M2's Inf code, or saturates.
    """
    v = v.to(torch.float32)
    sign = (v.view(torch.int32) < 0).to(torch.int32)
    a = v.abs()
    nan = torch.isnan(a)
    a = torch.where(nan, torch.zeros_like(a), a)
    inf = torch.isinf(a)
    a = torch.clamp(a, max=elem.max_normal)
    e = torch.clamp(_floor_log2(a), min=elem.emin)
    sub = a < elem.min_normal
    # subnormal: mantissa = a / 2^(emin - mbits); normal: a / 2^(e - mbits) - 2^mbits
    mant_sub = (a * pow2(torch.full_like(e, elem.mbits - elem.emin))).to(torch.int32)
    mant_norm = (a * pow2(elem.mbits - e)).to(torch.int32) - (1 << elem.mbits)
    exp_field = torch.where(sub, torch.zeros_like(e), e + elem.bias)
    mag = (exp_field << elem.mbits) | torch.where(sub, mant_sub, mant_norm)
    if elem.nan_codes:
        nan_code = 0x7E if elem.has_inf else elem.nan_codes[0]
        mag = torch.where(nan, torch.full_like(mag, nan_code), mag)
    if elem.inf_codes:
        mag = torch.where(inf, torch.full_like(mag, elem.inf_codes[0]), mag)
    code = mag | (sign << (elem.ebits + elem.mbits))
    return code.to(torch.uint8)


def decode(code: torch.Tensor, elem: ElementSpec) -> torch.Tensor:
    """fp32 values of element codes (uint8 or any integer dtype, low `elem.bits` bits)."""
    c = code.to(torch.int32) & ((1 << elem.bits) - 1)
    sign = (c >> (elem.ebits + elem.mbits)) & 1
    exp_field = (c >> elem.mbits) & ((1 << elem.ebits) - 1)
    mant = c & ((1 << elem.mbits) - 1)
    sub = exp_field == 0
    # (2^mbits + mant) * 2^(E - bias - mbits) for normals, mant * 2^(emin - mbits) below.
    sig = torch.where(sub, mant, mant + (1 << elem.mbits)).to(torch.float32)
    e = torch.where(sub, torch.full_like(exp_field, elem.emin), exp_field - elem.bias)
    v = sig * pow2(e - elem.mbits)
    mag_code = c & (elem.sign_bit - 1)
    if elem.has_inf:
        top = exp_field == (1 << elem.ebits) - 1
        v = torch.where(top & (mant == 0), torch.full_like(v, float("inf")), v)
        v = torch.where(top & (mant != 0), torch.full_like(v, float("nan")), v)
    for nc in elem.nan_codes if not elem.has_inf else ():
        v = torch.where(mag_code == nc, torch.full_like(v, float("nan")), v)
    return torch.where(sign.bool(), -v, v)
