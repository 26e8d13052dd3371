"""Pattern layer (issue 4): user-code styles compiled with backend="mxemu" fuse into
torch.ops.mxemu.{linear, grouped_mm, moe}, bit-faithful to eager; near misses stay.

Every count-asserting compile runs under fresh_cache() (an FX-cache hit skips passes).
"""

from __future__ import annotations

import re

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache, run_and_get_code
from torch.testing import FileCheck

from emu_inductor.formats import FORMATS, e8m0_decode
from emu_inductor.passes import recorder
from emu_inductor.patterns.act_qdq import vllm_ref_nvfp4_quant_dequant
from emu_inductor.patterns.dequant import E2M1_LUT, vllm_dequantize_to_dtype
from emu_inductor.reference import QuantizedExperts, QuantizedLinear, get_scheme
from emu_inductor.reference.qdq import act_fake_quantize, dequantize_weight

E, H, I, T, K = 4, 64, 32, 8, 2


def _compile_run(model, *args, dynamic=None):
    torch._dynamo.reset()
    counters.clear()
    recorder.RECORDS.clear()
    global _last_compiled
    _last_compiled = torch.compile(model, backend="mxemu", dynamic=dynamic)
    with fresh_cache(), torch.no_grad():
        out, code = run_and_get_code(_last_compiled, *args)
    return out, "\n".join(code)


_last_compiled = None


def _eager(model, *args):
    with torch.no_grad():
        return model(*args)


def _assert_close(out, ref):
    # the fused ops run the reference numerics: expect (near) bit equality
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)
    assert (out.float() - ref.float()).abs().max().item() == 0.0


def _reasons():
    return [r["reason"] for r in recorder.RECORDS if not r["fused"]]


# --- dense linear (the one-expert case), canonical style -----------------------------------------

LINEAR_SCHEMES = [
    "nvfp4_w4a4", "nvfp4_w4a16", "w_mxfp4_a_mxfp4", "w_mxfp4", "w_mxfp4_a_mxfp6_e2m3",
    "w_mxfp6_e3m2_a_mxfp6_e3m2", "w_mxfp8_e4m3_a_mxfp8_e4m3", "w_mxfp4_a_fp8",
    # arithmetic variants: the other NVFP4 reciprocal, MX FLOOR / RCEIL scales
    ("nvfp4_w4a4", {"recipe": "vllm_ref"}), ("w_mxfp4_a_mxfp4", {"scale_mode": "floor"}),
    ("w_mxfp4_a_mxfp4", {"scale_mode": "rceil"}),
]


def _scheme(s):
    if isinstance(s, tuple):
        return get_scheme(s[0]).with_act(**s[1])
    return get_scheme(s)


@pytest.mark.parametrize("scheme", LINEAR_SCHEMES, ids=lambda s: s if isinstance(s, str) else f"{s[0]}-{list(s[1].values())[0]}")
def test_linear_canonical(scheme):
    torch.manual_seed(0)
    sch = _scheme(scheme)
    m = QuantizedLinear.from_float(torch.randn(48, 128).bfloat16(), scheme=sch,
                                   input_global_scale=torch.tensor(2688.0 / 4.0))
    x = torch.randn(T, 128).bfloat16()
    out, code = _compile_run(m, x)
    assert counters["mxemu"]["linear"] == 1, dict(counters["mxemu"])
    fired = [k for k in counters["mxemu_patterns"] if k.startswith("linear.")]
    if sch.act is not None:  # the activation QDQ went inside the fused op (static fp8 scale too)
        assert len(fired) == 1 and not fired[0].endswith("a16"), fired
    FileCheck().check("torch.ops.mxemu.linear").check_not("extern_kernels.mm").run(code)
    spec = re.search(r'\{"act_fmt".*?\}', code).group(0)
    a = sch.act
    if a is not None and a.recipe:
        assert f'"act_recipe":"{a.recipe}"' in spec
    if a is not None and a.scale_mode:
        assert f'"act_scale_mode":"{a.scale_mode}"' in spec
    _assert_close(out, _eager(m, x))
    x2 = torch.randn(T, 128).bfloat16()  # fresh inputs through the same compiled model
    with torch.no_grad():
        _assert_close(_last_compiled(x2), _eager(m, x2))


def test_linear_bias_fp16_fp32():
    torch.manual_seed(1)
    for dt in (torch.float16, torch.float32):
        m = QuantizedLinear.from_float(torch.randn(32, 64).bfloat16(), scheme="w_mxfp4_a_mxfp4",
                                       bias=torch.randn(32).to(dt)).to(dt)
        x = torch.randn(5, 64).to(dt)
        out, code = _compile_run(m, x)
        assert counters["mxemu"]["linear"] == 1, (dt, dict(counters["mxemu"]))
        _assert_close(out, _eager(m, x))


ND_SCHEMES = ["nvfp4_w4a4", "w_mxfp4_a_mxfp4", "w_mxfp4_a_fp8", "w_mxfp6_e3m2_a_mxfp6_e3m2",
              ("nvfp4_w4a4", {"recipe": "vllm_ref"})]


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("scheme", ND_SCHEMES, ids=lambda s: s if isinstance(s, str) else f"{s[0]}-{list(s[1].values())[0]}")
def test_linear_nd_activation_fuses_with_its_qdq(scheme, bias):
    """[B, S, K] activations (what transformers hands a linear): F.linear flattens the
    QDQ'd tensor to [B*S, K] before mm; the activation QDQ still goes inside the fused op."""
    torch.manual_seed(2)
    m = QuantizedLinear.from_float(torch.randn(48, 128).bfloat16(), scheme=_scheme(scheme),
                                   input_global_scale=torch.tensor(2688.0 / 4.0),
                                   bias=torch.randn(48).bfloat16() if bias else None)
    x = torch.randn(2, 3, 128).bfloat16()
    out, code = _compile_run(m, x)
    assert counters["mxemu"]["linear"] == 1, dict(counters["mxemu"])
    fired = [k for k in counters["mxemu_patterns"] if k.startswith("linear.")]
    assert len(fired) == 1 and fired[0].endswith("_nd_bias" if bias else "_nd"), fired
    FileCheck().check("torch.ops.mxemu.linear").check_not("extern_kernels.mm").run(code)
    assert out.shape == (2, 3, 48)
    _assert_close(out, _eager(m, x))
    x2 = torch.randn(2, 3, 128).bfloat16() * 3  # fresh inputs through the same compiled model
    with torch.no_grad():
        _assert_close(_last_compiled(x2), _eager(m, x2))


class RegroupingLinear(torch.nn.Module):
    """Near miss of the N-d form: the QDQ runs along a last dim of 32, then a view merges
    pairs of rows into K = 64 (not the [prod(lead), K] flatten the fused op assumes)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        a = act_fake_quantize(x, self.inner.scheme.act, self.inner.input_global_scale)
        w = dequantize_weight(self.inner.weight, self.inner.weight_scale, self.inner.scheme.weight_fmt,
                              alpha=self.inner.alpha, dtype=x.dtype)
        return torch.nn.functional.linear(a.reshape(-1, 64), w)


def test_linear_nd_regrouping_view_keeps_its_qdq_outside():
    torch.manual_seed(3)
    inner = QuantizedLinear.from_float(torch.randn(16, 64).bfloat16(), scheme="nvfp4_w4a4",
                                       input_global_scale=torch.tensor(2688.0 / 4.0))
    m = RegroupingLinear(inner)
    x = torch.randn(2, 4, 32).bfloat16()
    out, _ = _compile_run(m, x)
    fired = [k for k in counters["mxemu_patterns"] if k.startswith("linear.")]
    assert not any("_nd" in k for k in fired), fired  # at most the weight-only dequant-GEMM
    assert any("not [prod(leading dims), K]" in r or "expected >= 3-d" in r for r in _reasons()), _reasons()
    _assert_close(out, _eager(m, x))


# --- whole MoE layer, canonical style (moe_emulated, gemm_style="grouped_mm") ----------------------

MOE_SCHEMES = ["nvfp4_w4a4", "w_mxfp4_a_mxfp4", "w_mxfp4", "nvfp4_w4a16", "w_mxfp6_e2m3_a_mxfp6_e2m3",
               "w_mxfp8_e4m3", ("nvfp4_w4a4", {"recipe": "vllm_ref"})]


def _experts(scheme, **kw):
    torch.manual_seed(0)
    sch = _scheme(scheme)
    if sch.act is not None and sch.act.fmt is not None and sch.act.fmt.has_global_scale:
        # NVFP4 activation global scales given: without them the first compiled call
        # would be the calibrating graph (reference/modules.py), not the one under test
        kw.setdefault("a1_global_scale", torch.tensor(1.0))
        kw.setdefault("a2_global_scale", torch.tensor(1.0))
    return QuantizedExperts.from_float((torch.randn(E, 2 * I, H) / 8).bfloat16(),
                                       (torch.randn(E, H, I) / 6).bfloat16(), scheme=sch, **kw)


def _route(t, seed=0, k=K):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, H, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(t)]).to(torch.int32)
    w = torch.rand(t, k, generator=g)
    return x, w / w.sum(-1, keepdim=True), ids


@pytest.mark.parametrize("scheme", MOE_SCHEMES, ids=lambda s: s if isinstance(s, str) else f"{s[0]}-{list(s[1].values())[0]}")
def test_moe_canonical(scheme):
    m = _experts(scheme)
    args = _route(T)
    out, code = _compile_run(m, *args)
    c = counters["mxemu"]
    assert c["grouped_mm"] == 2 and c["moe"] == 1, dict(c)
    assert code.count("torch.ops.mxemu.moe.default(") == 1
    FileCheck().check("torch.ops.mxemu.moe").run(code)
    FileCheck().check_not("torch.ops.mxemu.grouped_mm").run(code)
    FileCheck().check_not("_grouped_mm(").check_not("extern_kernels.bmm").run(code)
    _assert_close(out, _eager(m, *args))
    fresh = _route(T, seed=7)
    with torch.no_grad():
        _assert_close(_last_compiled(*fresh), _eager(m, *fresh))


@pytest.mark.parametrize("static_a2", [False, True], ids=["a2_dynamic", "a2_static"])
def test_moe_fp8_static_input_scale(static_a2):
    """vLLM's w_mxfp4_a_fp8: GEMM1's per-tensor fp8 QDQ uses the checkpoint's static
    input_scale, GEMM2's a dynamic one (spec, bug B3); both static is the other option.
    The whole layer is one mxemu::moe with the static scale passed through."""
    m = _experts("w_mxfp4_a_fp8")
    m.a1_global_scale = torch.tensor(0.011)
    if static_a2:
        m.a2_global_scale = torch.tensor(0.004)
    args = _route(T)
    out, code = _compile_run(m, *args)
    c = counters["mxemu"]
    assert c["grouped_mm"] == 2 and c["moe"] == 1, dict(c)
    fired = [k for k in counters["mxemu_patterns"] if k.startswith("grouped_mm.")]
    assert not any(k.endswith("a16") for k in fired), fired  # the QDQ went inside, not left to Inductor
    FileCheck().check("torch.ops.mxemu.moe").check_not("_grouped_mm(").run(code)
    _assert_close(out, _eager(m, *args))
    fresh = _route(T, seed=7)
    with torch.no_grad():
        _assert_close(_last_compiled(*fresh), _eager(m, *fresh))


def test_moe_activation_expert_map_variants():
    for act, emap in (("gelu", None), ("swigluoai", None), ("silu_no_mul", None),
                      ("silu", torch.tensor([0, -1, 1, 2, 3, -1], dtype=torch.int32))):
        torch.manual_seed(0)
        n1 = I if act.endswith("no_mul") else 2 * I
        m = QuantizedExperts.from_float((torch.randn(E, n1, H) / 8).bfloat16(), (torch.randn(E, H, I) / 6).bfloat16(),
                                        scheme="w_mxfp4_a_mxfp4", activation=act, expert_map=emap)
        x, w, ids = _route(T)
        if emap is not None:
            ids = torch.randint(0, 6, (T, K), dtype=torch.int32)
        out, code = _compile_run(m, x, w, ids)
        assert counters["mxemu"]["moe"] == 1, (act, dict(counters["mxemu"]))
        _assert_close(out, _eager(m, x, w, ids))


def test_moe_dynamic_tokens_no_recompile():
    m = _experts("nvfp4_w4a4")
    x, w, ids = _route(T)
    for t_ in (x, w, ids):
        torch._dynamo.mark_dynamic(t_, 0)
    torch._dynamo.reset()
    counters.clear()
    with fresh_cache(), torch.no_grad():
        cm = torch.compile(m, backend="mxemu")
        out, code = run_and_get_code(cm, x, w, ids)
        assert counters["mxemu"]["moe"] == 1, dict(counters["mxemu"])
        _assert_close(out, _eager(m, x, w, ids))
        runs = counters["mxemu"]["pass_runs"]
        for t in (3, 13):
            args = _route(t, seed=t)
            _assert_close(cm(*args), _eager(m, *args))
        assert counters["mxemu"]["pass_runs"] == runs, "recompiled for a new token count"
    assert "torch.ops.mxemu.moe" in "\n".join(code)


def test_moe_snapshot_post_pass_graph():
    """The rewritten post-grad graph of the canonical NVFP4 MoE: one op, routing gone."""
    from expecttest import assert_expected_inline
    from torch._inductor import config

    from emu_inductor.passes import MxemuPass

    m = _experts("nvfp4_w4a4")
    args = _route(T)
    seen = []
    p = MxemuPass()

    def pre(g):
        p(g)
        seen.append(g)

    torch._dynamo.reset()
    with fresh_cache(), config.patch(post_grad_custom_pre_pass=pre), torch.no_grad():
        torch.compile(m, backend="inductor")(*args)
    g = seen[0]
    lines = []
    for n in g.nodes:
        if n.op == "call_function":
            a = ", ".join(x.name if isinstance(x, torch.fx.Node) else ("<spec>" if isinstance(x, str) else repr(x))
                          for x in n.args)
            lines.append(f"{n.name} = {n.target}({a})")
        elif n.op == "output":
            lines.append(f"return {n.args[0]}")
    assert_expected_inline("\n".join(lines), """\
moe_default = mxemu.moe.default(arg8_1, arg0_1, arg2_1, arg4_1, arg1_1, arg3_1, arg5_1, arg9_1, arg10_1, arg6_1, arg7_1, None, <spec>)
return (moe_default,)""")
    spec = next(n for n in g.nodes if n.op == "call_function").args[-1]
    assert '"act_recipe":"vllm"' in spec and '"weight_fmt":"nvfp4"' in spec


# --- partial matches, other styles --------------------------------------------------------------


class SingleGroupedGemm(torch.nn.Module):
    """One grouped GEMM over expert-sorted rows (user code, not a whole MoE)."""

    def __init__(self, experts):
        super().__init__()
        self.e = experts

    def forward(self, a, offs):
        e = self.e
        W = dequantize_weight(e.w13, e.w13_scale, e.scheme.weight_fmt, alpha=e.w13_alpha, dtype=a.dtype)
        aq = act_fake_quantize(a, e.scheme.act, e.a1_global_scale)
        return torch._grouped_mm(aq, W.transpose(-2, -1), offs=offs)


def test_single_grouped_gemm_partial():
    # reads the experts' buffers directly (no forward to calibrate them): give the scale
    m = SingleGroupedGemm(_experts("nvfp4_w4a4", a1_global_scale=torch.tensor(2688.0 / 4.0),
                                   a2_global_scale=torch.tensor(2688.0 / 8.0)))
    a = torch.randn(12, H).bfloat16()
    offs = torch.tensor([3, 5, 9, 12], dtype=torch.int32)
    out, code = _compile_run(m, a, offs)
    assert counters["mxemu"]["grouped_mm"] == 1 and counters["mxemu"]["moe"] == 0, dict(counters["mxemu"])
    FileCheck().check("torch.ops.mxemu.grouped_mm").check_not("_grouped_mm(").run(code)
    _assert_close(out, _eager(m, a, offs))


class VllmStyleLinear(torch.nn.Module):
    """vLLM's NVFP4 emulation: dequantize_to_dtype (LUT nibble unpack, scales viewed as
    float8 and multiplied) + either the torch-reference QDQ or none."""

    def __init__(self, ql, qdq, lut_buffer=False):
        super().__init__()
        self.ql = ql
        self.qdq = qdq
        self.lut_buffer = lut_buffer
        self.register_buffer("lut", torch.tensor(E2M1_LUT, dtype=torch.float32))

    def forward(self, x):
        q = self.ql
        # a LUT built in the code is a graph constant (its values are checked); a buffer
        # or module-global LUT is a graph input whose values the pass cannot see
        lut = self.lut if self.lut_buffer else torch.tensor(E2M1_LUT, dtype=torch.float32)
        w = vllm_dequantize_to_dtype(q.weight, q.weight_scale.view(torch.uint8), q.alpha, lut, x.dtype)
        if self.qdq:
            x = vllm_ref_nvfp4_quant_dequant(x, q.input_global_scale)
        return x @ w.t()


@pytest.mark.parametrize("qdq", [False, True], ids=["w4a16", "w4a4_vllm_torch_qdq"])
def test_vllm_lut_style_linear(qdq):
    torch.manual_seed(0)
    ql = QuantizedLinear.from_float(torch.randn(32, 64).bfloat16(), scheme="nvfp4_w4a4",
                                    input_global_scale=torch.tensor(2688.0 / 4.0))
    m = VllmStyleLinear(ql, qdq)
    x = torch.randn(T, 64).bfloat16()
    out, code = _compile_run(m, x)
    assert counters["mxemu"]["linear"] == 1, (dict(counters["mxemu"]), _reasons())
    FileCheck().check("torch.ops.mxemu.linear").check_not("extern_kernels.mm").run(code)
    _assert_close(out, _eager(m, x))


def test_vllm_lut_buffer_fuses_with_a_runtime_guard():
    """A LUT held in a buffer is a graph input: its values are unknown at compile time, so
    the fusion is guarded by a run-time assert that the table is the E2M1 table."""
    torch.manual_seed(0)
    ql = QuantizedLinear.from_float(torch.randn(32, 64).bfloat16(), scheme="nvfp4_w4a16")
    m = VllmStyleLinear(ql, False, lut_buffer=True)
    x = torch.randn(T, 64).bfloat16()
    out, code = _compile_run(m, x)
    assert counters["mxemu"]["linear"] == 1
    assert counters["mxemu_patterns"]["linear.runtime_tensor_guard"] == 1
    assert torch.equal(out, _eager(m, x))


# --- near misses stay as written (with a reason for explain()) ----------------------------------------


class BitsLinear(torch.nn.Module):
    """MX weight-only linear written out by hand, with knobs for near misses."""

    def __init__(self, w, s, *, mask=0x0F, second_user=False):
        super().__init__()
        self.register_buffer("w", w)
        self.register_buffer("s", s)
        self.mask, self.second_user = mask, second_user

    def forward(self, x):
        from emu_inductor.formats import decode

        lo, hi = self.w & self.mask, self.w >> 4
        codes = torch.stack([lo, hi], -1).reshape(self.w.shape[0], -1)
        v = decode(codes, FORMATS["mxfp4"].element)
        vb = v.reshape(v.shape[0], v.shape[1] // 32, 32)
        W = (vb * e8m0_decode(self.s).unsqueeze(-1)).reshape(v.shape).to(x.dtype)
        y = torch.nn.functional.linear(x, W)
        return (y, W.sum()) if self.second_user else y


def _mx_weight(n=32, k=64):
    from emu_inductor.formats import quantize

    q = quantize(torch.randn(n, k), "mxfp4")
    return q.qdata, q.scale


def test_hand_written_mx_linear_matches_and_near_misses_do_not():
    w, s = _mx_weight()
    x = torch.randn(T, 64).bfloat16()
    cases = {
        "exact": (BitsLinear(w, s), 1, None),
        "wrong nibble mask": (BitsLinear(w, s, mask=0x07), 0, None),
        "second user of W": (BitsLinear(w, s, second_user=True), 0, None),
        "float16 scales": (BitsLinear(w, s.to(torch.float16)), 0, "scales are torch.float16, expected torch.uint8"),
    }
    for name, (m, n_fused, reason) in cases.items():
        out, code = _compile_run(m, x)
        assert counters["mxemu"]["linear"] == n_fused, (name, dict(counters["mxemu"]))
        if n_fused:
            FileCheck().check("torch.ops.mxemu.linear").run(code)
        else:
            FileCheck().check_not("torch.ops.mxemu").run(code)
        if reason:
            assert reason in _reasons(), (name, _reasons())
        ref = _eager(m, x)
        _assert_close(out[0] if isinstance(out, tuple) else out, ref[0] if isinstance(ref, tuple) else ref)


def test_block_size_24_not_fused():
    import dataclasses

    fmt24 = dataclasses.replace(FORMATS["nvfp4"], block_size=24)
    torch.manual_seed(0)
    n, k = 16, 96
    w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    s = (torch.rand(n, k // 24) + 0.5).to(torch.float8_e4m3fn)
    alpha = torch.tensor(0.01)

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.linear(x, dequantize_weight(w, s, fmt24, alpha=alpha, dtype=x.dtype))

    x = torch.randn(T, k).bfloat16()
    out, code = _compile_run(M(), x)
    assert counters["mxemu"]["linear"] == 0
    assert any("block size 24 not supported" in r for r in _reasons()), _reasons()
    _assert_close(out, M()(x))
