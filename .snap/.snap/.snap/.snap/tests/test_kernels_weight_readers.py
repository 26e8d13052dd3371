"""The weight-reader options of OpSpec (`w_e8m0_byte255`, `w_scale_order`) through the
generated kernels (interpreter on CPU) against the reference, bit for bit, on edge
probes: every code byte, E8M0 scale bytes 0 / 1 / 127 / 254 / 255, every E4M3 scale byte
(NaN included), awkward float scales. Each test also checks that the option changes the
reference's output on these probes, so a kernel ignoring it would fail."""

import dataclasses
import pytest
import torch

from emu_inductor.formats import FORMATS
from emu_inductor.kernels import KernelSpec, render
from emu_inductor.ops.reference_impl import grouped_mm_reference, linear_reference
from emu_inductor.ops.triton_impl import grouped_mm_triton, linear_triton
from emu_inductor.spec import OpSpec


def _same(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


def _differs(a, b) -> bool:
    return not torch.equal(torch.nan_to_num(a.float(), nan=7.0), torch.nan_to_num(b.float(), nan=7.0))


def _codes(lead, N, fmt, seed):
    """Packed bytes whose code bytes walk through all 256 values (row-shifted)."""
    kp = fmt.packed_size(64)
    n = (torch.arange(lead * N * kp) * 7 + seed) % 256
    return n.to(torch.uint8).reshape(*((lead,) if lead > 1 else ()), N, kp)


def _mx_scales(lead, N, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(110, 135, (lead, N, 2), generator=g)
    edge = torch.tensor([0, 1, 127, 254, 255, 128])
    s.view(-1)[: lead * N * 2: 3] = edge.repeat(lead * N)[: s.view(-1)[:: 3].numel()]
    s = s.to(torch.uint8)
    return s if lead > 1 else s[0]


def _finite_codes_under_255(q, s):
    """Blocks with scale byte 255 get positive non-zero codes (1.0), so that with positive
    activations the +inf reader gives +inf outputs where the NaN reader gives NaN."""
    qb = q.reshape(*s.shape, -1).clone()
    qb[s == 255] = 0x22
    return qb.reshape(q.shape)


def _nv_scales(lead, N, seed):
    """E4M3 scale bytes: all 256 byte values (0x7f / 0xff are NaN) spread over the blocks."""
    n = (torch.arange(lead * N * 4) * 37 + seed) % 256
    s = n.to(torch.uint8).view(torch.float8_e4m3fn).reshape(lead, N, 4)
    return s if lead > 1 else s[0]


def _x(M, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, 64, generator=g).to(torch.bfloat16)


def test_mx_byte255_inf_linear_and_grouped():
    fmt = FORMATS["mxfp4"]
    spec = OpSpec("mxfp4", w_e8m0_byte255="inf")
    default = OpSpec("mxfp4")
    N = 64
    s = _mx_scales(1, N, 0)
    q, x = _finite_codes_under_255(_codes(1, N, fmt, 3), s), _x(5, 0).abs()
    out = linear_triton(x, q, s, None, None, None, spec)
    ref = linear_reference(x, q, s, None, None, None, spec)
    _same(out, ref)
    assert torch.isinf(ref).any() and _differs(ref, linear_reference(x, q, s, None, None, None, default))
    # grouped: two experts, a row past the end
    E = 2
    se = _mx_scales(E, 32, 1)
    qe, a = _finite_codes_under_255(_codes(E, 32, fmt, 5), se), _x(9, 1).abs()
    offs = torch.tensor([4, 8], dtype=torch.int32)
    out = grouped_mm_triton(a, qe, se, None, offs, None, spec)
    ref = grouped_mm_reference(a, qe, se, None, offs, None, spec)
    _same(out, ref)
    assert _differs(ref, grouped_mm_reference(a, qe, se, None, offs, None, default))


def test_mx_byte255_inf_with_mx_activation_qdq():
    fmt = FORMATS["mxfp4"]
    spec = OpSpec("mxfp4", act_kind="block", act_fmt="mxfp4", act_scale_mode="even", w_e8m0_byte255="inf")
    q, s, x = _codes(1, 32, fmt, 11), _mx_scales(1, 32, 2), _x(4, 2)
    _same(linear_triton(x, q, s, None, None, None, spec), linear_reference(x, q, s, None, None, None, spec))


@pytest.mark.parametrize("order", ["s/g", "(v*s)*a"])
def test_nvfp4_scale_orders_linear(order):
    fmt = FORMATS["nvfp4"]
    spec = OpSpec("nvfp4", w_scale_order=order)
    N = 64
    q, s, x = _codes(1, N, fmt, 1), _nv_scales(1, N, 0), _x(5, 3)
    g = torch.Generator().manual_seed(4)
    row = torch.exp2(torch.randint(-12, 9, (N,), generator=g).float()) * (1.0 + torch.rand(N, generator=g))
    for alpha in (torch.tensor(0.0123), torch.tensor(3.7e-3), row):
        out = linear_triton(x, q, s, alpha, None, None, spec)
        ref = linear_reference(x, q, s, alpha, None, None, spec)
        _same(out, ref)
    # fp32 one-hot activations read the decoded weights out exactly: the order changes them
    # (against the default product with the equivalent dequantize-direction alpha)
    eye = torch.eye(64)
    a = 1.0 / row if order == "s/g" else row
    out = linear_triton(eye, q, s, row, None, None, spec)
    _same(out, linear_reference(eye, q, s, row, None, None, spec))
    assert _differs(out, linear_reference(eye, q, s, a, None, None, OpSpec("nvfp4")))


@pytest.mark.parametrize("order", ["s/g", "(v*s)*a"])
def test_nvfp4_scale_orders_grouped_and_with_qdq(order):
    fmt = FORMATS["nvfp4"]
    E = 3
    spec = OpSpec("nvfp4", w_scale_order=order)
    qe, se, a = _codes(E, 32, fmt, 9), _nv_scales(E, 32, 5), _x(11, 5)
    offs = torch.tensor([3, 3, 9], dtype=torch.int32)  # group 1 empty, rows 9-10 past the end
    alpha = torch.tensor([0.0123, 81.0, 3.1e-5])
    _same(grouped_mm_triton(a, qe, se, alpha, offs, None, spec),
          grouped_mm_reference(a, qe, se, alpha, offs, None, spec))
    qspec = OpSpec("nvfp4", act_kind="block", act_fmt="nvfp4", act_recipe="vllm", w_scale_order=order)
    gs = torch.tensor(37.5)
    q, s, x = _codes(1, 32, fmt, 2), _nv_scales(1, 32, 1), _x(4, 6)
    _same(linear_triton(x, q, s, torch.tensor(0.37), gs, None, qspec),
          linear_reference(x, q, s, torch.tensor(0.37), gs, None, qspec))


def test_defaults_keep_spec_strings_and_kernels():
    base = OpSpec("nvfp4", act_kind="block", act_fmt="nvfp4", act_recipe="vllm")
    assert "w_scale_order" not in base.to_str() and "w_e8m0_byte255" not in base.to_str()
    assert OpSpec.from_str(base.to_str()) == base
    other = OpSpec("nvfp4", act_kind="block", act_fmt="nvfp4", act_recipe="vllm", w_scale_order="s/g")
    assert OpSpec.from_str(other.to_str()) == other
    k0, k1 = KernelSpec(base, alpha1="scalar"), KernelSpec(other, alpha1="scalar")
    assert k0.digest() != k1.digest() and k0.short_name() != k1.short_name()
    assert "div_rn(s, tl.load(alpha_ptr))" in render(k1) and "div_rn(s, tl.load(alpha_ptr))" not in render(k0)
    mx = KernelSpec(OpSpec("mxfp4", w_e8m0_byte255="inf"))
    assert "_e8m0_decode_w(sc)" in render(mx) and "_e8m0_decode_w" not in render(KernelSpec(OpSpec("mxfp4")))


def test_bad_options_raise_naming_the_field():
    with pytest.raises(ValueError, match="w_e8m0_byte255"):
        OpSpec("mxfp4", w_e8m0_byte255="zero")
    with pytest.raises(ValueError, match="w_scale_order"):
        OpSpec("nvfp4", w_scale_order="a*s")


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp6_e2m3", "mxfp8_e4m3"])
def test_mx_ceil_activation_scale(fmt):
    """MX activation scale_mode "ceil" (torchao CEIL): A bit-identical at the ceil boundaries
    (powers of two, one ulp above), zeros, subnormals, Inf, NaN."""
    spec = OpSpec(fmt, act_kind="block", act_fmt=fmt, act_scale_mode="ceil")
    f = FORMATS[fmt]
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 256, (32, f.packed_size(64)), generator=g).to(torch.uint8)
    scales = torch.randint(118, 130, (32, 2), generator=g).to(torch.uint8)
    x = torch.randn(10, 64, generator=g) * torch.exp2(torch.randint(-20, 20, (10, 1), generator=g).float())
    x[0, :32] = torch.exp2(torch.arange(32).float() - 10)  # amax exactly a power of two
    x[1, :32] = torch.exp2(torch.arange(32).float() - 10) * (1 + 2.0 ** -7)  # one bf16 ulp above
    x[2, :32] = 0.0
    x[3, 5] = float("inf")
    x[4, 40] = float("nan")
    x[5, 32:] = 2.0 ** -130  # fp32 subnormal block
    x = x.to(torch.bfloat16)
    out = linear_triton(x, codes, scales, None, None, None, spec)
    ref = linear_reference(x, codes, scales, None, None, None, spec)
    _same(out, ref)
    floor = OpSpec(fmt, act_kind="block", act_fmt=fmt, act_scale_mode="floor")
    assert _differs(ref, linear_reference(x, codes, scales, None, None, None, floor))
    qe, se = codes.reshape(2, 16, -1), scales.reshape(2, 16, 2)
    offs = torch.tensor([4, 10], dtype=torch.int32)
    _same(grouped_mm_triton(x, qe, se, None, offs, None, spec), grouped_mm_reference(x, qe, se, None, offs, None, spec))


@pytest.mark.parametrize("scheme,reader,dtype", [("w_mxfp4_a_mxfp4", {"w_e8m0_byte255": "inf"}, torch.bfloat16),
                                                 ("nvfp4_w4a4", {"w_scale_order": "s/g"}, torch.bfloat16),
                                                 # (v*s)*a and v*(s*a) part in fp32 (bf16 rounding hides it)
                                                 ("nvfp4_w4a16", {"w_scale_order": "(v*s)*a"}, torch.float32)])
def test_moe_takes_non_default_readers(scheme, reader, dtype):
    """mxemu::moe with the weight readers of ModelOpt / Quark / compressed-tensors / gpt-oss:
    the fused kernels equal the reference (moe_emulated reading the weights the same way),
    and the reader matters (NVFP4: the default reader gives another result on these
    weights; E8M0 byte 255: the kernels decode it with the +inf reader)."""
    from emu_inductor.ops.reference_impl import moe_reference
    from emu_inductor.ops.triton_impl import moe_triton
    from emu_inductor.reference.modules import QuantizedExperts

    E, H, I, T = 4, 64, 32, 6
    g = torch.Generator().manual_seed(11)
    qe = QuantizedExperts.from_float((torch.randn(E, 2 * I, H, generator=g) * 0.3).bfloat16(),
                                     (torch.randn(E, H, I, generator=g) * 0.3).bfloat16(), scheme=scheme)
    if qe.a1_global_scale is not None:
        qe.a1_global_scale.fill_(2688.0 / 4.0)
        qe.a2_global_scale.fill_(2688.0 / 8.0)
    w13_scale, w2_scale = qe.w13_scale.clone(), qe.w2_scale.clone()
    if "w_e8m0_byte255" in reader:  # a few scale bytes 255: NaN for the default reader, +inf here
        w13_scale.view(torch.uint8)[1, 3, 0] = 255
        w2_scale.view(torch.uint8)[2, 5, 0] = 255
    x = torch.randn(T, H, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)]).to(torch.int32)
    tw = torch.softmax(torch.randn(T, 2, generator=g), -1)
    spec = dataclasses.replace(OpSpec.from_scheme(scheme), **reader)
    # global scales off powers of two, so the product orders round differently
    a13 = qe.w13_alpha * 1.3711 if qe.w13_alpha is not None else None
    a2 = qe.w2_alpha * 0.7293 if qe.w2_alpha is not None else None
    args = (x, qe.w13, w13_scale, a13, qe.w2, w2_scale, a2, tw, ids, qe.a1_global_scale, qe.a2_global_scale, None)
    ref = moe_reference(*args, spec)
    out = moe_triton(*args, spec, reduction="deterministic")
    if dtype == torch.bfloat16:
        _same(out, ref)
    else:  # fp32 GEMMs: the kernels' and the reference's summation orders differ (the contract's tolerance)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if "w_scale_order" in reader:
        assert _differs(ref, moe_reference(*args, OpSpec.from_scheme(scheme)))
    else:  # a 255 byte poisons whole GEMM rows either way (inf * 0, inf - inf): check the kernel's reader
        from emu_inductor.kernels.launch import kernel_spec_for

        src = render(kernel_spec_for(spec, torch.bfloat16, device=torch.device("cpu")))
        assert "s = _e8m0_decode_w(sc)" in src
