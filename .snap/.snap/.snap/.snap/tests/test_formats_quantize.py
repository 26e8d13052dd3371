"""quantize / dequantize / fake_quantize.

* fake_quantize(x) is bit-identical to dequantize(quantize(x), x.dtype) for every format,
  scale mode / NVFP4 recipe, dtype and axis, special blocks included.
* Independent float64 implementations (numpy; each fp32 rounding emulated by a
  np.float32 cast) of the NVFP4 "vllm" recipe (numerics.md, NVFP4 reference arithmetic)
  and of MXFP4 with FLOOR and EVEN scales, compared bit for bit.
* Hypothesis properties over shapes and values.
* torch.compile(fullgraph=True) with the eager backend and with Inductor on CPU.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from emu_inductor.formats import (
    FORMATS,
    MX_SCALE_MODES,
    NVFP4_RECIPES,
    QuantizedTensor,
    default_global_scale,
    dequantize,
    fake_quantize,
    quantize,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_IDS = ["fp32", "bf16", "fp16"]
MX_FORMATS = ["mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8_e4m3", "mxfp8_e5m2"]
VARIANTS = [(f, {"scale_mode": m}) for f in MX_FORMATS for m in MX_SCALE_MODES] + [
    ("nvfp4", {"recipe": r}) for r in sorted(NVFP4_RECIPES)
]
VAR_IDS = [f"{f}-{next(iter(kw.values()))}" for f, kw in VARIANTS]
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, msg: str = "") -> None:
    """Same dtype, shape and bits; NaN positions must match (NaN payloads may differ)."""
    assert got.dtype == want.dtype and got.shape == want.shape, msg
    gn, wn = torch.isnan(got), torch.isnan(want)
    assert torch.equal(gn, wn), f"{msg}: NaN positions differ ({int((gn ^ wn).sum())})"
    iv = INT_VIEW[got.dtype]
    ok = (got.contiguous().view(iv) == want.contiguous().view(iv)) | gn
    if not bool(ok.all()):
        idx = (~ok).nonzero()[:6].tolist()
        ex = [(i, got[tuple(i)].item(), want[tuple(i)].item()) for i in idx]
        raise AssertionError(f"{msg}: {int((~ok).sum())} of {ok.numel()} differ, e.g. {ex}")


def special_input(dtype: torch.dtype, n: int = 64, seed: int = 0) -> torch.Tensor:
    """[n, n] with varied per-row scales and special blocks along both axes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n, generator=g) * torch.exp(torch.randn(n, 1, generator=g) * 2)
    big = torch.finfo(dtype).max
    x[0, :] = 0.0  # zero blocks (axis -1)
    x[:, 1] = -0.0  # zero blocks (axis 0), negative zeros
    x[2, 5] = float("nan")
    x[3, 40] = float("inf")
    x[4, 17] = float("-inf")
    x[5, :16] = big  # saturating huge values
    x[6, 32:48] = -big / 3
    x[40:56, 60] = big / 2
    x[7, :] = torch.finfo(dtype).tiny * torch.randn(n, generator=g)  # (sub)normal edge
    x[8, :] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * (n // 8))  # E2M1 ties
    x[9, :] = torch.randint(-8, 9, (n,), generator=g) * 0.25  # many exact ties at any scale
    return x.to(dtype)


# --- fake_quantize == dequantize(quantize(x)) ---------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("fmt,kw", VARIANTS, ids=VAR_IDS)
def test_fake_equals_dequant_quant(fmt, kw, dtype):
    x = special_input(dtype)
    for axis in (-1, 0):
        q = quantize(x, fmt, axis=axis, **kw)
        assert isinstance(q, QuantizedTensor) and q.shape == x.shape
        d = dequantize(q, dtype)
        f = fake_quantize(x, fmt, axis=axis, **kw)
        assert_bits_equal(f, d, f"{fmt} {kw} {dtype} axis={axis}")
        # axis=0 is axis=-1 on the transpose
        if axis == 0:
            ft = fake_quantize(x.t().contiguous(), fmt, axis=-1, **kw).t()
            assert_bits_equal(f, ft, f"{fmt} {kw} {dtype} axis 0 vs transpose")


@pytest.mark.parametrize("fmt,kw", VARIANTS, ids=VAR_IDS)
def test_fake_equals_dequant_quant_half_away_and_readers(fmt, kw):
    x = special_input(torch.bfloat16, seed=1)
    for opts in ({"rounding": "half_away"}, {"e8m0_byte255": "inf", "e8m0_byte0": "zero"}):
        if fmt == "nvfp4" and "e8m0_byte0" in opts:
            continue
        qopts = {k: v for k, v in opts.items() if k == "rounding"}
        dopts = {k: v for k, v in opts.items() if k != "rounding"}
        d = dequantize(quantize(x, fmt, **kw, **qopts), torch.bfloat16, **dopts)
        f = fake_quantize(x, fmt, **kw, **opts)
        assert_bits_equal(f, d, f"{fmt} {kw} {opts}")


@pytest.mark.parametrize("recipe", sorted(NVFP4_RECIPES))
def test_nvfp4_explicit_and_per_expert_global_scale(recipe):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(3, 4, 32, generator=g) * torch.tensor([1.0, 30.0, 0.01]).view(3, 1, 1)).to(torch.bfloat16)
    amax = x.float().abs().amax(dim=(1, 2))
    gs = default_global_scale(amax, recipe)  # per expert, recipe's own direction
    assert gs.shape == (3,) and gs.dtype == torch.float32
    q = quantize(x, "nvfp4", recipe=recipe, global_scale=gs)
    f = fake_quantize(x, "nvfp4", recipe=recipe, global_scale=gs)
    assert_bits_equal(f, dequantize(q, torch.bfloat16), recipe)
    for e in range(3):
        fe = fake_quantize(x[e], "nvfp4", recipe=recipe, global_scale=gs[e])
        assert_bits_equal(f[e], fe, f"{recipe} expert {e}")
        # a per-tensor default global equals the explicit one computed from the same amax
        assert_bits_equal(fe, fake_quantize(x[e], "nvfp4", recipe=recipe), f"{recipe} default g")
    # a 0-d and a 1-element global scale mean the same
    g0 = gs[1].reshape(())
    assert_bits_equal(
        fake_quantize(x, "nvfp4", recipe=recipe, global_scale=g0),
        fake_quantize(x, "nvfp4", recipe=recipe, global_scale=g0.reshape(1)),
    )


def test_nvfp4_per_expert_global_scale_with_axis():
    """[E, K, N] quantized along K (axis=1) with one global scale per expert."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 32, 5, generator=g) * torch.tensor([1.0, 30.0, 0.01]).view(3, 1, 1)
    gs = torch.tensor([2.0, 0.5, 300.0])
    f = fake_quantize(x, "nvfp4", axis=1, global_scale=gs)
    q = quantize(x, "nvfp4", axis=1, global_scale=gs)
    assert_bits_equal(f, dequantize(q, torch.float32))
    for e in range(3):
        fe = fake_quantize(x[e], "nvfp4", axis=0, global_scale=gs[e])
        assert_bits_equal(f[e], fe, f"expert {e}")


def test_default_global_scale_rules():
    amax = torch.tensor([2688.0, 1.0, 0.0, float("inf"), float("nan")])
    q = default_global_scale(amax, "vllm")
    assert q.tolist()[:2] == [1.0, 2688.0] and q.tolist()[2:] == [1.0, 1.0, 1.0]
    d = default_global_scale(amax, "torchao")
    assert d.tolist()[:2] == [1.0, np.float32(1 / 2688)] and d.tolist()[2] == 1.0
    for r in ("vllm", "vllm_ref", "te", "compressed_tensors"):
        assert NVFP4_RECIPES[r].global_direction == "quantize"
    for r in ("modelopt", "torchao"):
        assert NVFP4_RECIPES[r].global_direction == "dequantize"


def test_quantized_tensor_layout():
    x = torch.randn(6, 64, 5)
    q = quantize(x, "mxfp4", axis=1)
    assert q.axis == -2 and q.shape == x.shape
    assert q.qdata.shape == (6, 5, 32) and q.scale.shape == (6, 5, 2) and q.scale.dtype == torch.uint8
    assert q.global_scale is None
    n = quantize(x.transpose(1, 2).contiguous(), "nvfp4")
    assert n.scale.dtype == torch.float8_e4m3fn and n.scale.shape == (6, 5, 4)
    assert n.global_scale.dtype == torch.float32
    assert dequantize(q, torch.float32).shape == x.shape


# --- NVFP4 "vllm": independent float64 implementation -------------------------------------


def _r32(a) -> np.ndarray:
    """Round float64 values to fp32 (RNE) and hand them back as float64."""
    return np.asarray(a, np.float64).astype(np.float32).astype(np.float64)


def e2m1_rne_table(y: np.ndarray, zero_sign_lt0: bool = False) -> np.ndarray:
    """RNE to E2M1 by vLLM's threshold table, in float64, sign kept, NaN kept, saturating.

    zero_sign_lt0: a zero result is negative iff y < 0 (compressed-tensors' and
    ModelOpt's `sign(y) * R(|y|)` / `y < 0`), so -0.0 gives +0.0."""
    a = np.abs(y)
    q = np.select(
        [a <= 0.25, a < 0.75, a <= 1.25, a < 1.75, a <= 2.5, a < 3.5, a <= 5.0],
        [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0],
        6.0,
    )
    q = np.where(np.isnan(a), np.nan, q)
    if zero_sign_lt0:
        return np.where(q == 0, np.where(y < 0, -0.0, 0.0), np.copysign(q, y))
    return np.copysign(q, y)


def nvfp4_vllm_f64(x: torch.Tensor, gs: float | None = None) -> torch.Tensor:
    """numerics.md "NVFP4 reference arithmetic", Triton-kernel variant r = gs / s."""
    shape, dtype = x.shape, x.dtype
    xf = x.float().numpy().astype(np.float64).reshape(-1, 16)
    if gs is None:
        amax_t = np.max(np.abs(xf))
        # torch eager evaluates `2688.0 / amax` as amax.reciprocal() * 2688 (two fp32
        # roundings; vLLM's helpers and compressed-tensors write the same expression), not
        # as a correctly rounded division: amax 80 gives 33.600002, not 33.599998.
        with np.errstate(divide="ignore"):
            g = _r32(_r32(1.0 / amax_t) * 2688.0)
        if not (np.isfinite(g) and g > 0):
            g = np.float64(1.0)
    else:
        g = _r32(gs)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        vmax = np.max(np.abs(xf), axis=1, keepdims=True)  # exact; NaN propagates
        sixth = _r32(1.0 / 6.0)
        s = _r32(g * _r32(vmax * sixth))  # gs * (vmax * f32(1/6)), two fp32 roundings
        s = np.clip(s, -448.0, 448.0)
        s = s.astype(np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)  # RNE, in range
        r = np.where(s == 0, 0.0, _r32(g / np.where(s == 0, 1.0, s)))  # vLLM Triton: gs / s
        y = _r32(xf * r)
        y = np.clip(y, -6.0, 6.0)
        q = e2m1_rne_table(y)
        out = _r32(q * _r32(s / g)).astype(np.float32)  # dequant q * (s / gs)
    return torch.from_numpy(out.reshape(shape)).to(dtype)


def _e4m3_f64(s: np.ndarray) -> np.ndarray:
    """RNE to E4M3 through ml_dtypes, saturating at 448 (ml_dtypes would give NaN)."""
    with np.errstate(invalid="ignore"):
        s = np.clip(s, -448.0, 448.0)
    return s.astype(np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)


def _rcp_vllm(t: np.ndarray) -> np.ndarray:
    # vLLM get_reciprocal: 1 / (t + (t == 0) * 1e8)
    return _r32(1.0 / _r32(t + (t == 0) * 1e8))


def nvfp4_recipe_f64(x: torch.Tensor, recipe: str, gs: float | None = None) -> torch.Tensor:
    """The other NVFP4 recipes, written out from each library's formula (see
    emu_inductor/formats/nvfp4.py's table and formats_references.md §6, §8.2, §9.1, §10),
    in float64 with every fp32 rounding emulated."""
    shape, dtype = x.shape, x.dtype
    xf = x.float().numpy().astype(np.float64).reshape(-1, 16)
    quant_dir = recipe in ("vllm", "vllm_ref", "vllm_torch", "te", "compressed_tensors")
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if gs is None:
            amax_t = np.max(np.abs(xf))
            g = _r32(_r32(1.0 / amax_t) * 2688.0) if quant_dir else _r32(amax_t / 2688.0)
            if not (np.isfinite(g) and g > 0):
                g = np.float64(1.0)
        else:
            g = _r32(gs)
        a = np.max(np.abs(xf), axis=1, keepdims=True)
        sixth = _r32(1.0 / 6.0)
        if recipe in ("vllm_ref", "vllm_torch"):
            s = _e4m3_f64(_r32(g * _r32(a * sixth)))
            y = _r32(xf * _rcp_vllm(_r32(s * _rcp_vllm(np.full_like(s, g)))))
            deq = _r32(s / g)
        elif recipe == "te":
            s = _e4m3_f64(np.minimum(_r32(a * _r32(g * sixth)), 448.0))
            r = np.minimum(_r32(1.0 / _r32(s * _r32(1.0 / g))), float(np.finfo(np.float32).max))
            y = _r32(xf * r)
            deq = _r32(s * _r32(1.0 / g))
        elif recipe == "compressed_tensors":
            # amax_b / 6.0 runs in x's dtype (fp32 quotient rounded to that dtype by torch)
            a6 = torch.from_numpy(_r32(a / 6.0).astype(np.float32)).to(dtype).double().numpy()
            s = _e4m3_f64(_r32(g * a6))
            s = np.where(s == 0, 0.125, s)
            y = _r32(xf / _r32(s / g))
            deq = _r32(s / g)
        elif recipe == "modelopt":
            s = _r32(a / _r32(6.0 * g))
            s = _e4m3_f64(np.clip(np.where(s == 0, 1.0, s), 2.0**-9, 448.0))
            d = _r32(s * g)
            y = np.where((d == 0) & (xf == 0), np.inf, _r32(xf / d))
            deq = d
        elif recipe == "torchao":
            s = _e4m3_f64(np.clip(_r32(_r32(a / 6.0) / g), 2.0**-6, 448.0))
            y = _r32(xf * _r32(_r32(1.0 / g) / s))
            deq = _r32(g * s)
        else:
            raise AssertionError(recipe)
        q = e2m1_rne_table(np.clip(y, -6.0, 6.0),
                           zero_sign_lt0=recipe in ("compressed_tensors", "modelopt", "vllm_torch"))
        if recipe == "modelopt":
            q = q + 0.0  # ModelOpt's e2m1_values table decodes the -0 code as +0.0
        out = _r32(q * deq).astype(np.float32)
    return torch.from_numpy(out.reshape(shape)).to(dtype)


OTHER_RECIPES = ["vllm_ref", "vllm_torch", "te", "compressed_tensors", "modelopt", "torchao"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("recipe", OTHER_RECIPES)
def test_nvfp4_other_recipes_vs_float64(recipe, dtype):
    quant_dir = NVFP4_RECIPES[recipe].global_direction == "quantize"
    for seed in range(2):
        x = special_input(dtype, seed=seed)
        x[11] = x[11] * 1e-6
        got = fake_quantize(x, "nvfp4", recipe=recipe)
        assert_bits_equal(got, nvfp4_recipe_f64(x, recipe), f"{recipe} default g {seed}")
        xf = special_input(dtype, seed=seed + 10).float().nan_to_num(0.0, 0.0, 0.0).clamp(-1e4, 1e4).to(dtype)
        for amax in (80.0, 1000.0, 3.0):
            gs = 2688.0 / amax if quant_dir else amax / 2688.0
            got = fake_quantize(xf, "nvfp4", recipe=recipe, global_scale=torch.tensor(gs))
            assert_bits_equal(got, nvfp4_recipe_f64(xf, recipe, gs), f"{recipe} g={gs} seed={seed}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_nvfp4_vllm_vs_float64(dtype):
    for seed in range(3):
        x = special_input(dtype, seed=seed)
        x[11] = x[11] * 1e-6
        assert_bits_equal(fake_quantize(x, "nvfp4", recipe="vllm"), nvfp4_vllm_f64(x), f"default g {seed}")
        for gs in (1.0, 37.5, 448.0 * 6 / 1000.0, 1e-3):
            got = fake_quantize(x, "nvfp4", recipe="vllm", global_scale=torch.tensor(gs))
            assert_bits_equal(got, nvfp4_vllm_f64(x, gs), f"g={gs} seed={seed}")


def test_nvfp4_vllm_bf16_e4m3_midpoints():
    """bf16 data where 448*amax_b/amax often lands on an E4M3 midpoint
    (formats_references.md §11.3): the fp32 op order decides; compare with float64."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(512, 64, generator=g) * 20).to(torch.bfloat16)
    x[0, 0] = 80.0  # tensor amax 80 -> gs = 33.6
    x = x.clamp(-80, 80)
    assert_bits_equal(fake_quantize(x, "nvfp4"), nvfp4_vllm_f64(x), "amax 80")


def test_nvfp4_zero_and_tiny_blocks_per_recipe():
    # formats_references.md §11.3: with tensor amax 1000 the zero block's stored scale is
    # vLLM/TE 0x00, CT 0x20 (0.125), ModelOpt 0x38 (1.0), torchao 0x08 (2^-6); a 1e-3
    # block: vLLM 0x00, CT 0x20, torchao 0x08, all giving 0. ModelOpt 0.47 clamps the
    # block scale to [2^-9, 448] (0x01), so the 1e-3 block survives (as +-1.1e-3).
    x = torch.zeros(3, 16)
    x[0, 0] = 1000.0
    x[2, :] = 1e-3 * torch.tensor([1.0, -1.0] * 8)
    x[2, 5] = 0.0
    want_zero = {"vllm": 0x00, "vllm_ref": 0x00, "vllm_torch": 0x00, "te": 0x00, "compressed_tensors": 0x20,
                 "modelopt": 0x38, "torchao": 0x08, "torchao_moe": 0x08}
    want_tiny = {"vllm": 0x00, "vllm_ref": 0x00, "vllm_torch": 0x00, "te": 0x00, "compressed_tensors": 0x20,
                 "modelopt": 0x01, "torchao": 0x08, "torchao_moe": 0x08}
    for r in NVFP4_RECIPES:
        q = quantize(x, "nvfp4", recipe=r)
        b = q.scale.view(torch.uint8)[:, 0].tolist()
        assert b[1] == want_zero[r] and b[2] == want_tiny[r], (r, b)
        f = fake_quantize(x, "nvfp4", recipe=r)
        assert (f[1] == 0).all(), (r, f[1])
        assert (f[2] == 0).all() != (r == "modelopt"), (r, f[2])
        assert_bits_equal(f, dequantize(q, torch.float32), r)
    # (ModelOpt's divide-by-zero path, s * g == 0, now needs a global scale below 2^-140,
    # which quantize rejects: global scales must be fp32 normals.)


def test_nvfp4_nan_inf_blocks():
    x = torch.randn(4, 32)
    x[0, 3] = float("nan")
    x[1, 20] = float("inf")
    gs = torch.tensor(10.0)
    for r in NVFP4_RECIPES:
        f = fake_quantize(x, "nvfp4", recipe=r, global_scale=gs)
        assert torch.isnan(f[0, :16]).all() and not torch.isnan(f[0, 16:]).any(), r
        # an Inf block saturates in every recipe (the block scale clamps to 448)
        assert not torch.isnan(f[1, 16:]).any() and torch.isfinite(f[1]).all(), (r, f[1])


# --- MXFP4 FLOOR / EVEN: independent float64 implementation -------------------------------


def mxfp4_f64(x: torch.Tensor, mode: str) -> torch.Tensor:
    shape, dtype = x.shape, x.dtype
    xf = x.float().numpy().astype(np.float64).reshape(-1, 32)
    out = np.empty_like(xf)
    for i, blk in enumerate(xf):
        amax = float(np.max(np.abs(blk)))
        if math.isnan(amax) or math.isinf(amax):
            out[i] = np.nan
            continue
        if amax == 0.0:
            e = -127
        else:
            m, ex = math.frexp(amax)  # amax = m * 2^ex, m in [0.5, 1)
            fl = ex - 1
            if mode == "even" and math.floor(2 * m * 2 + 0.5) / 2 >= 2:  # mantissa to 1 bit, half up
                fl += 1
            e = max(-127, min(127, fl - 2))
        scale = math.ldexp(1.0, e)
        out[i] = e2m1_rne_table(np.clip(blk / scale, -6.0, 6.0)) * scale  # exact in float64
    with np.errstate(over="ignore"):  # EVEN can round fp32-max blocks past the fp32 range
        out32 = out.astype(np.float32)
    return torch.from_numpy(out32.reshape(shape)).to(dtype)


@pytest.mark.parametrize("mode", ["floor", "even"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_mxfp4_vs_float64(mode, dtype):
    for seed in range(2):
        x = special_input(dtype, seed=seed)
        assert_bits_equal(fake_quantize(x, "mxfp4", scale_mode=mode), mxfp4_f64(x, mode), f"{mode} {seed}")


# --- hypothesis ----------------------------------------------------------------------------

PROP = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def block_inputs(draw, block: int = 32):
    dtype = draw(st.sampled_from(DTYPES))
    rows = draw(st.integers(1, 3))
    nb = draw(st.integers(1, 3))
    elems = st.floats(width=32, allow_nan=True, allow_infinity=True)
    base = draw(hnp.arrays(np.float32, (rows, nb * block), elements=elems))
    # mix in "ordinary" scaled values so that most blocks are not dominated by extremes
    scale = draw(st.sampled_from([1e-30, 1e-6, 1.0, 300.0, 1e20]))
    if draw(st.booleans()):
        rng = np.random.default_rng(draw(st.integers(0, 2**31)))
        keep = rng.random(base.shape) < 0.8
        base = np.where(keep, (rng.standard_normal(base.shape) * scale).astype(np.float32), base)
    with np.errstate(over="ignore"):
        return torch.from_numpy(base).to(dtype)


@PROP
@given(x=block_inputs(), var=st.sampled_from(VARIANTS), axis=st.sampled_from([-1, 0]))
def test_prop_fake_equals_dequant_quant(x, var, axis):
    fmt, kw = var
    if axis == 0:
        x = x.t().contiguous()
    if x.shape[axis] % FORMATS[fmt].block_size:
        return
    f = fake_quantize(x, fmt, axis=axis, **kw)
    d = dequantize(quantize(x, fmt, axis=axis, **kw), x.dtype)
    assert_bits_equal(f, d, f"{fmt} {kw}")
    # sign preserved wherever the result is not NaN (zeros: only where the recipe keeps
    # signs; compressed-tensors and ModelOpt give +0.0 for -0.0, vLLM's torch QDQ takes a
    # zero's sign from y < 0, so a negative that underflows to -0.0 in y gives +0.0)
    ok = ~torch.isnan(f)
    if kw.get("recipe") in ("compressed_tensors", "modelopt", "vllm_torch"):
        ok &= f != 0
    assert torch.equal(torch.signbit(f[ok]), torch.signbit(x[ok]))
    if fmt != "nvfp4":
        # MX: a block's result is NaN exactly when the block holds NaN or Inf
        xb = x.movedim(axis, -1).reshape(-1, 32)
        fb = f.movedim(axis, -1).reshape(-1, 32)
        bad = ~torch.isfinite(xb).all(dim=1)
        assert torch.equal(torch.isnan(fb).all(dim=1), bad) and not torch.isnan(fb[~bad]).any()


@PROP
@given(x=block_inputs(), mode=st.sampled_from(["floor", "even"]))
def test_prop_mxfp4_vs_float64(x, mode):
    assert_bits_equal(fake_quantize(x, "mxfp4", scale_mode=mode), mxfp4_f64(x, mode), mode)


@PROP
@given(x=block_inputs(block=16), gs=st.one_of(st.none(), st.floats(float(np.float32(1e-3)), 1e4, width=32)))
def test_prop_nvfp4_vllm_vs_float64(x, gs):
    g = None if gs is None else torch.tensor(gs, dtype=torch.float32)
    assert_bits_equal(fake_quantize(x, "nvfp4", global_scale=g), nvfp4_vllm_f64(x, gs), f"gs={gs}")


@PROP
@given(x=block_inputs(block=16), recipe=st.sampled_from(OTHER_RECIPES), use_g=st.booleans())
def test_prop_nvfp4_other_recipes_vs_float64(x, recipe, use_g):
    gs = None
    if use_g:
        gs = 2688.0 / 50.0 if NVFP4_RECIPES[recipe].global_direction == "quantize" else 50.0 / 2688.0
    g = None if gs is None else torch.tensor(gs, dtype=torch.float32)
    got = fake_quantize(x, "nvfp4", recipe=recipe, global_scale=g)
    assert_bits_equal(got, nvfp4_recipe_f64(x, recipe, gs), f"{recipe} gs={gs}")


@PROP
@given(x=block_inputs(), var=st.sampled_from([v for v in VARIANTS if v[0] != "nvfp4"
                                              and v[1].get("scale_mode") != "floor_log2"]))
def test_prop_mx_bf16_result_is_fp32_result_rounded(x, var):
    """MX scales are powers of two and elements have at most 4 significant bits, so the
    result for bf16 input equals the fp32 computation on the same values, cast to bf16.
    Not for "floor_log2" (microxcaling): its log2 is rounded in the input dtype, so the
    scale itself depends on it (a bf16 amax just below 2^k takes exponent k)."""
    fmt, kw = var
    xb = x.to(torch.bfloat16)
    a = fake_quantize(xb, fmt, **kw)
    b = fake_quantize(xb.float(), fmt, **kw).to(torch.bfloat16)
    assert_bits_equal(a, b, f"{fmt} {kw}")


# --- torch.compile ---------------------------------------------------------------------------

COMPILE_CASES = [("mxfp4", {"scale_mode": "even"}), ("nvfp4", {"recipe": "vllm"}),
                 # library knobs: ties toward zero, le0 zeros, the float64 log2 of rceil_log2,
                 # Inf -> byte 254, the byte-0 multiplier 1.0, ModelOpt's clamp and zero reader
                 ("mxfp4", {"variant": "modelopt"}), ("mxfp8_e4m3", {"variant": "torchao_rceil"}),
                 ("nvfp4", {"recipe": "modelopt"})]
COMPILE_IDS = ["mxfp4-even", "nvfp4-vllm", "mxfp4-modelopt", "mxfp8-torchao_rceil", "nvfp4-modelopt"]


def _compile_inputs() -> list[torch.Tensor]:
    # special blocks (NaN/Inf make NVFP4's default global scale 1.0) and finite data
    # (amax 80 exercises the default global scale 2688/amax and E4M3 midpoints)
    g = torch.Generator().manual_seed(9)
    finite = (torch.randn(64, 64, generator=g) * 20).clamp(-80, 80)
    finite[0, 0] = 80.0
    return [special_input(torch.bfloat16, n=64, seed=7), finite.to(torch.bfloat16)]


@pytest.mark.parametrize("fmt,kw", COMPILE_CASES, ids=COMPILE_IDS)
def test_compile_eager_backend_fullgraph(fmt, kw):
    torch._dynamo.reset()
    fq = torch.compile(lambda t: fake_quantize(t, fmt, **kw), fullgraph=True, backend="eager")
    fq0 = torch.compile(lambda t: fake_quantize(t, fmt, axis=0, **kw), fullgraph=True, backend="eager")
    qf = torch.compile(lambda t: quantize(t, fmt, **kw), fullgraph=True, backend="eager")
    dq = torch.compile(lambda qq: dequantize(qq, torch.bfloat16), fullgraph=True, backend="eager")
    for x in _compile_inputs():
        assert_bits_equal(fq(x), fake_quantize(x, fmt, **kw), "fake_quantize")
        assert_bits_equal(fq0(x), fake_quantize(x, fmt, axis=0, **kw), "axis 0")
        # quantize / dequantize trace too (QuantizedTensor out and in)
        q, qe = qf(x), quantize(x, fmt, **kw)
        assert torch.equal(q.qdata, qe.qdata)
        assert torch.equal(q.scale.view(torch.uint8), qe.scale.view(torch.uint8))
        assert_bits_equal(dq(qe), dequantize(qe, torch.bfloat16), "dequantize")


@pytest.mark.parametrize("fmt,kw", COMPILE_CASES, ids=COMPILE_IDS)
def test_compile_inductor_cpu_bit_identical(fmt, kw):
    torch._dynamo.reset()
    with torch._inductor.config.patch(emulate_precision_casts=True):
        fn = torch.compile(lambda t: fake_quantize(t, fmt, **kw), fullgraph=True, backend="inductor")
        got = [fn(x) for x in _compile_inputs()]
    for x, y in zip(_compile_inputs(), got):
        assert_bits_equal(y, fake_quantize(x, fmt, **kw), f"inductor {fmt}")


def test_compile_inductor_cpu_nvfp4_global_scale_input():
    """A global scale passed in as a graph input (the value check is eager-only)."""
    torch._dynamo.reset()
    x = _compile_inputs()[1]
    with torch._inductor.config.patch(emulate_precision_casts=True):
        fn = torch.compile(lambda t, g: fake_quantize(t, "nvfp4", global_scale=g), fullgraph=True)
        for gs in (33.6, 1.0):
            g = torch.tensor(gs, dtype=torch.float32)
            assert_bits_equal(fn(x, g), fake_quantize(x, "nvfp4", global_scale=g), f"g={gs}")
