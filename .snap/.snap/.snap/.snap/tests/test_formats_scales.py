"""E8M0 block scales: the four MX scale modes against exact rational arithmetic, the
edge-byte readers, and (optionally) whole-block MX FLOOR fake-quant against gfloat.

The oracle here never looks at fp32 bit fields: exponents come from math.frexp and
fractions.Fraction, so it shares no code or trick with emu_inductor.formats.scales.
"""

from __future__ import annotations

import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
import torch

from emu_inductor.formats import (
    E2M1,
    E2M3,
    E3M2,
    E4M3,
    E5M2,
    MX_SCALE_MODES,
    e8m0_decode,
    e8m0_inverse,
    e8m0_scale,
    fake_quantize,
    quantize,
)

ALL = [E2M1, E2M3, E3M2, E4M3, E5M2]
IDS = [e.name for e in ALL]


def floor_log2(q: Fraction) -> int:
    """floor(log2 q) for a positive rational, exactly."""
    e = q.numerator.bit_length() - q.denominator.bit_length()
    # now 2^(e-1) < q < 2^(e+1); settle which side of 2^e q is on
    if q < Fraction(2) ** e:
        e -= 1
    assert Fraction(2) ** e <= q < Fraction(2) ** (e + 1)
    return e


def ceil_log2(q: Fraction) -> int:
    e = floor_log2(q)
    return e if q == Fraction(2) ** e else e + 1


def fp32(v: float) -> float:
    return float(np.float32(v))


def oracle_byte(amax: float, elem, mode: str) -> int:
    """E8M0 byte for block max `amax` (an fp32 value), by exact arithmetic.

    floor: floor(log2 amax) - emax (OCP MX v1.0)
    ceil:  ceil(log2 amax) - emax
    even:  amax rounded to the element's mantissa width, ties up, then floor(log2) - emax
    rceil: ceil(log2 d) with d = fp32(amax * fp32(1/max_normal)) (torchao's formula)
    Result clamped to [-127, 127] and biased by 127; zero -> 0; NaN/Inf -> 255.
    """
    if math.isnan(amax) or math.isinf(amax):
        return 255
    if amax == 0:
        return 0
    q = Fraction(amax)
    if mode == "floor":
        e = floor_log2(q) - elem.emax
    elif mode == "ceil":
        e = ceil_log2(q) - elem.emax
    elif mode in ("even", "even_fp4"):
        f = floor_log2(q)
        ulp = Fraction(2) ** (f - (1 if mode == "even_fp4" else elem.mbits))
        r = math.floor(q / ulp + Fraction(1, 2)) * ulp  # half up
        e = floor_log2(r) - elem.emax
    elif mode == "rceil":
        # both factors are fp32, so the float64 product is exact; np.float32 rounds it RNE
        d = fp32(fp32(amax) * fp32(1.0 / elem.max_normal))
        if d == 0:
            return 0
        e = ceil_log2(Fraction(d))
    elif mode == "rceil_log2":
        # ceil(fl32(log2(d))), d = fp32 division (numpy float32 is IEEE). The exact ceil is
        # k; a correctly rounded fp32 log2 lands on k-1 when log2(d) - (k-1) is below half
        # the fp32 spacing next to k-1 on the side towards k.
        d = np.float32(np.float32(amax) / np.float32(elem.max_normal))
        if d == 0:
            return 0
        qd = Fraction(float(d))
        k = ceil_log2(qd)
        if qd != Fraction(2) ** k and k - 1 != 0:
            eps = math.log1p(float(qd / Fraction(2) ** (k - 1) - 1)) / math.log(2)
            m = abs(k - 1)
            spacing = 2.0 ** (math.floor(math.log2(m)) - 23)
            if k - 1 < 0 and m & (m - 1) == 0:
                spacing /= 2  # below a power of two the fp32 grid is twice as fine
            if eps < spacing / 2:
                k -= 1
        e = k
    elif mode == "floor_log2":
        # floor(fl32(log2 amax)) (microxcaling): the exact floor is k - 1; a correctly
        # rounded fp32 log2 reaches k when k - log2(amax) is below half the fp32 spacing
        # next to k on the side towards k - 1
        k = floor_log2(q) + 1
        e = k - 1
        if q != Fraction(2) ** (k - 1) and k != 0:
            eps = -math.log1p(float(q / Fraction(2) ** k - 1)) / math.log(2)
            m = abs(k)
            spacing = 2.0 ** (math.floor(math.log2(m)) - 23)
            if k > 0 and m & (m - 1) == 0:
                spacing /= 2  # below a power of two the fp32 grid is twice as fine
            if eps < spacing / 2:
                e = k
        e -= elem.emax
    else:
        raise AssertionError(mode)
    return max(-127, min(127, e)) + 127


def oracle_bytes(amax: np.ndarray, elem, mode: str) -> np.ndarray:
    return np.array([oracle_byte(float(a), elem, mode) for a in np.asarray(amax, np.float32)], np.uint8)


def scale_bytes(amax, elem, mode) -> np.ndarray:
    return e8m0_scale(torch.from_numpy(np.asarray(amax, np.float32)), elem, mode).numpy()


# --- the published table (formats_references.md §5.1) -----------------------------------

TABLE_AMAX = [1.0, 1.4, 1.5, 1.6, 1.75, 1.9, 6.0, 6.5, 7.9]
TABLE = {
    "floor": [-2, -2, -2, -2, -2, -2, 0, 0, 0],
    "ceil": [-2, -1, -1, -1, -1, -1, 1, 1, 1],
    "even": [-2, -2, -2, -2, -1, -1, 0, 0, 1],
    "rceil": [-2, -2, -2, -1, -1, -1, 0, 1, 1],
    "rceil_log2": [-2, -2, -2, -1, -1, -1, 0, 1, 1],  # equal to rceil away from 2^k boundaries
    "even_fp4": [-2, -2, -2, -2, -1, -1, 0, 0, 1],  # E2M1 has 1 mantissa bit: = even
    "floor_log2": [-2, -2, -2, -2, -2, -2, 0, 0, 0],  # = floor away from just below 2^k
}


@pytest.mark.parametrize("mode", MX_SCALE_MODES)
def test_e2m1_table(mode):
    got = scale_bytes(TABLE_AMAX, E2M1, mode).astype(int) - 127
    assert got.tolist() == TABLE[mode]
    assert (oracle_bytes(TABLE_AMAX, E2M1, mode).astype(int) - 127).tolist() == TABLE[mode]


def test_e4m3_boundaries():
    # EVEN bumps at mantissa >= 1.9375 (E4M3, 3 mantissa bits); RCEIL when amax > 1.75 * 2^k;
    # 448 -> 0 for floor/even/rceil and 1 for ceil; 480 -> floor 0 but rceil 1.
    exp = lambda a, m: int(scale_bytes([a], E4M3, m)[0]) - 127  # noqa: E731
    assert exp(448.0, "floor") == 0 and exp(448.0, "even") == 0 and exp(448.0, "rceil") == 0
    assert exp(448.0, "ceil") == 1
    assert exp(480.0, "floor") == 0 and exp(480.0, "rceil") == 1
    assert exp(1.9375 * 256, "even") == 1 and exp(np.nextafter(np.float32(1.9375 * 256), 0), "even") == 0
    assert exp(1.75 * 256, "rceil") == 0 and exp(np.nextafter(np.float32(1.75 * 256), 1e9), "rceil") == 1
    # E3M2 (2 mantissa bits) bumps at 1.875, E2M3 (3 bits) at 1.9375
    assert int(scale_bytes([1.875 * 16], E3M2, "even")[0]) - 127 == 1
    assert int(scale_bytes([1.87 * 16], E3M2, "even")[0]) - 127 == 0
    assert int(scale_bytes([1.9375 * 4], E2M3, "even")[0]) - 127 == 1
    assert int(scale_bytes([1.875 * 4], E2M3, "even")[0]) - 127 == 0


def _amax_probes(elem, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # random positive fp32 bit patterns (all exponents incl. subnormal), Gaussians at
    # many scales, and +-4 ulp around max_normal * 2^k and every mantissa threshold
    raw = (rng.integers(0, 0x7F800000, 5000, dtype=np.int64)).astype(np.uint32).view(np.float32)
    g = np.abs(rng.standard_normal(5000) * np.exp2(rng.integers(-140, 126, 5000))).astype(np.float32)
    centers = []
    for k in range(-135, 120, 3):
        for m in (1.0, 1.5, 1.75, 1.875, 1.9375, 1.96875, elem.max_normal / 2 ** elem.emax):
            centers.append(m * 2.0**k)
    c = np.array(centers, np.float32)
    near = [c]
    lo, hi = c.copy(), c.copy()
    for _ in range(4):
        lo = np.nextafter(lo, np.float32(0))
        hi = np.nextafter(hi, np.float32(np.inf))
        near += [lo, hi]
    special = np.array([0.0, 1e-45, 2.0**-149, 2.0**-127, 2.0**-126, 1.1754942e-38, 3.4028235e38,
                        2.0**127, 1.5 * 2.0**127], np.float32)
    return np.concatenate([raw, g, *near, special])


@pytest.mark.parametrize("elem", ALL, ids=IDS)
@pytest.mark.parametrize("mode", MX_SCALE_MODES)
def test_modes_vs_exact_oracle(elem, mode):
    a = _amax_probes(elem, seed=elem.bits * 10 + elem.mbits)
    got = scale_bytes(a, elem, mode)
    want = oracle_bytes(a, elem, mode)
    bad = np.nonzero(got != want)[0]
    assert bad.size == 0, (
        f"{bad.size} mismatches, e.g. amax={a[bad[:5]].tolist()} got={got[bad[:5]]} want={want[bad[:5]]}"
    )


@pytest.mark.parametrize("elem", ALL, ids=IDS)
def test_rceil_equals_exact_ceil_log2_of_ratio(elem):
    """torchao computes amax * fp32(1/max_normal) in fp32. Wherever that product is an
    fp32 normal (amax >= max_normal * 2^-126) it equals the exact
    ceil(log2(amax / max_normal)) on all boundary probes (as formats_references.md §5.1
    found). Below, see test_rceil_subnormal_descale_differs_from_exact."""
    a = _amax_probes(elem, seed=99)
    a = a[(a >= np.float32(elem.max_normal * 2.0**-126)) & (a < np.float32(1e38))]
    got = scale_bytes(a, elem, "rceil").astype(int)
    exact = []
    for v in a.tolist():
        e = ceil_log2(Fraction(v) / Fraction(elem.max_normal))
        exact.append(max(-127, min(127, e)) + 127)
    exact = np.array(exact)
    bad = np.nonzero(got != exact)[0]
    assert bad.size == 0, f"amax={a[bad[:5]].tolist()} got={got[bad[:5]]} exact={exact[bad[:5]]}"


@pytest.mark.parametrize("elem", ALL, ids=IDS)
def test_rceil_subnormal_descale_differs_from_exact(elem):
    """Where amax * fp32(1/max_normal) is an fp32 subnormal, the product loses bits: an
    amax a few ulps above max_normal * 2^-127 gives d == 2^-127 (byte 0, as torchao's
    formula does), while the exact ceil(log2(amax/max_normal)) is -126 (byte 1).
    emu_inductor follows torchao's fp32 formula; this pins the (tiny) divergence."""
    edge = np.float32(elem.max_normal * 2.0**-127)
    assert scale_bytes([edge], elem, "rceil")[0] == 0
    above = np.nextafter(edge, np.float32(1))
    d = np.float32(above * np.float32(1.0 / elem.max_normal))
    exact = ceil_log2(Fraction(float(above)) / Fraction(elem.max_normal)) + 127
    assert exact == 1
    assert d == np.float32(2.0**-127)  # the fp32 product lost the excess
    assert scale_bytes([above], elem, "rceil")[0] == 0
    # far enough above, both agree again
    far = np.float32(elem.max_normal * 2.0**-127 * 1.01)
    assert scale_bytes([far], elem, "rceil")[0] == 1


@pytest.mark.parametrize("mode", MX_SCALE_MODES)
@pytest.mark.parametrize("elem", ALL, ids=IDS)
def test_zero_nan_inf_subnormal_amax(mode, elem):
    a = np.array([0.0, np.nan, np.inf, 1e-45, 1e-40, 1.1754942e-38], np.float32)
    got = scale_bytes(a, elem, mode)
    assert got[0] == 0 and got[1] == 255 and got[2] == 255
    assert (got[3:] == 0).all()  # fp32 subnormal amax: below 2^-127 * 2^emax, clamps to byte 0
    # negative-signed NaN too
    assert scale_bytes(np.array([-np.nan], np.float32), elem, mode)[0] == 255


def test_scale_accepts_bf16_and_fp16_amax():
    a32 = torch.tensor([0.0, 1.0, 1.75, 6.0, 6.5, 1000.0, 3e38, float("inf")])
    for dt in (torch.bfloat16, torch.float16):
        a = a32.to(dt)
        for mode in MX_SCALE_MODES:
            if mode != "floor_log2":  # the one mode whose log2 is rounded in amax's dtype
                assert torch.equal(e8m0_scale(a, E2M1, mode), e8m0_scale(a.float(), E2M1, mode))
    # bf16(3e38) = 1.766 * 2^127: its log2 rounds to 128 in bf16, not in fp32
    top = torch.tensor([3e38]).to(torch.bfloat16)
    assert int(e8m0_scale(top, E2M1, "floor_log2")) == int(e8m0_scale(top.float(), E2M1, "floor_log2")) + 1


def test_largest_bytes():
    # amax = max fp32 in floor mode: floor(log2) = 127, minus emax
    for elem in ALL:
        b = int(scale_bytes([3.4028235e38], elem, "floor")[0])
        assert b == 127 + 127 - elem.emax
        assert int(scale_bytes([3.4028235e38], elem, "even")[0]) == 127 + 128 - elem.emax


# --- through quantize: zero, NaN and Inf blocks ---------------------------------------------


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8_e4m3", "mxfp8_e5m2"])
@pytest.mark.parametrize("mode", MX_SCALE_MODES)
def test_blocks_zero_nan_inf(fmt, mode):
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    x[0] = 0.0
    x[1, :32] = -0.0
    x[2, 3] = float("nan")
    x[3, 40] = float("inf")
    x[4, 0] = float("-inf")
    q = quantize(x, fmt, scale_mode=mode)
    s = q.scale
    assert s.dtype == torch.uint8 and s.shape == (5, 2)
    assert s[0].tolist() == [0, 0] and s[1, 0].item() == 0
    assert s[2, 0].item() == 255 and s[2, 1].item() != 255
    assert s[3, 1].item() == 255 and s[3, 0].item() != 255
    assert s[4, 0].item() == 255
    y = fake_quantize(x, fmt, scale_mode=mode)
    assert (y[0] == 0).all() and not torch.signbit(y[0]).any()
    assert (y[1, :32] == 0).all() and torch.signbit(y[1, :32]).all()
    for r, blk in ((2, 0), (3, 1), (4, 0)):
        assert torch.isnan(y[r, 32 * blk: 32 * blk + 32]).all()
        assert not torch.isnan(y[r, 32 * (1 - blk): 32 * (2 - blk)]).any()


# --- decoding ------------------------------------------------------------------------------


def test_e8m0_decode_all_bytes_vs_torch_and_ml_dtypes():
    u = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    got = e8m0_decode(u)
    assert got.dtype == torch.float32
    want_t = u.view(torch.float8_e8m0fnu).to(torch.float32)
    want_m = torch.from_numpy(u.numpy().view(ml_dtypes.float8_e8m0fnu).astype(np.float32))
    for want in (want_t, want_m):
        assert torch.isnan(want[255]) and torch.isnan(got[255])
        assert torch.equal(got[:255].view(torch.int32), want[:255].view(torch.int32))
    # independent: 2^(u-127) in float64 (exact for every byte, incl. the subnormal 2^-127)
    assert got[:255].double().tolist() == [math.ldexp(1.0, b - 127) for b in range(255)]
    assert got[0].item() == 2.0**-127 and got[0].view(torch.int32).item() == 0x00400000
    assert got[127].item() == 1.0 and got[254].item() == 2.0**127


def test_e8m0_decode_edge_byte_readers():
    u = torch.tensor([0, 1, 127, 254, 255], dtype=torch.int32).to(torch.uint8)
    nan_pow = e8m0_decode(u)
    inf_pow = e8m0_decode(u, byte255="inf")
    nan_zero = e8m0_decode(u, byte0="zero")
    inf_zero = e8m0_decode(u, byte255="inf", byte0="zero")
    assert inf_pow[4].item() == float("inf") and torch.isnan(nan_pow[4]) and torch.isnan(nan_zero[4])
    assert nan_zero[0].item() == 0.0 and not torch.signbit(nan_zero[0])
    assert inf_zero[:4].tolist() == [0.0, 2.0**-126, 1.0, 2.0**127] and inf_zero[4].item() == float("inf")
    for t in (nan_pow, inf_pow, nan_zero, inf_zero):
        assert t[1:4].tolist() == [2.0**-126, 1.0, 2.0**127]
    assert nan_pow[0].item() == inf_pow[0].item() == 2.0**-127


def test_e8m0_inverse_all_bytes():
    u = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    inv = e8m0_inverse(u)
    assert torch.isnan(inv[255])
    assert inv[:255].double().tolist() == [math.ldexp(1.0, 127 - b) for b in range(255)]
    assert (inv[:255].double() * e8m0_decode(u)[:255].double() == 1.0).all()


def test_e8m0_readers_through_dequantize():
    from emu_inductor.formats import dequantize

    x = torch.zeros(2, 32)
    x[1, 5] = float("nan")
    q = quantize(x, "mxfp8_e4m3")
    assert q.scale[:, 0].tolist() == [0, 255]
    d = dequantize(q, torch.float32, e8m0_byte255="inf", e8m0_byte0="zero")
    assert (d[0] == 0).all() and torch.isnan(d[1]).all()
    # byte 255 as +inf: finite non-zero codes become +-inf, zeros and NaN codes NaN
    q.scale[1, 0] = 255
    q.qdata[1, :3] = torch.tensor([0x38, 0xB8, 0x00], dtype=torch.int32).to(torch.uint8)
    d = dequantize(q, torch.float32, e8m0_byte255="inf")
    assert d[1, 0].item() == float("inf") and d[1, 1].item() == float("-inf") and torch.isnan(d[1, 2])
    d = dequantize(q, torch.float32)  # default reader: NaN
    assert torch.isnan(d[1, :3]).all()


# --- whole-block MX FLOOR against gfloat -----------------------------------------------------


def test_mx_floor_fake_quant_vs_gfloat():
    import gfloat  # a hard test dependency: listed in the `test` extra of pyproject.toml
    from gfloat.formats import (
        format_info_mxfp4_e2m1,
        format_info_mxfp6_e2m3,
        format_info_mxfp6_e3m2,
        format_info_mxfp8_e4m3,
        format_info_mxfp8_e5m2,
    )

    fis = {
        "mxfp4": format_info_mxfp4_e2m1,
        "mxfp6_e2m3": format_info_mxfp6_e2m3,
        "mxfp6_e3m2": format_info_mxfp6_e3m2,
        "mxfp8_e4m3": format_info_mxfp8_e4m3,
        "mxfp8_e5m2": format_info_mxfp8_e5m2,
    }
    g = torch.Generator().manual_seed(11)
    rows = 12
    x = torch.randn(rows, 64, generator=g) * torch.exp(torch.randn(rows, 1, generator=g) * 3)
    x[0, :32] = 0.0
    x[1, :32] *= 1e-38  # subnormal block
    for dt in (torch.float32, torch.bfloat16):
        xd = x.to(dt)
        xs = xd.float().numpy().astype(np.float64).reshape(-1, 32)
        for name, fi in fis.items():
            got = fake_quantize(xd, name, scale_mode="floor").float().numpy().astype(np.float64).reshape(-1, 32)
            want = np.stack([
                gfloat.quantize_block(fi, blk, gfloat.compute_scale_amax, gfloat.RoundMode.TiesToEven)
                for blk in xs
            ])
            np.testing.assert_array_equal(got, want, err_msg=f"{name} {dt}")


def test_even_vs_compressed_tensors():
    """compressed-tensors 0.20 `generate_mx_scales` (its MX "even" rule: round the amax
    to the element's mantissa width, ties up, then floor(log2) - offset) equals our "even"
    for MXFP4 (E2M1) and MXFP6 E2M3. For MXFP8 it keeps FP4's 1-bit rounding (offset 8):
    that is our "even_fp4" for E4M3, not "even" (which rounds to E4M3's 3 bits)."""
    from compressed_tensors.quantization.utils.mxfp_utils import generate_mx_scales

    rng = np.random.default_rng(4)
    a = np.abs(rng.standard_normal(20000) * np.exp2(rng.integers(-100, 100, 20000))).astype(np.float32)
    a = np.concatenate([a, np.array(TABLE_AMAX, np.float32), np.float32([7.5, 7.6, 7.75, 7.8, 1.9375, 1.875])])
    a = a[a > 0]
    theirs8 = generate_mx_scales(torch.from_numpy(a), 8)
    assert torch.equal(torch.from_numpy(scale_bytes(a, E4M3, "even_fp4")).to(theirs8.dtype), theirs8)
    assert not torch.equal(torch.from_numpy(scale_bytes(a, E4M3, "even")).to(theirs8.dtype), theirs8)
    for elem, bits in ((E2M1, 4), (E2M3, 6)):
        theirs = generate_mx_scales(torch.from_numpy(a), bits)
        assert torch.equal(torch.from_numpy(scale_bytes(a, elem, "even")).to(theirs.dtype), theirs), elem.name
