"""Whole MoE layers written the torchtitan way (argsort of the expert ids, scatter_add_
counts + cumsum offsets, x[order // k], torch._grouped_mm over 3-d packed MXFP4 experts,
chunk(2), combine by index_add_ / scatter back + view(T, k, H) sum) become ONE mxemu::moe
when `emu_inductor.recognize.moe` proves the activation, routing and combine by
evaluation; near misses (k-sum in bf16, router weights never applied) keep the two fused
GEMMs and explain() says why the whole-layer fusion did not happen."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from emu_inductor import _compat
from emu_inductor.formats import MXFP4, quantize
from emu_inductor.passes import recording
from emu_inductor.spec import OpSpec
from tests.corpus.oracle import assert_within_accumulation

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def round_e2m1_where(y):
    a = y.abs()
    q = torch.where(a <= 0.25, 0.0, torch.where(a < 0.75, 0.5, torch.where(a <= 1.25, 1.0, torch.where(
        a < 1.75, 1.5, torch.where(a <= 2.5, 2.0, torch.where(a < 3.5, 3.0, torch.where(a <= 5.0, 4.0, 6.0)))))))
    return torch.copysign(q, y)


class TitanStyleMoE(torch.nn.Module):
    """MXFP4 w4a4 experts decoded with bit arithmetic, frexp-floor activation QDQ, softmax
    top-k routing, rows sorted by expert; `combine` picks how the outputs come back."""

    def __init__(self, combine, E=4, H=64, I=32, k=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.E, self.k, self.combine = E, k, combine
        self.register_buffer("router", torch.randn(E, H, generator=g).to(torch.bfloat16))
        q13, q2 = quantize(torch.randn(E, 2 * I, H, generator=g), MXFP4), quantize(torch.randn(E, H, I, generator=g),
                                                                                    MXFP4)
        self.register_buffer("w13", q13.qdata)
        self.register_buffer("s13", q13.scale)
        self.register_buffer("w2", q2.qdata)
        self.register_buffer("s2", q2.scale)

    @staticmethod
    def dequant(w, s, dtype):
        E, N = w.shape[:2]
        c = torch.stack([w & 0xF, w >> 4], -1).reshape(E, N, -1).to(torch.int32)
        e, m, sg = (c >> 1) & 3, c & 1, (c >> 3) & 1
        mag = torch.where(e == 0, m.float() * 0.5, (1.0 + m.float() * 0.5) * torch.exp2((e - 1).float()))
        v = torch.where(sg == 1, -mag, mag)
        sc = torch.where(s == 255, torch.nan, torch.exp2(s.float() - 127.0))
        return (v.reshape(E, N, -1, 32) * sc.unsqueeze(-1)).reshape(E, N, -1).to(dtype)

    @staticmethod
    def qdq(x):
        xb = x.float().reshape(x.shape[0], -1, 32)
        amax = xb.abs().amax(-1, keepdim=True)
        _, ex = torch.frexp(amax)
        scale = torch.where(torch.isfinite(amax), torch.exp2(torch.clamp(ex - 3, -127, 127).float()), torch.nan)
        return (round_e2m1_where(xb * (1.0 / scale)) * scale).reshape(x.shape).to(x.dtype)

    def forward(self, x):
        T, H = x.shape
        w, ids = torch.topk(torch.softmax((x @ self.router.t()).float(), dim=-1), self.k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        offs = torch.cumsum(torch.zeros(self.E, dtype=torch.int64).scatter_add_(0, flat, torch.ones_like(flat)),
                            0).to(torch.int32)
        tok = order // self.k
        h = torch._grouped_mm(self.qdq(x[tok]), self.dequant(self.w13, self.s13, x.dtype).transpose(-2, -1),
                              offs=offs)
        gate, up = h.chunk(2, dim=-1)
        y = torch._grouped_mm(self.qdq(F.silu(gate) * up), self.dequant(self.w2, self.s2, x.dtype).transpose(-2, -1),
                              offs=offs)
        if self.combine == "index_add":  # fp32, in expert-sorted row order
            out = torch.zeros(T, H, dtype=torch.float32)
            out.index_add_(0, tok, y.float() * w.reshape(-1)[order].unsqueeze(-1))
            return out.to(x.dtype)
        if self.combine == "view_sum":  # scatter back, view(T, k, H) * w summed in fp32
            back = torch.empty_like(y)
            back[order] = y
            return (back.view(T, self.k, H).float() * w.unsqueeze(-1)).sum(1).to(x.dtype)
        if self.combine in ("reversed", "bmm"):  # fp32 sums in an order none of the exact variants has
            back = torch.empty_like(y)
            back[order] = y
            p = back.view(T, self.k, H).float()
            if self.combine == "bmm":  # a GEMM over the slots: the BLAS picks the order (and FMAs)
                return torch.bmm(w.float().unsqueeze(1), p).squeeze(1).to(x.dtype)
            acc = p[:, -1] * w[:, -1:]
            for j in range(self.k - 2, -1, -1):
                acc = acc + p[:, j] * w[:, j:j + 1]
            return acc.to(x.dtype)
        if self.combine == "bf16_scatter_add":  # near miss: each product rounded, k-sum in bf16 (torchtitan)
            yw = (y.float() * w.reshape(-1)[order].unsqueeze(-1)).to(x.dtype)
            return torch.zeros_like(x).scatter_add_(0, tok.unsqueeze(-1).expand(-1, H), yw)
        if self.combine == "no_weights":  # near miss: the router weights are never applied
            return torch.zeros(T, H, dtype=torch.float32).index_add_(0, tok, y.float()).to(x.dtype)
        raise ValueError(f"combine: unknown {self.combine!r}")


def _compile(model, x, dynamic=None):
    """(compiled output, op targets after the post-grad passes, explain() records)."""
    from torch._inductor import config as inductor_config

    captured = []

    def record_graph(graph):
        captured.append([str(n.target) for n in graph.nodes if n.op == "call_function"])

    counters.clear()
    with inductor_config.patch(post_grad_custom_post_pass=record_graph), _compat.inductor_caches_disabled(), \
            recording() as sink, torch.no_grad():
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="mxemu", dynamic=dynamic)
        out = compiled(x)
    return compiled, out, captured[0], sink.candidates


@pytest.mark.parametrize("combine,k", [("index_add", 2), ("view_sum", 3), ("reversed", 4), ("bmm", 8)])
def test_titan_style_moe_becomes_one_mxemu_moe(combine, k):
    model = TitanStyleMoE(combine, E=max(4, 2 * k), k=k)
    x = torch.randn(5, 64).to(torch.bfloat16)
    compiled, out, ops, records = _compile(model, x)
    assert ops.count("mxemu.moe.default") == 1, ops
    assert not any("grouped_mm" in o for o in ops), ops  # routing, both GEMMs and the combine are inside
    fused = [r for r in records if r.family == "semantic_moe" and r.fused]
    assert fused and "silu between the GEMMs" in fused[0].reason, [r.reason for r in records]
    if combine == "reversed":  # a k-sum order of its own: proven within fp32 accumulation rounding
        assert "fp32 accumulation rounding" in fused[0].reason, fused[0].reason
    with torch.no_grad():
        assert_within_accumulation(out, model(x), combine)
        x2 = torch.randn(5, 64).to(torch.bfloat16) * 3  # fresh inputs, same compiled graph
        assert_within_accumulation(compiled(x2), model(x2), combine)


@pytest.mark.parametrize("combine,why", [
    ("bf16_scatter_add", "routing/combine differ from mxemu::moe"),
    ("no_weights", "no router weights"),
])
def test_near_miss_combine_keeps_gemm_only_fusion(combine, why):
    model = TitanStyleMoE(combine)
    x = torch.randn(5, 64).to(torch.bfloat16)
    _, out, ops, records = _compile(model, x)
    assert "mxemu.moe.default" not in ops and ops.count("mxemu.grouped_mm.default") == 2, ops
    reasons = [r.reason for r in records if r.family == "semantic_moe" and not r.fused]
    assert len(reasons) == 1 and "whole-layer mxemu::moe not proven" in reasons[0] and why in reasons[0], reasons
    with torch.no_grad():
        assert_within_accumulation(out, model(x), combine)


class ReferenceSkeletonChunk(torch.nn.Module):
    """Issue 8's example: emu_inductor's own reference MoE (expert_gemm scatters each GEMM's
    rows back to slot order and recomputes the group ends) with gate/up by chunk(2, -1),
    which the traced "moe" family does not match."""

    def __init__(self, E=4, H=64, I=32, k=2, bias=False):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.E, self.k = E, k
        self.b13 = torch.randn(E, 2 * I, generator=g).to(torch.bfloat16) if bias else None
        self.b2 = torch.randn(E, H, generator=g).to(torch.bfloat16) if bias else None
        q13, q2 = quantize(torch.randn(E, 2 * I, H, generator=g), MXFP4), quantize(torch.randn(E, H, I, generator=g),
                                                                                    MXFP4)
        for name, t in (("w13", q13.qdata), ("s13", q13.scale), ("w2", q2.qdata), ("s2", q2.scale),
                        ("router", torch.randn(E, H, generator=g).to(torch.bfloat16))):
            self.register_buffer(name, t)

    def forward(self, x):
        from emu_inductor.reference import get_scheme
        from emu_inductor.reference.moe import dequantize_experts, expert_gemm
        from emu_inductor.reference.qdq import act_fake_quantize

        s = get_scheme("mxfp4_w4a4")
        w, ids = torch.topk(torch.softmax((x @ self.router.t()).float(), -1), self.k, -1)
        key = ids.reshape(-1)
        c1 = expert_gemm(act_fake_quantize(x.repeat_interleave(self.k, dim=0), s.act, None),
                         dequantize_experts(self.w13, self.s13, s.weight_fmt, None, x.dtype), key, self.E, "grouped_mm",
                         self.b13)
        gate, up = c1.chunk(2, -1)
        c3 = expert_gemm(act_fake_quantize(F.silu(gate) * up, s.act, None),
                         dequantize_experts(self.w2, self.s2, s.weight_fmt, None, x.dtype), key, self.E, "grouped_mm",
                         self.b2)
        return (c3.reshape(x.shape[0], self.k, -1).float() * w.unsqueeze(-1)).sum(1).to(x.dtype)


@pytest.mark.parametrize("bias", [False, True])
def test_reference_skeleton_with_chunk_becomes_one_mxemu_moe(bias):
    """Routing inside the activation region (scatter back, gather again, ends computed
    twice): the activation is proven inside the body on identity probe GEMMs. Dynamic
    token count: size queries of the routing do not block the rewrite; one compile
    serves other token counts. Per-expert GEMM biases go to mxemu::moe's w13/w2_bias."""
    model = ReferenceSkeletonChunk(bias=bias)
    x = torch.randn(5, 64).to(torch.bfloat16)
    compiled, out, ops, records = _compile(model, x, dynamic=True)
    assert ops.count("mxemu.moe.default") == 1 and not any("grouped_mm" in o for o in ops), ops
    with torch.no_grad():
        assert_within_accumulation(out, model(x), "reference skeleton with chunk")
        x9 = torch.randn(9, 64).to(torch.bfloat16)
        assert_within_accumulation(compiled(x9), model(x9), "reference skeleton with chunk, 9 tokens")
    assert counters["mxemu"]["pass_runs"] == 1, dict(counters["mxemu"])  # no recompile for 9 tokens


# --- the recogniser alone, on traced graphs (no torch.compile: ~0.1 s a spelling) ------------

E_, H_, I_, T_, K_ = 4, 64, 32, 5, 2
SPEC_MX = OpSpec("mxfp4", "block", "mxfp4", "floor").to_str()  # what the GEMM fusion would have written


def _spelled_layer(spec, counts="scatter_add", act="silu_chunk", combine="index_add", rows="tok"):
    """Routing -> mxemu::grouped_mm -> activation -> mxemu::grouped_mm -> combine, one
    slot spelled differently per case (the GEMMs stand for what the GEMM fusion made)."""

    def fn(x, router, w13, s13, w2, s2):
        w, ids = torch.topk(torch.softmax((x @ router.t()).float(), -1), K_, -1)
        w = w / w.sum(-1, keepdim=True)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        c = {"scatter_add": lambda: torch.zeros(E_, dtype=torch.int64).scatter_add_(0, flat, torch.ones_like(flat)),
             "one_hot": lambda: F.one_hot(flat, E_).sum(0),
             "eq_arange": lambda: (flat.unsqueeze(-1) == torch.arange(E_)).sum(0),
             "histc": lambda: torch.histc(flat.float(), bins=E_, min=0, max=E_),
             "index_add": lambda: torch.zeros(E_, dtype=torch.int32).index_add(
                 0, flat, torch.ones_like(flat, dtype=torch.int32))}[counts]()
        offs = torch.cumsum(c, 0).to(torch.int32)
        tok = order // K_
        xr = x[tok] if rows == "tok" else x.repeat_interleave(K_, dim=0)[order]
        h = torch.ops.mxemu.grouped_mm(xr, w13, s13, None, offs, None, spec)
        if act == "silu_slice":
            a = F.silu(h[:, :I_]) * h[:, I_:]
        elif act == "silu_fp32":  # near miss: silu(g) * u in fp32, one rounding (the reference rounds twice)
            g, u = h.float().chunk(2, -1)
            a = (F.silu(g) * u).to(x.dtype)
        else:
            g, u = h.chunk(2, -1)
            a = (F.gelu(g, approximate="tanh") if act == "gelu_tanh" else F.silu(g)) * u
        y = torch.ops.mxemu.grouped_mm(a, w2, s2, None, offs, None, spec)
        wr = w.reshape(-1)[order].unsqueeze(-1)
        if combine == "view_sum":
            back = torch.empty_like(y)
            back[order] = y
            return (back.view(T_, K_, H_).float() * w.unsqueeze(-1)).sum(1).to(x.dtype)
        if combine == "view_sum_bf16_weights":  # near miss: weights rounded to bf16 first
            back = torch.empty_like(y)
            back[order] = y
            return (back.view(T_, K_, H_) * w.to(x.dtype).unsqueeze(-1)).float().sum(1).to(x.dtype)
        out = torch.zeros(T_, H_, dtype=torch.float32)
        if combine == "scatter_add":
            return out.scatter_add_(0, tok.unsqueeze(-1).expand(-1, H_), y.float() * wr).to(x.dtype)
        if combine == "wrong_token":  # near miss: row r goes back to token r % T
            return out.index_add_(0, order % T_, y.float() * wr).to(x.dtype)
        if combine == "unsorted_weights":  # near miss: weights in slot order, rows in expert order
            return out.index_add_(0, tok, y.float() * w.reshape(-1).unsqueeze(-1)).to(x.dtype)
        return out.index_add_(0, tok, y.float() * wr).to(x.dtype)

    return fn


def _traced(fn):
    from torch.func import functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    from emu_inductor import ops  # noqa: F401  (registers mxemu::grouped_mm)

    g = torch.Generator().manual_seed(0)
    q13, q2 = quantize(torch.randn(E_, 2 * I_, H_, generator=g), MXFP4), quantize(torch.randn(E_, H_, I_, generator=g),
                                                                                  MXFP4)
    args = (torch.randn(T_, H_).bfloat16(), torch.randn(E_, H_).bfloat16(), q13.qdata, q13.scale, q2.qdata, q2.scale)
    return make_fx(functionalize(fn, remove="mutations_and_views"), tracing_mode="fake")(*args).graph


def _recognise(**spelling):
    from emu_inductor.passes.semantic_moe import grouped_site
    from emu_inductor.recognize.moe import recognize_moe

    graph = _traced(_spelled_layer(SPEC_MX, **spelling))
    second = [n for n in graph.nodes if grouped_site(n) is not None][-1]
    return recognize_moe(grouped_site(second), grouped_site)


@pytest.mark.parametrize("spelling", [
    {}, {"counts": "one_hot"}, {"counts": "eq_arange"}, {"counts": "histc"}, {"counts": "index_add"},
    {"rows": "repeat_interleave"}, {"act": "silu_slice"},
    {"combine": "scatter_add"}, {"combine": "view_sum"},
], ids=lambda s: "-".join(s.values()) or "base")
def test_spellings_proven(spelling):
    from emu_inductor.recognize.moe import MoeVerdict

    v = _recognise(**spelling)
    assert isinstance(v, MoeVerdict), v.reason
    assert v.activation == "silu" and v.region.top_k == K_ and v.region.hidden.name.startswith("x")


@pytest.mark.parametrize("spelling,why", [
    ({"combine": "view_sum_bf16_weights"}, "routing/combine differ from mxemu::moe"),
    ({"combine": "wrong_token"}, "routing/combine differ from mxemu::moe"),
    ({"combine": "unsorted_weights"}, "routing/combine differ from mxemu::moe"),
    ({"act": "gelu_tanh"}, "activation between the GEMMs not proven"),
    ({"act": "silu_fp32"}, "activation between the GEMMs not proven"),
], ids=lambda s: "-".join(s.values()) if isinstance(s, dict) else "")
def test_near_misses_rejected_with_the_probe(spelling, why):
    v = _recognise(**spelling)
    assert getattr(v, "reason", None) is not None and why in v.reason and "probe" in v.reason, v


def test_previous_layer_gemm_does_not_pair():
    """Two layers in a row, the first one not fusable whole: the second layer's GEMM1 is fed
    by the first layer's GEMM2 but routed by other ids, so it is no second GEMM (no
    record), while each layer's own pair is found."""
    from emu_inductor.passes.semantic_moe import grouped_site
    from emu_inductor.recognize.moe_region import pair_of

    one = _spelled_layer(SPEC_MX, combine="wrong_token")

    def two(x, router, w13, s13, w2, s2):
        h = x + one(x, router, w13, s13, w2, s2)
        return h + one(h, router.flip(0), w13, s13, w2, s2)

    gemms = [grouped_site(n) for n in _traced(two).nodes if grouped_site(n) is not None]
    assert len(gemms) == 4
    assert [pair_of(s, grouped_site) is not None for s in gemms] == [False, True, False, True]
    assert pair_of(gemms[1], grouped_site).node is gemms[0].node and pair_of(gemms[3], grouped_site).node is gemms[2].node
