"""microxcaling's MX QDQ (formats variants "microxcaling" / "microxcaling_even": floor_log2
scales, the element rounding computed in the activation dtype, lt0 zeros) through the
generated kernels (Triton's interpreter on CPU: bf16 roundings by the exact integer-RNE
`_rnd`) against emu_inductor.formats bit for bit, on the recogniser's probe blocks (which
hold the value each in-dtype rounding sends up and negatives that underflow in the dtype)
plus random blocks. Each test also checks the exact-rounding twin differs there."""

from __future__ import annotations

import pytest
import torch

from emu_inductor.formats import FORMATS, fake_quantize
from emu_inductor.kernels import KernelSpec
from emu_inductor.kernels.launch import get_module
from emu_inductor.kernels.render import render
from emu_inductor.recognize.probes import act_blocks
from emu_inductor.recognize.variants import act_variants
from emu_inductor.spec import OpSpec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TWIN = {"microxcaling": "half_away", "microxcaling_even": "rne"}


def _variant(name: str, fmt: str):
    (v,) = [v for v in act_variants() if v.named == name and v.fmt == fmt]
    return v


def _blocks(fmt: str, dtype: torch.dtype) -> torch.Tensor:
    f = FORMATS[fmt]
    x = act_blocks(f.block_size, dtype, [f.element]).blocks.reshape(-1, f.block_size)
    g = torch.Generator().manual_seed(3)
    e = torch.randint(-30, 31, (64, 1), generator=g).to(torch.float32)
    x = torch.cat([x, (torch.randn(64, f.block_size, generator=g) * torch.exp2(e)).to(dtype)])
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        # the interpreter flushes bf16 subnormals when it widens them (the GPU does not)
        x = x[~((x != 0) & (x.abs() < torch.finfo(dtype).tiny)).any(dim=1)]
    return x.contiguous()


def _kernel_qdq(x: torch.Tensor, op: OpSpec) -> torch.Tensor:
    mod = get_module(KernelSpec(op, KernelSpec.dtype_name(x.dtype), interpret=DEVICE == "cpu"))
    M, K = x.shape
    out = torch.empty_like(x.to(DEVICE))
    BM = 1024 if DEVICE == "cpu" else 64
    mod.qdq_kernel[(-(-M // BM), 1)](x.to(DEVICE), out, torch.ones(1, device=DEVICE), M, K, STATIC_A=True,
                                     BM=BM, BK=K)
    return out.cpu()


def _n_differ(a: torch.Tensor, b: torch.Tensor) -> int:
    iv = torch.int16 if a.element_size() == 2 else torch.int32
    return int((~((a.view(iv) == b.view(iv)) | (torch.isnan(a) & torch.isnan(b)))).sum())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8_e4m3"])
@pytest.mark.parametrize("name", ["microxcaling", "microxcaling_even"])
def test_kernel_equals_formats_variant(name, fmt, dtype):
    v = _variant(name, fmt)
    assert v.kernel_supported, v.unsupported_reason()
    op = OpSpec(fmt, "block", fmt, v.scale_mode, act_rounding=v.rounding, **v.spec_fields)
    assert op.act_rounding == "microxcaling_" + ("nearest" if name == "microxcaling" else "even")
    x = _blocks(fmt, dtype)
    ref = fake_quantize(x, fmt, variant=name)
    out = _kernel_qdq(x, op)
    assert _n_differ(out, ref) == 0
    twin = fake_quantize(x, fmt, scale_mode="floor_log2", rounding=TWIN[name], signed_zero="lt0")
    # the value below half the smallest subnormal, both signs, at each probe scale; in bf16
    # also the zeros of negatives that underflow there
    assert _n_differ(twin, ref) >= 8
    twin_op = OpSpec(fmt, "block", fmt, "floor_log2", act_rounding=TWIN[name], act_signed_zero="lt0")
    assert _n_differ(_kernel_qdq(x, twin_op), twin) == 0


def test_only_in_dtype_roundings_render_the_dtype_steps():
    """The exact roundings render as before: no dtype rounding of the scaled block or sum."""
    for rounding, present in (("half_away", False), ("microxcaling_nearest", True), ("microxcaling_even", True)):
        op = OpSpec("mxfp4", "block", "mxfp4", "floor_log2", act_rounding=rounding, act_signed_zero="lt0")
        text = render(KernelSpec(op, "bf16", interpret=True))
        assert ("y = _rnd(xb *" in text) == present and ("tl.floor(_rnd(n + 0.5))" in text) == present, rounding


def test_linear_kernel_equals_reference_with_microxcaling_activations():
    """mxemu::linear's kernel and its reference (OpSpec.scheme() -> formats, in x's dtype)
    agree, bf16, on rows holding the value the in-dtype rounding sends up."""
    from emu_inductor.ops.reference_impl import linear_reference
    from emu_inductor.ops.triton_impl import linear_triton

    op = OpSpec("mxfp4", "block", "mxfp4", "floor_log2", act_rounding="microxcaling_nearest", act_signed_zero="lt0")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, generator=g).bfloat16()
    x[:, 0] = 4.0  # amax 4: scale 2^0, quantum of the smallest subnormal 0.5
    x[:, 1] = 0.2490234375  # bf16's largest value below 1/4: rounds up to 0.5 here
    w = torch.randint(0, 256, (16, 32), generator=g, dtype=torch.uint8)
    s = torch.randint(120, 130, (16, 2), generator=g, dtype=torch.uint8)
    out = linear_triton(x, w, s, None, None, None, op)
    ref = linear_reference(x, w, s, None, None, None, op)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    exact = linear_reference(x, w, s, None, None, None, OpSpec("mxfp4", "block", "mxfp4", "floor_log2",
                                                                act_rounding="half_away", act_signed_zero="lt0"))
    assert not torch.equal(exact, ref)
