"""The MX activation-QDQ edge-case options of OpSpec (`act_signed_zero`, `act_inf_amax`,
`act_byte0_inverse`)
through the generated kernels (interpreter on CPU) against `emu_inductor.formats`, bit for
bit, zero signs included, on the recogniser's probe blocks plus edge blocks: +-0, tiny
values that round to zero, fp32 subnormals, +-Inf blocks, NaN blocks, amax at the top of
fp32's range (the "even" rounding carry).

The kernels get their options from the recogniser's own mapping (ActVariant.spec_fields),
so the library variants the pass fuses (Quark's fake_quantize_mx = formats `quark_hw`,
compressed-tensors' MX, microxcaling's sign * floor(...) zeros) are tested as fused. Each
test also checks that the option changes formats' output on these probes (a kernel that
ignored it would fail), and that default specs render exactly as before the fields.
"""

from __future__ import annotations

import pytest
import torch

from emu_inductor.formats import FORMATS, fake_quantize
from emu_inductor.kernels import KernelSpec
from emu_inductor.kernels.launch import get_module
from emu_inductor.ops.reference_impl import linear_reference
from emu_inductor.ops.triton_impl import linear_triton
from emu_inductor.recognize.probes import act_blocks
from emu_inductor.recognize.variants import ActVariant, act_variants
from emu_inductor.spec import OpSpec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INF, NAN = float("inf"), float("nan")


def _named(name: str, fmt: str) -> ActVariant:
    (v,) = [v for v in act_variants() if v.named == name and v.fmt == fmt]
    return v


def _spec(v: ActVariant) -> OpSpec:
    return OpSpec(v.fmt, "block", v.fmt, v.scale_mode, act_rounding=v.rounding, **v.spec_fields)


def _edge_blocks(bs: int, dtype: torch.dtype) -> torch.Tensor:
    top = torch.finfo(dtype).max
    rows = []
    for fill in (0.0, -0.0):
        rows.append(torch.full((bs,), fill))
    r = torch.randn(bs, generator=torch.Generator().manual_seed(1))
    mixed = r.clone()
    mixed[:4] = torch.tensor([-1e-30, 1e-30, -0.0, 0.0])  # round to zero next to amax ~2
    rows.append(mixed)
    for special in (INF, -INF, NAN):
        b = r.clone() * 100
        b[3] = special
        b[5] = -1e-3
        b[6] = -0.0
        rows.append(b)
    both = r.clone()
    both[0], both[1] = INF, NAN
    rows.append(both)
    rows.append(torch.full((bs,), -INF))
    big = r.clone()
    big[2] = top  # "even" rounds this amax past 2^127: a carry
    big[4] = -1e30
    rows.append(big)
    rows.append(torch.where(torch.arange(bs) % 2 == 0, -top, top / 3))
    if dtype == torch.float32:  # fp32 subnormals (the interpreter flushes bf16 ones when widening)
        rows.append(r * 2.0 ** -140)
        rows.append(-(r.abs()) * 2.0 ** -149)
    return torch.stack(rows).to(dtype)


def _probes(fmt: str, dtype: torch.dtype) -> torch.Tensor:
    f = FORMATS[fmt]
    x = act_blocks(f.block_size, dtype, [f.element]).blocks.reshape(-1, f.block_size)
    x = torch.cat([x, _edge_blocks(f.block_size, dtype)])
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        # Triton's interpreter flushes bf16 subnormals to zero when it widens them (the GPU
        # does not): blocks holding them are not comparable here
        sub = ((x != 0) & (x.abs() < torch.finfo(dtype).tiny)).any(dim=1)
        x = x[~sub]
    return x.contiguous()


def _kernel_qdq(x: torch.Tensor, op: OpSpec) -> torch.Tensor:
    mod = get_module(KernelSpec(op, KernelSpec.dtype_name(x.dtype), interpret=DEVICE == "cpu"))
    M, K = x.shape
    xd = x.to(DEVICE)
    out = torch.empty_like(xd)
    BM = 1024 if DEVICE == "cpu" else 64
    mod.qdq_kernel[(-(-M // BM), 1)](xd, out, torch.ones(1, device=DEVICE), M, K, STATIC_A=True, BM=BM, BK=K)
    return out.cpu()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _assert_bits(out: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, zero_sign: bool = True):
    same = (torch.isnan(out) & torch.isnan(ref)) | (_bits(out) == _bits(ref))
    if not zero_sign:
        same |= (out == 0) & (ref == 0)
    bad = torch.nonzero(~same)
    assert bad.numel() == 0, (f"{bad.shape[0]} of {same.numel()} values differ; first at {bad[0].tolist()}: "
                              f"x = {x[tuple(bad[0])].item()!r}, kernel {out[tuple(bad[0])].item()!r}, "
                              f"formats {ref[tuple(bad[0])].item()!r}")


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.equal(_bits(torch.nan_to_num(a, nan=7.0)), _bits(torch.nan_to_num(b, nan=7.0)))


DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])


@DTYPES
@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp6_e3m2", "mxfp8_e4m3"])
def test_quark_hw_kernel_equals_formats_variant(fmt, dtype):
    v = _named("quark_hw", fmt)
    assert v.kernel_supported, v.unsupported_reason()
    op = _spec(v)
    assert op.act_inf_amax == "max" and op.act_signed_zero == ("keep" if fmt.startswith("mxfp8") else "positive")
    x = _probes(fmt, dtype)
    ref = fake_quantize(x, fmt, variant="quark_hw")
    out = _kernel_qdq(x, op)
    # "keep": the shared element rounder negates as 0 - v, so its zeros are +0.0 (a known,
    # value-equal deviation pinned by the codegen snapshots; see test_kernels_recipes)
    _assert_bits(out, ref, x, zero_sign=op.act_signed_zero != "keep")
    # the options matter here: the default 'even' QDQ gives NaN blocks where Quark is finite
    plain = fake_quantize(x, fmt, scale_mode="even")
    assert _differs(plain, ref)
    inf_rows = torch.isinf(x).any(dim=1) & ~torch.isnan(x).any(dim=1)
    assert torch.isnan(plain[inf_rows]).all() and not torch.isnan(ref[inf_rows]).any()


@DTYPES
@pytest.mark.parametrize("zero", ["lt0", "le0", "positive"])
@pytest.mark.parametrize("mode,rounding", [("floor_log2", "rne"), ("floor_log2", "half_away"), ("even", "rne"),
                                           ("rceil", "rne")])
def test_signed_zero_kernel_equals_formats(mode, rounding, zero, dtype):
    fmt = "mxfp4"
    x = _probes(fmt, dtype)
    ref = fake_quantize(x, fmt, scale_mode=mode, rounding=rounding, signed_zero=zero)
    op = OpSpec(fmt, "block", fmt, mode, act_rounding=rounding, act_signed_zero=zero)
    _assert_bits(_kernel_qdq(x, op), ref, x)
    other = fake_quantize(x, fmt, scale_mode=mode, rounding=rounding, signed_zero="le0" if zero != "le0" else "lt0")
    assert _differs(other, ref)


@DTYPES
@pytest.mark.parametrize("inf_amax", ["nan_or_overflow", "max"])
@pytest.mark.parametrize("mode", ["even", "floor", "rceil", "floor_log2"])
def test_inf_amax_kernel_equals_formats(mode, inf_amax, dtype):
    fmt = "mxfp6_e2m3"
    x = _probes(fmt, dtype)
    ref = fake_quantize(x, fmt, scale_mode=mode, inf_amax=inf_amax, signed_zero="positive")
    op = OpSpec(fmt, "block", fmt, mode, act_inf_amax=inf_amax, act_signed_zero="positive")
    _assert_bits(_kernel_qdq(x, op), ref, x)
    if inf_amax == "max" or mode == "even":  # elsewhere nan_or_overflow is the default's bytes
        assert _differs(fake_quantize(x, fmt, scale_mode=mode, signed_zero="positive"), ref)


@DTYPES
@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp6_e3m2", "mxfp8_e4m3"])
@pytest.mark.parametrize("name", ["torchao_floor", "torchao_ceil", "torchao_even"])
def test_torchao_kernel_equals_formats_variant(name, fmt, dtype):
    """torchao 0.18's to_mx FLOOR/CEIL/EVEN: an Inf block scaled by 2^-(128 - emax) (the Inf
    saturates, the rest flush to 0) and a byte-0 block scaled into range by 2^126."""
    v = _named(name, fmt)
    x = _probes(fmt, dtype)
    ref = fake_quantize(x, fmt, variant=name)
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        # 2^126 * a 2^-126 amax is 1.0: its output 2^-127 is a bf16 subnormal, which the
        # interpreter flushes when it narrows (the GPU does not)
        keep = ~((ref != 0) & (ref.abs() < torch.finfo(dtype).tiny)).any(dim=1)
        x, ref = x[keep].contiguous(), ref[keep]
    # "keep" zeros: the kernels' are +0 (0 - v), invisible after the GEMM
    _assert_bits(_kernel_qdq(x, _spec(v)), ref, x, zero_sign=False)
    assert _differs(fake_quantize(x, fmt, scale_mode=v.scale_mode), ref)


@pytest.mark.parametrize("byte0", ["min_normal", "one"])
def test_byte0_inverse_kernel_equals_formats(byte0):
    fmt, dtype = "mxfp4", torch.float32
    x = _probes(fmt, dtype)
    ref = fake_quantize(x, fmt, scale_mode="floor", byte0_inverse=byte0)
    op = OpSpec(fmt, "block", fmt, "floor", act_byte0_inverse=byte0)
    _assert_bits(_kernel_qdq(x, op), ref, x, zero_sign=False)
    assert _differs(fake_quantize(x, fmt, scale_mode="floor"), ref)


def test_library_variants_now_fusable_and_their_spec_fields():
    v = _named("compressed_tensors", "mxfp4")
    assert v.kernel_supported and v.spec_fields == {"act_signed_zero": "lt0", "act_inf_amax": "nan_or_overflow",
                                                    "act_byte0_inverse": "pow2"}
    # still refused: what the kernels do not render, named in the reason
    assert "nan_element=max" in _named("quark", "mxfp4").unsupported_reason()
    assert "scale_mode 'rceil_log2'" in _named("torchao_rceil", "mxfp4").unsupported_reason()
    # torchao 0.18's FLOOR/CEIL/EVEN: Inf amax as 2^128 and the 2^126 byte-0 multiplier
    v = _named("torchao_even", "mxfp4")
    assert v.kernel_supported and v.spec_fields == {"act_signed_zero": "keep", "act_inf_amax": "exponent",
                                                    "act_byte0_inverse": "min_normal"}
    # microxcaling's zeros (sign(a) * floor(|a| + 0.5)): the generic floor_log2 variant with lt0
    mx = [v for v in act_variants() if v.named is None and v.fmt == "mxfp4" and v.scale_mode == "floor_log2"
          and v.rounding == "half_away" and v.signed_zero == "lt0"]
    assert len(mx) == 1 and mx[0].kernel_supported and "signed_zero=lt0" in mx[0].name


def test_linear_kernel_equals_reference_with_quark_hw_activations():
    """mxemu::linear's kernel and its reference (OpSpec.scheme() -> act_fake_quantize) agree
    on rows holding Inf; the option reaches the reference (finite where the default is NaN)."""
    op = OpSpec("mxfp4", "block", "mxfp4", "even", act_signed_zero="positive", act_inf_amax="max")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, generator=g).bfloat16()
    x[1, 3] = INF
    x[2, 40] = -INF
    x[3, :32] = -0.0
    w = torch.randint(0, 256, (16, 32), generator=g, dtype=torch.uint8)
    s = torch.randint(120, 130, (16, 2), generator=g, dtype=torch.uint8)
    out = linear_triton(x, w, s, None, None, None, op)
    ref = linear_reference(x, w, s, None, None, None, op)
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    default = linear_reference(x, w, s, None, None, None, OpSpec("mxfp4", "block", "mxfp4", "even"))
    assert torch.isnan(default[1]).all() and not torch.isnan(ref[1]).all()


def test_opspec_fields_left_out_at_defaults_and_validated():
    op = OpSpec("mxfp4", "block", "mxfp4", "even")
    assert "act_signed_zero" not in op.to_str() and "act_inf_amax" not in op.to_str()
    edge = OpSpec("mxfp4", "block", "mxfp4", "even", act_signed_zero="positive", act_inf_amax="max")
    assert OpSpec.from_str(edge.to_str()) == edge and edge.short_name() != op.short_name()
    a = edge.scheme().act
    assert (a.signed_zero, a.inf_amax) == ("positive", "max")
    assert OpSpec.from_scheme(edge.scheme()) == edge
    with pytest.raises(ValueError, match="act_signed_zero"):
        OpSpec("nvfp4", "block", "nvfp4", act_recipe="vllm", act_signed_zero="positive")
    with pytest.raises(ValueError, match="act_inf_amax"):
        OpSpec("mxfp4", "block", "mxfp4", "rceil", act_inf_amax="exponent")  # rendered for floor/ceil/even
    with pytest.raises(ValueError, match="act_byte0_inverse"):
        OpSpec("mxfp4", "block", "mxfp4", "even", act_byte0_inverse="half")
    with pytest.raises(ValueError, match="act_byte0_inverse"):
        OpSpec("nvfp4", "block", "nvfp4", act_recipe="vllm", act_byte0_inverse="one")
    b0 = OpSpec("mxfp4", "block", "mxfp4", "floor", act_inf_amax="exponent", act_byte0_inverse="min_normal")
    assert "act_byte0_inverse" not in op.to_str() and OpSpec.from_str(b0.to_str()) == b0
    assert b0.scheme().act.byte0_inverse == "min_normal" and OpSpec.from_scheme(b0.scheme()) == b0
    with pytest.raises(ValueError, match="act_signed_zero"):
        OpSpec("mxfp4", act_signed_zero="lt0")  # weight-only: no activation QDQ
