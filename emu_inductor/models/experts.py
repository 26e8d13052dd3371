"""QuantizedExperts with per-expert GEMM biases (GPT-OSS).

`emu_inductor.reference.moe_emulated` has no bias arguments; GPT-OSS experts have
`gate_up_proj_bias` [E, 2I] and `down_proj_bias` [E, H]. This module adds them the way
vLLM's `fused_moe_kernel` does (HAS_BIAS): the bias is added to the fp32 GEMM
accumulator, before the router weight and before the one cast to the activation dtype:

    C1 = dtype(fp32(A1 @ W13[e]^T) + fp32(b13[e]))
    C3 = dtype(fp32(A2 @ W2[e]^T) + fp32(b2[e]))
    out[t] = dtype(sum_k fp32(w[t, k]) * fp32(C3))

Everything else (weight dequantization, activation QDQ, swigluoai, the combine) is the
reference's own code. With zero biases the result equals `moe_emulated` (tested bit for
bit on CPU). In the grouped_mm style the bias rides in the GEMM as one extra K column
(see `_expert_gemm_bias`), so the graph stays compile-friendly (bf16 `_grouped_mm`).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..formats import default_global_scale
from ..reference import QuantizedExperts, act_fake_quantize, apply_activation, get_scheme
from ..reference.moe import check_moe_args, dequantize_experts, sort_by_expert

__all__ = ["moe_emulated_with_bias", "BiasedQuantizedExperts"]


def _expert_gemm_bias(a_rows, w, key, E, style, bias=None):
    """Row r = dtype(fp32(a_rows[r] @ w[key[r]].T) + fp32(bias[key[r]])), one rounding;
    rows with key == E give zeros.

    "grouped_mm": torch._grouped_mm has no fp32 output for bf16 operands (its meta
    function requires bf16 out), so the bias rides in the GEMM: K is extended by one
    column of ones in the activations and the bias in the weights (padded with zeros to
    keep 16-byte strides). The bf16 bias times 1.0 is exact, so the fp32 accumulator
    holds sum_K a*w + b before the single cast. "bmm": fp32 gather + bmm (reference).
    """
    dtype = a_rows.dtype
    if style == "grouped_mm":
        if bias is not None:
            if bias.dtype != dtype:
                raise ValueError(f"bias: expected dtype {dtype} like the activations, got {bias.dtype}")
            R, K = a_rows.shape
            pad = 8
            ones = torch.zeros(R, pad, dtype=dtype, device=a_rows.device)
            ones[:, 0] = 1
            a_rows = torch.cat([a_rows, ones], dim=1)
            wb = torch.zeros(*w.shape[:2], pad, dtype=dtype, device=w.device)
            wb[:, :, 0] = bias
            w = torch.cat([w, wb], dim=2)
        order, offs = sort_by_expert(key, E)
        y_sorted = torch._grouped_mm(a_rows[order], w.transpose(-2, -1), offs=offs)
        y = torch.empty_like(y_sorted)
        y[order] = y_sorted
    else:
        wg = w.float()[key.clamp(max=E - 1)]
        y = torch.bmm(a_rows.float().unsqueeze(1), wg.transpose(-2, -1)).squeeze(1)
        if bias is not None:
            y = y + bias.float()[key.clamp(max=E - 1)]
        y = y.to(dtype)
    return torch.where((key < E).unsqueeze(-1), y, torch.zeros_like(y))


def moe_emulated_with_bias(hidden_states, w13, w2, topk_weights, topk_ids, *, scheme, w13_scale, w2_scale,
                           w13_alpha=None, w2_alpha=None, a1_global_scale=None, a2_global_scale=None,
                           activation="swigluoai", w13_bias: Optional[torch.Tensor] = None,
                           w2_bias: Optional[torch.Tensor] = None, gemm_style="grouped_mm"):
    scheme = get_scheme(scheme)
    T, H, E, I = check_moe_args(
        hidden_states, w13, w2, topk_weights, topk_ids, scheme, w13_scale=w13_scale, w2_scale=w2_scale,
        w13_alpha=w13_alpha, w2_alpha=w2_alpha, activation=activation, apply_router_weight_on_input=False,
        expert_map=None, a1_global_scale=a1_global_scale, a2_global_scale=a2_global_scale,
    )
    N1 = w13.shape[1]
    for name, b, shape in (("w13_bias", w13_bias, (E, N1)), ("w2_bias", w2_bias, (E, H))):
        if b is not None and tuple(b.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(b.shape)}")
    dtype = hidden_states.dtype
    fmt = scheme.weight_fmt
    top_k = topk_ids.shape[1]
    W13 = dequantize_experts(w13, w13_scale, fmt, w13_alpha, dtype)
    W2 = dequantize_experts(w2, w2_scale, fmt, w2_alpha, dtype)
    key = topk_ids.reshape(-1).long()
    x_rows = hidden_states.repeat_interleave(top_k, dim=0)
    a1 = act_fake_quantize(x_rows, scheme.act, a1_global_scale)
    c1 = _expert_gemm_bias(a1, W13, key, E, gemm_style, w13_bias)
    c2 = apply_activation(c1, activation)
    a2 = act_fake_quantize(c2, scheme.act, a2_global_scale)
    c3 = _expert_gemm_bias(a2, W2, key, E, gemm_style, w2_bias)
    c3 = c3.reshape(T, top_k, H).to(torch.float32)
    c3 = c3 * topk_weights.to(torch.float32).unsqueeze(-1)
    return c3.sum(dim=1).to(dtype)


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
        c1 = _expert_gemm_bias(x_rows, W13, key, W13.shape[0], "bmm", self.w13_bias)
        c2 = apply_activation(c1, self.activation)
        for buf, t in ((self.a1_global_scale, hidden_states), (self.a2_global_scale, c2)):
            amax = t.abs().amax().float()
            buf.copy_(default_global_scale(amax, "vllm"))
        return self

    def forward(self, hidden_states, topk_weights, topk_ids):
        return moe_emulated_with_bias(
            hidden_states, self.w13, self.w2, topk_weights, topk_ids, scheme=self.scheme,
            w13_scale=self.w13_scale, w2_scale=self.w2_scale, w13_alpha=self.w13_alpha, w2_alpha=self.w2_alpha,
            a1_global_scale=self.a1_global_scale, a2_global_scale=self.a2_global_scale,
            activation=self.activation, w13_bias=self.w13_bias, w2_bias=self.w2_bias,
            gemm_style="grouped_mm" if self.gemm_style == "grouped_mm" else "bmm",
        )
