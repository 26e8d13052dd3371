"""Activation fake-quantization recognised by what it computes (emu_inductor.recognize).

Each case is a user's own spelling of an activation QDQ feeding a GEMM, traced to the
post-grad ATen form the mxemu pass sees. Each checks the verdict (or the rejection and
the probe it names) AND that the matched variant's reference reproduces the user's
function bit for bit on fresh random inputs (so a wrong verdict fails).
"""

from unittest import mock

import pytest
import torch
from torch._inductor.decomposition import select_decomp_table
from torch._inductor.fx_passes.post_grad import view_to_reshape
from torch.fx.experimental.proxy_tensor import make_fx

from emu_inductor.formats import fake_quantize
from emu_inductor.recognize import ActVerdict, Rejection, gemm_nodes, recognize_activation
from emu_inductor.reference import fp8_tensor_fake_quantize

K = 64


def trace(fn, *args, mode="fake"):
    with mock.patch("torch.compiler.is_compiling", lambda: True):  # skip eager value checks
        gm = make_fx(fn, decomposition_table=select_decomp_table(), tracing_mode=mode)(*args)
    view_to_reshape(gm)
    gm.graph.eliminate_dead_code()
    return gm


def fresh(seed, dtype, rows=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=g) * torch.exp2(torch.randint(-8, 9, (rows, 1), generator=g).float())
    x[0, :16] = 0  # a zero block
    return x.to(dtype)


def recognise(qdq, dtype=torch.bfloat16, gs=None, mode="fake"):
    w = torch.randn(8, K, dtype=dtype)
    x = fresh(0, dtype)
    if gs is None:
        gm = trace(lambda x, w: qdq(x) @ w.t(), x, w, mode=mode)
    else:
        gm = trace(lambda x, w, g: qdq(x, g) @ w.t(), x, w, gs, mode=mode)
    (gemm,) = gemm_nodes(gm.graph)
    return recognize_activation(gemm, use_cache=False)


def assert_reproduces(v, qdq, dtype, gs=None):
    for seed in (11, 12, 13):
        x = fresh(seed, dtype)
        user = qdq(x) if gs is None else qdq(x, gs)
        ref = v.reference(x, gs)
        assert torch.equal(user.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           ref.view(torch.int16 if dtype != torch.float32 else torch.int32))


def expect(qdq, *, kind, dtype=torch.bfloat16, gs=None, supported=True, **fields):
    v = recognise(qdq, dtype, gs)
    assert isinstance(v, ActVerdict), v.reason
    assert v.variant.kind == kind, v.variant
    for k, val in fields.items():
        assert getattr(v.variant, k) == val, (k, v.variant)
    assert v.kernel_supported == supported, v.unsupported_reason
    assert_reproduces(v, qdq, dtype, gs)
    return v


# --- user spellings ------------------------------------------------------------------------------


def round_e2m1_where(y):
    """E2M1 round-to-nearest-even as a where chain (vLLM / compressed-tensors thresholds)."""
    a = y.abs()
    q = torch.where(a <= 0.25, 0.0, torch.where(a < 0.75, 0.5, torch.where(a <= 1.25, 1.0, torch.where(
        a < 1.75, 1.5, torch.where(a <= 2.5, 2.0, torch.where(a < 3.5, 3.0, torch.where(a <= 5.0, 4.0, 6.0)))))))
    return torch.copysign(q, y)


def round_e2m1_half_down(y):
    """Ties toward zero (ModelOpt's MXFP4 qtensor): formats' rounding "half_toward_zero"."""
    a = y.abs()
    q = torch.where(a <= 0.25, 0.0, torch.where(a <= 0.75, 0.5, torch.where(a <= 1.25, 1.0, torch.where(
        a <= 1.75, 1.5, torch.where(a <= 2.5, 2.0, torch.where(a <= 3.5, 3.0, torch.where(a <= 5.0, 4.0, 6.0)))))))
    return torch.copysign(q, y)


def _blocks(x, bs):
    return x.float().reshape(x.shape[0], -1, bs)


def qdq_mx_log2(x, rounder=round_e2m1_where):
    """MX scale as exp2(floor(log2(amax)) - 2) in fp32, NaN for non-finite blocks."""
    xb = _blocks(x, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    e = torch.clamp(torch.floor(torch.log2(amax)) - 2, -127, 127)
    scale = torch.exp2(torch.where(torch.isfinite(amax), e, torch.nan))
    return (rounder(xb / scale) * scale).reshape(x.shape).to(x.dtype)


def qdq_mx_frexp(x):
    xb = _blocks(x, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    _, e = torch.frexp(amax)  # amax = m * 2^e, m in [0.5, 1)
    scale = torch.exp2(torch.clamp(e - 3, -127, 127).float())
    scale = torch.where(torch.isfinite(amax), scale, torch.nan)
    return (round_e2m1_where(xb * (1.0 / scale)) * scale).reshape(x.shape).to(x.dtype)


def qdq_mx_exponent_bits(x):
    """floor(log2 amax) from the fp32 exponent field; scale and its inverse built from bits."""
    xb = _blocks(x, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    e = torch.clamp(((amax.view(torch.int32) >> 23) & 0xFF) - 127 - 2, -127, 127)
    scale = torch.where(e == -127, 2.0 ** -127, ((e + 127) << 23).view(torch.float32))
    inv = ((127 - e) << 23).view(torch.float32)
    scale = torch.where(torch.isfinite(amax), scale, torch.nan)
    return (round_e2m1_where(xb * inv) * scale).reshape(x.shape).to(x.dtype)


def qdq_mx_bf16_log2(x):
    """microxcaling's Python path: log2 of the amax in the input dtype (bf16)."""
    xb = x.reshape(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    e = torch.clamp(torch.floor(torch.log2(amax)).float() - 2, -127, 127)
    scale = torch.exp2(torch.where(torch.isfinite(amax.float()), e, torch.nan))
    return (round_e2m1_where(xb.float() / scale) * scale).reshape(x.shape).to(x.dtype)


def qdq_nvfp4_vllm(x, gs):
    """vLLM's Triton NVFP4 recipe: s = e4m3(gs * (amax * (1/6))), y = x * (gs / s)."""
    xb = _blocks(x, 16)
    amax = xb.abs().amax(-1, keepdim=True)
    s = torch.clamp(gs * (amax * (1.0 / 6.0)), -448.0, 448.0).to(torch.float8_e4m3fn).to(torch.float32)
    r = torch.where(s == 0, torch.zeros_like(s), gs / s)
    q = round_e2m1_where(torch.clamp(xb * r, -6.0, 6.0))
    return (q * (s / gs)).reshape(x.shape).to(x.dtype)


def qdq_nvfp4_guarded_reciprocal(x, gs):
    """vLLM's torch reference: y = x * rcp(s * rcp(gs)), rcp(t) = 1 / (t + (t == 0) * 1e8)."""
    def rcp(t):
        return 1.0 / (t + (t == 0).to(t.dtype) * 1e8)

    xb = _blocks(x, 16)
    amax = xb.abs().amax(-1, keepdim=True)
    s = torch.clamp(gs * (amax * (1.0 / 6.0)), -448.0, 448.0).to(torch.float8_e4m3fn).to(torch.float32)
    q = round_e2m1_where(torch.clamp(xb * rcp(s * rcp(gs)), -6.0, 6.0))
    return (q * (s / gs)).reshape(x.shape).to(x.dtype)


def qdq_nvfp4_bf16_scale(x, gs):
    """The block scale formed in bf16 instead of fp32."""
    xb = x.reshape(x.shape[0], -1, 16)
    amax = xb.abs().amax(-1, keepdim=True)
    s = torch.clamp(gs.to(torch.bfloat16) * (amax / 6), -448, 448).to(torch.float8_e4m3fn).to(torch.float32)
    r = torch.where(s == 0, torch.zeros_like(s), gs / s)
    q = round_e2m1_where(torch.clamp(xb.float() * r, -6.0, 6.0))
    return (q * (s / gs)).reshape(x.shape).to(x.dtype)


# --- tests ---------------------------------------------------------------------------------------


def test_reference_mx_even():
    expect(lambda x: fake_quantize(x, "mxfp4", scale_mode="even"), kind="mx", fmt="mxfp4", scale_mode="even",
           rounding="rne")


def test_reference_nvfp4_vllm_ref_recipe():
    expect(lambda x, g: fake_quantize(x, "nvfp4", recipe="vllm_ref", global_scale=g), kind="nvfp4",
           gs=torch.tensor(37.5), recipe="vllm_ref")


def test_where_chain_and_log2_floor_scale():
    v = expect(qdq_mx_log2, kind="mx", fmt="mxfp4", scale_mode="floor", rounding="rne")
    assert "ceil" in " ".join(name for name, _ in v.separated) or v.separated


def test_frexp_e8m0():
    expect(qdq_mx_frexp, kind="mx", fmt="mxfp4", scale_mode="floor")


def test_exponent_bit_extraction_e8m0():
    expect(qdq_mx_exponent_bits, kind="mx", fmt="mxfp4", scale_mode="floor")


def test_division_equals_reciprocal_multiply_for_mx():
    def div(x):
        return qdq_mx_log2(x)

    def mul(x):
        xb = _blocks(x, 32)
        amax = xb.abs().amax(-1, keepdim=True)
        e = torch.clamp(torch.floor(torch.log2(amax)) - 2, -127, 127)
        scale = torch.exp2(torch.where(torch.isfinite(amax), e, torch.nan))
        return (round_e2m1_where(xb * (1.0 / scale)) * scale).reshape(x.shape).to(x.dtype)

    a, b = recognise(div), recognise(mul)
    assert isinstance(a, ActVerdict) and isinstance(b, ActVerdict)
    assert a.variant == b.variant


def test_nvfp4_vllm_recipe_with_its_global_scale():
    v = expect(qdq_nvfp4_vllm, kind="nvfp4", gs=torch.tensor(37.5), recipe="vllm")
    assert v.global_scale is not None and v.global_scale.op == "placeholder"


def test_nvfp4_guarded_reciprocal():
    expect(qdq_nvfp4_guarded_reciprocal, kind="nvfp4", gs=torch.tensor(37.5), recipe="vllm_ref")


def test_fp8_per_tensor_dynamic():
    expect(lambda x: fp8_tensor_fake_quantize(x), kind="fp8_tensor", static=False)


def test_ties_toward_zero_is_its_own_variant():
    # ModelOpt's tie rule is formats' rounding "half_toward_zero", a generic MX variant
    v = recognise(lambda x: qdq_mx_log2(x, round_e2m1_half_down))
    assert isinstance(v, ActVerdict), v.reason
    assert (v.variant.scale_mode, v.variant.rounding) == ("floor", "half_toward_zero")
    assert_reproduces(v, lambda x: qdq_mx_log2(x, round_e2m1_half_down), torch.bfloat16)


def test_near_miss_tie_rule_rejected_naming_the_probe():
    from tests.corpus.spellings import round_half_up  # ties toward +inf: no variant's rule

    r = recognise(lambda x: qdq_mx_log2(x, round_half_up))
    assert isinstance(r, Rejection)
    assert "no known activation quantization matches" in r.reason
    assert "closest: mxfp4 scale_mode=floor rounding=rne" in r.reason, r.reason
    assert "probe 'ties of e2m1" in r.reason, r.reason


def test_scale_in_bf16_never_wrongly_accepted():
    for qdq, gs in ((qdq_mx_bf16_log2, None), (qdq_nvfp4_bf16_scale, torch.tensor(37.5))):
        r = recognise(qdq, gs=gs)
        if isinstance(r, ActVerdict):  # only if it is exactly a known function
            assert_reproduces(r, qdq, torch.bfloat16, gs)
        else:
            assert "probe" in r.reason, r.reason


def test_log2_floor_in_fp32_input():
    """fp32 log2 rounds up just below a power of two: the boundary probes must catch it."""
    r = recognise(qdq_mx_log2, dtype=torch.float32)
    if isinstance(r, ActVerdict):
        assert_reproduces(r, qdq_mx_log2, torch.float32)
    else:
        assert "scale boundary" in r.reason, r.reason


def test_row_gather_between_qdq_and_bmm():
    E, R = 2, 8
    order = torch.randperm(E * R)
    w = torch.randn(E, 8, K, dtype=torch.bfloat16)

    def f(x, w, order):
        q = fake_quantize(x, "mxfp4", scale_mode="rceil")
        return torch.bmm(q[order].reshape(E, R, K), w.transpose(1, 2))

    gm = trace(f, fresh(0, torch.bfloat16), w, order)
    (gemm,) = gemm_nodes(gm.graph)
    v = recognize_activation(gemm, use_cache=False)
    assert isinstance(v, ActVerdict), v.reason
    assert v.variant.scale_mode == "rceil"
    assert [n.target for n in v.post][-1] == torch.ops.aten.index.Tensor or len(v.post) == 2


def test_symbolic_rows():
    v = recognise(lambda x: fake_quantize(x, "mxfp4", scale_mode="floor"), mode="symbolic")
    assert isinstance(v, ActVerdict), v.reason
    assert v.variant.scale_mode == "floor"


def test_unquantized_operand_is_none():
    v = recognise(lambda x: torch.nn.functional.silu(x))
    assert isinstance(v, ActVerdict) and v.variant.kind == "none"


def test_ceil_scale_recognised_and_fused():
    v = expect(lambda x: fake_quantize(x, "mxfp4", scale_mode="ceil"), kind="mx", scale_mode="ceil")
    assert v.act_quant().scale_mode == "ceil"


def test_grouped_mm_moe_gemm_both_sides():
    """The MoE form: QDQ(x)[order] into torch._grouped_mm over dequantized experts."""
    from emu_inductor.formats import quantize
    from emu_inductor.recognize import WeightVerdict, recognize_weight
    from emu_inductor.reference import dequantize_weight

    E, R, N = 2, 8, 32
    qw = quantize(torch.randn(E, N, K), "nvfp4")
    alpha = torch.rand(E) * 0.01 + 1e-3

    def f(x, w, s, a, gs, order, offs):
        q = fake_quantize(x, "nvfp4", recipe="vllm", global_scale=gs)
        wd = dequantize_weight(w, s, qw.fmt, alpha=a, dtype=torch.bfloat16)
        return torch._grouped_mm(q[order], wd.transpose(-2, -1), offs=offs)

    args = (fresh(0, torch.bfloat16), qw.qdata, qw.scale, alpha, torch.tensor(37.5), torch.randperm(E * R),
            torch.tensor([R, 2 * R], dtype=torch.int32))
    gm = trace(f, *args)
    (gemm,) = gemm_nodes(gm.graph)
    a = recognize_activation(gemm, use_cache=False)
    w = recognize_weight(gemm, use_cache=False)
    assert isinstance(a, ActVerdict) and a.variant.recipe == "vllm" and len(a.post) == 1, a
    assert isinstance(w, WeightVerdict) and w.variant.alpha_order == "scale_alpha" and w.kernel_supported, w
    assert w.alpha.name.startswith("a")


def test_global_scale_computed_from_the_dequant_direction_input():
    """gs = 1 / input_scale in the graph: the reciprocal node is the global scale."""
    def qdq(x, input_scale):
        return qdq_nvfp4_vllm(x, 1.0 / input_scale)

    v = recognise(qdq, gs=torch.tensor(0.0267))
    assert isinstance(v, ActVerdict), v.reason
    assert v.variant.recipe == "vllm" and v.global_scale.op == "call_function"
    for seed in (21, 22):
        x = fresh(seed, torch.bfloat16)
        assert torch.equal(qdq(x, torch.tensor(0.0267)).view(torch.int16),
                           v.reference(x, 1.0 / torch.tensor(0.0267)).view(torch.int16))
