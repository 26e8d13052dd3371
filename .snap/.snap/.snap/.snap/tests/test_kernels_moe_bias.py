"""Per-expert GEMM biases in the fused MoE kernels (GPT-OSS; vLLM's HAS_BIAS), run under
Triton's interpreter on CPU, against the eager reference `moe_emulated(w13_bias=, w2_bias=)`
(which `emu_inductor.models.moe_emulated_with_bias` calls).

Semantics: C1 = dtype(fp32 acc + fp32(b13[e])) before the activation, C3 = dtype(fp32 acc
+ fp32(b2[e])) before the router weight and the combine. Checked as in
tests/test_kernels_moe.py: A1 bit-identical, C2 within one bf16 ulp (two if gated) of the
reference activation of the reference biased GEMM1, A2 bit-identical to the reference QDQ
of the kernel's own C2, output bit-identical (deterministic reduction) whenever C2 matched
bit for bit (a one-ulp transcendental difference may legitimately propagate).
"""

import zlib

import pytest
import torch
from helpers import moe_check as moe_matrix_check  # the same oracle and tolerances as test_kernels_moe

from emu_inductor.ops.triton_impl import grouped_mm_triton, moe_triton
from emu_inductor.ops import library as _lib  # noqa: F401  (registers torch.ops.mxemu.*)
from emu_inductor.ops.reference_impl import grouped_mm_reference
from emu_inductor.spec import OpSpec
from emu_inductor.reference import moe_emulated
from emu_inductor.reference.activations import is_gated
from emu_inductor.reference.modules import QuantizedExperts
from emu_inductor.reference.moe import dequantize_experts, grouped_bias_operands, sort_by_expert
from emu_inductor.reference.qdq import act_fake_quantize
from emu_inductor.spec.schemes import SCHEMES

E, H, I = 4, 64, 32
BIAS_SCHEMES = ["nvfp4_w4a4", "w_mxfp4_a_mxfp4", "w_mxfp4_a_fp8", "nvfp4_w4a16"]


def _gen(tag):
    return torch.Generator().manual_seed(zlib.crc32(tag.encode()))  # stable across processes


def _experts(scheme, activation):
    g = _gen(f"bias/{scheme}/{activation}")
    n1 = 2 * I if is_gated(activation) else I
    w13 = torch.randn(E, n1, H, generator=g).to(torch.bfloat16) * 0.2
    w2 = torch.randn(E, H, I, generator=g).to(torch.bfloat16) * 0.2
    qe = QuantizedExperts.from_float(w13, w2, scheme=scheme, activation=activation)
    if qe.a1_global_scale is not None:
        qe.a1_global_scale.fill_(2688.0 / 4.0)
        qe.a2_global_scale.fill_(2688.0 / 8.0)
    # biases of the size of the GEMM outputs (so they change C1 / C3 visibly)
    b13 = (torch.randn(E, n1, generator=g) * 0.3).to(torch.bfloat16)
    b2 = (torch.randn(E, H, generator=g) * 0.3).to(torch.bfloat16)
    return qe, b13, b2


def _inputs(T, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
    tw = torch.softmax(torch.randn(T, k, generator=g), -1)
    return x, tw, ids


def _ref(qe, scheme, activation, x, tw, ids, b13, b2, rw_in=False, emap=None):
    return moe_emulated(x, qe.w13, qe.w2, tw, ids, scheme=scheme, w13_scale=qe.w13_scale, w2_scale=qe.w2_scale,
                        w13_alpha=qe.w13_alpha, w2_alpha=qe.w2_alpha, a1_global_scale=qe.a1_global_scale,
                        a2_global_scale=qe.a2_global_scale, activation=activation,
                        apply_router_weight_on_input=rw_in, expert_map=emap, w13_bias=b13, w2_bias=b2)


def _kernel(qe, scheme, activation, x, tw, ids, b13, b2, rw_in=False, emap=None, **kw):
    spec = OpSpec.from_scheme(scheme, activation=activation, router_weight_on_input=rw_in)
    return moe_triton(x, qe.w13, qe.w13_scale, qe.w13_alpha, qe.w2, qe.w2_scale, qe.w2_alpha, tw, ids,
                      qe.a1_global_scale, qe.a2_global_scale, emap, spec, w13_bias=b13, w2_bias=b2, **kw)


def _check(scheme, activation, b13_on=True, b2_on=True, rw_in=False, emap=None, T=7, seed=1, reduction=None):
    """tests/test_kernels_moe.py's checks (A1 bit-identical, C2 within its ulps of the
    reference biased GEMM1's activation, A2 bit-identical, output bit-identical with the
    deterministic reduction whenever C2 matched) on the biased experts."""
    qe, b13, b2 = _experts(scheme, activation)
    k = 1 if rw_in else 2
    x, tw, ids = _inputs(T, k, seed)
    if emap is not None:
        g = torch.Generator().manual_seed(seed + 1)
        ids = torch.stack([torch.randperm(emap.shape[0], generator=g)[:k] for _ in range(T)]).to(torch.int32)
    return moe_matrix_check(qe, scheme, activation, x, tw, ids, rw_in=rw_in, emap=emap, reduction=reduction,
                            exact_out=reduction != "atomic", w13_bias=b13 if b13_on else None,
                            w2_bias=b2 if b2_on else None)


@pytest.mark.parametrize("activation", ["swigluoai", "silu"])
@pytest.mark.parametrize("scheme", BIAS_SCHEMES)
def test_bias_matrix(scheme, activation):
    res, ref = _check(scheme, activation)
    # the biases matter: the reference without them differs
    qe, _, _ = _experts(scheme, activation)
    x, tw, ids = _inputs(7, 2, 1)
    assert not torch.equal(ref, _ref(qe, scheme, activation, x, tw, ids, None, None))


@pytest.mark.parametrize("which", ["w13_only", "w2_only"])
def test_one_bias(which):
    _check("nvfp4_w4a4", "swigluoai", b13_on=which == "w13_only", b2_on=which == "w2_only")


def test_bias_with_expert_map_router_on_input_and_atomic():
    emap = torch.tensor([0, -1, 1, 2, -1, 3], dtype=torch.int32)  # globals 1 and 4 not on this rank
    _check("nvfp4_w4a4", "silu", emap=emap)
    _check("w_mxfp4_a_mxfp4", "silu", rw_in=True)
    _check("nvfp4_w4a4", "swigluoai", reduction="atomic")


@pytest.mark.parametrize("scheme", ["nvfp4_w4a4", "w_mxfp4_a_fp8"])
def test_zero_bias_equals_no_bias(scheme):
    qe, b13, b2 = _experts(scheme, "swigluoai")
    x, tw, ids = _inputs(6, 2, 3)
    z13, z2 = torch.zeros_like(b13), torch.zeros_like(b2)
    out0 = _kernel(qe, scheme, "swigluoai", x, tw, ids, None, None)
    outz = _kernel(qe, scheme, "swigluoai", x, tw, ids, z13, z2)
    assert torch.equal(outz, out0)
    assert torch.equal(_ref(qe, scheme, "swigluoai", x, tw, ids, z13, z2),
                       _ref(qe, scheme, "swigluoai", x, tw, ids, None, None))


def test_op_dispatch_with_bias(monkeypatch):
    """torch.ops.mxemu.moe with biases: the triton backend (interpreter) equals the reference
    backend; bias-less calls keep working positionally."""
    scheme, act = "nvfp4_w4a4", "swigluoai"
    qe, b13, b2 = _experts(scheme, act)
    x, tw, ids = _inputs(5, 2, 4)
    spec = OpSpec.from_scheme(scheme, activation=act).to_str()
    args = (x, qe.w13, qe.w13_scale, qe.w13_alpha, qe.w2, qe.w2_scale, qe.w2_alpha, tw, ids,
            qe.a1_global_scale, qe.a2_global_scale, None, spec)
    outs = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv("EMU_INDUCTOR_KERNEL_BACKEND", backend)
        outs[backend] = torch.ops.mxemu.moe(*args, b13, b2)
        outs[backend + "_kw"] = torch.ops.mxemu.moe(*args, w13_bias=b13, w2_bias=b2)
        outs[backend + "_none"] = torch.ops.mxemu.moe(*args)
    assert torch.equal(outs["triton"], outs["reference"])
    assert torch.equal(outs["triton"], outs["triton_kw"])
    assert torch.equal(outs["triton_none"], outs["reference_none"])
    assert torch.equal(outs["reference"], _ref(qe, scheme, act, x, tw, ids, b13, b2))


@pytest.mark.parametrize("scheme", ["nvfp4_w4a4", "w_mxfp4_a_mxfp4"])
def test_grouped_mm_bias(scheme):
    """mxemu::grouped_mm with a per-expert bias [E, N] equals the K-extended torch._grouped_mm
    the reference writes (the stage-1 form the pass fuses)."""
    qe, b13, _ = _experts(scheme, "silu")
    sch = SCHEMES[scheme]
    x, _, ids = _inputs(9, 2, 6)
    a = x.repeat_interleave(2, 0)
    key = ids.reshape(-1).long()
    order, offs = sort_by_expert(key, E)
    a_sorted = a[order]
    spec = OpSpec.from_scheme(scheme)
    out = grouped_mm_triton(a_sorted, qe.w13, qe.w13_scale, qe.w13_alpha, offs, qe.a1_global_scale, spec, bias=b13)
    ref = grouped_mm_reference(a_sorted, qe.w13, qe.w13_scale, qe.w13_alpha, offs, qe.a1_global_scale, spec, bias=b13)
    W = dequantize_experts(qe.w13, qe.w13_scale, sch.weight_fmt, qe.w13_alpha, x.dtype)
    aq = act_fake_quantize(a_sorted, sch.act, qe.a1_global_scale)
    a_ext, w_ext = grouped_bias_operands(aq, W, b13)
    kext = torch._grouped_mm(a_ext, w_ext.transpose(-2, -1), offs=offs)
    assert torch.equal(out, ref)
    assert torch.equal(out, kext)
    out0 = grouped_mm_triton(a_sorted, qe.w13, qe.w13_scale, qe.w13_alpha, offs, qe.a1_global_scale, spec)
    outz = grouped_mm_triton(a_sorted, qe.w13, qe.w13_scale, qe.w13_alpha, offs, qe.a1_global_scale, spec,
                             bias=torch.zeros_like(b13))
    assert torch.equal(out0, outz)


def _moe_args():
    qe, b13, b2 = _experts("nvfp4_w4a4", "swigluoai")
    x, tw, ids = _inputs(4, 2, 7)
    spec = OpSpec.from_scheme("nvfp4_w4a4", activation="swigluoai")
    return (x, qe.w13, qe.w13_scale, qe.w13_alpha, qe.w2, qe.w2_scale, qe.w2_alpha, tw, ids, qe.a1_global_scale,
            qe.a2_global_scale, None, spec), b13, b2


@pytest.mark.parametrize("arg,bad,match", [
    ("w13_bias", lambda b: b.float(), "w13_bias.*dtype"),
    ("w13_bias", lambda b: b[:, :-1], "w13_bias.*shape"),
    ("w13_bias", lambda b: b[0], "w13_bias.*shape"),
    ("w13_bias", lambda b: b.to("meta"), "w13_bias"),
    ("w2_bias", lambda b: b.half(), "w2_bias.*dtype"),
    ("w2_bias", lambda b: b[:-1], "w2_bias.*shape"),
    ("w2_bias", lambda b: b.to("meta"), "w2_bias"),
])
@pytest.mark.parametrize("entry", ["kernel", "op", "reference"])
def test_bad_bias_is_value_error(entry, arg, bad, match, monkeypatch):
    args, b13, b2 = _moe_args()
    kw = {"w13_bias": b13, "w2_bias": b2}
    kw[arg] = bad(kw[arg])
    with pytest.raises(ValueError, match=match):
        if entry == "kernel":
            moe_triton(*args, **kw)
        elif entry == "op":
            monkeypatch.setenv("EMU_INDUCTOR_KERNEL_BACKEND", "reference")
            torch.ops.mxemu.moe(*args[:-1], args[-1].to_str(), **kw)
        else:
            x, w13, s13, a13, w2, s2, a2, tw, ids, g1, g2, _, spec = args
            moe_emulated(x, w13, w2, tw, ids, scheme="nvfp4_w4a4", w13_scale=s13, w2_scale=s2, w13_alpha=a13,
                         w2_alpha=a2, a1_global_scale=g1, a2_global_scale=g2, activation="swigluoai", **kw)


def test_grouped_mm_bad_bias():
    qe, b13, _ = _experts("nvfp4_w4a4", "silu")
    a = torch.randn(6, H).to(torch.bfloat16)
    offs = torch.tensor([2, 4, 5, 6], dtype=torch.int32)
    spec = OpSpec.from_scheme("nvfp4_w4a4").to_str()
    for bad, match in ((b13.float(), "bias.*dtype"), (b13[:, :5], "bias.*shape")):
        with pytest.raises(ValueError, match=match):
            torch.ops.mxemu.grouped_mm(a, qe.w13, qe.w13_scale, qe.w13_alpha, offs, qe.a1_global_scale, spec, bad)
