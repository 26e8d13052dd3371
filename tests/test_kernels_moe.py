"""Fused MoE kernels (generated Triton, run under the interpreter on CPU) against the
eager reference: every scheme x activation x router-weight placement x expert_map.

Checks per case: the kernel's fake-QDQ'd GEMM1 input (a debug output) is bit-identical
to the reference act_fake_quantize; its activation output C2 is within one bf16 ulp of
the reference activation of the reference GEMM1 (transcendentals may differ by an ulp);
its A2 is bit-identical to the reference QDQ of its own C2; the final output is within
fp32-accumulation tolerance of emu_inductor.reference, and bit-identical whenever C2 matched.
"""

import functools
import zlib

import pytest
import torch

from emu_inductor.ops.triton_impl import moe_triton
from emu_inductor.spec import OpSpec
from emu_inductor.reference import moe_emulated
from emu_inductor.reference.activations import ACTIVATIONS, apply_activation, is_gated
from emu_inductor.reference.moe import dequantize_experts
from emu_inductor.reference.modules import QuantizedExperts
from emu_inductor.reference.qdq import act_fake_quantize
from emu_inductor.spec.schemes import SCHEMES
from helpers import bf16_ulp_close, moe_check, moe_run

E, H, I = 4, 64, 32


@functools.lru_cache(maxsize=None)
def _experts(scheme: str, activation: str, big: bool = False):
    g = torch.Generator().manual_seed(zlib.crc32(f"{scheme}/{activation}".encode()))  # stable across processes (str hash is salted)
    n1 = 2 * I if is_gated(activation) else I
    w13 = torch.randn(E, n1, H, generator=g).to(torch.bfloat16) * (4.0 if big else 0.2)
    w2 = torch.randn(E, H, I, generator=g).to(torch.bfloat16) * 0.2
    qe = QuantizedExperts.from_float(w13, w2, scheme=scheme, activation=activation)
    if qe.a1_global_scale is not None:  # realistic NVFP4 activation global scales
        qe.a1_global_scale.fill_(2688.0 / 4.0)
        qe.a2_global_scale.fill_(2688.0 / (400.0 if big else 8.0))
    return qe


def _inputs(T, k, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, H, generator=g) * scale).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
    tw = torch.softmax(torch.randn(T, k, generator=g), -1)
    return x, tw, ids


# Every scheme x activation; the router-weight placement and the expert map (routing-side
# paths that no activation's epilogue text touches) with every scheme under a gated, an
# ungated and a clamped activation. The full product (464 cases) cost ~6 of CI's CPU minutes.
_ROUTING_ACTS = ("silu", "silu_no_mul", "swigluoai")
_MATRIX = [pytest.param(s, a, rw, em, id=f"{s}-{a}-{'rw_in' if rw else 'rw_out'}-{'emap' if em else 'nomap'}")
           for s in sorted(SCHEMES) for a in sorted(ACTIVATIONS)
           for rw in (False, True) for em in (False, True)
           if a in _ROUTING_ACTS or not (rw or em)]


@pytest.mark.parametrize("scheme,activation,rw_in,emap_on", _MATRIX)
def test_moe_matrix(scheme, activation, rw_in, emap_on):
    qe = _experts(scheme, activation)
    k = 1 if rw_in else 2
    x, tw, ids = _inputs(7, k, seed=1)
    emap = None
    if emap_on:  # 6 global experts, global 1 and 4 not on this rank
        emap = torch.tensor([0, -1, 1, 2, -1, 3], dtype=torch.int32)
        g = torch.Generator().manual_seed(2)
        ids = torch.stack([torch.randperm(6, generator=g)[:k] for _ in range(7)]).to(torch.int32)
    # deterministic reduction: the reference's own summation order, so bit-identical
    moe_check(qe, scheme, activation, x, tw, ids, rw_in=rw_in, emap=emap, exact_out=True)


EDGE_SCHEMES = ["nvfp4_w4a4", "w_mxfp4_a_mxfp4", "w_mxfp4_a_fp8", "nvfp4_w4a16"]


@pytest.mark.parametrize("scheme", EDGE_SCHEMES)
def test_routing_edge_cases(scheme):
    qe = _experts(scheme, "silu")
    x, tw, _ = _inputs(9, 2, seed=3)
    # expert 0: 1 row, expert 1: none, expert 2: 10 rows (odd 9 + pad), expert 3: 7
    ids = torch.tensor([[0, 2]] + [[2, 3]] * 7 + [[2, 2]], dtype=torch.int32)
    moe_check(qe, scheme, "silu", x, tw, ids, exact_out=True)
    # every token on one expert, atomic reduction (tolerance only)
    ids = torch.full((9, 2), 3, dtype=torch.int32)
    moe_check(qe, scheme, "silu", x, tw, ids, reduction="atomic")
    # one token
    moe_check(qe, scheme, "silu", x[:1], tw[:1], ids[:1], exact_out=True)


@pytest.mark.parametrize("scheme", ["nvfp4_w4a4", "w_mxfp4_a_mxfp4", "w_mxfp4_a_fp8", "w_mxfp6_e3m2_a_mxfp6_e3m2"])
def test_saturating_magnitudes(scheme):
    qe = _experts(scheme, "silu", big=True)
    x, tw, ids = _inputs(5, 2, seed=4, scale=300.0)
    moe_check(qe, scheme, "silu", x, tw, ids, exact_out=True)


def test_gate_up_alpha_and_atomic():
    qe = _experts("nvfp4_w4a4", "silu")
    x, tw, ids = _inputs(6, 2, seed=5)
    qe2 = QuantizedExperts(qe.w13, qe.w13_scale, qe.w2, qe.w2_scale, scheme="nvfp4_w4a4",
                           w13_alpha=torch.stack([qe.w13_alpha, qe.w13_alpha * 2], 1), w2_alpha=qe.w2_alpha,
                           a1_global_scale=qe.a1_global_scale, a2_global_scale=qe.a2_global_scale)
    moe_check(qe2, "nvfp4_w4a4", "silu", x, tw, ids, exact_out=True)
    moe_check(qe2, "nvfp4_w4a4", "silu", x, tw, ids, reduction="atomic")


def _args(scheme="nvfp4_w4a4"):
    qe = _experts(scheme, "silu")
    x, tw, ids = _inputs(4, 2)
    return dict(hidden_states=x, w13=qe.w13, w13_scale=qe.w13_scale, w13_alpha=qe.w13_alpha, w2=qe.w2,
                w2_scale=qe.w2_scale, w2_alpha=qe.w2_alpha, topk_weights=tw, topk_ids=ids,
                a1_global_scale=qe.a1_global_scale, a2_global_scale=qe.a2_global_scale, expert_map=None)


@pytest.mark.parametrize("arg,bad,name", [
    ("hidden_states", lambda a: a.to(torch.int32), "hidden_states"),
    ("w13", lambda a: a[:, :-1], "w13"),
    ("w2_scale", lambda a: a.view(torch.uint8), "w2_scale"),
    ("topk_ids", lambda a: a.to(torch.float32), "topk_ids"),
    ("topk_ids", lambda a: a + 10, "topk_ids"),
    ("topk_weights", lambda a: a[:, :1], "topk_weights"),
    ("expert_map", lambda a: torch.tensor([0, 1, 2, 9], dtype=torch.int32), "expert_map"),
    ("a1_global_scale", lambda a: None, "a1_global_scale"),
    ("w13_alpha", lambda a: a.to(torch.float64), "w13_alpha"),
    ("w2", lambda a: a.to("meta"), "w2"),
])
def test_bad_inputs_are_value_errors(arg, bad, name):
    kw = _args()
    kw[arg] = bad(kw[arg])
    spec = OpSpec.from_scheme("nvfp4_w4a4")
    with pytest.raises(ValueError, match=name):
        moe_triton(*kw.values(), spec)


def test_op_dispatches_to_triton_under_interpreter():
    import emu_inductor.ops.library as lib

    kw = _args("w_mxfp4_a_mxfp4")
    assert lib.select_backend(torch.device("cpu")) == "triton"
    spec = OpSpec.from_scheme("w_mxfp4_a_mxfp4")
    out = torch.ops.mxemu.moe(*kw.values(), spec.to_str())
    ref = lib._REFERENCE["moe"](*kw.values(), spec)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("scheme,activation,rw_in", [
    ("nvfp4_w4a4", "silu", False), ("nvfp4_w4a4", "swigluoai", True), ("w_mxfp4_a_mxfp4", "gelu_no_mul", False),
    ("w_mxfp4_a_fp8", "silu", True), ("w_mxfp6_e3m2_a_mxfp6_e3m2", "silu", False), ("nvfp4_w4a16", "silu", False)])
def test_prequant_and_prefetch_paths_bit_identical(scheme, activation, rw_in):
    """The fast paths change no value: A1 fake-quantized once (prequant_kernel) or per N tile in
    the GEMM (prequant=False), weight bytes loaded one K step ahead (config prefetch=1) give
    bit-identical A1, C2, A2 and outputs."""
    from emu_inductor.kernels.tiles import TileConfig

    qe = _experts(scheme, activation)
    k = 1 if rw_in else 2
    x, tw, ids = _inputs(9, k, seed=7)
    spec = OpSpec.from_scheme(scheme, activation=activation, router_weight_on_input=rw_in)
    args = (x, qe.w13, qe.w13_scale, qe.w13_alpha, qe.w2, qe.w2_scale, qe.w2_alpha, tw, ids,
            qe.a1_global_scale, qe.a2_global_scale, None, spec)
    base = moe_triton(*args, debug=True, prequant=False)
    for kw in (dict(prequant=True), dict(config=TileConfig(16, 32, 64, 4, 1, prefetch=1)),
               dict(prequant=True, config=TileConfig(16, 64, 64, 4, 1, prefetch=1))):
        other = moe_triton(*args, debug=True, **kw)
        for name in ("out", "a1", "c2", "a2"):
            if base[name] is not None:
                assert torch.equal(base[name].nan_to_num(7.0), other[name].nan_to_num(7.0)), (kw, name)
