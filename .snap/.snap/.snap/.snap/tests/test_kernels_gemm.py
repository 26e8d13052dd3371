"""mxemu::linear and mxemu::grouped_mm through the generated kernels (interpreter on CPU)
against the reference implementations, for every scheme."""

import pytest
import torch

from emu_inductor.ops.triton_impl import grouped_mm_triton, linear_triton
from emu_inductor.ops.reference_impl import grouped_mm_reference, linear_reference
from emu_inductor.spec import OpSpec
from emu_inductor.reference.modules import quantize_weight
from emu_inductor.spec.schemes import SCHEMES


def _close(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2 * max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_linear(scheme):
    g = torch.Generator().manual_seed(0)
    sch = SCHEMES[scheme]
    N, K = 48, 64
    w = (torch.randn(N, K, generator=g) * 0.3).to(torch.bfloat16)
    q, s, alpha = quantize_weight(w, sch.weight_fmt)
    x = torch.randn(2, 5, K, generator=g).to(torch.bfloat16)
    bias = torch.randn(N, generator=g).to(torch.bfloat16)
    gs = torch.tensor(2688.0 / 4.0) if (sch.act is not None and sch.act.kind == "block"
                                        and sch.act.fmt.has_global_scale) else None
    spec = OpSpec.from_scheme(scheme)
    for b in (None, bias):
        out = linear_triton(x, q, s, alpha, gs, b, spec)
        ref = linear_reference(x, q, s, alpha, gs, b, spec)
        _close(out, ref)
        if b is None:
            assert torch.equal(out, ref)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_grouped_mm(scheme):
    g = torch.Generator().manual_seed(1)
    sch = SCHEMES[scheme]
    E, N, K = 3, 32, 64
    w = (torch.randn(E, N, K, generator=g) * 0.3).to(torch.bfloat16)
    q, s, alpha = quantize_weight(w, sch.weight_fmt)
    a = torch.randn(11, K, generator=g).to(torch.bfloat16)
    offs = torch.tensor([3, 3, 9], dtype=torch.int32)  # group 1 empty, rows 9-10 past the end
    gs = torch.tensor(2688.0 / 4.0) if (sch.act is not None and sch.act.kind == "block"
                                        and sch.act.fmt.has_global_scale) else None
    spec = OpSpec.from_scheme(scheme)
    out = grouped_mm_triton(a, q, s, alpha, offs, gs, spec)
    ref = grouped_mm_reference(a, q, s, alpha, offs, gs, spec)
    assert torch.equal(out, ref)


SPLIT_SCHEMES = ["nvfp4_w4a4", "w_mxfp4_a_mxfp4", "w_mxfp4_a_fp8", "nvfp4_w4a16", "w_mxfp6_e3m2_a_mxfp6_e3m2"]


@pytest.mark.parametrize("scheme", SPLIT_SCHEMES)
def test_linear_split_k_matches_reference(scheme):
    """Decode configs split K (split2): fp32 partial sums per K range, added in order by
    combine_kernel (bias, one rounding). Within fp32-accumulation rounding of the reference;
    without a bias the 1-split case is the unsplit path bit for bit."""
    from emu_inductor.kernels.tiles import TileConfig

    g = torch.Generator().manual_seed(2)
    sch = SCHEMES[scheme]
    N, K = 40, 256
    w = (torch.randn(N, K, generator=g) * 0.3).to(torch.bfloat16)
    q, s, alpha = quantize_weight(w, sch.weight_fmt)
    x = torch.randn(3, K, generator=g).to(torch.bfloat16)
    bias = torch.randn(N, generator=g).to(torch.bfloat16)
    gs = torch.tensor(2688.0 / 4.0) if (sch.act is not None and sch.act.kind == "block"
                                        and sch.act.fmt.has_global_scale) else None
    spec = OpSpec.from_scheme(scheme)
    for b in (None, bias):
        ref = linear_reference(x, q, s, alpha, gs, b, spec)
        for split in (1, 3, 4):  # 3: cdiv(4 tiles, 3) = 2 per split -> 2 splits launched
            out = linear_triton(x, q, s, alpha, gs, b, spec, config=TileConfig(16, 32, 64, 4, 1, split2=split))
            _close(out, ref)
        one = linear_triton(x, q, s, alpha, gs, b, spec, config=TileConfig(16, 32, 64, 4, 1, split2=1))
        unsplit = linear_triton(x, q, s, alpha, gs, b, spec, config=TileConfig(16, 32, 64, 4, 1))
        assert torch.equal(one, unsplit)


@pytest.mark.parametrize("scheme", ["nvfp4_w4a4", "w_mxfp4_a_mxfp4"])
def test_grouped_mm_split_k_with_bias_and_rows_past_the_end(scheme):
    from emu_inductor.kernels.tiles import TileConfig

    g = torch.Generator().manual_seed(3)
    sch = SCHEMES[scheme]
    E, N, K = 3, 32, 256
    w = (torch.randn(E, N, K, generator=g) * 0.3).to(torch.bfloat16)
    q, s, alpha = quantize_weight(w, sch.weight_fmt)
    a = torch.randn(11, K, generator=g).to(torch.bfloat16)
    bias = torch.randn(E, N, generator=g).to(torch.bfloat16)
    offs = torch.tensor([3, 3, 9], dtype=torch.int32)  # group 1 empty, rows 9-10 past the end
    gs = torch.tensor(2688.0 / 4.0) if sch.act.fmt.has_global_scale else None
    spec = OpSpec.from_scheme(scheme)
    for b in (None, bias):
        ref = grouped_mm_reference(a, q, s, alpha, offs, gs, spec, bias=b)
        out = grouped_mm_triton(a, q, s, alpha, offs, gs, spec, bias=b, config=TileConfig(16, 32, 64, 4, 1, split2=4))
        _close(out, ref)
        assert torch.equal(out[9:], torch.zeros_like(out[9:]))


def test_linear_ops_and_errors():
    sch = SCHEMES["w_mxfp4_a_mxfp4"]
    w = torch.randn(32, 64).to(torch.bfloat16)
    q, s, _ = quantize_weight(w, sch.weight_fmt)
    x = torch.randn(3, 64).to(torch.bfloat16)
    spec = OpSpec.from_scheme("w_mxfp4_a_mxfp4").to_str()
    out = torch.ops.mxemu.linear(x, q, s, None, None, None, spec)
    assert torch.equal(out, linear_reference(x, q, s, None, None, None, OpSpec.from_str(spec)))
    with pytest.raises(ValueError, match="weight_scale"):
        linear_triton(x, q, s[:, :1], None, None, None, OpSpec.from_str(spec))
    with pytest.raises(ValueError, match="x"):
        linear_triton(x.to(torch.int8), q, s, None, None, None, OpSpec.from_str(spec))
    with pytest.raises(ValueError, match="offs"):
        grouped_mm_triton(x, q.unsqueeze(0), s.unsqueeze(0), None, torch.tensor([1, 2]), None, OpSpec.from_str(spec))
