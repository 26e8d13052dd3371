"""QuantizedExperts with per-expert GEMM biases (GPT-OSS).

GPT-OSS experts have `gate_up_proj_bias` [E, 2I] and `down_proj_bias` [E, H]. They are
applied the way
vLLM's `fused_moe_kernel` does (HAS_BIAS): the bias is added to the fp32 GEMM
accumulator, before the router weight and before the one cast to the activation dtype:

    C1 = dtype(fp32(A1 @ W13[e]^T) + fp32(b13[e]))
    C3 = dtype(fp32(A2 @ W2[e]^T) + fp32(b2[e]))
    out[t] = dtype(sum_k fp32(w[t, k]) * fp32(C3))

The biases are arguments of the reference itself (`moe_emulated(w13_bias=, w2_bias=)`);
everything else (weight dequantization, activation QDQ, swigluoai, the combine) is the
reference's own code. With zero biases the result equals `moe_emulated` without biases
(tested bit for bit on CPU). In the grouped_mm style the bias rides in the GEMM as one
extra K column (`reference.moe.grouped_bias_operands`), so the graph stays
compile-friendly (bf16 `_grouped_mm`), and under backend="mxemu" the whole layer fuses
into one `mxemu::moe` with the bias arguments.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..formats import default_global_scale
from ..reference import QuantizedExperts, apply_activation, moe_emulated
from ..reference.moe import dequantize_experts, expert_gemm

__all__ = ["moe_emulated_with_bias", "BiasedQuantizedExperts"]


def moe_emulated_with_bias(hidden_states, w13, w2, topk_weights, topk_ids, *, scheme, w13_scale, w2_scale,
                           w13_alpha=None, w2_alpha=None, a1_global_scale=None, a2_global_scale=None,
                           activation="swigluoai", w13_bias: Optional[torch.Tensor] = None,
                           w2_bias: Optional[torch.Tensor] = None, gemm_style="grouped_mm"):
    """`moe_emulated` with per-expert GEMM biases (the reference's `w13_bias` / `w2_bias`)."""
    return moe_emulated(
        hidden_states, w13, w2, topk_weights, topk_ids, scheme=scheme, w13_scale=w13_scale, w2_scale=w2_scale,
        w13_alpha=w13_alpha, w2_alpha=w2_alpha, a1_global_scale=a1_global_scale, a2_global_scale=a2_global_scale,
        activation=activation, w13_bias=w13_bias, w2_bias=w2_bias, gemm_style=gemm_style,
    )


class BiasedQuantizedExperts(QuantizedExperts):
    """QuantizedExperts plus per-expert GEMM biases (see the module docstring)."""

    def __init__(self, *args, w13_bias=None, w2_bias=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("w13_bias", w13_bias)
        self.register_buffer("w2_bias", w2_bias)

    @classmethod
    def from_float(cls, w13, w2, *, scheme, w13_bias=None, w2_bias=None, **kwargs):
        base = QuantizedExperts.from_float(w13, w2, scheme=scheme, **kwargs)
        return cls.from_quantized(base, w13_bias=w13_bias, w2_bias=w2_bias)

    @classmethod
    def from_quantized(cls, base: QuantizedExperts, *, w13_bias=None, w2_bias=None):
        return cls(base.w13, base.w13_scale, base.w2, base.w2_scale, scheme=base.scheme,
                   w13_alpha=base.w13_alpha, w2_alpha=base.w2_alpha, a1_global_scale=base.a1_global_scale,
                   a2_global_scale=base.a2_global_scale, activation=base.activation,
                   gemm_style=base.gemm_style, w13_bias=w13_bias, w2_bias=w2_bias)

    @torch.no_grad()
    def calibrate_(self, hidden_states, topk_weights, topk_ids):
        """Activation global scales from one pass, with the GEMM1 bias included."""
        if self.a1_global_scale is None:
            return self
        fmt, dt = self.scheme.weight_fmt, hidden_states.dtype
        W13 = dequantize_experts(self.w13, self.w13_scale, fmt, self.w13_alpha, dt)
        key = topk_ids.reshape(-1).long()
        x_rows = hidden_states.repeat_interleave(topk_ids.shape[1], 0)
        c1 = expert_gemm(x_rows, W13, key, W13.shape[0], "bmm", self.w13_bias)
        c2 = apply_activation(c1, self.activation)
        for buf, t in ((self.a1_global_scale, hidden_states), (self.a2_global_scale, c2)):
            amax = t.abs().amax().float()
            buf.copy_(default_global_scale(amax, "vllm"))
        self.calibrated = True
        return self

    def forward(self, hidden_states, topk_weights, topk_ids):
        self.calibrate_on_first_call(hidden_states, topk_weights, topk_ids)
        return moe_emulated_with_bias(
            hidden_states, self.w13, self.w2, topk_weights, topk_ids, scheme=self.scheme,
            w13_scale=self.w13_scale, w2_scale=self.w2_scale, w13_alpha=self.w13_alpha, w2_alpha=self.w2_alpha,
            a1_global_scale=self.a1_global_scale, a2_global_scale=self.a2_global_scale,
            activation=self.activation, w13_bias=self.w13_bias, w2_bias=self.w2_bias,
            gemm_style="grouped_mm" if self.gemm_style == "grouped_mm" else "bmm",
        )
