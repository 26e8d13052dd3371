"""Gated activations with gate/up interleaved (spec/activations.py: gate_up="interleaved"):
`silu_interleaved` / `gelu_interleaved` compute fn(h[..., ::2]) * h[..., 1::2], the gpt-oss
layout without swigluoai's clamp and alpha (transformers' gpt-oss MXFP4 path).

* Reference: the interleaved activation is the halves one on the columns reordered.
* Kernels (Triton interpreter): against the eager reference with the helpers' checks (A1
  bit-identical, C2 within two bf16 ulps of the reference activation, A2 bit-identical to
  the QDQ of the kernel's C2, output bit-identical when C2 matched), on the one-pass path
  and on split-K GEMM1 (partial sums + act_epilogue_kernel), with per-expert biases; and
  bit-identical to the halves activation over the same weight rows stored interleaved
  (only the weight rows GEMM1 reads differ).
* Recognition: the MoE body proof names the interleaved activation in several spellings;
  near misses (gate and up swapped, silu on clamped halves) are refused with the closest
  activation and the probe, never fused as something else.
"""

import zlib

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from emu_inductor.formats import MXFP4, quantize
from emu_inductor.kernels.tiles import TileConfig
from emu_inductor.ops.triton_impl import moe_triton
from emu_inductor.reference import moe_emulated
from emu_inductor.reference.activations import apply_activation, split_gate_up
from emu_inductor.reference.modules import QuantizedExperts
from emu_inductor.spec import OpSpec
from emu_inductor.spec.activations import ACTIVATION_SPECS, gate_up_layout
from emu_inductor.spec.schemes import SCHEMES
from helpers import bf16_ulp_close, moe_check
from tests.corpus.oracle import assert_within_accumulation
from tests.test_recognize_moe_bmm import InterleavedGatherBmmMoE, dequant_kn

E, H, I, T = 4, 128, 32, 6
INTERLEAVED = [n for n, s in ACTIVATION_SPECS.items() if s.gate_up == "interleaved" and s.function != "swigluoai"]


def _gen(tag):
    return torch.Generator().manual_seed(zlib.crc32(tag.encode()))  # stable across processes


def _to_interleaved(t, dim=1):
    """Rows [gate 0..I-1; up 0..I-1] -> [g0, u0, g1, u1, ...] along `dim`."""
    n = t.shape[dim] // 2
    perm = torch.stack([torch.arange(n), torch.arange(n) + n], 1).reshape(-1)
    return t.index_select(dim, perm)


def _specials(tag, shape):
    g = _gen(tag)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-20, 8, shape, generator=g).float())
    flat = x.view(-1)
    flat[: 8] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 7.0, -7.0, 1e-30])
    return x.to(torch.bfloat16)


# --------------------------------------------------------------------------------------
# spec + reference
# --------------------------------------------------------------------------------------

def test_registry_facts():
    assert {"silu_interleaved", "gelu_interleaved"} <= set(INTERLEAVED)
    assert gate_up_layout("swigluoai") == "interleaved" and gate_up_layout("silu") == "halves"
    assert gate_up_layout("relu2_no_mul") is None
    with pytest.raises(ValueError, match="activation"):
        gate_up_layout("silu_swapped")
    with pytest.raises(ValueError, match="layout"):
        split_gate_up(torch.zeros(2, 4), "swapped")


@pytest.mark.parametrize("name", INTERLEAVED)
def test_reference_is_halves_on_reordered_columns(name):
    x = _specials(name, (33, 2 * I))
    halves = name.replace("_interleaved", "")
    y = apply_activation(_to_interleaved(x, -1), name)
    assert torch.equal(y.nan_to_num(3.0), apply_activation(x, halves).nan_to_num(3.0))
    fn = {"silu": F.silu, "gelu": F.gelu}[ACTIVATION_SPECS[name].function]
    assert torch.equal(apply_activation(x, name).nan_to_num(3.0), (fn(x[..., ::2]) * x[..., 1::2]).nan_to_num(3.0))
    # and not the halves activation on the same columns (the test can tell them apart)
    assert not torch.equal(apply_activation(x, name).nan_to_num(3.0), apply_activation(x, halves).nan_to_num(3.0))


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------

def _experts(scheme, tag):
    """Halves-layout experts and the same bytes with w13's rows (and scales, bias) interleaved."""
    g = _gen(f"{scheme}/{tag}")
    w13 = (torch.randn(E, 2 * I, H, generator=g) * 0.2).bfloat16()
    w2 = (torch.randn(E, H, I, generator=g) * 0.2).bfloat16()
    qe = QuantizedExperts.from_float(w13, w2, scheme=scheme, activation="silu")
    if qe.a1_global_scale is not None:
        qe.a1_global_scale.fill_(2688.0 / 4.0)
        qe.a2_global_scale.fill_(2688.0 / 8.0)
    qi = QuantizedExperts(_to_interleaved(qe.w13), _to_interleaved(qe.w13_scale), qe.w2, qe.w2_scale,
                          scheme=scheme, w13_alpha=qe.w13_alpha, w2_alpha=qe.w2_alpha,
                          a1_global_scale=qe.a1_global_scale, a2_global_scale=qe.a2_global_scale)
    b13 = (torch.randn(E, 2 * I, generator=g) * 0.3).bfloat16()
    b2 = (torch.randn(E, H, generator=g) * 0.3).bfloat16()
    x = torch.randn(T, H, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)]).to(torch.int32)
    tw = torch.softmax(torch.randn(T, 2, generator=g), -1)
    return qe, qi, b13, b2, x, tw, ids


def _run(q, scheme, act, x, tw, ids, cfg=None, b13=None, b2=None):
    spec = OpSpec.from_scheme(scheme, activation=act)
    return moe_triton(x, q.w13, q.w13_scale, q.w13_alpha, q.w2, q.w2_scale, q.w2_alpha, tw, ids,
                      q.a1_global_scale, q.a2_global_scale, None, spec, config=cfg, debug=True,
                      reduction="deterministic", w13_bias=b13, w2_bias=b2)


SCHEMES_K = ["w_mxfp4", "nvfp4_w4a4", "w_mxfp4_a_mxfp4"]
CONFIGS = {"onepass": None, "split4": TileConfig(16, 32, 32, 4, 1, split1=4, split2=2),
           "split2_swap": TileConfig(16, 32, 32, 4, 1, split1=2, split2=1, swap=1)}


# every scheme kind (weight-only MX, NVFP4 w4a4 with global scales, MX w4a4) meets every
# path; each activation every path (a full product costs a minute on the interpreter)
CASES = [("w_mxfp4", "silu_interleaved", "onepass"), ("w_mxfp4", "gelu_interleaved", "split4"),
         ("nvfp4_w4a4", "silu_interleaved", "split4"), ("nvfp4_w4a4", "gelu_interleaved", "split2_swap"),
         ("w_mxfp4_a_mxfp4", "silu_interleaved", "split2_swap"), ("w_mxfp4_a_mxfp4", "gelu_interleaved", "onepass")]


@pytest.mark.parametrize("scheme,name,cfg", CASES)
def test_kernel_equals_halves_kernel_on_interleaved_rows(scheme, name, cfg):
    """Only the weight rows GEMM1 reads differ: the same sums, the same epilogue ops, so the
    interleaved kernel over interleaved bytes is the halves kernel over halves bytes bit
    for bit (A1, C2, A2, output), biases included; split-K runs act_epilogue_kernel."""
    qe, qi, b13, b2, x, tw, ids = _experts(scheme, f"{name}/{cfg}")
    halves = name.replace("_interleaved", "")
    a = _run(qi, scheme, name, x, tw, ids, CONFIGS[cfg], _to_interleaved(b13), b2)
    b = _run(qe, scheme, halves, x, tw, ids, CONFIGS[cfg], b13, b2)
    for k in ("out", "a1", "c2", "a2"):
        if a[k] is not None:
            assert torch.equal(a[k].nan_to_num(7.0), b[k].nan_to_num(7.0)), k
    if cfg == "onepass":  # reading the interleaved bytes as halves is another function (the check can fail)
        c = _run(qi, scheme, halves, x, tw, ids, CONFIGS[cfg], _to_interleaved(b13), b2)
        assert not torch.equal(c["out"], a["out"])


@pytest.mark.parametrize("name", INTERLEAVED)
@pytest.mark.parametrize("scheme", SCHEMES_K)
def test_kernel_against_reference(scheme, name):
    _, qi, b13, b2, x, tw, ids = _experts(scheme, f"ref/{name}")
    moe_check(qi, scheme, name, x, tw, ids, exact_out=True)
    moe_check(qi, scheme, name, x, tw, ids, exact_out=True, w13_bias=_to_interleaved(b13), w2_bias=b2)


@pytest.mark.parametrize("scheme", SCHEMES_K)
def test_split_k_epilogue_against_reference(scheme):
    name = "silu_interleaved"
    _, qi, b13, b2, x, tw, ids = _experts(scheme, "split-ref")
    bi = _to_interleaved(b13)
    d = _run(qi, scheme, name, x, tw, ids, CONFIGS["split4"], bi, b2)
    ref = moe_emulated(x, qi.w13, qi.w2, tw, ids, scheme=scheme, w13_scale=qi.w13_scale, w2_scale=qi.w2_scale,
                       w13_alpha=qi.w13_alpha, w2_alpha=qi.w2_alpha, a1_global_scale=qi.a1_global_scale,
                       a2_global_scale=qi.a2_global_scale, activation=name, w13_bias=bi, w2_bias=b2)
    v = d["valid"]
    assert v.all()
    from emu_inductor.reference.moe import dequantize_experts

    # C2 within two bf16 ulps of the reference activation of the reference biased GEMM1
    W13 = dequantize_experts(qi.w13, qi.w13_scale, SCHEMES[scheme].weight_fmt, qi.w13_alpha, x.dtype)
    local = ids.reshape(-1).long()
    acc = torch.einsum("rk,rnk->rn", d["a1"], W13[local].float()) + bi.float()[local]
    assert bf16_ulp_close(d["c2"], apply_activation(acc.to(x.dtype), name).float(), 2)
    err = (d["out"].float() - ref.float()).abs().max().item()
    assert err <= 0.02 * max(1.0, ref.float().abs().max().item()), err


# --------------------------------------------------------------------------------------
# recognition (traced graphs: GEMMs already fused, no compile)
# --------------------------------------------------------------------------------------

K_ = 2
SPEC_MX = OpSpec("mxfp4", "block", "mxfp4", "floor").to_str()


def _act(kind, h):
    if kind == "silu_strided":  # transformers' gpt-oss MXFP4 path
        return F.silu(h[:, ::2]) * h[:, 1::2]
    if kind == "silu_view_pairs":  # pairs as a trailing dim of 2
        v = h.view(h.shape[0], -1, 2)
        return F.silu(v[..., 0]) * v[..., 1]
    if kind == "gelu_strided":
        return F.gelu(h[:, 0::2]) * h[:, 1::2]
    if kind == "swigluoai_hf":  # transformers' GptOssExperts (alpha 1.702, limit 7)
        g, u = h[..., ::2].clamp(max=7.0), h[..., 1::2].clamp(min=-7.0, max=7.0)
        return (u + 1) * (g * torch.sigmoid(g * 1.702))
    if kind == "swapped":  # near miss: up columns taken as the gate
        return F.silu(h[:, 1::2]) * h[:, ::2]
    if kind == "clamped":  # near miss: swigluoai's clamp without its alpha and +1
        return F.silu(h[:, ::2].clamp(max=7.0)) * h[:, 1::2].clamp(min=-7.0, max=7.0)
    raise ValueError(kind)


def _layer(kind):
    def fn(x, router, w13, s13, w2, s2):
        Tn, Hn = x.shape
        w, ids = torch.topk(torch.softmax((x @ router.t()).float(), -1), K_, -1)
        w = w / w.sum(-1, keepdim=True)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        offs = torch.cumsum(torch.zeros(E, dtype=torch.int64).scatter_add_(0, flat, torch.ones_like(flat)),
                            0).to(torch.int32)
        tok = order // K_
        h = torch.ops.mxemu.grouped_mm(x[tok], w13, s13, None, offs, None, SPEC_MX)
        y = torch.ops.mxemu.grouped_mm(_act(kind, h), w2, s2, None, offs, None, SPEC_MX)
        out = torch.zeros(Tn, Hn, dtype=torch.float32)
        return out.index_add_(0, tok, y.float() * w.reshape(-1)[order].unsqueeze(-1)).to(x.dtype)

    return fn


def _recognise(kind):
    from torch.func import functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    from emu_inductor import ops  # noqa: F401  (registers mxemu::grouped_mm)
    from emu_inductor.passes.semantic_moe import grouped_site
    from emu_inductor.recognize.moe import recognize_moe

    g = _gen("recognise")
    Hn = 64
    q13, q2 = quantize(torch.randn(E, 2 * I, Hn, generator=g), MXFP4), quantize(torch.randn(E, Hn, I, generator=g),
                                                                                 MXFP4)
    args = (torch.randn(5, Hn).bfloat16(), torch.randn(E, Hn).bfloat16(), q13.qdata, q13.scale, q2.qdata, q2.scale)
    # views stay views, as in the post-grad graph the passes see: h[:, ::2] is a strided
    # slice there (a *_copy would be contiguous, and torch's CPU GELU on a contiguous bf16
    # tensor takes its vectorised erf, a strided one the scalar erf: ulps apart)
    graph = make_fx(functionalize(_layer(kind), remove="mutations"), tracing_mode="fake")(*args).graph
    second = [n for n in graph.nodes if grouped_site(n) is not None][-1]
    return recognize_moe(grouped_site(second), grouped_site, use_cache=False)


@pytest.mark.parametrize("kind,activation", [
    ("silu_strided", "silu_interleaved"), ("silu_view_pairs", "silu_interleaved"),
    ("gelu_strided", "gelu_interleaved"), ("swigluoai_hf", "swigluoai"),
])
def test_interleaved_spellings_proven(kind, activation):
    from emu_inductor.recognize.moe import MoeVerdict

    v = _recognise(kind)
    assert isinstance(v, MoeVerdict), v.reason
    assert v.activation == activation


@pytest.mark.parametrize("kind,closest", [("swapped", None), ("clamped", "silu_interleaved")])
def test_near_misses_refused_naming_the_probe(kind, closest):
    v = _recognise(kind)
    reason = getattr(v, "reason", None)
    assert reason is not None and "activation between the GEMMs not proven" in reason, v
    assert "probe batch" in reason, reason
    if closest:
        assert f"closest {closest}:" in reason, reason


# --------------------------------------------------------------------------------------
# the gathered-bmm form (activation proven inside the body), compiled: one near miss
# --------------------------------------------------------------------------------------

def test_swapped_interleave_in_bmm_layer_keeps_two_grouped_gemms():
    """gpt-oss's gathered-bmm plumbing with gate and up swapped: no registry activation
    computes it, so the two GEMMs fuse alone, explain() says the body differs from
    mxemu::moe for every activation, and (no QDQ between the GEMMs) gives no QDQ hint."""
    from emu_inductor import _compat
    from emu_inductor.passes import recording

    class Swapped(InterleavedGatherBmmMoE):
        def forward(self, x):
            Tn, Hn = x.shape
            w, ids = torch.topk(torch.softmax((x @ self.router.t()).float(), dim=-1), self.k, dim=-1)
            w = w / w.sum(-1, keepdim=True)
            flat = ids.reshape(-1)
            w13 = dequant_kn(self.w13, self.w13_s, x.dtype)
            w2 = dequant_kn(self.w2, self.w2_s, x.dtype)
            h = torch.bmm(x.repeat_interleave(self.k, dim=0).unsqueeze(1), w13[flat]).squeeze(1)
            h = F.silu(h[:, 1::2]) * h[:, ::2]
            y = torch.bmm(h.unsqueeze(1), w2[flat]).squeeze(1)
            return (y.view(Tn, self.k, Hn).float() * w.unsqueeze(-1)).sum(dim=1).to(x.dtype)

    model = Swapped(act_qdq=False)
    x = torch.randn(5, 64).to(torch.bfloat16)
    counters.clear()
    torch._dynamo.reset()
    with _compat.inductor_caches_disabled(), recording() as sink, torch.no_grad():
        compiled = torch.compile(model, backend="mxemu")
        compiled(x)
    records = sink.candidates
    assert counters["mxemu_ops"] == {"grouped_mm": 2}, [r.reason for r in records]
    left = [r for r in records if r.family == "semantic_moe" and not r.fused]
    assert len(left) == 1 and "routing/combine differ from mxemu::moe" in left[0].reason, [r.reason for r in records]
    assert "activation QDQ" not in left[0].reason  # there is none between the GEMMs
    with torch.no_grad():
        for xi in (x, torch.randn(5, 64).to(torch.bfloat16) * 3):  # fresh inputs, same compiled graph
            assert_within_accumulation(compiled(xi), model(xi), "swapped interleave")


def test_reference_module_with_interleaved_activation_fuses_by_pattern():
    """The project's own MoE module with activation="silu_interleaved": the traced structure
    pattern of the "moe" family (one per registry activation) makes it one mxemu::moe."""
    from torch._inductor.utils import fresh_cache

    g = _gen("pattern")
    m = QuantizedExperts.from_float((torch.randn(E, 2 * I, 64, generator=g) / 8).bfloat16(),
                                    (torch.randn(E, 64, I, generator=g) / 6).bfloat16(), scheme="w_mxfp4_a_mxfp4",
                                    activation="silu_interleaved")
    x = torch.randn(5, 64, generator=g).bfloat16()
    tw = torch.softmax(torch.randn(5, 2, generator=g), -1)
    ids = torch.randint(0, E, (5, 2), generator=g, dtype=torch.int32)
    torch._dynamo.reset()
    counters.clear()
    with fresh_cache(), torch.no_grad():
        out = torch.compile(m, backend="mxemu")(x, tw, ids)
        ref = m(x, tw, ids)
    assert counters["mxemu_patterns"]["moe.silu_interleaved"] == 1, dict(counters["mxemu_patterns"])
    assert_within_accumulation(out, ref, "silu_interleaved module")
