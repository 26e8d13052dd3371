"""MoE routing with data-dependent sizes (torch.bincount counts, as torchao's MoE code
writes it) graph-breaks under Dynamo's default config; with
`capture_scalar_outputs` / `capture_dynamic_output_shape_ops` (docs/backend.md) the
layer is one graph and becomes ONE mxemu::moe. The GEMMs are called the way torchao's
`_emulated_nvfp4_scaled_grouped_mm_2d_3d` calls them: `torch._grouped_mm(..., offs=,
out_dtype=torch.bfloat16)`."""

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from tests.corpus.oracle import assert_within_accumulation
from tests.test_recognize_moe import TitanStyleMoE, _compile

DATA_DEPENDENT = dict(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True)


class BincountMoE(TitanStyleMoE):
    """TitanStyleMoE with bincount counts and out_dtype=bf16 grouped GEMMs."""

    def forward(self, x):
        T, H = x.shape
        w, ids = torch.topk(torch.softmax((x @ self.router.t()).float(), dim=-1), self.k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        offs = torch.cumsum(torch.bincount(flat, minlength=self.E), 0).to(torch.int32)
        tok = order // self.k
        h = torch._grouped_mm(self.qdq(x[tok]), self.dequant(self.w13, self.s13, x.dtype).transpose(-2, -1),
                              offs=offs, out_dtype=torch.bfloat16)
        gate, up = h.chunk(2, dim=-1)
        y = torch._grouped_mm(self.qdq(F.silu(gate) * up), self.dequant(self.w2, self.s2, x.dtype).transpose(-2, -1),
                              offs=offs, out_dtype=torch.bfloat16)
        out = torch.zeros(T, H, dtype=torch.float32)
        out.index_add_(0, tok, y.float() * w.reshape(-1)[order].unsqueeze(-1))
        return out.to(x.dtype)


def test_bincount_moe_is_one_mxemu_moe_with_the_data_dependent_flags():
    model = BincountMoE("index_add")
    x = torch.randn(5, 64).to(torch.bfloat16)
    with torch._dynamo.config.patch(**DATA_DEPENDENT):
        compiled, out, ops, records = _compile(model, x)
        assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
        assert counters["mxemu"]["semantic_moe"] == 1, dict(counters["mxemu"])
        assert ops.count("mxemu.moe.default") == 1 and not any("grouped_mm" in o for o in ops), ops
        with torch.no_grad():
            assert_within_accumulation(out, model(x), "bincount")
            x2 = torch.randn(5, 64).to(torch.bfloat16) * 3  # fresh inputs, same compiled graph
            assert_within_accumulation(compiled(x2), model(x2), "bincount")
