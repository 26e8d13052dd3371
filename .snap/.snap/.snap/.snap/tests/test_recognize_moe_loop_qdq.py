"""A per-expert loop MoE whose activation QDQ is written inside the loop, once per expert
(`qdq(x[rows_e])` before W13[e], `qdq(act(h))` before W2[e]): "semantic_loop" proves each
expert's QDQ the same row-local function (MXFP4 / NVFP4 with a static per-tensor global
scale), so the two grouped GEMMs carry it (w4a4) and "semantic_loop_moe" makes the whole
layer ONE mxemu::moe, equal to eager on fresh inputs, an empty expert included. Near misses
(one expert quantizing with another recipe; a per-tensor scale from each expert's own rows)
keep the QDQ per expert and the GEMMs weight-only, with the reason in explain()."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from emu_inductor.formats import quantize
from tests.corpus.quark_style import fake_quantize_mx
from tests.test_recognize_moe import round_e2m1_where
from tests.test_recognize_moe_bmm import LUT, GatherBmmMoE
from tests.test_recognize_moe_loop import FLAGS, _compile
from tests.test_recognize_moe_loop_whole import _tokens


def qdq_nvfp4(x, gs):
    """Two-level NVFP4 (vLLM's Triton recipe): s = e4m3(gs * amax / 6), y = x * (gs / s)."""
    R, K = x.shape
    xb = x.float().reshape(R, K // 16, 16)
    amax = xb.abs().amax(-1, keepdim=True)
    s = torch.clamp(gs * (amax * (1.0 / 6.0)), -448.0, 448.0).to(torch.float8_e4m3fn).to(torch.float32)
    r = torch.where(s == 0, torch.zeros_like(s), gs / s)
    q = round_e2m1_where(torch.clamp(xb * r, -6.0, 6.0))
    return (q * (s / gs)).reshape(R, K).to(x.dtype)


def qdq_mxfp4(x):
    """MXFP4, E8M0 scale floor(log2 amax) - 2 by frexp, where-chain rounding."""
    R, K = x.shape
    xb = x.float().reshape(R, K // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    _, ex = torch.frexp(amax)
    scale = torch.where(torch.isfinite(amax), torch.exp2(torch.clamp(ex - 3, -127, 127).float()), torch.nan)
    return (round_e2m1_where(xb * (1.0 / scale)) * scale).reshape(R, K).to(x.dtype)


def dequant_nvfp4(codes, scales, alpha, dtype):
    """[E, N, K/2] E2M1 pairs, [E, N, K/16] E4M3 block scales, [E] float scales -> [E, N, K]."""
    E, N = codes.shape[:2]
    c = torch.stack([codes & 0xF, codes >> 4], -1).reshape(E, N, -1).long()
    v = torch.tensor(LUT, dtype=torch.float32)[c].reshape(E, N, -1, 16)
    return (v * (scales.float() * alpha.view(E, 1, 1)).unsqueeze(-1)).reshape(E, N, -1).to(dtype)


class QdqLoopMoE(GatherBmmMoE):
    """for e: tok, slot = nonzero(ids == e); h = F.linear(qdq(x[tok]), W13[e]); silu-gated;
    y = F.linear(qdq(h), W2[e]); out.index_add_(0, tok, y.float() * w[tok, slot]) in fp32.
    fmt "mxfp4" (weights and activations) or "nvfp4" (per-expert float scales, static
    activation global scales in buffers). miss: "recipe" (the last expert's QDQ is amd-quark's
    MX recipe, another known variant: even scale, +0 for elements rounding to zero),
    "dynamic" (NVFP4 global scale from each expert's own rows' amax), "bf16_combine" (ModelOpt's
    combine: bf16 weighted rows index_add_-ed into a bf16 buffer)."""

    def __init__(self, fmt="mxfp4", miss=None):
        super().__init__(act_qdq=False)
        self.fmt, self.miss = fmt, miss
        if fmt == "nvfp4":
            g = torch.Generator().manual_seed(7)
            for name, shape in (("w13", (self.E, 2 * self.I, 64)), ("w2", (self.E, 64, self.I))):
                w = torch.randn(*shape, generator=g)
                gs = 2688.0 / w.abs().amax(dim=(1, 2))
                qs = [quantize(w[e], "nvfp4", global_scale=gs[e]) for e in range(self.E)]
                self.register_buffer(name, torch.stack([q.qdata for q in qs]))
                self.register_buffer(name + "_s", torch.stack([q.scale for q in qs]))
                self.register_buffer(name + "_a", 1.0 / gs)
            self.register_buffer("a1_gs", torch.tensor(2688.0 / 4.0))
            self.register_buffer("a2_gs", torch.tensor(2688.0 / 2.0))

    def weights(self, dtype):
        if self.fmt == "nvfp4":
            return (dequant_nvfp4(self.w13, self.w13_s, self.w13_a, dtype),
                    dequant_nvfp4(self.w2, self.w2_s, self.w2_a, dtype))
        from tests.test_recognize_moe_bmm import dequant_kn
        return (dequant_kn(self.w13, self.w13_s, dtype).transpose(1, 2),
                dequant_kn(self.w2, self.w2_s, dtype).transpose(1, 2))

    def qdq(self, x, which, e):
        if self.fmt == "mxfp4":
            return fake_quantize_mx(x) if self.miss == "recipe" and e == self.E - 1 else qdq_mxfp4(x)
        if self.miss == "dynamic":
            return qdq_nvfp4(x, 2688.0 / x.float().abs().amax())
        return qdq_nvfp4(x, self.a1_gs if which == 1 else self.a2_gs)

    def forward(self, x):
        w, ids = torch.topk(torch.softmax((x @ self.router.t()).float(), dim=-1), self.k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        w13, w2 = self.weights(x.dtype)
        bf16 = self.miss == "bf16_combine"
        if bf16:
            w = w.to(x.dtype)
        out = torch.zeros(x.shape[0], x.shape[1], dtype=x.dtype if bf16 else torch.float32)
        for e in range(self.E):
            tok, slot = torch.nonzero(ids == e, as_tuple=True)
            h = F.linear(self.qdq(x[tok], 1, e), w13[e])
            h = F.silu(h[:, :self.I]) * h[:, self.I:]
            y = F.linear(self.qdq(h, 2, e), w2[e])
            if bf16:
                out.index_add_(0, tok, (y * w[tok, slot, None]).to(x.dtype))
            else:
                out.index_add_(0, tok, y.float() * w[tok, slot].unsqueeze(-1))
        return out.to(x.dtype)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_per_expert_qdq_loop_becomes_one_w4a4_moe(fmt):
    model = QdqLoopMoE(fmt)
    code, records = _compile(model, _tokens(model, 1, 16, empty=False), flags=True,
                             x2=_tokens(model, 2, 16, empty=True))  # fresh tokens, an expert without rows
    assert counters["mxemu"]["semantic_loop_moe"] == 1, [r.reason for r in records]
    assert counters["mxemu_ops"] == {"moe": 1}, dict(counters["mxemu_ops"])
    assert code.count("torch.ops.mxemu.moe.default(") == 1 and "grouped_mm" not in code
    loop = [r for r in records if r.family == "semantic_loop" and r.fused]
    assert len(loop) == 2 and all("same row-local function for every expert" in r.reason for r in loop), \
        [r.reason for r in records]
    assert f"activation: {fmt}" in loop[0].reason, loop[0].reason
    # the whole layer carries the activation QDQ (w4a4): its spec is not weight-only
    assert "act_kind='none'" not in code and "act_kind=none" not in code


@pytest.mark.parametrize("fmt,miss,reason", [
    ("mxfp4", "recipe", "the experts quantize their rows differently"),
    ("nvfp4", "dynamic", "not row-local"),
    # the QDQ goes into the GEMMs, the combine is what differs (ModelOpt's MoE, tests/corpus/modelopt_style.py)
    ("mxfp4", "bf16_combine", "routing/combine differ from mxemu::moe"),
])
def test_per_expert_qdq_near_misses_stay_per_expert(fmt, miss, reason):
    model = QdqLoopMoE(fmt, miss)
    code, records = _compile(model, _tokens(model, 1, 16, empty=False), flags=True,
                             x2=_tokens(model, 2, 16, empty=False))
    assert counters["mxemu"]["semantic_loop_moe"] == 0, dict(counters["mxemu"])
    assert counters["mxemu_ops"] == {"grouped_mm": 2}, dict(counters["mxemu_ops"])
    whole = [r for r in records if r.family == "semantic_loop_moe" and not r.fused]
    assert whole and reason in whole[0].reason, [r.reason for r in records]


def test_quark_corpus_moe_is_one_mxemu_moe():
    """amd-quark's MoE (tests/corpus/quark_style.py): fake_quantize_mx per expert inside the loop, index_add_
    in fp32 -> one mxemu::moe carrying Quark's MX recipe (quark_hw). Its QDQ reshapes rows with -1, which
    eager PyTorch cannot do for an expert without rows, so every expert gets rows here."""
    from tests.corpus import BY_NAME, E, H

    m, _ = BY_NAME["quark_mxfp4_moe"].make(1, torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    xs = []
    while len(xs) < 2:
        x = torch.randn(16, H, generator=g).to(torch.bfloat16)
        if m.route(x)[1].unique().numel() == E:
            xs.append(x)
    code, records = _compile(m, xs[0], flags=True, x2=xs[1])
    assert counters["mxemu_ops"] == {"moe": 1}, [r.reason for r in records]
    loop = [r for r in records if r.family == "semantic_loop" and r.fused]
    assert loop and "quark_hw" in loop[0].reason, [r.reason for r in records]
