"""Errors name the argument the user actually passed (issue 12, item 4), as ValueError,
or TypeError for a wrong Python type. Each case used to blame another argument or raise
another exception type (noted per case)."""

import pytest
import torch

from emu_inductor.reference import QuantizedExperts, QuantizedLinear, moe_emulated, softmax_topk
from emu_inductor.spec.opspec import OpSpec

E, H, I, T = 4, 64, 32, 3


def _experts(scheme="nvfp4_w4a4", **kw):
    g = torch.Generator().manual_seed(0)
    return QuantizedExperts.from_float((torch.randn(E, 2 * I, H, generator=g) / 8).bfloat16(),
                                       (torch.randn(E, H, I, generator=g) / 6).bfloat16(), scheme=scheme, **kw)


def _route(t=T):
    g = torch.Generator().manual_seed(1)
    return softmax_topk(torch.randn(t, E, generator=g), 2)


def _call(m, x, **override):
    w, ids = _route(x.shape[0])
    kw = dict(scheme=m.scheme, w13_scale=m.w13_scale, w2_scale=m.w2_scale, w13_alpha=m.w13_alpha,
              w2_alpha=m.w2_alpha, a1_global_scale=torch.tensor(400.0), a2_global_scale=torch.tensor(400.0))
    kw.update(override)
    return moe_emulated(x, m.w13, m.w2, w, ids, **kw)


def _raises(exc, arg, fn):
    with pytest.raises(exc) as info:
        fn()
    assert str(info.value).startswith(arg + ":"), str(info.value)  # was: another argument
    return str(info.value)


def test_from_float_hidden_size_not_a_block_multiple_blames_w13():
    # was: "x: size 60 of the quantized axis 2 ..." (the formats layer's argument name)
    g = torch.Generator().manual_seed(2)
    msg = _raises(ValueError, "w13", lambda: QuantizedExperts.from_float(
        torch.randn(E, 2 * I, 60, generator=g).bfloat16(), torch.randn(E, 60, I, generator=g).bfloat16(),
        scheme="nvfp4_w4a4"))
    assert "60" in msg and "16" in msg
    _raises(ValueError, "w2", lambda: QuantizedExperts.from_float(
        torch.randn(E, 2 * 24, H).bfloat16(), torch.randn(E, H, 24).bfloat16(), scheme="nvfp4_w4a4"))
    _raises(ValueError, "w2", lambda: QuantizedExperts.from_float(
        torch.randn(E, 2 * I, H).bfloat16(), torch.randn(E, 48, I).bfloat16(), scheme="nvfp4_w4a4"))
    _raises(ValueError, "weight", lambda: QuantizedLinear.from_float(torch.randn(32, 60).bfloat16(),
                                                                      scheme="w_mxfp4"))
    _raises(TypeError, "w13", lambda: QuantizedExperts.from_float([[1.0]], torch.randn(E, H, I), scheme="w_mxfp4"))


def test_hidden_size_mismatch_blames_hidden_states():
    # was: "w13: expected shape (4, 64, 64) ..., got shape (4, 64, 32)"
    m = _experts()
    msg = _raises(ValueError, "hidden_states", lambda: _call(m, torch.randn(T, 2 * H).bfloat16()))
    assert str(H) in msg and str(2 * H) in msg
    w, ids = _route()
    _raises(ValueError, "hidden_states", lambda: m(torch.randn(T, 2 * H).bfloat16(), w, ids))
    # a corrupt w13 (disagreeing with w2) is still w13's fault
    _raises(ValueError, "w13", lambda: moe_emulated(
        torch.randn(T, H).bfloat16(), m.w13[:, :, :16], m.w2, w, ids, scheme=m.scheme, w13_scale=m.w13_scale,
        w2_scale=m.w2_scale, w13_alpha=m.w13_alpha, w2_alpha=m.w2_alpha, a1_global_scale=torch.tensor(1.0),
        a2_global_scale=torch.tensor(1.0)))


def test_fp32_input_to_grouped_mm_blames_hidden_states():
    # was: "gemm_style: expected bfloat16 activations ..."
    m = _experts()
    msg = _raises(ValueError, "hidden_states", lambda: _call(m, torch.randn(T, H)))
    assert "gemm_style='bmm'" in msg and "float32" in msg
    w, ids = _route()
    _raises(ValueError, "hidden_states", lambda: m(torch.randn(T, H), w, ids))
    assert not m.calibrated  # a rejected batch does not calibrate the module
    m.gemm_style = "bmm"
    assert m(torch.randn(T, H), w, ids).dtype == torch.float32


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("arg", ["a1_global_scale", "a2_global_scale"])
def test_bad_activation_global_scale_names_it(arg, value):
    # was: "global_scale: expected finite positive values" (the formats layer's name)
    m = _experts()
    _raises(ValueError, arg, lambda: _call(m, torch.randn(T, H).bfloat16(), **{arg: torch.tensor(value)}))


def test_python_float_global_scale_is_a_type_error():
    # was: AttributeError: 'float' object has no attribute 'dtype'
    m = _experts()
    msg = _raises(TypeError, "a1_global_scale", lambda: _call(m, torch.randn(T, H).bfloat16(), a1_global_scale=400.0))
    assert "float" in msg
    _raises(TypeError, "a2_global_scale", lambda: _experts(a2_global_scale=2.0))
    _raises(TypeError, "input_global_scale", lambda: QuantizedLinear.from_float(
        torch.randn(32, H).bfloat16(), scheme="nvfp4_w4a4", input_global_scale=1.0))
    # a static fp8 input scale too
    fp8 = _experts("w_mxfp4_a_fp8")
    _raises(TypeError, "a1_global_scale", lambda: _call(fp8, torch.randn(T, H).bfloat16(), a1_global_scale=0.01,
                                                        a2_global_scale=None))
    _raises(ValueError, "a1_global_scale", lambda: _call(fp8, torch.randn(T, H).bfloat16(),
                                                         a1_global_scale=torch.tensor(0.0), a2_global_scale=None))


@pytest.mark.parametrize("text", ["{}", "[]", "5", '{"weight_fmt": "nvfp4", "bogus": 1}'])
def test_op_spec_string_errors_name_spec(text):
    # was: TypeError: OpSpec.__init__() missing 1 required positional argument: 'weight_fmt'
    _raises(ValueError, "spec", lambda: OpSpec.from_str(text))


def test_op_spec_wrong_type():
    _raises(TypeError, "spec", lambda: OpSpec.from_str(None))
    spec = OpSpec.from_scheme("nvfp4_w4a4")
    assert OpSpec.from_str(spec.to_str()) == spec
