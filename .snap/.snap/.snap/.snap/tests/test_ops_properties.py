"""Property-based tests: each fused op (generated Triton kernels under the interpreter)
against the eager reference on random inputs drawn by hypothesis: shapes with 0 and 1
tokens, experts with no tokens, every block-size multiple in a small range, expert maps
with non-local experts, activation global scales across the whole exponent range, rows
spanning the exponent range, and zero / NaN / Inf rows and blocks.

Properties (tests/helpers.py and tests/test_kernels_moe.py's oracle, NaN-aware):
  - A1 (the kernel's fake-quantized GEMM1 input) equals the reference QDQ bit for bit
    (NaN where the reference has NaN; +-0 compared as values: the kernels' element
    rounder gives +0.0 where formats keeps -0.0, see tests/test_kernels_recipes.py);
  - A2 equals the reference QDQ of the kernel's own C2, the same way;
  - outputs: NaN at the reference's NaN positions, the rest within the fp32-accumulation
    tolerance of the existing oracle.

Profiles (HYPOTHESIS_PROFILE): "ci" (default) a bounded, derandomized example count so
CI is reproducible and fast; "dev" many more random examples for local runs.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emu_inductor.ops.reference_impl import grouped_mm_reference, linear_reference
from emu_inductor.ops.triton_impl import grouped_mm_triton, linear_triton, moe_triton
from emu_inductor.reference import moe_emulated
from emu_inductor.reference.activations import is_gated
from emu_inductor.reference.modules import QuantizedExperts, quantize_weight
from emu_inductor.reference.qdq import act_fake_quantize
from emu_inductor.spec import OpSpec
from emu_inductor.spec.schemes import SCHEMES

settings.register_profile("ci", max_examples=20, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=300, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# one scheme per activation kind / element family (NVFP4 global scale, MX E8M0, fp8
# per-tensor, weight-only, 6-bit): the matrix of every scheme is tests/test_kernels_moe.py
MOE_SCHEMES = ["nvfp4_w4a4", "w_mxfp4_a_mxfp4", "w_mxfp4_a_fp8", "nvfp4_w4a16", "w_mxfp6_e3m2_a_mxfp6_e3m2"]
GEMM_SCHEMES = MOE_SCHEMES + ["w_mxfp8_e4m3_a_mxfp8_e4m3"]
ACTIVATIONS = ["silu", "swigluoai", "relu2_no_mul"]
BLOCK = 32  # a multiple of every format's block size (16, 32)


def _has_global(scheme) -> bool:
    act = SCHEMES[scheme].act
    return act is not None and act.kind == "block" and act.fmt.has_global_scale


def _is_fp8(scheme) -> bool:
    act = SCHEMES[scheme].act
    return act is not None and act.kind == "fp8_tensor"


@functools.lru_cache(maxsize=None)
def _experts(scheme, activation, E, H, I):
    g = torch.Generator().manual_seed(E * 1000 + H + I)
    n1 = 2 * I if is_gated(activation) else I
    w13 = (torch.randn(E, n1, H, generator=g) * 0.2).bfloat16()
    w2 = (torch.randn(E, H, I, generator=g) * 0.2).bfloat16()
    kw = {}
    if _has_global(scheme):  # set below per example; these only satisfy the constructor
        kw = dict(a1_global_scale=torch.tensor(1.0), a2_global_scale=torch.tensor(1.0))
    return QuantizedExperts.from_float(w13, w2, scheme=scheme, activation=activation, **kw)


# --- strategies ------------------------------------------------------------------------------


@st.composite
def activations(draw, T, H, dtype=torch.bfloat16):
    """[T, H]: each row a random magnitude 2^e (e over most of bf16's range), some rows or
    blocks zero, some elements NaN / +-Inf."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    for t in range(T):
        kind = draw(st.sampled_from(["plain", "plain", "scaled", "zero_row", "zero_block", "nan", "inf"]))
        if kind == "scaled":
            x[t] *= 2.0 ** draw(st.integers(-60, 60))
        elif kind == "zero_row":
            x[t] = 0.0
        elif kind == "zero_block":
            b = draw(st.integers(0, H // 16 - 1))
            x[t, b * 16:(b + 1) * 16] = 0.0
        elif kind in ("nan", "inf"):
            j = draw(st.integers(0, H - 1))
            x[t, j] = float("nan") if kind == "nan" else draw(st.sampled_from([float("inf"), float("-inf")]))
    return x.to(dtype)


def global_scales():
    """Quantize-direction NVFP4 global scales over the exponent range fp32 accepts
    (2688/amax for amax from ~2^-100 to ~2^100 and beyond)."""
    return st.builds(lambda e, m: float(m * 2.0 ** e), st.integers(-100, 100), st.floats(1.0, 1.99))


# --- comparisons -----------------------------------------------------------------------------


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical except +-0 (compared as values); NaN exactly where the other is NaN."""
    na, nb = torch.isnan(a), torch.isnan(b)
    if not torch.equal(na, nb):
        return False
    return torch.equal(torch.where(na, 0.0, a), torch.where(nb, 0.0, b))


def _close_nan_aware(out: torch.Tensor, ref: torch.Tensor):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    o, r = out.float(), ref.float()
    assert torch.equal(torch.isnan(o), torch.isnan(r)), "NaN positions differ from the reference"
    fin = torch.isfinite(r)
    scale = max(1.0, r[fin].abs().max().item()) if fin.any() else 1.0
    torch.testing.assert_close(o, r, rtol=2e-2, atol=2e-2 * scale, equal_nan=True)


# --- mxemu::moe ------------------------------------------------------------------------------


@PROFILE
@given(data=st.data())
def test_moe_matches_reference(data):
    scheme = data.draw(st.sampled_from(MOE_SCHEMES), label="scheme")
    activation = data.draw(st.sampled_from(ACTIVATIONS), label="activation")
    E = data.draw(st.integers(1, 3), label="E")
    H = BLOCK * data.draw(st.integers(1, 3), label="H/32")
    I = BLOCK * data.draw(st.integers(1, 2), label="I/32")
    T = data.draw(st.sampled_from([0, 1, 1, 2, 3, 5, 8]), label="T")
    rw_in = data.draw(st.booleans(), label="router weight on input")
    k = 1 if rw_in else data.draw(st.integers(1, 2), label="top_k")
    use_map = data.draw(st.booleans(), label="expert_map")
    n_global = E + (data.draw(st.integers(0, 2), label="non-local experts") if use_map else 0)
    ids = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, n_global - 1), min_size=k, max_size=k),
                                          min_size=T, max_size=T), label="ids"), dtype=torch.int32).reshape(T, k)
    emap = None
    if use_map:  # a random placement of the E local experts among n_global, -1 elsewhere
        perm = data.draw(st.permutations(list(range(n_global))), label="placement")
        emap = torch.full((n_global,), -1, dtype=torch.int32)
        for local, glob in enumerate(perm[:E]):
            emap[glob] = local
    x = data.draw(activations(T, H), label="x")
    tw = torch.softmax(torch.randn(T, k, generator=torch.Generator().manual_seed(T * 7 + k)), -1)
    qe = _experts(scheme, activation, E, H, I)
    a1 = a2 = None
    if _has_global(scheme):
        a1 = torch.tensor(data.draw(global_scales(), label="a1_global_scale"))
        a2 = torch.tensor(data.draw(global_scales(), label="a2_global_scale"))
    elif _is_fp8(scheme) and data.draw(st.booleans(), label="static fp8 scales"):
        a1 = torch.tensor(2.0 ** data.draw(st.integers(-20, 20), label="log2 a1 scale"))
        a2 = torch.tensor(2.0 ** data.draw(st.integers(-20, 20), label="log2 a2 scale"))
    spec = OpSpec.from_scheme(scheme, activation=activation, router_weight_on_input=rw_in)
    res = moe_triton(x, qe.w13, qe.w13_scale, qe.w13_alpha, qe.w2, qe.w2_scale, qe.w2_alpha, tw, ids, a1, a2,
                     emap, spec, debug=True, reduction="deterministic")
    ref = moe_emulated(x, qe.w13, qe.w2, tw, ids, scheme=scheme, w13_scale=qe.w13_scale, w2_scale=qe.w2_scale,
                       w13_alpha=qe.w13_alpha, w2_alpha=qe.w2_alpha, a1_global_scale=a1, a2_global_scale=a2,
                       activation=activation, apply_router_weight_on_input=rw_in, expert_map=emap,
                       gemm_style="bmm")
    _close_nan_aware(res["out"], ref)
    if T == 0:
        return
    sch = SCHEMES[scheme]
    valid = res["valid"]
    x_rows = x.repeat_interleave(k, dim=0)
    if rw_in:
        x_rows = x_rows * tw.reshape(-1).to(x.dtype).unsqueeze(-1)
    if sch.act is not None and sch.act.kind == "block":
        a1_ref = act_fake_quantize(x_rows, sch.act, a1).float()
        assert _same_values(res["a1"][valid], a1_ref[valid]), "A1 differs from the reference QDQ"
    if res["a2"] is not None and sch.act is not None and valid.any():
        c2k = res["c2"][valid].to(x.dtype)
        a2_ref = act_fake_quantize(c2k, sch.act, a2).float()
        assert _same_values(res["a2"][valid], a2_ref), "A2 differs from the reference QDQ of the kernel's C2"


# --- mxemu::linear and mxemu::grouped_mm ------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _weights(scheme, lead, N, K):
    g = torch.Generator().manual_seed(N * 100 + K + len(lead))
    w = (torch.randn(*lead, N, K, generator=g) * 0.3).bfloat16()
    return quantize_weight(w, SCHEMES[scheme].weight_fmt)


def _act_scale(data, scheme):
    if _has_global(scheme):
        return torch.tensor([data.draw(global_scales(), label="global scale")])
    if _is_fp8(scheme) and data.draw(st.booleans(), label="static fp8 scale"):
        return torch.tensor([2.0 ** data.draw(st.integers(-20, 20), label="log2 fp8 scale")])
    return None


@PROFILE
@given(data=st.data())
def test_linear_matches_reference(data):
    scheme = data.draw(st.sampled_from(GEMM_SCHEMES), label="scheme")
    K = BLOCK * data.draw(st.integers(1, 3), label="K/32")
    N = data.draw(st.sampled_from([16, 32, 48]), label="N")
    M = data.draw(st.sampled_from([0, 1, 2, 5]), label="rows")
    q, s, alpha = _weights(scheme, (), N, K)
    x = data.draw(activations(M, K), label="x")
    gs = _act_scale(data, scheme)
    bias = None
    if data.draw(st.booleans(), label="bias"):
        bias = torch.randn(N, generator=torch.Generator().manual_seed(N)).bfloat16()
    spec = OpSpec.from_scheme(scheme)
    out = linear_triton(x, q, s, alpha, gs, bias, spec)
    ref = linear_reference(x, q, s, alpha, gs, bias, spec)
    _close_nan_aware(out, ref)


@PROFILE
@given(data=st.data())
def test_grouped_mm_matches_reference(data):
    scheme = data.draw(st.sampled_from(GEMM_SCHEMES), label="scheme")
    E = data.draw(st.integers(1, 3), label="E")
    K = BLOCK * data.draw(st.integers(1, 3), label="K/32")
    N = data.draw(st.sampled_from([16, 32]), label="N")
    R = data.draw(st.sampled_from([0, 1, 3, 6]), label="rows")
    ends = sorted(data.draw(st.lists(st.integers(0, R), min_size=E, max_size=E), label="group ends"))
    offs = torch.tensor(ends, dtype=torch.int32)  # empty groups and rows past the last end included
    q, s, alpha = _weights(scheme, (E,), N, K)
    a = data.draw(activations(R, K), label="a")
    gs = _act_scale(data, scheme)
    spec = OpSpec.from_scheme(scheme)
    out = grouped_mm_triton(a, q, s, alpha, offs, gs, spec)
    ref = grouped_mm_reference(a, q, s, alpha, offs, gs, spec)
    _close_nan_aware(out, ref)
    assert torch.equal(out[ends[-1]:], torch.zeros_like(out[ends[-1]:])), "rows past offs[-1] are not zero"


def test_linear_empty_input_dynamic_fp8():
    """Found by test_linear_matches_reference (rows=0, dynamic fp8 scale): the reference's
    per-tensor fp8 QDQ took the amax of an empty tensor and raised; kept as an example."""
    q, s, alpha = _weights("w_mxfp4_a_fp8", (), 16, 32)
    x = torch.zeros(0, 32, dtype=torch.bfloat16)
    spec = OpSpec.from_scheme("w_mxfp4_a_fp8")
    out = linear_triton(x, q, s, alpha, None, None, spec)
    assert torch.equal(out, linear_reference(x, q, s, alpha, None, None, spec))
    assert out.shape == (0, 16)


def test_profiles_are_bounded():
    ci = settings.get_profile("ci")
    assert ci.max_examples <= 25 and ci.derandomize and ci.deadline is None
    assert settings.get_profile("dev").max_examples > ci.max_examples


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
