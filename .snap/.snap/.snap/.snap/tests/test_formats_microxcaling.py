"""formats' microxcaling variants (rounding "microxcaling_nearest" / "microxcaling_even",
scale_mode "floor_log2", signed_zero "lt0") equal microsoft/microxcaling's Python MX
quantizer bit for bit. The library is not on PyPI (not installable here); the oracle is its
`_quantize_mx` re-written op for op in tests/corpus/microxcaling_style.py, which computes
every step in the input dtype as the library does."""

from __future__ import annotations

import pytest
import torch

from emu_inductor.formats import FORMATS, fake_quantize, round_to_element
from tests.corpus.microxcaling_style import ELEM_PARAMS, _quantize_mx

ROUNDS = ("nearest", "even")
EXACT_TWIN = {"nearest": "half_away", "even": "rne"}


def _bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _n_differ(a, b) -> int:
    same = (_bits(a) == _bits(b)) | (torch.isnan(a) & torch.isnan(b))
    return int((~same).sum())


def _every_bf16_in_blocks(top: float) -> torch.Tensor:
    """Every bf16 bit pattern (NaN, +-Inf, +-0, subnormals included), 31 to a block of 32
    whose first element `top` pins the shared exponent (blocks holding NaN/Inf are NaN)."""
    v = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    n = v.numel() // 31 * 31
    blocks = v[:n].reshape(-1, 31)
    return torch.cat([torch.full((blocks.shape[0], 1), top, dtype=torch.bfloat16), blocks], 1)


@pytest.mark.parametrize("rnd", ROUNDS)
@pytest.mark.parametrize("fmt", sorted(ELEM_PARAMS))
def test_every_bf16_value_under_several_shared_exponents(fmt, rnd):
    name = "microxcaling" if rnd == "nearest" else "microxcaling_even"
    for top in (1.5 * 2.0 ** -128, 1.99 * 2.0 ** -100, 2.0 ** -3, 1.0, 7.0, 1.5 * 2.0 ** 20, 2.0 ** 120,
                3.3e38):
        x = _every_bf16_in_blocks(top)
        want = _quantize_mx(x, round=rnd, params=ELEM_PARAMS[fmt])
        got = fake_quantize(x, fmt, variant=name)
        assert _n_differ(got, want) == 0, f"{fmt} {rnd} top {top}"


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
@pytest.mark.parametrize("rnd", ROUNDS)
def test_random_and_edges_fp32_bf16(rnd, dtype):
    """Random blocks at 2^-40..2^40 plus, per block, the value each rounding sends up
    (C = 1/2 - 2^-(p+2) of the smallest subnormal's quantum), its negative, and a negative
    that underflows in the dtype once scaled; the exact twin rounding must differ there
    (so the test can fail)."""
    g = torch.Generator().manual_seed(7)
    p = 7 if dtype == torch.bfloat16 else 23
    for fmt, params in ELEM_PARAMS.items():
        el = FORMATS[fmt].element
        e = torch.randint(-40, 41, (512, 1), generator=g).to(torch.float32)
        x = torch.randn(512, 32, generator=g) * torch.exp2(e)
        c = (0.5 - 2.0 ** -(p + 2)) * 2.0 ** (el.emin - el.mbits)
        k = torch.randint(-20, 21, (128,), generator=g).to(torch.float32)
        x[:128, 0] = 2.0 ** el.emax * torch.exp2(k)
        x[:128, 1] = c * torch.exp2(k)
        x[:128, 2] = -c * torch.exp2(k)
        x[:128, 3] = -(2.0 ** -140) * torch.exp2(k + el.emax)  # in the dtype, below it once scaled
        x[:128, 4:] = 0.0  # the first element pins the shared exponent
        x = x.to(dtype)
        want = _quantize_mx(x, round=rnd, params=params)
        opts = dict(scale_mode="floor_log2", signed_zero="lt0")
        assert _n_differ(fake_quantize(x, fmt, rounding="microxcaling_" + rnd, **opts), want) == 0, fmt
        assert _n_differ(fake_quantize(x, fmt, rounding=EXACT_TWIN[rnd], **opts), want) >= 256, fmt


@pytest.mark.parametrize("dtype,p", ((torch.bfloat16, 7), (torch.float32, 23), (torch.float16, 10)))
@pytest.mark.parametrize("rnd", ROUNDS)
def test_round_to_element_differs_from_exact_twin_only_below_half(rnd, dtype, p):
    """The element rounding alone, every E2M1 input of `dtype` in [0, 8): equal to the exact
    twin except at 1/2 - 2^-(p+2) of the quantum (the dtype's largest value below half the
    smallest subnormal), which rounds up; both signs."""
    el = FORMATS["mxfp4"].element
    if dtype == torch.float32:  # fp32: the values around the binades that matter
        base = torch.tensor([0.25, 0.5, 1.0, 2.0, 4.0, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]).view(torch.int32)
        y = (base[:, None] + torch.arange(-300, 300, dtype=torch.int32)[None, :]).reshape(-1).view(torch.float32)
    else:
        v = torch.arange(0, 0x7C00 if dtype == torch.float16 else 0x7F80, dtype=torch.int32).to(torch.int16)
        y = v.view(dtype).to(torch.float32)
        y = y[y < 8]
    y = torch.cat([y, -y])
    got = round_to_element(y, el, rounding="microxcaling_" + rnd, signed_zero="lt0", dtype=dtype)
    twin = round_to_element(y, el, rounding=EXACT_TWIN[rnd], signed_zero="lt0", dtype=dtype)
    differ = _bits(got) != _bits(twin)
    c = (0.5 - 2.0 ** -(p + 2)) * 0.5  # E2M1's smallest subnormal quantum is 0.5
    assert sorted(y[differ].tolist()) == [-c, c]
    assert got[y == c].tolist() == [0.5] and got[y == -c].tolist() == [-0.5]


def test_options_validated():
    x = torch.ones(1, 32)
    with pytest.raises(ValueError, match="rounding"):
        fake_quantize(x, "mxfp4", rounding="microxcaling")
    with pytest.raises(TypeError, match="dtype"):
        round_to_element(x, FORMATS["mxfp4"].element, rounding="microxcaling_nearest", dtype="bf16")
