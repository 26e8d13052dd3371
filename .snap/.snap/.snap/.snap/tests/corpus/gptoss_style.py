"""transformers (installed 5.24) gpt-oss MXFP4: checkpoint blocks [.., G, 16] uint8 and
scales [.., G] uint8, dequantized by `convert_moe_packed_tensors` (LUT per nibble + ldexp,
returns [E, K, N]). Weight-only (W4A16). The MoE gathers each row's expert weight and uses
bmm (gpt-oss keeps [E, H, 2I] weights and multiplies x @ W); gate/up interleaved in
columns ([..., ::2] / [..., 1::2]) as gpt-oss stores them (mxemu's 'silu_interleaved');
combine view(T, k, H) weighted and summed."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.integrations.moe import _default_apply_gate, batched_mm_experts_forward
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from emu_inductor.formats import quantize

from . import E, H, I, TOP_K, CorpusEntry, Variant, WeightVariant
from .data import gen, moe_weights, qtensor, tokens, weight


_GATE_THEN_UP = torch.cat([torch.arange(0, 2 * I, 2), torch.arange(1, 2 * I, 2)])


def _to_blocks(w: torch.Tensor):
    """An MXFP4 checkpoint as gpt-oss ships it (produced here with emu_inductor's even
    quantizer; only the stored bytes matter to the layer)."""
    q = quantize(w, "mxfp4", scale_mode="even")
    *lead, kp = q.qdata.shape
    return q.qdata.reshape(*lead, kp // 16, 16), q.scale


class GptOssMXFP4Linear(nn.Module):
    def __init__(self, w):
        super().__init__()
        blocks, scales = _to_blocks(w.unsqueeze(0))
        self.register_buffer("weight_blocks", blocks)
        self.register_buffer("weight_scales", scales)
        self.act_qdq = None

    def dequantized_weights(self, dtype=torch.bfloat16):
        w = convert_moe_packed_tensors(self.weight_blocks, self.weight_scales, dtype=dtype)[0]
        return {"weight": w.t()}  # in emu_view's [N, K] layout

    def forward(self, x):
        w = convert_moe_packed_tensors(self.weight_blocks, self.weight_scales, dtype=x.dtype)[0]  # [K, N]
        return x @ w

    def emu_view(self):
        return {"weight": qtensor("mxfp4", self.weight_blocks[0].flatten(-2), self.weight_scales[0])}


class GptOssMXFP4MoE(nn.Module):
    def __init__(self, router, w13, w2):
        super().__init__()
        self.router = nn.Linear(H, E, bias=False, dtype=router.dtype)
        self.router.weight.data.copy_(router)
        # gpt-oss interleaves gate and up rows: row 2j = gate j, row 2j+1 = up j
        inter = torch.stack([w13[:, :I], w13[:, I:]], dim=2).reshape(E, 2 * I, H)
        for name, w in (("gate_up_proj", inter), ("down_proj", w2)):
            blocks, scales = _to_blocks(w)
            self.register_buffer(name + "_blocks", blocks)
            self.register_buffer(name + "_scales", scales)
        self.act_qdq = None

    def route(self, x):
        logits = self.router(x)
        top, ids = torch.topk(logits, TOP_K, dim=-1)
        return torch.softmax(top, dim=1, dtype=top.dtype).float(), ids

    def dequantized_weights(self, dtype=torch.bfloat16):
        w13 = convert_moe_packed_tensors(self.gate_up_proj_blocks, self.gate_up_proj_scales, dtype=dtype)
        w2 = convert_moe_packed_tensors(self.down_proj_blocks, self.down_proj_scales, dtype=dtype)
        return {"w13": w13.transpose(1, 2)[:, _GATE_THEN_UP], "w2": w2.transpose(1, 2)}  # emu_view's layout

    def forward(self, x):
        T = x.shape[0]
        w, ids = self.route(x)
        gate_up = convert_moe_packed_tensors(self.gate_up_proj_blocks, self.gate_up_proj_scales, dtype=x.dtype)
        down = convert_moe_packed_tensors(self.down_proj_blocks, self.down_proj_scales, dtype=x.dtype)
        flat = ids.reshape(-1)
        xr = x.repeat_interleave(TOP_K, dim=0).unsqueeze(1)  # [T*k, 1, H]
        h = torch.bmm(xr, gate_up[flat]).squeeze(1)  # [T*k, 2I]
        h = F.silu(h[..., ::2]) * h[..., 1::2]
        y = torch.bmm(h.unsqueeze(1), down[flat]).squeeze(1)  # [T*k, H]
        y = y.view(T, TOP_K, H).float() * w.unsqueeze(-1)
        return y.sum(dim=1).to(x.dtype)

    def emu_view(self):
        # rows back to emu's gate-then-up order: a row permutation of the stored bytes
        b, s = self.gate_up_proj_blocks.flatten(-2), self.gate_up_proj_scales
        return {"w13": qtensor("mxfp4", b[:, _GATE_THEN_UP], s[:, _GATE_THEN_UP]),
                "w2": qtensor("mxfp4", self.down_proj_blocks.flatten(-2), self.down_proj_scales)}


class TransformersBatchedMMMoE(nn.Module):
    """transformers' own `batched_mm` experts implementation (integrations.moe.
    batched_mm_experts_forward: rows repeated k times, `bmm(x.unsqueeze(1), W[ids])` over
    [E, K, N] weights with is_transposed=True, chunk(2) gate/up, `proj * w` summed over
    view(T, k, H)), its experts read from an MXFP4 checkpoint through
    convert_moe_packed_tensors (gate rows then up rows, concatenated); router softmax top-k
    renormalised in fp32."""

    has_gate, has_bias, is_transposed, has_post_expert_norm, _is_expert_parallel = True, False, True, False, False
    _apply_gate = _default_apply_gate

    def __init__(self, router, w13, w2):
        super().__init__()
        self.router = nn.Linear(H, E, bias=False, dtype=router.dtype)
        self.router.weight.data.copy_(router)
        for name, w in (("gate_up_proj", w13), ("down_proj", w2)):
            blocks, scales = _to_blocks(w)
            self.register_buffer(name + "_blocks", blocks)
            self.register_buffer(name + "_scales", scales)
        self.num_experts = E
        self.act_fn = F.silu
        self.act_qdq = None

    @property
    def gate_up_proj(self):  # [E, H, 2I] in the model's dtype, as the checkpoint loader would give it
        return convert_moe_packed_tensors(self.gate_up_proj_blocks, self.gate_up_proj_scales,
                                          dtype=self.router.weight.dtype)

    @property
    def down_proj(self):  # [E, I, H]
        return convert_moe_packed_tensors(self.down_proj_blocks, self.down_proj_scales, dtype=self.router.weight.dtype)

    def route(self, x):
        w, ids = torch.topk(torch.softmax(self.router(x).float(), dim=-1), TOP_K, dim=-1)
        return w / w.sum(-1, keepdim=True), ids

    def dequantized_weights(self, dtype=torch.bfloat16):
        return {n: convert_moe_packed_tensors(getattr(self, p + "_blocks"), getattr(self, p + "_scales"),
                                              dtype=dtype).transpose(1, 2)
                for n, p in (("w13", "gate_up_proj"), ("w2", "down_proj"))}

    def forward(self, x):
        w, ids = self.route(x)
        return batched_mm_experts_forward(self, x, ids, w)

    def emu_view(self):
        return {n: qtensor("mxfp4", getattr(self, p + "_blocks").flatten(-2), getattr(self, p + "_scales"))
                for n, p in (("w13", "gate_up_proj"), ("w2", "down_proj"))}


def make_batched_mm_moe(seed, dtype):
    g = gen(seed)
    m = TransformersBatchedMMMoE(*moe_weights(g, E, H, I, dtype))
    return m, (tokens(seed, 5, H, dtype),)


def make_linear(seed, dtype):
    g = gen(seed)
    return GptOssMXFP4Linear(weight(g, 2 * I, H, dtype=dtype)), (tokens(seed, 5, H, dtype),)


def make_moe(seed, dtype):
    g = gen(seed)
    m = GptOssMXFP4MoE(*moe_weights(g, E, H, I, dtype))
    return m, (tokens(seed, 5, H, dtype),)


ENTRIES = [
    CorpusEntry(
        "gptoss_mxfp4_linear", "linear", "transformers",
        "installed transformers 5.24: integrations.mxfp4.convert_moe_packed_tensors",
        Variant(WeightVariant("mxfp4", "q*2^e", e8m0_byte255="ldexp")), make_linear,
        dtypes=(torch.bfloat16, torch.float32),
        exact_gemm=False, plumbing="x @ W with W [K, N] from convert_moe_packed_tensors (not F.linear)",
        expect_fused=True,
        fused_today="mxemu::linear (semantic): its empty buffer + slice writes pass the structure check; the "
                    "[1, N, G, 16] blocks picked by [0] are read as [N, K/2] codes through a reshape; its ldexp "
                    "is the E8M0 reader 'ldexp' (byte 255: 0 stays 0, 0.5 -> 2^127, |v| >= 1 -> inf)",
    ),
    CorpusEntry(
        "gptoss_mxfp4_moe", "moe", "transformers",
        "installed transformers 5.24: integrations.mxfp4.convert_moe_packed_tensors",
        Variant(WeightVariant("mxfp4", "q*2^e", e8m0_byte255="ldexp")), make_moe,
        expect_fused=True,
        plumbing="topk on logits then softmax; gather W[ids] + bmm; interleaved gate/up [::2]/[1::2]; "
                 "view(T,k,H) weighted sum fp32",
        fused_today="one mxemu::moe (weight-only; the layer has no activation QDQ): 'semantic_bmm' rewrites "
                    "each bmm over W[ids] as a grouped GEMM over expert-sorted rows once the stack's decode is "
                    "proven (reader ldexp), 'semantic' fuses both, 'semantic_moe' proves the activation "
                    "silu(h[..., ::2]) * h[..., 1::2] to be 'silu_interleaved' (gate/up interleaved, no clamp, "
                    "no alpha: the spec registry's gate_up layout), the routing and the k-sum; the op reads the "
                    "stored interleaved w13 rows as they are (measured bf16 2026-12-03; before silu_interleaved "
                    "existed only the two grouped GEMMs fused)",
    ),
    CorpusEntry(
        "transformers_batched_mm_mxfp4_moe", "moe", "transformers",
        "installed transformers 5.24: integrations.moe.batched_mm_experts_forward (+ _default_apply_gate), "
        "integrations.mxfp4.convert_moe_packed_tensors",
        Variant(WeightVariant("mxfp4", "q*2^e", e8m0_byte255="ldexp")), make_batched_mm_moe,
        expect_fused=True,
        plumbing="repeat_interleave(k) rows, gather W[ids] + bmm (is_transposed=True), chunk(2), proj * w "
                 "view(T,k,H) summed",
        fused_today="one mxemu::moe: semantic_bmm turns both bmm over W[ids] into grouped GEMMs over "
                    "expert-sorted rows (weights proven: reader ldexp), semantic fuses them, semantic_moe proves "
                    "silu, routing and the k-sum (measured bf16 2026-12-02)",
    ),
]
