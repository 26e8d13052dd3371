"""Helpers shared by several test modules (test modules import this, never each other).

- dummy custom ops and pattern families for the pass infrastructure
  (tests/test_passes_infra.py, tests/test_backend.py);
- the fused-MoE oracle against the reference (tests/test_kernels_moe.py,
  tests/test_kernels_moe_bias.py) and the seeded random MoE case of the kernel-option tests
  (`random_moe_case`: tests/test_kernels_decode.py, _prefill.py, _prefill_dq.py);
- the compiled-model decoding loop (tests/test_models_compile*.py).
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch._inductor.fx_passes.post_grad import view_to_reshape
from torch.fx.experimental.proxy_tensor import make_fx

from emu_inductor.ops.triton_impl import moe_triton
from emu_inductor.passes import (
    meta_val,
    register_pattern_family,
    register_replacement,
    register_shape_agnostic_replacement,
    unregister_pattern_family,
)
from emu_inductor.reference import moe_emulated
from emu_inductor.reference.activations import apply_activation, is_gated
from emu_inductor.reference.moe import dequantize_experts
from emu_inductor.reference.qdq import act_fake_quantize
from emu_inductor.spec import SCHEMES, OpSpec

aten = torch.ops.aten

# --------------------------------------------------------------------------------------
# dummy ops and families (the pass infrastructure tests)
# --------------------------------------------------------------------------------------

AFFINE = "mxemu_test_affine"
HALFSUM = "mxemu_test_halfsum4"


@torch.library.custom_op("mxemu_test::affine", mutates_args=())
def _affine(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0 + 1.0


@_affine.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("mxemu_test::halfsum4", mutates_args=())
def _halfsum4(x: torch.Tensor) -> torch.Tensor:
    return (x.reshape(-1, 4) * 0.5).sum(-1)


@_halfsum4.register_fake
def _(x):
    return x.new_empty((x.numel() // 4,))


def affine_search(x):
    return x * 2.0 + 1.0


def affine_replace(x):
    return torch.ops.mxemu_test.affine(x)


def halfsum_search(x):
    return (x.reshape(-1, 4) * 0.5).sum(-1)


def halfsum_replace(x):
    return torch.ops.mxemu_test.halfsum4(x)


def halfsum_check(match):
    x = meta_val(match.kwargs["x"])
    return x.dim() == 1 and x.dtype == torch.float32


INIT_CALLS: dict[str, int] = {AFFINE: 0, HALFSUM: 0}


def affine_init(pm_pass, input_device=None):
    INIT_CALLS[AFFINE] += 1
    register_replacement(affine_search, affine_replace, [torch.empty(8)], pm_pass,
                         pattern_name="affine_2x_plus_1")


def halfsum_init(pm_pass):
    INIT_CALLS[HALFSUM] += 1
    register_shape_agnostic_replacement(halfsum_search, halfsum_replace, [torch.empty(8)],
                                        pm_pass, extra_check=halfsum_check,
                                        pattern_name="halfsum4")


def install_dummy_families() -> tuple[str, str]:
    """Register both dummy families (replacing earlier registrations)."""
    register_pattern_family(AFFINE, affine_init, anchors=[aten.add.Tensor], replace=True)
    register_pattern_family(HALFSUM, halfsum_init, anchors=[aten.sum], replace=True)
    return AFFINE, HALFSUM


def uninstall_dummy_families() -> None:
    unregister_pattern_family(AFFINE)
    unregister_pattern_family(HALFSUM)


@contextmanager
def dummy_families():
    install_dummy_families()
    try:
        yield (AFFINE, HALFSUM)
    finally:
        uninstall_dummy_families()


@contextmanager
def temp_family(name, init_fn, **kw):
    register_pattern_family(name, init_fn, **kw)
    try:
        yield name
    finally:
        unregister_pattern_family(name)


def graph_of(fn, *args, mode="fake"):
    """A post-grad-like graph: ATen, FakeTensor metadata, views turned into reshapes."""
    gm = make_fx(fn, tracing_mode=mode)(*args)
    view_to_reshape(gm)
    gm.recompile()
    return gm


def call_targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def f_two(x, y):
    return (x * 2.0 + 1.0).relu() + (y * 3.0 + 1.0)


# --------------------------------------------------------------------------------------
# the fused-MoE oracle (generated kernels vs the reference)
# --------------------------------------------------------------------------------------


def moe_run(qe, scheme, activation, x, tw, ids, *, rw_in=False, emap=None, reduction=None, w13_bias=None,
         w2_bias=None):
    spec = OpSpec.from_scheme(scheme, activation=activation, router_weight_on_input=rw_in)
    res = moe_triton(x, qe.w13, qe.w13_scale, qe.w13_alpha, qe.w2, qe.w2_scale, qe.w2_alpha, tw, ids,
                     qe.a1_global_scale, qe.a2_global_scale, emap, spec, debug=True, reduction=reduction,
                     w13_bias=w13_bias, w2_bias=w2_bias)
    ref = moe_emulated(x, qe.w13, qe.w2, tw, ids, scheme=scheme, w13_scale=qe.w13_scale, w2_scale=qe.w2_scale,
                       w13_alpha=qe.w13_alpha, w2_alpha=qe.w2_alpha, a1_global_scale=qe.a1_global_scale,
                       a2_global_scale=qe.a2_global_scale, activation=activation,
                       apply_router_weight_on_input=rw_in, expert_map=emap, w13_bias=w13_bias, w2_bias=w2_bias)
    return res, ref


def bf16_ulp_close(a, b, ulps=1):
    """|a - b| <= `ulps` bf16 ulps of max(|a|, |b|) elementwise (a, b on the bf16 grid), or
    |a - b| <= 2^-20: GELU's 0.5*g*(1+erf(g/sqrt2)) cancels catastrophically for g << 0,
    so a one-ulp fp32 erf difference between Triton and torch moves tiny results (|y| <
    1e-4) by more than a bf16 ulp of themselves. Gated activations get two ulps: a
    one-ulp flip of act(g) in bf16 is scaled by `up` and rounded again in the product."""
    m = torch.maximum(a.abs(), b.abs()).clamp(min=2.0**-126)
    ulp = torch.pow(2.0, torch.floor(torch.log2(m)) - 7)
    d = (a - b).abs()
    return bool(((d <= ulps * ulp) | (d <= 2.0**-20)).all())


def moe_check(qe, scheme, activation, x, tw, ids, *, rw_in=False, emap=None, reduction=None, exact_out=False,
           w13_bias=None, w2_bias=None):
    """The fused MoE (debug rows) against the reference; with per-expert biases the
    reference GEMM1 adds w13_bias[e] to the fp32 accumulator before C1's rounding."""
    res, ref = moe_run(qe, scheme, activation, x, tw, ids, rw_in=rw_in, emap=emap, reduction=reduction,
                    w13_bias=w13_bias, w2_bias=w2_bias)
    sch = SCHEMES[scheme]
    k = ids.shape[1]
    valid = res["valid"]
    # A1: bit-identical to the reference QDQ of the (router-weighted) input rows
    x_rows = x.repeat_interleave(k, dim=0)
    if rw_in:
        x_rows = x_rows * tw.reshape(-1).to(x.dtype).unsqueeze(-1)
    a1_ref = act_fake_quantize(x_rows, sch.act, qe.a1_global_scale).float()
    assert torch.equal(res["a1"][valid], a1_ref[valid]), "A1 differs from the reference QDQ"
    # C2 within one bf16 ulp (two if gated) of the reference activation of the reference GEMM1
    if valid.any():
        local = (emap.long()[ids.reshape(-1).long()] if emap is not None else ids.reshape(-1).long())
        W13 = dequantize_experts(qe.w13, qe.w13_scale, sch.weight_fmt, qe.w13_alpha, x.dtype)
        acc = torch.einsum("rk,rnk->rn", a1_ref, W13[local.clamp(min=0)].float())
        if w13_bias is not None:
            acc = acc + w13_bias.float()[local.clamp(min=0)]
        c1 = acc.to(x.dtype)
        c2_ref = apply_activation(c1, activation).float()
        ulps = 2 if is_gated(activation) else 1
        assert bf16_ulp_close(res["c2"][valid], c2_ref[valid], ulps), f"C2 differs by more than {ulps} bf16 ulp(s)"
        # A2: bit-identical to the reference QDQ of the kernel's own C2
        if res["a2"] is not None:
            c2k = res["c2"][valid].to(x.dtype)
            a2_ref = act_fake_quantize(c2k, sch.act, qe.a2_global_scale).float()
            assert torch.equal(res["a2"][valid], a2_ref), "A2 differs from the reference QDQ of the kernel's C2"
    out = res["out"]
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if exact_out and valid.any() and not torch.equal(res["c2"][valid], c2_ref[valid]):
        # a one-ulp transcendental difference in C2 (Triton's vs torch's erf/exp; torch's
        # vectorised CPU erf depends on the host ISA) legitimately propagates to the
        # output, so bit-exactness is only owed when C2 itself matched bit for bit
        exact_out = False
    if exact_out:
        assert torch.equal(out, ref)
    else:
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2 * max(1.0, ref.abs().max().item()))
    return res, ref


# --------------------------------------------------------------------------------------
# compiled models
# --------------------------------------------------------------------------------------

PROMPT, NEW = 8, 20


def model_backend():
    backend = pytest.importorskip("emu_inductor.backend")  # the backend module must exist
    return "mxemu" if "mxemu" in torch._dynamo.list_backends() else backend.mxemu


def greedy(fwd, prompt, new=NEW):
    """`new` greedy tokens by full recomputation in a fixed [1, PROMPT + new] buffer;
    returns the sequence and the logits of every step's last real position."""
    buf = torch.zeros(1, PROMPT + new, dtype=torch.long)
    buf[:, :PROMPT] = prompt
    step_logits = []
    for s in range(new):
        pos = PROMPT + s - 1
        logits = fwd(buf, use_cache=False).logits
        step_logits.append(logits[:, : pos + 1].clone())
        buf[:, pos + 1] = logits[:, pos].argmax(-1)
    return buf, step_logits


def random_moe_case(scheme: str, activation: str, name: str, *, E: int, H: int, I: int, T: int, k: int = 2,
                    bias: bool = False):
    """Quantized experts from fresh random bf16 weights, rows, top-k routing over distinct
    experts and (with `bias`) per-expert GEMM biases, seeded by `name`; NVFP4 activation global
    scales set to fixed values. Returns (experts, x, topk_weights, topk_ids, b13, b2)."""
    import zlib

    from emu_inductor.reference.modules import QuantizedExperts

    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    n1 = 2 * I if is_gated(activation) else I
    qe = QuantizedExperts.from_float((torch.randn(E, n1, H, generator=g) * 0.2).bfloat16(),
                                     (torch.randn(E, H, I, generator=g) * 0.2).bfloat16(), scheme=scheme,
                                     activation=activation)
    if qe.a1_global_scale is not None:
        qe.a1_global_scale.fill_(2688.0 / 4.0)
        qe.a2_global_scale.fill_(2688.0 / 8.0)
    x = torch.randn(T, H, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
    tw = torch.softmax(torch.randn(T, k, generator=g), -1)
    b13 = (torch.randn(E, n1, generator=g) * 0.05).bfloat16() if bias else None
    b2 = (torch.randn(E, H, generator=g) * 0.05).bfloat16() if bias else None
    return qe, x, tw, ids, b13, b2
