"""scale_mode "floor_log2" equals microxcaling's shared exponent bit for bit.

microxcaling (not installable here) takes `floor(torch.log2(amax + 2^-126 * (amax == 0)))`
in the input dtype. The formats compute that from exponent bits and exact per-binade
thresholds (formats.log2_floor); these tests compare against torch's own log2 on the CPU:
every bf16 and fp16 value, a few hundred fp32 values either side of every power of two
(subnormals included), random fp32 bit patterns; then the E8M0 byte against the
transcription's shared exponent and the whole QDQ against the transcription
(tests/corpus/microxcaling_style.py) on fresh random data, ties and edge blocks.
"""

from __future__ import annotations

import pytest
import torch

from emu_inductor.formats import (FORMATS, e8m0_decode, e8m0_scale, fake_quantize, log2_floor_exponent,
                                  log2_floor_thresholds, quantize)
from tests.corpus import microxcaling_style as MX
from tests.test_formats_libraries import assert_bits_equal, probes


def _all_finite_nonneg(dtype) -> torch.Tensor:
    top = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}[dtype]
    return torch.arange(0, top, dtype=torch.int32).to(torch.int16).view(dtype)


def _fp32_boundaries(n: int = 300) -> torch.Tensor:
    """n fp32 values either side of every power of two 2^-149 .. 2^127 and of 2^128."""
    powers = torch.arange(1, 256, dtype=torch.int32) << 23  # 2^-126 .. 2^128 (Inf's bits)
    sub = torch.tensor([1 << j for j in range(23)], dtype=torch.int32)  # subnormal powers of two
    centre = torch.cat([sub, powers])
    bits = (centre[:, None] + torch.arange(-n, n, dtype=torch.int32)[None, :]).reshape(-1)
    bits = bits[(bits > 0) & (bits < 0x7F800000)]
    return bits.view(torch.float32)


def _torch_floor_log2(x: torch.Tensor) -> torch.Tensor:
    return torch.floor(torch.log2(x)).to(torch.int32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_every_value_of_the_dtype_equals_torch_log2(dtype):
    x = _all_finite_nonneg(dtype)
    want = _torch_floor_log2(x[1:])
    got = log2_floor_exponent(x[1:], dtype)
    normal = x[1:].float() >= 2.0 ** -126
    assert torch.equal(got[normal], want[normal])
    # fp32-subnormal values (bf16 subnormals) give -127: torch says <= -126 there
    assert bool((got[~normal] == -127).all()) and bool((want[~normal] <= -126).all())
    assert int((got != (x[1:].float().view(torch.int32) >> 23) - 127)[normal].sum()) > 0  # rounding up happens


def test_fp32_boundaries_and_random_patterns_equal_torch_log2():
    x = _fp32_boundaries()
    normal = x >= 2.0 ** -126
    want, got = _torch_floor_log2(x), log2_floor_exponent(x, torch.float32)
    assert torch.equal(got[normal], want[normal])
    assert bool((want[~normal] <= -126).all())
    bumped = int((got != (x.view(torch.int32) >> 23) - 127)[normal].sum())
    assert bumped > 5000  # the neighbourhoods hold the rounded-up values (44 per binade at |k| >= 64)
    g = torch.Generator().manual_seed(7)
    r = torch.randint(1 << 23, 0x7F800000, (1 << 20,), generator=g, dtype=torch.int32).view(torch.float32)
    assert torch.equal(log2_floor_exponent(r, torch.float32), _torch_floor_log2(r))


def test_thresholds_are_data_and_checked():
    with pytest.raises(ValueError, match="dtype"):
        log2_floor_thresholds(torch.float64)
    t = log2_floor_thresholds(torch.float32)
    assert len(t) == 256 and t[127] == 1 << 23 and min(t) == (1 << 23) - 44
    with pytest.raises(ValueError, match="amax"):
        e8m0_scale(torch.ones(2, dtype=torch.float64), FORMATS["mxfp4"].element, "floor_log2")


def _mx_shared_exp(amax: torch.Tensor, emax: int) -> torch.Tensor:
    """microxcaling _shared_exponents + _quantize_mx's offset and clamps, from a block amax."""
    se = MX._shared_exponents(amax.reshape(-1, 1), -1).reshape(-1) - emax
    se = torch.where(se > 127, torch.full_like(se, float("nan")), se)
    return torch.where(se < -127, torch.full_like(se, -127), se)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fmt_name", sorted(MX.ELEM_PARAMS))
def test_scale_byte_equals_microxcaling_shared_exponent(fmt_name, dtype):
    el = FORMATS[fmt_name].element
    if dtype == torch.bfloat16:  # every bf16 bit pattern as the amax, NaN and Inf included
        amax = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(dtype).abs()
    else:
        amax = torch.cat([_fp32_boundaries(), torch.tensor([0.0, float("inf"), float("nan")])]).to(dtype)
    want = torch.exp2(_mx_shared_exp(amax, el.emax).float())  # NaN where microxcaling's scale is NaN
    got = e8m0_decode(e8m0_scale(amax, el, "floor_log2"))
    assert_bits_equal(got, want, f"{fmt_name} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fmt_name", sorted(MX.ELEM_PARAMS))
def test_qdq_equals_microxcaling(fmt_name, dtype):
    """The whole microxcaling QDQ (round="even" = RNE) on the formats probes plus blocks whose
    amax sits one to three ulps below 2^k for many k. microxcaling rounds elements as
    floor(|a| + 0.5) in the input dtype, which in bf16 rounds up values just below a tie
    (tests/corpus/microxcaling_style.py): those elements are excluded, the rest must agree."""
    el = FORMATS[fmt_name].element
    g = torch.Generator().manual_seed(11)
    rows = [probes(fmt_name, dtype, seed=5).float()]
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[dtype]
    for k in range(-120, 121, 7):
        top = torch.tensor([2.0 ** k] * 3, dtype=dtype).view(ints) - torch.tensor([1, 2, 3], dtype=ints)
        r = torch.randn(3, 64, generator=g).clamp(-1, 1) * 2.0 ** (k - 1)
        r[:, 0] = top.view(dtype).float()
        r[:, 33] = -top.view(dtype).float()
        rows.append(r)
    x = torch.cat(rows).to(dtype)
    want = MX._quantize_mx(x, round="even", params=MX.ELEM_PARAMS[fmt_name])
    got = fake_quantize(x, fmt_name, scale_mode="floor_log2", signed_zero="lt0")
    floor = fake_quantize(x, fmt_name, scale_mode="floor", signed_zero="lt0")
    # elements microxcaling rounds in the input dtype: |a| + 0.5 rounds up to the next integer there
    s = e8m0_decode(quantize(x, fmt_name, scale_mode="floor_log2").scale).repeat_interleave(32, dim=-1)
    a = (x.float() / s).abs() * 2.0 ** (MX.ELEM_PARAMS[fmt_name][1] - 2)
    a = a / torch.exp2(torch.floor(torch.log2(a.clamp(min=2.0 ** -126))).clamp(min=-(2 ** (MX.ELEM_PARAMS[fmt_name][0] - 1)) + 2))
    inexact = torch.floor((a.to(dtype) + 0.5).float()) != torch.floor(a + 0.5)
    keep = ~inexact | ~torch.isfinite(a)
    assert int((~keep).sum()) <= (x.numel() // 1000 if dtype == torch.bfloat16 else 0)
    assert_bits_equal(torch.where(keep, got, want), want, f"{fmt_name} {dtype}")
    with pytest.raises(AssertionError):  # the probes separate floor_log2 from "floor"
        assert_bits_equal(torch.where(keep, floor, want), want)
