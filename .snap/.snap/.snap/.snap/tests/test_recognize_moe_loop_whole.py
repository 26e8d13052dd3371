"""A whole MoE written as a Python loop over experts (family "semantic_loop_moe"): rows by
`nonzero(ids == e)` or transformers' one-hot mask + `torch.where`, F.linear over W13[e] /
W2[e] of two decoded stacks, silu-gated activation, router weight, `index_add_` into one
output becomes ONE mxemu::moe (Dynamo's data-dependent capture flags: unbacked row counts),
equal to eager on fresh inputs, routings with an empty expert included. Near misses keep
their two grouped GEMMs and explain() says which piece was not proven."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from tests.test_recognize_moe_bmm import GatherBmmMoE, dequant_kn
from tests.test_recognize_moe_loop import LoopMoE, _compile


def _tokens(model, seed, T, empty):
    """Fresh tokens whose top-k ids leave at least one expert empty (`empty`) or hit every one."""
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(T, 64, generator=g).to(torch.bfloat16)
        hit = torch.topk((x @ model.router.t()).float(), model.k, dim=-1).indices.unique().numel()
        if (hit < model.E) == empty:
            return x


class OneHotLoopMoE(GatherBmmMoE):
    """transformers' eager experts: one-hot expert mask, `torch.where(mask[e])`, gate/up by
    chunk(2), fp32 index_add_. `miss`: a near miss ("stack": the last expert's GEMM1 reads
    another stack; "no_weight": no router weight; "buffer": the last expert is combined into
    another buffer, returned beside the output)."""

    def __init__(self, miss=None, **kw):
        super().__init__(act_qdq=False, **kw)
        self.miss = miss

    def forward(self, x):
        w, ids = torch.topk(torch.softmax((x @ self.router.t()).float(), dim=-1), self.k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        w13 = dequant_kn(self.w13, self.w13_s, x.dtype).transpose(1, 2)  # [E, 2I, H]
        w2 = dequant_kn(self.w2, self.w2_s, x.dtype).transpose(1, 2)  # [E, H, I]
        other = dequant_kn(self.w13, self.w13_s + 1, x.dtype).transpose(1, 2) if self.miss == "stack" else w13
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
        out2 = torch.zeros_like(out)
        mask = F.one_hot(ids, num_classes=self.E).permute(2, 1, 0)
        for e in range(self.E):
            last = e == self.E - 1
            slot, tok = torch.where(mask[e])
            g, u = F.linear(x[tok], (other if last else w13)[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(g) * u, w2[e]).float()
            if self.miss != "no_weight":
                y = y * w[tok, slot, None]
            (out2 if last and self.miss == "buffer" else out).index_add_(0, tok, y)
        return (out.to(x.dtype), out2) if self.miss == "buffer" else out.to(x.dtype)


def _whole(model):
    x = _tokens(model, 1, 16, empty=False)
    code, records = _compile(model, x, flags=True, x2=_tokens(model, 2, 16, empty=True))
    assert counters["mxemu"]["semantic_loop_moe"] == 1, [r.reason for r in records]
    assert counters["mxemu_ops"] == {"moe": 1}, dict(counters["mxemu_ops"])
    assert code.count("torch.ops.mxemu.moe.default(") == 1
    assert "torch.ops.mxemu.grouped_mm.default(" not in code
    return records


def test_nonzero_loop_becomes_one_moe():
    records = _whole(LoopMoE("nonzero", act_qdq=False))
    whole = [r for r in records if r.family == "semantic_loop_moe" and r.fused]
    assert whole and "silu between the GEMMs" in whole[0].reason, [r.reason for r in records]


def test_one_hot_where_loop_becomes_one_moe():
    _whole(OneHotLoopMoE())


@pytest.mark.parametrize("miss,reason", [
    ("stack", "which is not hidden states or routing"),  # expert 3 meets another decode
    ("no_weight", "no router weights"),
    ("buffer", "every expert's rows reach"),
])
def test_near_misses_keep_the_grouped_gemms(miss, reason):
    model = OneHotLoopMoE(miss)
    x = _tokens(model, 1, 16, empty=False)
    counters.clear()
    torch._dynamo.reset()
    from emu_inductor import _compat
    from emu_inductor.passes import recording
    from tests.corpus.oracle import assert_within_accumulation
    from tests.test_recognize_moe_loop import FLAGS

    with torch._dynamo.config.patch(**FLAGS), _compat.inductor_caches_disabled(), recording() as sink, \
            torch.no_grad():
        out, ref = torch.compile(model, backend="mxemu")(x), model(x)
    for o, r in zip(*((out, ref) if miss == "buffer" else ((out,), (ref,)))):
        assert_within_accumulation(o, r, miss)
    assert counters["mxemu"]["semantic_loop_moe"] == 0, dict(counters["mxemu"])
    assert "moe" not in counters["mxemu_ops"], dict(counters["mxemu_ops"])
    left = [r for r in sink.candidates if r.family == "semantic_loop_moe" and not r.fused]
    assert left and reason in left[0].reason, [r.reason for r in sink.candidates]
