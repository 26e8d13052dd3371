"""NVIDIA ModelOpt (installed 0.47): qtensor round trips. An NVFP4 linear (NVFP4QTensor
.quantize / .dequantize for the weight and, with the exported input_scale, for the
activation) and an MXFP4 MoE (MXFP4QTensor for weights and activations). MoE routing the
transformers eager way ModelOpt's HF plugins wrap: a one-hot expert mask, torch.where per
expert, gate/up by chunk(2, -1), index_add_ of bf16 weighted rows."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from modelopt.torch.quantization.qtensor import MXFP4QTensor, NVFP4QTensor

from . import E, H, I, TOP_K, CorpusEntry, Variant, WeightVariant
from .data import gen, moe_weights, qtensor, tokens, weight


def nvfp4_qdq(x, scale_2):
    q, s, s2 = NVFP4QTensor.quantize(x, 16, weights_scaling_factor_2=scale_2)
    return q.dequantize(x.dtype, scale=s, double_scale=s2, block_sizes={-1: 16})


def mxfp4_qdq(x):
    q, s = MXFP4QTensor.quantize(x, 32)
    return q.dequantize(x.dtype, scale=s, block_sizes={-1: 32})


class ModelOptNVFP4Linear(nn.Module):
    def __init__(self, w, x_calib):
        super().__init__()
        q, s, s2 = NVFP4QTensor.quantize(w, 16)
        self.register_buffer("weight", q._quantized_data)
        self.register_buffer("weight_scale", s)
        self.register_buffer("weight_scale_2", s2)
        self.register_buffer("input_scale", x_calib.abs().amax().float() / (6.0 * 448.0))
        self.shape = tuple(w.shape)

    def act_qdq(self, x):
        return nvfp4_qdq(x, self.input_scale)

    def dequantized_weights(self, dtype=torch.bfloat16):
        q = NVFP4QTensor(torch.Size(self.shape), dtype, self.weight)
        return {"weight": q.dequantize(dtype, scale=self.weight_scale, double_scale=self.weight_scale_2,
                                       block_sizes={-1: 16})}

    def forward(self, x):
        return F.linear(self.act_qdq(x), self.dequantized_weights(x.dtype)["weight"])

    def emu_view(self):
        return {"weight": qtensor("nvfp4", self.weight, self.weight_scale, self.weight_scale_2),
                "a1_global": self.input_scale}


class ModelOptMXFP4MoE(nn.Module):
    def __init__(self, router, w13, w2):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False, dtype=router.dtype)
        self.gate.weight.data.copy_(router)
        for name, w in (("gate_up_proj", w13), ("down_proj", w2)):
            q, s = MXFP4QTensor.quantize(w, 32)
            self.register_buffer(name, q._quantized_data)
            self.register_buffer(name + "_scale", s.reshape(*w.shape[:-1], -1))
            setattr(self, name + "_shape", tuple(w.shape))

    def route(self, x):
        logits = self.gate(x)
        w = F.softmax(logits, dim=1, dtype=torch.float)
        w, ids = torch.topk(w, TOP_K, dim=-1)
        return w / w.sum(dim=-1, keepdim=True), ids

    def act_qdq(self, x):
        return mxfp4_qdq(x)

    def _weight(self, name, dtype):
        q = MXFP4QTensor(torch.Size(getattr(self, name + "_shape")), dtype, getattr(self, name))
        return q.dequantize(dtype, scale=getattr(self, name + "_scale"), block_sizes={-1: 32})

    def dequantized_weights(self, dtype=torch.bfloat16):
        return {"w13": self._weight("gate_up_proj", dtype), "w2": self._weight("down_proj", dtype)}

    def forward(self, x):
        w, ids = self.route(x)
        w = w.to(x.dtype)
        gate_up, down = self._weight("gate_up_proj", x.dtype), self._weight("down_proj", x.dtype)
        out = torch.zeros_like(x)
        expert_mask = F.one_hot(ids, num_classes=E).permute(2, 1, 0)
        for e in range(E):
            idx, top_x = torch.where(expert_mask[e])
            cur = x[top_x]
            g, u = F.linear(self.act_qdq(cur), gate_up[e]).chunk(2, dim=-1)
            h = F.linear(self.act_qdq(F.silu(g) * u), down[e])
            out.index_add_(0, top_x, (h * w[top_x, idx, None]).to(x.dtype))
        return out

    def emu_view(self):
        return {"w13": qtensor("mxfp4", self.gate_up_proj, self.gate_up_proj_scale),
                "w2": qtensor("mxfp4", self.down_proj, self.down_proj_scale)}


def make_linear(seed, dtype):
    g = gen(seed)
    m = ModelOptNVFP4Linear(weight(g, 2 * I, H, dtype=dtype), tokens(seed + 50, 8, H, dtype))
    return m, (tokens(seed, 5, H, dtype),)


def make_moe(seed, dtype):
    g = gen(seed)
    m = ModelOptMXFP4MoE(*moe_weights(g, E, H, I, dtype))
    return m, (tokens(seed, 5, H, dtype),)


ENTRIES = [
    CorpusEntry(
        "modelopt_nvfp4_linear", "linear", "modelopt",
        "installed nvidia-modelopt 0.47: NVFP4QTensor.quantize / .dequantize (weight and activation)",
        Variant(WeightVariant("nvfp4", "q*(s*g)", recipe="modelopt"),
                act={"fmt": "nvfp4", "recipe": "modelopt", "signed_zero": "positive"}, act_global="static"),
        make_linear, expect_fused=True,
        fused_today="one mxemu::linear with the activation QDQ (semantic, ~15 s): e2m1_values / e2m1_bounds are "
                    "module globals Dynamo lifts to graph inputs; the backend hands Inductor's real inputs to the "
                    "recogniser, which reads their values (asserted at run time), proves the weight as v*(s*g) with "
                    "code 0x8 read as +0 (ModelOpt's table; invisible after the GEMM) and the activation as recipe "
                    "modelopt",
    ),
    CorpusEntry(
        "modelopt_mxfp4_moe", "moe", "modelopt",
        "installed nvidia-modelopt 0.47: MXFP4QTensor.quantize / .dequantize (weights and activations)",
        Variant(WeightVariant("mxfp4", "q*2^e", e8m0_byte255="inf"),
                act={"fmt": "mxfp4", "scale_mode": "rceil", "rounding": "half_toward_zero", "signed_zero": "le0"}),
        make_moe, compile_smoke=False,
        compile_note="default Dynamo config: torch.where(expert_mask[e]) (nonzero) in the loop makes Dynamo skip "
                     "the forward frame (measured 54-121 s, 7 graphs, no fusion); left out of the compile test for "
                     "time",
        fused_today="default config: nothing. With the capture flags: one graph; the per-expert F.linear over "
                    "gate_up[e] / down[e] become two mxemu::grouped_mm (semantic_loop), weight-only; but stock "
                    "Inductor miscompiles ModelOpt's activation QDQ on nonzero-selected rows (measured: backend "
                    "'inductor' and 'mxemu' both max error 10.0 vs eager at seed 1, aot_eager exact; the QDQ is "
                    "not fused, so mxemu inherits it); no mxemu::moe, for two reasons: semantic_loop takes a per-expert "
                    "QDQ into the grouped GEMMs only when it is a proven variant, and ModelOpt's MXFP4 qtensor QDQ "
                    "is none (closest 'modelopt' gives NaN for a block holding NaN / -Inf, ModelOpt gives -0.0; "
                    "semantic_loop_moe's refusal names the probe); and its bf16 combine (weighted rows rounded to "
                    "bf16, index_add_ into a bf16 buffer) differs from mxemu::moe's fp32 sum, verified by the body "
                    "proof on the same plumbing with a proven QDQ (tests/test_recognize_moe_loop_qdq.py "
                    "'bf16_combine': 261 of 1024 values differ on a probe routing); measured bf16 2026-12-02",
        plumbing="one-hot expert mask + torch.where per expert, chunk(2), index_add_ bf16",
    ),
]
