"""The kernels render scale_mode "floor_log2" (microxcaling's floor(log2 amax) in the
activation dtype) exactly, without calling a log2: the rendered `_e8m0_scale` reads the
exponent field and compares the fraction field with the formats' per-binade thresholds.

Proof on the rendered helper itself: every bf16 and fp16 value (NaN and Inf included) and
a few hundred fp32 values either side of every power of two give the byte of torch's
`floor(log2(amax))` in that dtype (microxcaling's shared exponent, clamped). Then the
whole rendered activation QDQ equals `formats.fake_quantize(scale_mode="floor_log2")` on
the recognizer's probe blocks for every MX format.
"""

from __future__ import annotations

import pytest
import torch

from emu_inductor.formats import FORMATS, e8m0_scale
from emu_inductor.kernels import KernelSpec, render
from emu_inductor.kernels.cache import load_module
from emu_inductor.kernels.launch import get_module
from emu_inductor.recognize.probes import act_blocks
from emu_inductor.spec import OpSpec
from tests.test_formats_log2_floor import _fp32_boundaries

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MX_ACTS = {"mxfp4": "mxfp4", "mxfp6_e2m3": "mxfp6_e2m3", "mxfp6_e3m2": "mxfp6_e3m2", "mxfp8_e4m3": "mxfp8_e4m3"}

# The probe kernel is appended to each rendered module, so it calls that module's own
# `_e8m0_scale`. (A module-level kernel calling a global that each case rebinds works under
# the interpreter only: a compiled kernel keeps the helper it was first compiled with.)
_PROBE = """

@triton.jit
def _scale_probe(a_ptr, u_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    a = tl.load(a_ptr + offs, mask=m, other=0.0)
    tl.store(u_ptr + offs, _e8m0_scale(a), mask=m)
"""


def _kspec(fmt: str, dtype: torch.dtype, rounding: str = "rne") -> KernelSpec:
    op = OpSpec(weight_fmt=fmt, act_kind="block", act_fmt=fmt, act_scale_mode="floor_log2", act_rounding=rounding)
    return KernelSpec(op, KernelSpec.dtype_name(dtype), interpret=DEVICE == "cpu")


def _module(fmt: str, dtype: torch.dtype, rounding: str = "rne"):
    return get_module(_kspec(fmt, dtype, rounding))


def _rendered_bytes(fmt: str, dtype: torch.dtype, amax: torch.Tensor) -> torch.Tensor:
    ks = _kspec(fmt, dtype)
    probe = load_module(f"probe_{ks.short_name()}", render(ks) + _PROBE)._scale_probe
    a = amax.to(torch.float32).to(DEVICE)
    u = torch.empty(a.shape, dtype=torch.int32, device=DEVICE)
    BLOCK = 4096
    probe[(-(-a.numel() // BLOCK),)](a, u, a.numel(), BLOCK=BLOCK)
    return u.cpu()


def _values(dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float32:
        return torch.cat([_fp32_boundaries(), torch.tensor([0.0, float("inf"), float("nan")])])
    return torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(dtype).abs()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8_e4m3"])
def test_rendered_scale_equals_torch_floor_log2(fmt, dtype):
    el = FORMATS[fmt].element
    amax = _values(dtype)
    got = _rendered_bytes(fmt, dtype, amax)
    # microxcaling: floor(log2(amax + 2^-126 * (amax == 0))) in dtype, - emax, NaN above 127,
    # -127 below; byte 255 for NaN
    guard = (amax == 0).to(dtype) * torch.tensor(2.0 ** -126, dtype=dtype)
    se = torch.floor(torch.log2(amax + guard)).float() - el.emax
    se = torch.where(se > 127, torch.full_like(se, float("nan")), se).clamp(min=-127)
    want = torch.where(torch.isnan(se), torch.full_like(se, 255), se + 127).to(torch.int32)
    assert torch.equal(got, want), f"{int((got != want).sum())} of {got.numel()} bytes differ"
    assert torch.equal(got, e8m0_scale(amax, el, "floor_log2").to(torch.int32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("rounding", ["rne", "half_away"])
@pytest.mark.parametrize("fmt", sorted(MX_ACTS))
def test_rendered_qdq_equals_formats(fmt, rounding, dtype):
    from emu_inductor.formats import fake_quantize

    f = FORMATS[fmt]
    x = act_blocks(f.block_size, dtype, [f.element]).blocks.reshape(-1, f.block_size).contiguous()
    ref = fake_quantize(x, fmt, scale_mode="floor_log2", rounding=rounding)
    mod = _module(fmt, dtype, rounding)
    xd = x.to(DEVICE)
    out = torch.empty_like(xd)
    BM = 1024 if DEVICE == "cpu" else 64
    mod.qdq_kernel[(-(-x.shape[0] // BM), 1)](xd, out, torch.ones(1, device=DEVICE), x.shape[0], x.shape[1],
                                               STATIC_A=True, BM=BM, BK=x.shape[1])
    out = out.cpu()
    # zeros compared by value (the shared element rounder gives +0.0 for -0.0, see
    # test_kernels_recipes). Triton's interpreter flushes bf16 subnormals when it widens
    # them (the GPU does not), so a block holding them is not comparable there: the same
    # blocks differ with scale_mode="floor"; all of them are byte-0 blocks either way
    same = (out == ref) | (torch.isnan(out) & torch.isnan(ref))
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        sub = ((x != 0) & (x.abs() < torch.finfo(dtype).tiny)).any(dim=1, keepdim=True)
        same |= sub
    assert bool(same.all()), f"{int((~same).sum())} of {same.numel()} values differ"
    # and the mode matters on these probes: "floor" gives other values
    assert not torch.equal(fake_quantize(x, fmt, scale_mode="floor", rounding=rounding).nan_to_num(), ref.nan_to_num())
