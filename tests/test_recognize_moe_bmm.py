"""MoE experts through `torch.bmm` (family "semantic_bmm"): a batched GEMM over gathered
expert weights `W[ids]` (transformers' gpt-oss reference style) or over every expert
densely becomes a grouped GEMM that "semantic" fuses, and a gathered layer whose
activation, routing and combine are proven becomes one mxemu::moe. A bmm whose weights
are not proven stays a bmm, with the recogniser's reason in explain()."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from emu_inductor import _compat
from emu_inductor.formats import MXFP4, quantize
from emu_inductor.passes import recording
from tests.corpus.oracle import assert_within_accumulation
from tests.test_recognize_moe import TitanStyleMoE

LUT = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def dequant_kn(w, s, dtype, lut=LUT):
    """[E, N, K/2] codes + [E, N, K/32] E8M0 -> [E, K, N] (LUT decode, exp2 scale, transposed)."""
    E, N = w.shape[:2]
    t = torch.tensor(lut, dtype=torch.float32)
    c = torch.stack([w & 0xF, w >> 4], -1).reshape(E, N, -1).long()
    sc = torch.where(s == 255, torch.nan, torch.exp2(s.float() - 127.0))
    v = (t[c].reshape(E, N, -1, 32) * sc.unsqueeze(-1)).reshape(E, N, -1)
    return v.to(dtype).transpose(1, 2)


class GatherBmmMoE(torch.nn.Module):
    """Routed rows repeated k times, each multiplied by its expert's matrix gathered as
    W[ids] through bmm; gate rows then up rows; view(T, k, H) weighted sum in fp32.
    `act_qdq`: MXFP4 activations (frexp floor, where-chain rounding) on both GEMMs' rows."""

    def __init__(self, act_qdq=True, lut=LUT, E=4, H=64, I=32, k=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.E, self.k, self.I, self.act, self.lut = E, k, I, act_qdq, lut
        self.register_buffer("router", torch.randn(E, H, generator=g).to(torch.bfloat16))
        q13, q2 = quantize(torch.randn(E, 2 * I, H, generator=g), MXFP4), quantize(torch.randn(E, H, I, generator=g),
                                                                                    MXFP4)
        for name, q in (("w13", q13), ("w2", q2)):
            self.register_buffer(name, q.qdata)
            self.register_buffer(name + "_s", q.scale)

    def qdq(self, x):
        return TitanStyleMoE.qdq(x) if self.act else x

    def forward(self, x):
        T, H = x.shape
        w, ids = torch.topk(torch.softmax((x @ self.router.t()).float(), dim=-1), self.k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        flat = ids.reshape(-1)
        w13 = dequant_kn(self.w13, self.w13_s, x.dtype, self.lut)  # [E, H, 2I]
        w2 = dequant_kn(self.w2, self.w2_s, x.dtype, self.lut)  # [E, I, H]
        xr = self.qdq(x.repeat_interleave(self.k, dim=0)).unsqueeze(1)  # [T*k, 1, H]
        h = torch.bmm(xr, w13[flat]).squeeze(1)
        h = F.silu(h[:, :self.I]) * h[:, self.I:]
        y = torch.bmm(self.qdq(h).unsqueeze(1), w2[flat]).squeeze(1)
        return (y.view(T, self.k, H).float() * w.unsqueeze(-1)).sum(dim=1).to(x.dtype)


class InterleavedGatherBmmMoE(GatherBmmMoE):
    """gpt-oss's reference plumbing: gate and up columns interleaved, silu(h[::2]) * h[1::2]
    (no clamp, no alpha): mxemu::moe's 'silu_interleaved'."""

    def forward(self, x):
        T, H = x.shape
        w, ids = torch.topk(torch.softmax((x @ self.router.t()).float(), dim=-1), self.k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        flat = ids.reshape(-1)
        w13 = dequant_kn(self.w13, self.w13_s, x.dtype)
        w2 = dequant_kn(self.w2, self.w2_s, x.dtype)
        h = torch.bmm(x.repeat_interleave(self.k, dim=0).unsqueeze(1), w13[flat]).squeeze(1)
        h = F.silu(h[:, ::2]) * h[:, 1::2]
        y = torch.bmm(h.unsqueeze(1), w2[flat]).squeeze(1)
        return (y.view(T, self.k, H).float() * w.unsqueeze(-1)).sum(dim=1).to(x.dtype)


class DenseBmmMoE(GatherBmmMoE):
    """Every token through every expert (bmm over [E, T, H]), dense [T, E] router weights."""

    def forward(self, x):
        T, H = x.shape
        w, ids = torch.topk(torch.softmax((x @ self.router.t()).float(), dim=-1), self.k, dim=-1)
        dense = torch.zeros(T, self.E, dtype=torch.float32).scatter(1, ids, w / w.sum(-1, keepdim=True))
        w13 = dequant_kn(self.w13, self.w13_s, x.dtype)
        w2 = dequant_kn(self.w2, self.w2_s, x.dtype)
        h = torch.bmm(x.unsqueeze(0).expand(self.E, T, H), w13)
        h = F.silu(h[..., :self.I]) * h[..., self.I:]
        y = torch.bmm(h, w2)
        return (y.float() * dense.t().unsqueeze(-1)).sum(dim=0).to(x.dtype)


class TransformersBatchedMM(GatherBmmMoE):
    """transformers' own `batched_mm` experts (installed integrations.moe.batched_mm_experts_forward:
    `bmm(W[ids], x.unsqueeze(-1))` with [E, N, K] weights, the weight gathered as the FIRST
    operand; chunk(2) gate/up; proj * w summed over view(T, k, H)) over MXFP4 experts
    dequantized by properties, the way a quantized checkpoint's experts would be read."""

    has_gate, has_bias, is_transposed, has_post_expert_norm, _is_expert_parallel = True, False, False, False, False

    def __init__(self, **kw):
        super().__init__(act_qdq=False, **kw)
        self.num_experts = self.E
        self.act_fn = F.silu

    @property
    def gate_up_proj(self):
        return dequant_kn(self.w13, self.w13_s, torch.bfloat16).transpose(1, 2)  # [E, 2I, H]

    @property
    def down_proj(self):
        return dequant_kn(self.w2, self.w2_s, torch.bfloat16).transpose(1, 2)  # [E, H, I]

    def _apply_gate(self, gate_up_out):
        from transformers.integrations.moe import _default_apply_gate

        return _default_apply_gate(self, gate_up_out)

    def forward(self, x):
        from transformers.integrations.moe import batched_mm_experts_forward

        w, ids = torch.topk(torch.softmax((x @ self.router.t()).float(), dim=-1), self.k, dim=-1)
        return batched_mm_experts_forward(self, x, ids, w / w.sum(-1, keepdim=True))


def _decomposed_ops(graph) -> list:
    """Nodes of a post-grad graph whose op Inductor decomposes: stock Inductor never lowers
    one (they are gone before the post-grad passes), and some have no lowering at all in
    another torch (torch 2.11: aten.arange.start_step, which a rewrite once inserted and the
    H200 compile refused: "both a fallback and a decomp for same op")."""
    from torch._inductor.decomposition import select_decomp_table

    table = select_decomp_table()
    sizes = (torch.ops.aten.sym_size.int, torch.ops.aten.sym_stride.int, torch.ops.aten.sym_numel.default)
    return [str(n.target) for n in graph.nodes
            if n.op == "call_function" and n.target in table and n.target not in sizes]  # size queries: not lowered


def _compile(model, x, dynamic=None):
    from emu_inductor.passes.mxemu_pass import MxemuPass

    counters.clear()
    torch._dynamo.reset()
    inserted = []
    original = MxemuPass.__call__

    def checked(self, graph):
        before = set(_decomposed_ops(graph))
        original(self, graph)
        inserted.extend(o for o in _decomposed_ops(graph) if o not in before)

    with _compat.inductor_caches_disabled(), recording() as sink, torch.no_grad(), \
            pytest.MonkeyPatch.context() as mp:
        mp.setattr(MxemuPass, "__call__", checked)
        compiled = torch.compile(model, backend="mxemu", dynamic=dynamic)
        out, code = run_and_get_code(compiled, x)
    assert not inserted, f"the rewrites inserted ops Inductor decomposes: {inserted}"
    return compiled, out, "\n".join(code), sink.candidates


def _fresh_inputs_match(compiled, model, x, what):
    with torch.no_grad():
        assert_within_accumulation(compiled(x), model(x), what)
        x2 = torch.randn(x.shape).to(torch.bfloat16) * 3  # fresh inputs, same compiled graph
        assert_within_accumulation(compiled(x2), model(x2), what)


def test_gathered_bmm_moe_becomes_one_mxemu_moe():
    model = GatherBmmMoE()
    x = torch.randn(5, 64).to(torch.bfloat16)
    compiled, out, code, records = _compile(model, x)
    assert counters["mxemu"]["semantic_bmm"] == 2, dict(counters["mxemu"])
    assert counters["mxemu"]["semantic_moe"] == 1, dict(counters["mxemu"])
    assert counters["mxemu_ops"] == {"moe": 1}, dict(counters["mxemu_ops"])
    assert "torch.ops.mxemu.moe.default(" in code and "grouped_mm" not in code
    fused = [r for r in records if r.family == "semantic_moe" and r.fused]
    assert fused and "silu between the GEMMs" in fused[0].reason, [r.reason for r in records]
    _fresh_inputs_match(compiled, model, x, "gathered bmm moe")


def test_transformers_batched_mm_experts_become_one_mxemu_moe():
    model = TransformersBatchedMM()
    x = torch.randn(5, 64).to(torch.bfloat16)
    compiled, out, code, records = _compile(model, x)
    assert counters["mxemu"]["semantic_bmm"] == 2, [r.reason for r in records]
    assert counters["mxemu_ops"] == {"moe": 1}, [r.reason for r in records]
    assert "weight-first bmm computed transposed" in " ".join(r.reason or "" for r in records)
    _fresh_inputs_match(compiled, model, x, "transformers batched_mm")


def test_interleaved_activation_becomes_one_mxemu_moe():
    """silu(h[::2]) * h[1::2] is the registry's 'silu_interleaved' (its near misses, and the
    refusal without an activation-QDQ hint: tests/test_moe_interleaved.py)."""
    model = InterleavedGatherBmmMoE(act_qdq=False)
    x = torch.randn(5, 64).to(torch.bfloat16)
    compiled, out, code, records = _compile(model, x)
    assert counters["mxemu_ops"] == {"moe": 1}, [r.reason for r in records]
    fused = [r for r in records if r.family == "semantic_moe" and r.fused]
    assert fused and "silu_interleaved between the GEMMs" in fused[0].reason, [r.reason for r in records]
    _fresh_inputs_match(compiled, model, x, "interleaved")


@pytest.mark.parametrize("dynamic", [None, True])
def test_dense_bmm_experts_fuse_as_grouped_gemms(dynamic):
    """dynamic=True: rows per expert symbolic, group ends M, 2M, .. from its size."""
    model = DenseBmmMoE(act_qdq=False)
    x = torch.randn(5, 64).to(torch.bfloat16)
    compiled, out, code, records = _compile(model, x, dynamic)
    assert counters["mxemu"]["semantic_bmm"] == 2 and counters["mxemu"]["semantic"] == 2, dict(counters["mxemu"])
    assert counters["mxemu_ops"] == {"grouped_mm": 2}, dict(counters["mxemu_ops"])
    assert "extern_kernels.bmm(" not in code and "aten.bmm.default(" not in code  # no bmm runs
    _fresh_inputs_match(compiled, model, x, "dense bmm experts")
    if dynamic:
        x9 = torch.randn(9, 64).to(torch.bfloat16)  # another token count, same graph
        with torch.no_grad():
            assert_within_accumulation(compiled(x9), model(x9), "dense bmm experts, 9 tokens")


def test_unproven_expert_weights_leave_the_bmm():
    """A decode table with two entries swapped is no known format: the bmm stays."""
    lut = list(LUT)
    lut[2], lut[3] = lut[3], lut[2]
    model = GatherBmmMoE(act_qdq=False, lut=lut)
    x = torch.randn(5, 64).to(torch.bfloat16)
    compiled, out, code, records = _compile(model, x)
    assert not counters["mxemu_ops"], dict(counters["mxemu_ops"])
    assert counters["mxemu"]["semantic_bmm"] == 0, dict(counters["mxemu"])
    left = [r for r in records if r.family == "semantic_bmm" and not r.fused]
    assert len(left) == 2 and all("expert weights not proven, bmm left as written" in r.reason for r in left), \
        [r.reason for r in records]
    with torch.no_grad():
        assert_within_accumulation(out, model(x), "unproven")
