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
    "IN_DTYPE_ROUNDINGS",
    "SIGNED_ZERO_MODES",
    "NAN_ELEMENT_MODES",
    "pow2",
    "round_to_element",
    "encode",
    "decode",
]

# Ties: "rne" to even; "half_away" away from zero (microxcaling "nearest", Quark's
# Triton MXFP4 kernel); "half_toward_zero" toward zero (ModelOpt's MXFP4 qtensor counts
# the bounds strictly below |y|, so 0.75 -> 0.5, 1.75 -> 1.5, 3.5 -> 3).
# "microxcaling_nearest" / "microxcaling_even": microsoft/microxcaling's `_round_mantissa`
# "nearest" / "even" as its Python path computes them, in the input dtype (see
# `round_in_dtype`): not exact roundings, so no tie rule above reproduces them in bf16.
ROUNDING_MODES = ("rne", "half_away", "half_toward_zero", "microxcaling_nearest", "microxcaling_even")
#: roundings computed in the input dtype (round_to_element's `dtype`), -> their exact twin
IN_DTYPE_ROUNDINGS = {"microxcaling_nearest": "half_away", "microxcaling_even": "rne"}
# Sign of a result that rounds to zero (non-zero results always keep the input's sign):
#   "keep"      copysign: -0.0 and tiny negatives give -0.0 (torchao, vLLM, ml_dtypes)
#   "lt0"       negative iff the input is < 0: -0.0 gives +0.0, -1e-3 gives -0.0
#               (compressed-tensors `cast_to_fp4`, ModelOpt NVFP4 `_cast_fp4`)
#   "le0"       negative iff the input is <= 0: +0.0 and -0.0 give -0.0, +1e-3 gives +0.0
#               (ModelOpt MXFP4 `(2 - sign(x)) // 2`)
#   "positive"  always +0.0 (Quark's C++ `fake_quantize_to_low_precision_fp`)
SIGNED_ZERO_MODES = ("keep", "lt0", "le0", "positive")
# What a NaN element becomes in FP4/FP6 (which have no NaN; the block scale is NaN too):
#   "nan"  stays NaN as a value, encoded as a zero code (ml_dtypes' byte)
#   "max"  the largest magnitude with the NaN's sign bit (Quark's Triton MXFP4 encoder,
#          whose exponent-field arithmetic saturates an all-ones exponent)
NAN_ELEMENT_MODES = ("nan", "max")

_F32_EXP_MASK = 0x7F800000


def check_tensor(t, arg: str) -> None:
    """TypeError naming `arg` unless `t` is a tensor (the functions below take tensors only)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{arg}: expected a torch.Tensor, got {type(t).__name__}")


def check_element(elem, arg: str = "elem") -> None:
    if not isinstance(elem, ElementSpec):
        raise TypeError(f"{arg}: expected an ElementSpec (e.g. formats.E2M1), got {type(elem).__name__}")


def pow2(e: torch.Tensor) -> torch.Tensor:
    """2**e as fp32 for an int32 tensor e in [-126, 127], built from exponent bits (exact)."""
    return ((e + 127) << 23).to(torch.int32).view(torch.float32)


def _floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) for non-negative fp32 a, from the exponent field (exact).

    fp32 zero and subnormals give -127; callers clamp to their own minimum exponent.
    """
    return ((a.view(torch.int32) >> 23) & 0xFF) - 127


def round_in_dtype(n: torch.Tensor, rounding: str, dtype: torch.dtype) -> torch.Tensor:
    """microxcaling's `_round_mantissa` on the scaled magnitude n >= 0 (fp32 holding a value
    of `dtype`; n < 2^9), with every step rounded to `dtype` as torch computes it there:

        "microxcaling_nearest"  floor(RN(n + 0.5))
        "microxcaling_even"     floor(RN(n + 0.5)) - ((RN(n - 0.5) % 2) == 0)

    For n >= 1/2 the steps are exact (n + 0.5 and n - 0.5 stay on the dtype's grid), so
    these are half-away and ties-to-even. Below 1/2 the sum n + 0.5 lands in the next
    binade, whose grid is twice as coarse: n = 1/2 - 2^-(p+2), the dtype's largest value
    below 1/2 (p fraction bits: bf16 0.498046875, fp32 0.5 - 2^-25), makes the sum a tie
    between 1 - 2^-(p+1) and 1.0, which RNE sends to 1.0, so it rounds to 1 where an exact
    rounding gives 0 (the "even" mask stays 0 there: RN(n - 0.5) % 2 rounds to 2.0).
    That is the only difference (tests/test_formats_microxcaling.py, every bf16 value).
    """
    s = n + 0.5  # exact in fp32 for a dtype value n >= 2^-16; smaller n: RN gives 0.5 anyway
    r = torch.floor(s.to(dtype).to(torch.float32))
    if rounding == "microxcaling_even":
        t = n - 0.5  # exact for n >= 1/2; below, (t % 2) is in (1.5, 2], never 0
        r = r - (torch.remainder(t, 2.0) == 0).to(torch.float32)
    return r


def round_to_element(
    y: torch.Tensor,
    elem: ElementSpec,
    *,
    rounding: str = "rne",
    saturate: bool = True,
    signed_zero: str = "keep",
    nan_element: str = "nan",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Round fp32 `y` to the nearest value of `elem`, returned as fp32 values.

    rounding: "rne" (ties to even; torchao, ml_dtypes, vLLM, Quark HIP) or "half_away"
    (ties away from zero; microxcaling's default "nearest", Quark's Triton path).
    saturate: magnitudes beyond the largest normal (Inf included) clamp to it, as every
    MX/NVFP4 quantizer does. With saturate=False, types that have Inf or NaN (E4M3,
    E5M2) follow the IEEE overflow rule instead (Inf where the type has one, else NaN),
    which is ml_dtypes' cast behaviour; FP4/FP6 have neither and always saturate.
    NaN stays NaN (or, with nan_element="max", becomes the signed max normal). The sign
    is kept, so -0.0 and tiny negatives give -0.0, unless `signed_zero` says otherwise
    (see SIGNED_ZERO_MODES).
    rounding "microxcaling_nearest" / "microxcaling_even" (IN_DTYPE_ROUNDINGS) compute
    in `dtype`, the input dtype, as microsoft/microxcaling's Python MX quantizer does
    (`_quantize_mx` -> `_quantize_elemwise_core` -> `_round_mantissa`): y is first
    rounded to `dtype` (its `A / 2**shared_exp`; a negative y that underflows there
    becomes -0.0, whose zero takes sign(-0.0) = 0), then `round_in_dtype`. Its
    per-element `floor(log2|a|)` in `dtype` can land one binade high just below a power
    of two; that never changes the result (the value rounds up to that power of two
    either way), so the exact exponent is used. Other roundings ignore `dtype`.
    """
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding: got {rounding!r}, expected one of {ROUNDING_MODES}")
    if signed_zero not in SIGNED_ZERO_MODES:
        raise ValueError(f"signed_zero: got {signed_zero!r}, expected one of {SIGNED_ZERO_MODES}")
    if nan_element not in NAN_ELEMENT_MODES:
        raise ValueError(f"nan_element: got {nan_element!r}, expected one of {NAN_ELEMENT_MODES}")
    check_tensor(y, "y")
    check_element(elem)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a torch float dtype, got {dtype!r}")
    y = y.to(torch.float32)
    if rounding in IN_DTYPE_ROUNDINGS:
        y = y.to(dtype).to(torch.float32)  # the library scales the block in `dtype`
    a = y.abs()
    saturate = saturate or not (elem.has_inf or elem.nan_codes)
    if saturate:
        a = torch.clamp(a, max=elem.max_normal)  # NaN propagates through clamp
    # Quantum of the binade holding a: 2^(max(e, emin) - mbits). Subnormals share emin.
    e = torch.clamp(_floor_log2(a), min=elem.emin, max=elem.emax + 1)
    n = a * pow2(elem.mbits - e)  # exact: a scaled into [0, 2^(mbits+1))
    if rounding == "rne":
        r = torch.round(n)  # round-half-to-even
    elif rounding in IN_DTYPE_ROUNDINGS:
        r = round_in_dtype(n, rounding, dtype)
    else:
        f = torch.floor(n)
        frac = n - f  # exact; no n + 0.5 double rounding
        up = frac >= 0.5 if rounding == "half_away" else frac > 0.5
        r = f + up.to(torch.float32)
    v = r * pow2(e - elem.mbits)
    if not saturate:
        overflow = v > elem.max_normal
        special = float("inf") if elem.has_inf else float("nan")
        v = torch.where(overflow, torch.full_like(v, special), v)
    if nan_element == "max" and not (elem.has_inf or elem.nan_codes):
        v = torch.where(torch.isnan(v), torch.full_like(v, elem.max_normal), v)
    if signed_zero == "keep":
        return torch.copysign(v, y)
    out = torch.copysign(v, y)  # non-zero results (and NaN) keep the input's sign
    if signed_zero == "lt0":
        zero_sign = torch.where(y < 0, -1.0, 1.0)
    elif signed_zero == "le0":
        zero_sign = torch.where(y > 0, 1.0, -1.0)
    else:
        zero_sign = torch.ones_like(y)
    return torch.where(v == 0, torch.copysign(torch.zeros_like(v), zero_sign), out)


def encode(v: torch.Tensor, elem: ElementSpec) -> torch.Tensor:
    """Codes (uint8, in the low `elem.bits` bits) of fp32 values that are already on the
    element grid (the output of `round_to_element`).

    NaN becomes the type's NaN code (E4M3 0x7F, E5M2 0x7E) or, for FP4/FP6, which have
    no NaN, a signed zero (ml_dtypes' choice); in block formats the block scale carries
    the NaN. Inf becomes E5M2's Inf code, or saturates.
    """
    check_tensor(v, "v")
    check_element(elem)
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
    check_tensor(code, "code")
    check_element(elem)
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
