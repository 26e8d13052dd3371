"""MoE experts as a Python loop over a dequantized stack (family "semantic_loop"): the
per-expert GEMMs `F.linear(rows_e, W[e])` become one grouped GEMM that "semantic" fuses
(mxemu::grouped_mm), with every expert's rows computed densely (no graph break) or
selected by `nonzero` (Dynamo's data-dependent capture flags: unbacked row counts). A
chain of GEMMs over one stack (layer l reads layer l-1's output) is not a group and stays
as written, with the reason."""

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from emu_inductor import _compat
from emu_inductor.passes import recording
from tests.corpus.oracle import assert_within_accumulation
from tests.test_recognize_moe_bmm import GatherBmmMoE, dequant_kn

FLAGS = dict(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True)


class LoopMoE(GatherBmmMoE):
    """amd-quark's reference loop: experts [E, N, K] decoded once, `F.linear(qdq(rows), W[e])`
    per expert, rows by `nonzero(ids == e)` ("nonzero") or every token with its weight
    masked ("dense"); index_add_ / += into fp32."""

    def __init__(self, rows="dense", **kw):
        super().__init__(**kw)
        self.rows = rows

    def forward(self, x):
        T, H = x.shape
        w, ids = torch.topk(torch.softmax((x @ self.router.t()).float(), dim=-1), self.k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        w13 = dequant_kn(self.w13, self.w13_s, x.dtype).transpose(1, 2)  # [E, 2I, H]
        w2 = dequant_kn(self.w2, self.w2_s, x.dtype).transpose(1, 2)  # [E, H, I]
        out = torch.zeros(T, H, dtype=torch.float32)
        for e in range(self.E):
            if self.rows == "nonzero":
                tok, slot = torch.nonzero(ids == e, as_tuple=True)
                h = F.linear(self.qdq(x[tok]), w13[e])
                h = F.silu(h[:, :self.I]) * h[:, self.I:]
                y = F.linear(self.qdq(h), w2[e])
                out.index_add_(0, tok, y.float() * w[tok, slot].unsqueeze(-1))
            else:
                h = F.linear(self.qdq(x), w13[e])
                h = F.silu(h[:, :self.I]) * h[:, self.I:]
                y = F.linear(self.qdq(h), w2[e])
                out += y.float() * (w * (ids == e)).sum(-1, keepdim=True)
        return out.to(x.dtype)


class ChainedStack(GatherBmmMoE):
    """Not experts: a stack of square layers applied one after the other."""

    def forward(self, x):
        W = dequant_kn(self.w13, self.w13_s, x.dtype)[:, :, :64].transpose(1, 2)  # [E, 64, 64]
        for e in range(self.E):
            x = F.linear(x, W[e])
        return x


def _all_experts_hit(model, seed):
    """Fresh tokens whose top-k ids hit every expert: with the capture flags, Dynamo/Inductor
    (stock, without mxemu too) compile a graph asserting each nonzero() row count is nonzero
    (RuntimeError 'Ne(u0, 0)' when an expert gets no rows), so the loop test keeps them hit."""
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(16, 64, generator=g).to(torch.bfloat16)
        ids = torch.topk((x @ model.router.t()).float(), model.k, dim=-1).indices
        if ids.unique().numel() == model.E:
            return x


def _compile(model, x, flags=False, x2=None):
    counters.clear()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(**(FLAGS if flags else {})), _compat.inductor_caches_disabled(), \
            recording() as sink, torch.no_grad():
        compiled = torch.compile(model, backend="mxemu")
        out, code = run_and_get_code(compiled, x)
        ref = model(x)
        if x2 is None:
            x2 = torch.randn(x.shape).to(torch.bfloat16) * 3  # fresh inputs, same graph
        assert_within_accumulation(compiled(x2), model(x2), "fresh inputs")
    assert_within_accumulation(out, ref, "first inputs")
    return "\n".join(code), sink.candidates


def test_dense_expert_loop_becomes_two_grouped_gemms():
    code, records = _compile(LoopMoE("dense"), torch.randn(5, 64).to(torch.bfloat16))
    # the per-expert activation QDQ (of every token, per expert) is proven row-local and goes into the op
    assert counters["mxemu"]["semantic_loop"] == 2 and counters["mxemu"]["semantic"] == 0, dict(counters["mxemu"])
    assert counters["mxemu_ops"] == {"grouped_mm": 2}, dict(counters["mxemu_ops"])
    assert code.count("torch.ops.mxemu.grouped_mm.default(") == 2
    loop = [r for r in records if r.family == "semantic_loop" and r.fused]
    assert loop and "4 per-expert GEMMs" in loop[0].reason, [r.reason for r in records]
    assert all("same row-local function for every expert" in r.reason for r in loop), [r.reason for r in loop]


def test_nonzero_expert_loop_with_the_capture_flags():
    m = LoopMoE("nonzero")
    code, records = _compile(m, _all_experts_hit(m, 1), flags=True, x2=_all_experts_hit(m, 2))
    assert counters["mxemu"]["semantic_loop"] == 2, dict(counters["mxemu"])
    assert not counters["mxemu"]["internal_errors"], [r.reason for r in records]
    # the activation QDQ written per expert is proven one row-local QDQ: the grouped GEMMs carry it and the
    # whole layer is one mxemu::moe (empty experts, NVFP4 and near misses: tests/test_recognize_moe_loop_qdq.py;
    # this QDQ's reshape(rows, -1, 32) cannot run eagerly on an expert without rows)
    assert counters["mxemu"]["semantic_loop_moe"] == 1 and counters["mxemu_ops"] == {"moe": 1}, \
        [r.reason for r in records]


def test_chained_gemms_over_one_stack_stay_as_written():
    code, records = _compile(ChainedStack(act_qdq=False), torch.randn(5, 64).to(torch.bfloat16))
    assert counters["mxemu"]["semantic_loop"] == 0, dict(counters["mxemu"])
    left = [r for r in records if r.family == "semantic_loop" and not r.fused]
    assert left and "another GEMM over the same experts" in left[0].reason, [r.reason for r in records]


class StackAlsoReturned(LoopMoE):
    """The dequantized stack has another (live) user: grouping would compute the decode twice."""

    def forward(self, x):
        w13 = dequant_kn(self.w13, self.w13_s, x.dtype).transpose(1, 2)
        return torch.stack([F.linear(x, w13[e]) for e in range(self.E)]).sum(0), w13.amax()


def test_stack_with_another_user_stays_as_written():
    model = StackAlsoReturned(act_qdq=False)
    x = torch.randn(5, 64).to(torch.bfloat16)
    counters.clear()
    torch._dynamo.reset()
    with _compat.inductor_caches_disabled(), recording() as sink, torch.no_grad():
        out, amax = torch.compile(model, backend="mxemu")(x)
        ref, ref_amax = model(x)
    assert counters["mxemu"]["semantic_loop"] == 0, dict(counters["mxemu"])
    left = [r for r in sink.candidates if r.family == "semantic_loop" and not r.fused]
    assert left and "also used by" in left[0].reason, [r.reason for r in sink.candidates]
    assert_within_accumulation(out, ref, "stack used elsewhere")
    assert torch.equal(amax, ref_amax)



def test_vllm_torch_moe_per_expert_linears_are_grouped():
    """vLLM's torch_moe reference (corpus vllm_nvfp4_moe): each expert dequantizes its own
    slice w13[i] of the packed bytes, fused per expert as mxemu::linear; with the capture
    flags (boolean-mask rows) the 4 + 4 ops become two mxemu::grouped_mm."""
    from tests.corpus import BY_NAME, E, H

    m, _ = BY_NAME["vllm_nvfp4_moe"].make(1, torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    xs = []
    while len(xs) < 2:
        x = torch.randn(16, H, generator=g).to(torch.bfloat16)
        if m.route(x)[1].unique().numel() == E:  # every expert gets rows (see _all_experts_hit)
            xs.append(x)
    code, records = _compile(m, xs[0], flags=True, x2=xs[1])
    assert counters["mxemu"]["semantic_group"] == 2, [r.reason for r in records]
    assert counters["mxemu_ops"] == {"grouped_mm": 2}, dict(counters["mxemu_ops"])
    grouped = [r for r in records if r.family == "semantic_group" and r.fused]
    assert grouped and f"{E} per-expert mxemu::linear" in grouped[0].reason
