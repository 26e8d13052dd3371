"""torch.ops.mxemu.{moe, linear, grouped_mm} reject what the eager reference rejects, on
both backends ("reference" and "triton" under the interpreter), with a ValueError naming
the argument as the op call names it; on an accelerator the value checks are
`torch._assert_async` (no device-to-host sync), which the meta-device test observes.
"""

from __future__ import annotations

import warnings
from unittest import mock

import pytest
import torch

import emu_inductor.ops  # noqa: F401  (registers torch.ops.mxemu.*)
from emu_inductor.formats import GlobalScaleWarning, fake_quantize
from emu_inductor.ops import validate
from emu_inductor.reference import moe_emulated
from emu_inductor.reference.modules import QuantizedExperts, quantize_weight
from emu_inductor.spec import OpSpec
from emu_inductor.spec.schemes import SCHEMES

E, H, I, N, K = 3, 32, 32, 32, 32
BACKENDS = ["reference", "triton"]
BAD_SCALES = [0.0, -1.0, float("nan"), float("inf"), float("-inf")]
NV_ONLY_BAD = [1e-45, 1e-39]  # positive but below fp32's smallest normal: formats rejects them


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("EMU_INDUCTOR_KERNEL_BACKEND", request.param)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


def _moe_args(scheme="nvfp4_w4a4", T=3):
    g = torch.Generator().manual_seed(0)
    qe = QuantizedExperts.from_float((torch.randn(E, 2 * I, H, generator=g) * 0.2).bfloat16(),
                                     (torch.randn(E, H, I, generator=g) * 0.2).bfloat16(), scheme=scheme)
    a1 = a2 = None
    if qe.a1_global_scale is not None:
        a1, a2 = torch.tensor([600.0]), torch.tensor([300.0])
    x = torch.randn(T, H, generator=g).bfloat16()
    ids = torch.tensor([[0, 1], [2, 0], [1, 1]], dtype=torch.int32)[:T]
    tw = torch.rand(T, 2, generator=g)
    return dict(hidden_states=x, w13=qe.w13, w13_scale=qe.w13_scale, w13_alpha=qe.w13_alpha, w2=qe.w2,
                w2_scale=qe.w2_scale, w2_alpha=qe.w2_alpha, topk_weights=tw, topk_ids=ids, a1_global_scale=a1,
                a2_global_scale=a2, expert_map=None, spec=OpSpec.from_scheme(scheme).to_str())


def _gemm_weights(scheme, lead=()):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(*lead, N, K, generator=g) * 0.3).bfloat16()
    return quantize_weight(w, SCHEMES[scheme].weight_fmt)


def _act_gs(scheme):
    act = SCHEMES[scheme].act
    return torch.tensor([600.0]) if act is not None and act.kind == "block" and act.fmt.has_global_scale else None


def _linear_args(scheme="nvfp4_w4a4"):
    q, s, alpha = _gemm_weights(scheme)
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(2)).bfloat16()
    return dict(x=x, weight=q, weight_scale=s, alpha=alpha, input_global_scale=_act_gs(scheme), bias=None,
                spec=OpSpec.from_scheme(scheme).to_str())


def _grouped_args(scheme="nvfp4_w4a4"):
    q, s, alpha = _gemm_weights(scheme, (E,))
    a = torch.randn(5, K, generator=torch.Generator().manual_seed(3)).bfloat16()
    return dict(a=a, w=q, w_scale=s, w_alpha=alpha, offs=torch.tensor([2, 2, 4], dtype=torch.int32),
                a_global_scale=_act_gs(scheme), spec=OpSpec.from_scheme(scheme).to_str(), bias=None)


OPS = {"moe": _moe_args, "linear": _linear_args, "grouped_mm": _grouped_args}


def _call(op, kw):
    return getattr(torch.ops.mxemu, op)(**kw)


def _raises(op, kw, name):
    with pytest.raises(ValueError, match=rf"^{name}: "):
        _call(op, kw)


def test_good_inputs_run_on_both_backends(backend):
    for op, make in OPS.items():
        out = _call(op, make())
        assert torch.isfinite(out.float()).all(), op


# --- scales: every op, every scale argument --------------------------------------------------

SCALE_ARGS = [("moe", "a1_global_scale", True), ("moe", "a2_global_scale", True), ("moe", "w13_alpha", False),
              ("moe", "w2_alpha", False), ("linear", "input_global_scale", True), ("linear", "alpha", False),
              ("grouped_mm", "a_global_scale", True), ("grouped_mm", "w_alpha", False)]


@pytest.mark.parametrize("op,arg,is_act", SCALE_ARGS, ids=[f"{o}-{a}" for o, a, _ in SCALE_ARGS])
def test_bad_scale_is_value_error(backend, op, arg, is_act):
    """The measured bug: mxemu::moe with a1_global_scale 0 or NaN returned all-NaN output."""
    bad = BAD_SCALES + (NV_ONLY_BAD if is_act else [])
    for v in bad:
        kw = OPS[op]()
        kw[arg] = torch.full_like(kw[arg], v)
        _raises(op, kw, arg)


def test_fp8_static_scale_is_value_error(backend):
    kw = _moe_args("w_mxfp4_a_fp8")
    for arg in ("a1_global_scale", "a2_global_scale"):
        for v in BAD_SCALES:
            k2 = dict(kw, **{arg: torch.tensor([v])})
            _raises("moe", k2, arg)
    kw = _linear_args("w_mxfp4_a_fp8")
    _raises("linear", dict(kw, input_global_scale=torch.tensor([0.0])), "input_global_scale")


def test_scale_host_facts(backend):
    """Missing NVFP4 activation global scale (the kernel has no dynamic one), wrong dtype,
    several values, a Python float, a global scale for an MX weight."""
    for op, arg in (("moe", "a1_global_scale"), ("linear", "input_global_scale"), ("grouped_mm", "a_global_scale")):
        kw = OPS[op]()
        _raises(op, dict(kw, **{arg: None}), arg)
        _raises(op, dict(kw, **{arg: kw[arg].double()}), arg)
        _raises(op, dict(kw, **{arg: torch.tensor([600.0, 600.0])}), arg)
    kw = _linear_args("w_mxfp4_a_mxfp4")
    _raises("linear", dict(kw, alpha=torch.tensor([1.0])), "alpha")
    kw = _grouped_args("w_mxfp4")
    _raises("grouped_mm", dict(kw, w_alpha=torch.tensor([1.0])), "w_alpha")
    kw = _linear_args()
    _raises("linear", dict(kw, alpha=kw["alpha"].bfloat16()), "alpha")


def test_linear_fp32_bias_rejected_on_both_backends(backend):
    """The Triton mxemu::linear used to accept an fp32 bias next to bf16 activations; the
    reference (F.linear in the activation dtype) rejects it."""
    kw = _linear_args()
    _raises("linear", dict(kw, bias=torch.zeros(N)), "bias")
    _raises("linear", dict(kw, bias=torch.zeros(N + 1, dtype=torch.bfloat16)), "bias")
    out = _call("linear", dict(kw, bias=torch.zeros(N, dtype=torch.bfloat16)))
    assert out.shape == (2, N)
    kw = _grouped_args()
    _raises("grouped_mm", dict(kw, bias=torch.zeros(E, N)), "bias")


def test_ids_map_offs_values(backend):
    kw = _moe_args()
    _raises("moe", dict(kw, topk_ids=kw["topk_ids"] + E), "topk_ids")
    _raises("moe", dict(kw, topk_ids=kw["topk_ids"] - 1), "topk_ids")
    _raises("moe", dict(kw, expert_map=torch.tensor([0, 1, E], dtype=torch.int32)), "expert_map")
    _raises("moe", dict(kw, expert_map=torch.tensor([0, -2, 1], dtype=torch.int32)), "expert_map")
    out = _call("moe", dict(kw, expert_map=torch.tensor([0, -1, 1], dtype=torch.int32)))
    assert out.shape == kw["hidden_states"].shape
    kw = _grouped_args()
    _raises("grouped_mm", dict(kw, offs=torch.tensor([3, 2, 4], dtype=torch.int32)), "offs")
    _raises("grouped_mm", dict(kw, offs=torch.tensor([-1, 2, 4], dtype=torch.int32)), "offs")


def test_reference_rejects_the_same_scales():
    """The rule the ops apply is the reference's: moe_emulated raises for each bad value
    (naming the argument, or the formats' `global_scale` for the fp32-normal floor)."""
    kw = _moe_args()
    spec = OpSpec.from_str(kw.pop("spec"))
    for v in BAD_SCALES + NV_ONLY_BAD:
        with pytest.raises(ValueError, match="global_scale"):
            moe_emulated(kw["hidden_states"], kw["w13"], kw["w2"], kw["topk_weights"], kw["topk_ids"],
                         scheme=spec.scheme(), w13_scale=kw["w13_scale"], w2_scale=kw["w2_scale"],
                         w13_alpha=kw["w13_alpha"], w2_alpha=kw["w2_alpha"], a1_global_scale=torch.tensor([v]),
                         a2_global_scale=kw["a2_global_scale"], gemm_style="bmm")


@pytest.mark.parametrize("v", [torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).tiny * 0.999,
                               torch.finfo(torch.float32).tiny / 2, 1e-30, 1e30, 3e38])
def test_min_global_scale_matches_formats(v):
    """ops' NVFP4 activation-global-scale floor equals the formats' own check."""
    g = torch.tensor([v], dtype=torch.float32)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GlobalScaleWarning)  # degenerate but legal
            fake_quantize(torch.ones(16), "nvfp4", global_scale=g)
        formats_ok = True
    except ValueError:
        formats_ok = False
    assert formats_ok == bool(g.item() >= validate.MIN_ACT_GLOBAL_SCALE)


# --- no device sync: the non-CPU path is torch._assert_async ----------------------------------


def _to_meta(kw):
    return {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def test_device_value_checks_use_assert_async_not_sync():
    """On a non-CPU device every value check is one torch._assert_async (a meta tensor
    would raise on any bool()/item() sync), naming the argument in its message."""
    calls = []
    with mock.patch.object(torch, "_assert_async", lambda t, msg="": calls.append(msg)):
        kw = _to_meta(_moe_args())
        spec = OpSpec.from_str(kw["spec"])
        validate.check_moe_values(kw["topk_ids"], kw["w13"], kw["w13_alpha"], kw["w2_alpha"],
                                  kw["a1_global_scale"], kw["a2_global_scale"],
                                  torch.tensor([0, 1, 2], dtype=torch.int32, device="meta"), spec)
        kw = _to_meta(_linear_args())
        validate.check_linear_values(kw["alpha"], kw["input_global_scale"], OpSpec.from_str(kw["spec"]))
        kw = _to_meta(_grouped_args())
        validate.check_grouped_mm_values(kw["w_alpha"], kw["offs"], kw["a_global_scale"],
                                         OpSpec.from_str(kw["spec"]))
    names = [m.split(":")[0] for m in calls]
    assert names == ["w13_alpha", "w2_alpha", "a1_global_scale", "a2_global_scale", "topk_ids", "expert_map",
                     "alpha", "input_global_scale", "w_alpha", "a_global_scale", "offs"]


def test_fake_impls_run_on_meta_without_values():
    """The fake implementations see no values (meta / FakeTensors): shapes only."""
    for op, make in OPS.items():
        kw = _to_meta(make())
        out = _call(op, kw)
        assert out.device.type == "meta", op


@pytest.mark.parametrize("op", sorted(OPS))
def test_opcheck_fake_and_aot(backend, op):
    """torch.library.opcheck: the fake implementation agrees with the real op (which now
    validates values) and AOT dispatch with dynamic shapes works. (test_schema is left
    out: its mutation check multiplies the float8 block scales, which CPU torch lacks.)"""
    kw = OPS[op]()
    torch.library.opcheck(getattr(torch.ops.mxemu, op).default, (), kw,
                          test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))


# --- compiled: a bad scale fed to the fused op raises, never NaN -----------------------------


def test_compiled_model_with_bad_scale_raises():
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache

    g = torch.Generator().manual_seed(4)
    m = QuantizedExperts.from_float((torch.randn(4, 64, 64, generator=g) / 8).bfloat16(),
                                    (torch.randn(4, 64, 32, generator=g) / 6).bfloat16(), scheme="nvfp4_w4a4",
                                    a1_global_scale=torch.tensor(600.0), a2_global_scale=torch.tensor(300.0))
    x = torch.randn(5, 64, generator=g).bfloat16()
    ids = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0], [0, 2]], dtype=torch.int32)
    tw = torch.full((5, 2), 0.5)
    torch._dynamo.reset()
    counters.clear()
    cm = torch.compile(m, backend="mxemu")
    with fresh_cache(), torch.no_grad():
        out = cm(x, tw, ids)
        assert counters["mxemu"]["moe"] == 1, dict(counters["mxemu"])
        assert torch.isfinite(out.float()).all()
        for v in (0.0, float("nan")):
            m.a1_global_scale.fill_(v)
            with pytest.raises(ValueError, match="^a1_global_scale: "):
                cm(x, tw, ids)
        m.a1_global_scale.fill_(600.0)
        m.a2_global_scale.fill_(float("inf"))
        with pytest.raises(ValueError, match="^a2_global_scale: "):
            cm(x, tw, ids)
    torch._dynamo.reset()
