"""Bad input raises ValueError that names the offending argument."""

from __future__ import annotations

import dataclasses
import re
import warnings

import pytest
import torch

from emu_inductor.formats import (
    E2M1,
    FORMATS,
    dequantize,
    e8m0_decode,
    e8m0_scale,
    fake_quantize,
    get_element,
    get_format,
    pack,
    quantize,
    round_to_element,
    unpack,
)
from emu_inductor.formats.nvfp4 import default_global_scale, get_recipe

QDQ = [quantize, fake_quantize]


def raises(arg: str):
    """ValueError whose message starts with the argument's name ("x: ...")."""
    return pytest.raises(ValueError, match=rf"^{re.escape(arg)}:")
QDQ_IDS = ["quantize", "fake_quantize"]


def x32(k: int = 64, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(2, k).to(dtype)


# --- packed data / scales --------------------------------------------------------------


def test_dequantize_scale_wrong_dtype():
    q = quantize(x32(), "mxfp4")
    bad = dataclasses.replace(q, scale=q.scale.to(torch.float32))
    with raises("q.scale"):
        dequantize(bad)
    bad = dataclasses.replace(q, scale=q.scale.view(torch.float8_e8m0fnu))
    with raises("q.scale"):
        dequantize(bad)
    n = quantize(x32(), "nvfp4")
    bad = dataclasses.replace(n, scale=n.scale.view(torch.uint8))
    with raises("q.scale"):
        dequantize(bad)


def test_dequantize_qdata_wrong_dtype():
    q = quantize(x32(), "mxfp8_e4m3")
    bad = dataclasses.replace(q, qdata=q.qdata.view(torch.float8_e4m3fn))
    with raises("q.qdata"):
        dequantize(bad)
    bad = dataclasses.replace(q, qdata=q.qdata.to(torch.int32))
    with raises("q.qdata"):
        dequantize(bad)


def test_dequantize_bad_q_dtype_and_readers():
    with raises("q"):
        dequantize(torch.zeros(4, dtype=torch.uint8))
    q = quantize(x32(), "mxfp4")
    with raises("dtype"):
        dequantize(q, torch.float64)
    with raises("dtype"):
        dequantize(q, torch.int8)
    with raises("e8m0_byte255"):
        dequantize(q, e8m0_byte255="max")
    with raises("e8m0_byte0"):
        dequantize(q, e8m0_byte0="nan")


def test_pack_unpack_bad_input():
    with raises("codes"):
        pack(torch.zeros(3, dtype=torch.uint8), 4)  # odd K for 4-bit
    with raises("codes"):
        pack(torch.zeros(6, dtype=torch.uint8), 6)  # not a multiple of 4 for quark fp6
    with raises("codes"):
        pack(torch.zeros(4, dtype=torch.int32), 4)
    with raises("codes"):
        pack(torch.zeros(4, dtype=torch.float32), 8)
    with raises("bits"):
        pack(torch.zeros(4, dtype=torch.uint8), 5)
    with raises("fp6_layout"):
        pack(torch.zeros(4, dtype=torch.uint8), 6, fp6_layout="torchao")
    with raises("packed"):
        unpack(torch.zeros(4, dtype=torch.int8), 4)
    with raises("packed"):
        unpack(torch.zeros(4, dtype=torch.uint8), 6)  # not a multiple of 3
    with raises("bits"):
        unpack(torch.zeros(4, dtype=torch.uint8), 3)
    with raises("fp6_layout"):
        unpack(torch.zeros(3, dtype=torch.uint8), 6, fp6_layout="x")


# --- input tensor ------------------------------------------------------------------------


@pytest.mark.parametrize("fn", QDQ, ids=QDQ_IDS)
@pytest.mark.parametrize("fmt,k", [("mxfp4", 48), ("mxfp8_e5m2", 16), ("nvfp4", 24), ("mxfp6_e2m3", 33)])
def test_k_not_divisible_by_block(fn, fmt, k):
    with raises("x"):
        fn(x32(k), fmt)
    # along another axis too
    with raises("x"):
        fn(torch.randn(k, 32), fmt, axis=0)


@pytest.mark.parametrize("fn", QDQ, ids=QDQ_IDS)
def test_bad_x(fn):
    with raises("x"):
        fn(torch.randn(2, 32, dtype=torch.float64), "mxfp4")
    with raises("x"):
        fn(torch.ones(2, 32, dtype=torch.int32), "mxfp4")
    with raises("x"):
        fn(torch.tensor(1.0), "mxfp4")
    with raises("x"):
        fn([1.0] * 32, "mxfp4")
    with raises("axis"):
        fn(x32(), "mxfp4", axis=2)
    with raises("axis"):
        fn(x32(), "mxfp4", axis=-3)


# --- names of variants -------------------------------------------------------------------


@pytest.mark.parametrize("fn", QDQ, ids=QDQ_IDS)
def test_unknown_names(fn):
    with raises("fmt"):
        fn(x32(), "mxfp5")
    with raises("fmt"):
        fn(x32(), 4)
    with raises("recipe"):
        fn(x32(), "nvfp4", recipe="cutlass")
    with raises("scale_mode"):
        fn(x32(), "mxfp4", scale_mode="nearest")
    with raises("rounding"):
        fn(x32(), "mxfp4", rounding="nearest")
    with raises("rounding"):
        fn(x32(), "nvfp4", rounding="even")


def test_unknown_names_lower_level():
    with raises("fmt"):
        get_format("nvfp8")
    with raises("elem"):
        get_element("e3m3")
    with raises("recipe"):
        get_recipe("nvidia")
    with raises("recipe"):
        default_global_scale(torch.tensor(1.0), "nvidia")
    with raises("scale_mode"):
        e8m0_scale(torch.tensor([1.0]), E2M1, "round")
    with raises("rounding"):
        round_to_element(torch.tensor([1.0]), E2M1, rounding="stochastic")
    with raises("byte255"):
        e8m0_decode(torch.tensor([1], dtype=torch.uint8), byte255="zero")
    with raises("byte0"):
        e8m0_decode(torch.tensor([1], dtype=torch.uint8), byte0="inf")


def test_fake_quantize_bad_reader_options():
    with raises("e8m0_byte255"):
        fake_quantize(x32(), "mxfp4", e8m0_byte255="zero")
    with raises("e8m0_byte0"):
        fake_quantize(x32(), "mxfp4", e8m0_byte0="inf")
    with raises("fp6_layout"):
        quantize(x32(), "mxfp6_e3m2", fp6_layout="torchao")


@pytest.mark.parametrize("fn", QDQ, ids=QDQ_IDS)
def test_options_for_the_wrong_family(fn):
    with raises("scale_mode"):
        fn(x32(), "nvfp4", scale_mode="floor")
    with raises("recipe"):
        fn(x32(), "mxfp4", recipe="vllm")
    for fmt in ("mxfp4", "mxfp6_e2m3", "mxfp8_e4m3"):
        with raises("global_scale"):
            fn(x32(), fmt, global_scale=torch.tensor(1.0))


# --- global scale --------------------------------------------------------------------------


@pytest.mark.parametrize("fn", QDQ, ids=QDQ_IDS)
@pytest.mark.parametrize(
    "g",
    [
        torch.tensor(float("nan")),
        torch.tensor(float("inf")),
        torch.tensor(float("-inf")),
        torch.tensor(0.0),
        torch.tensor(-0.0),
        torch.tensor(-2.0),
        torch.tensor([1.0, 0.0]),
        torch.tensor([2.0, float("nan")]),
    ],
    ids=["nan", "inf", "-inf", "zero", "-zero", "negative", "one-zero", "one-nan"],
)
def test_global_scale_bad_values(fn, g):
    with raises("global_scale"):
        fn(x32(), "nvfp4", global_scale=g)


@pytest.mark.parametrize("fn", QDQ, ids=QDQ_IDS)
def test_global_scale_bad_type_or_shape(fn):
    for g in (torch.tensor(1.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.bfloat16),
              torch.tensor(1, dtype=torch.int32)):
        with raises("global_scale"):
            fn(x32(), "nvfp4", global_scale=g)
    for g in ("1.0", [1.0], True):
        with pytest.raises(TypeError, match=r"^global_scale:"):
            fn(x32(), "nvfp4", global_scale=g)
    with raises("global_scale"):
        fn(torch.randn(3, 2, 32), "nvfp4", global_scale=torch.ones(2))  # not the leading dim
    with raises("global_scale"):
        fn(torch.randn(3, 32), "nvfp4", global_scale=torch.ones(3, 32))  # as many dims as x


@pytest.mark.parametrize("fn", QDQ, ids=QDQ_IDS)
def test_global_scale_reaching_the_quantized_axis(fn):
    # a per-slice global scale may only span dims before the quantized axis; otherwise it
    # would be applied to whichever dim movedim() shifts into its place
    x = torch.randn(16, 16, 32)
    with raises("global_scale"):
        fn(x, "nvfp4", axis=0, global_scale=torch.ones(16))
    with raises("global_scale"):
        fn(x, "nvfp4", axis=1, global_scale=torch.ones(16, 16))
    fn(x, "nvfp4", axis=1, global_scale=torch.ones(16))  # fine: dim 0 precedes axis 1


@pytest.mark.parametrize("fn", QDQ, ids=QDQ_IDS)
def test_global_scale_python_number_works(fn):
    # a Python float (or int) is the same as a 0-d fp32 tensor holding it
    x = x32()
    for g in (37.5, 3):
        want = fn(x, "nvfp4", global_scale=torch.tensor(float(g)))
        got = fn(x, "nvfp4", global_scale=g)
        if fn is quantize:
            assert torch.equal(got.qdata, want.qdata) and torch.equal(got.global_scale, want.global_scale)
        else:
            assert torch.equal(got, want)


@pytest.mark.parametrize("fn", QDQ, ids=QDQ_IDS)
@pytest.mark.parametrize("g", [1e-45, 1e-39, 0.5 * 2.0**-126], ids=["1e-45", "1e-39", "half-min-normal"])
def test_global_scale_subnormal_rejected(fn, g):
    # below fp32's smallest normal the recipes' reciprocal (1/g, s/g) overflows
    with raises("global_scale"):
        fn(x32(), "nvfp4", global_scale=torch.tensor(g))
    with raises("global_scale"):
        fn(x32(), "nvfp4", global_scale=g)
    fn(x32(), "nvfp4", global_scale=torch.tensor(2.0**-126))  # the smallest normal is fine


@pytest.mark.parametrize("fn", QDQ, ids=QDQ_IDS)
@pytest.mark.parametrize("g", [1e30, 1e-30], ids=["1e30", "1e-30"])
def test_global_scale_degenerate_warns(fn, g):
    # legal (finite, normal, positive) but every block scale saturates at 448 (1e30) or
    # underflows to 0 (1e-30, all zeros out): a GlobalScaleWarning, once
    from emu_inductor.formats import GlobalScaleWarning

    x = torch.randn(4, 64)
    with pytest.warns(GlobalScaleWarning, match="global_scale") as rec:
        fn(x, "nvfp4", global_scale=torch.tensor(g))
    assert len([w for w in rec if issubclass(w.category, GlobalScaleWarning)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", GlobalScaleWarning)
        fn(x, "nvfp4", global_scale=torch.tensor(2688.0 / 4.0))  # a sensible scale: silent
        fn(x, "nvfp4")


@pytest.mark.parametrize("fn", QDQ, ids=QDQ_IDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nvfp4_default_global_scale_nonfinite_amax_warns(fn, bad):
    from emu_inductor.formats import GlobalScaleWarning

    x = torch.randn(4, 32)
    x[2, 5] = bad
    with pytest.warns(GlobalScaleWarning, match=r"global_scale=1\.0") as rec:
        out = fn(x, "nvfp4")
    assert len([w for w in rec if issubclass(w.category, GlobalScaleWarning)]) == 1
    # the warning says what was used: 1.0, in the recipe's direction
    want = fake_quantize(x, "nvfp4", global_scale=torch.tensor(1.0))
    got = out if fn is fake_quantize else dequantize(out, torch.float32)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got[~torch.isnan(got)], want[~torch.isnan(want)])


# --- empty tensors ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8_e4m3", "mxfp8_e5m2"])
@pytest.mark.parametrize("shape,axis", [((0, 64), -1), ((3, 0), -1), ((0,), -1), ((2, 0, 32), -1), ((0, 5), 0)])
def test_empty_tensors(fmt, shape, axis):
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.zeros(shape, dtype=dtype)
        q = quantize(x, fmt, axis=axis)
        d = dequantize(q, dtype)
        f = fake_quantize(x, fmt, axis=axis)
        assert d.shape == x.shape and f.shape == x.shape and d.dtype == f.dtype == dtype
        bits = FORMATS[fmt].pack_bits
        assert pack(unpack(q.qdata, bits), bits).shape == q.qdata.shape
    if fmt == "nvfp4" and len(shape) == 3:  # per-leading-index global scale of an empty dim
        x = torch.zeros(0, 4, 32)
        assert quantize(x, fmt, global_scale=torch.ones(0)).qdata.shape == (0, 4, 16)


def test_empty_lower_level():
    e = torch.zeros(0)
    assert e8m0_scale(e, E2M1).shape == (0,)
    assert e8m0_decode(e.to(torch.uint8)).shape == (0,)
    assert round_to_element(e, E2M1).shape == (0,)
    assert default_global_scale(e.reshape(0)).shape == (0,)


# --- QuantizedTensor shapes ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "mxfp6_e3m2", "mxfp8_e4m3"])
def test_dequantize_rejects_broadcastable_scale(fmt):
    q = quantize(torch.randn(4, 64), fmt)
    for bad in (q.scale[:, :1], q.scale[:1], q.scale[None], q.scale.reshape(-1)):
        with raises("q.scale"):
            dequantize(dataclasses.replace(q, scale=bad.contiguous()))
    with raises("q.qdata"):
        dequantize(dataclasses.replace(q, qdata=q.qdata[:, :-1]))
    with raises("q.qdata"):
        dequantize(dataclasses.replace(q, qdata=q.qdata[:1]))
    with raises("q.axis"):
        dequantize(dataclasses.replace(q, axis=2))


def test_dequantize_checks_global_scale():
    q = quantize(torch.randn(3, 4, 32), "nvfp4", global_scale=torch.ones(3))
    dequantize(q)
    with raises("q.global_scale"):
        dequantize(dataclasses.replace(q, global_scale=torch.ones(4, 1, 1, 1)))
    with raises("q.global_scale"):
        dequantize(dataclasses.replace(q, global_scale=torch.ones(3, 4, 2, 32)))
    with raises("q.global_scale"):
        dequantize(dataclasses.replace(q, global_scale=1.0))
    m = quantize(torch.randn(3, 32), "mxfp4")
    with raises("q.global_scale"):
        dequantize(dataclasses.replace(m, global_scale=torch.tensor(1.0)))


def test_pack_unpack_zero_dim_and_wrong_type():
    with raises("codes"):
        pack(torch.tensor(3, dtype=torch.uint8), 4)
    with raises("packed"):
        unpack(torch.tensor(3, dtype=torch.uint8), 4)
    with pytest.raises(TypeError, match=r"^codes:"):
        pack([1, 2], 4)
    with pytest.raises(TypeError, match=r"^packed:"):
        unpack(b"ab", 4)


# --- variants and their knobs -------------------------------------------------------------


@pytest.mark.parametrize("fn", QDQ, ids=QDQ_IDS)
def test_variant_errors(fn):
    with raises("variant"):
        fn(x32(), "mxfp4", variant="cutlass")
    with raises("variant"):
        fn(x32(), "nvfp4", variant="torchao_floor")
    with raises("variant"):
        fn(x32(), "mxfp8_e4m3", variant="modelopt")  # ModelOpt's qtensor is MXFP4 only
    with raises("signed_zero"):
        fn(x32(), "mxfp4", signed_zero="negative")
    with raises("nan_element"):
        fn(x32(), "mxfp4", nan_element="zero")
    with raises("inf_amax"):
        fn(x32(), "mxfp4", inf_amax="inf")
    with raises("inf_amax"):
        fn(x32(), "nvfp4", inf_amax="nan")
    with raises("byte0_inverse"):
        fn(x32(), "mxfp4", byte0_inverse="zero")
    with raises("byte0_inverse"):
        fn(x32(), "nvfp4", byte0_inverse="one")


def test_wrong_python_types_are_type_errors_naming_the_argument():
    from emu_inductor.formats import decode, e8m0_inverse, encode

    def type_error(arg):
        return pytest.raises(TypeError, match=rf"^{re.escape(arg)}:")

    with type_error("axis"):
        quantize(x32(), "mxfp4", axis="1")
    with type_error("axis"):
        fake_quantize(x32(), "mxfp4", axis=1.0)
    with type_error("y"):
        round_to_element([1.0], E2M1)
    with type_error("elem"):
        round_to_element(torch.ones(2), "e2m1")
    with type_error("v"):
        encode(1.0, E2M1)
    with type_error("code"):
        decode([3], E2M1)
    with type_error("amax"):
        e8m0_scale(2.0, E2M1)
    with type_error("u"):
        e8m0_decode(127)
    with type_error("u"):
        e8m0_inverse(127)
