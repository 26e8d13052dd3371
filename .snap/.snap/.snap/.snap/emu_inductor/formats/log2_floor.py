"""floor(log2 x) with log2 rounded to a float dtype, as exact per-binade thresholds.

microxcaling's MX quantizer takes its shared exponent as `floor(torch.log2(amax))` in the
input dtype. log2 of an amax just below 2^k rounds up to the integer k when k - log2(amax)
is under half the dtype's spacing below k, so the exponent comes out one higher than the
amax's exponent bits say (bf16 amax 504 -> 9, not 8; fp32 amax 511.99997 -> 9).

For a dtype with `p` fraction bits the rule is, for a normal fp32-valued x in the binade
[2^(k-1), 2^k) (exponent field f = k - 1 + 127, fraction field m):

    floor(RN_p(log2 x)) = k - 1 + (m >= T[f]),   T[f] = ceil(2^23 * (2^(1 - h_k) - 1))

where h_k is half the gap between k and the next smaller value of the dtype's grid
(log2 x > k - h_k exactly when it rounds to k; log2 x is irrational off powers of two, so
it never ties). T[f] = 2^23 means no x of that binade rounds up. T is computed once with
50-digit decimal arithmetic (so the thresholds do not depend on any log2 implementation)
and checked against torch's CPU log2 for every bf16 and fp16 value and a few hundred fp32
values either side of every power of two (tests/test_formats_log2_floor.py): torch's
log2 rounds correctly there, in fp32 and in bf16/fp16 (computed in fp32, rounded once).

Inputs in a narrower dtype are fp32 values too, so one fp32 threshold per binade serves
every input dtype; only the rounding precision of the log2 result (`p`) differs. fp32
subnormal x (field 0) and zero give -127 here: floor(log2 x) <= -126 for those, and every
MX element has emax >= 2, so the clamped E8M0 exponent is -127 either way.
"""

from __future__ import annotations

import decimal
import functools

import torch

__all__ = ["LOG2_DTYPE_BITS", "log2_floor_thresholds", "log2_floor_runs", "log2_floor_exponent"]

#: the float dtypes whose log2 rounding is described: fraction bits of the log2 result
LOG2_DTYPE_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
_NEVER = 1 << 23
_MANT_MASK = 0x007FFFFF


def _half_gap_below(k: int, p: int) -> decimal.Decimal:
    """Half the distance from the integer k (k != 0) to the next smaller value of a binary
    float grid with p fraction bits (exponent range wide enough for |k| <= 128)."""
    j = abs(k).bit_length() - 1  # 2^j <= |k| < 2^(j+1)
    if k > 0 and k == 1 << j:
        gap_exp = j - 1 - p  # below a power of two the spacing halves
    else:
        gap_exp = j - p  # k > 0 inside a binade; k < 0: spacing above |k|
    return decimal.Decimal(2) ** (gap_exp - 1)


@functools.lru_cache(maxsize=None)
def log2_floor_thresholds(dtype: torch.dtype) -> tuple[int, ...]:
    """T[f] for every fp32 exponent field f = 0..255 (see the module docstring): the
    smallest fraction field of the binade 2^(f-127) whose log2, rounded to `dtype`,
    reaches the next integer; 2^23 where none does (and for f = 0 and 255)."""
    if dtype not in LOG2_DTYPE_BITS:
        raise ValueError(f"dtype: expected one of {list(LOG2_DTYPE_BITS)}, got {dtype}")
    p = LOG2_DTYPE_BITS[dtype]
    ctx = decimal.Context(prec=50)
    ln2 = ctx.ln(decimal.Decimal(2))
    scale = decimal.Decimal(1 << 23)
    out = [_NEVER] * 256
    for f in range(1, 255):
        k = f - 127 + 1  # the binade [2^(k-1), 2^k)
        if k == 0:
            continue  # log2 of x just below 1 is a small negative number, exact enough: never 0
        t = ctx.multiply(scale, ctx.subtract(ctx.exp(ctx.multiply(1 - _half_gap_below(k, p), ln2)), 1))
        c = int(t.to_integral_value(rounding=decimal.ROUND_CEILING))
        if abs(t - t.to_integral_value(rounding=decimal.ROUND_HALF_EVEN)) < decimal.Decimal("1e-30"):
            raise AssertionError(f"log2 threshold of binade {k - 1} too close to an integer to decide")
        out[f] = min(c, _NEVER)
    return tuple(out)


@functools.lru_cache(maxsize=None)
def log2_floor_runs(dtype: torch.dtype) -> tuple[tuple[int, int, int], ...]:
    """The thresholds as runs (first field, last field, T) of equal T, fields 0..255: the
    form the kernels render (a short chain of comparisons on the exponent field)."""
    t = log2_floor_thresholds(dtype)
    runs = []
    start = 0
    for f in range(1, 257):
        if f == 256 or t[f] != t[start]:
            runs.append((start, f - 1, t[start]))
            start = f
    return tuple(runs)


def log2_floor_exponent(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int32 floor(log2 x) with log2 rounded to `dtype`, for finite x >= 0 holding values
    of `dtype` (any float tensor; compared in fp32). Zero and fp32-subnormal x give -127;
    Inf/NaN give garbage (callers mask them)."""
    bits = x.to(torch.float32).view(torch.int32)
    field = (bits >> 23) & 0xFF
    thr = torch.tensor(log2_floor_thresholds(dtype), dtype=torch.int32, device=x.device)[field.long()]
    return field - 127 + ((bits & _MANT_MASK) >= thr).to(torch.int32)
