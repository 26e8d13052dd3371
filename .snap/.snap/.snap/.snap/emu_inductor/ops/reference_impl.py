"""Reference implementations of the mxemu ops: the eager emulation itself.

Used on CPU without Triton's interpreter (logged once) and as the oracle in tests.
"""

from __future__ import annotations

import torch

from ..reference import act_fake_quantize, dequantize_weight, moe_emulated
from ..reference.moe import dequantize_experts, expert_gemm
from ..spec.opspec import OpSpec

__all__ = ["moe_reference", "linear_reference", "grouped_mm_reference"]


def moe_reference(hidden_states, w13, w13_scale, w13_alpha, w2, w2_scale, w2_alpha, topk_weights, topk_ids,
                  a1_global_scale, a2_global_scale, expert_map, spec: OpSpec, w13_bias=None, w2_bias=None):
    style = "grouped_mm" if hidden_states.dtype == torch.bfloat16 else "bmm"
    return moe_emulated(
        hidden_states, w13, w2, topk_weights, topk_ids, scheme=spec.scheme(), w13_scale=w13_scale,
        w2_scale=w2_scale, w13_alpha=w13_alpha, w2_alpha=w2_alpha, a1_global_scale=a1_global_scale,
        a2_global_scale=a2_global_scale, activation=spec.activation,
        apply_router_weight_on_input=spec.router_weight_on_input, expert_map=expert_map,
        gemm_style=style, fp6_layout=spec.fp6_layout, validate=False, w13_bias=w13_bias, w2_bias=w2_bias,
        e8m0_byte255=spec.w_e8m0_byte255, scale_order=spec.w_scale_order, e8m0_byte0=spec.w_e8m0_byte0,
    )


def linear_reference(x, weight, weight_scale, alpha, input_global_scale, bias, spec: OpSpec):
    scheme = spec.scheme()
    w = dequantize_weight(weight, weight_scale, scheme.weight_fmt, alpha=alpha, dtype=x.dtype,
                          fp6_layout=spec.fp6_layout, e8m0_byte255=spec.w_e8m0_byte255,
                          scale_order=spec.w_scale_order, e8m0_byte0=spec.w_e8m0_byte0)
    a = act_fake_quantize(x, scheme.act, input_global_scale)
    return torch.nn.functional.linear(a, w, bias)


def grouped_mm_reference(a, w, w_scale, w_alpha, offs, a_global_scale, spec: OpSpec, bias=None):
    """out[r] = QDQ(a[r]) @ dequant(W[g(r)]).T (+ bias[g(r)] on the fp32 accumulator) with
    g(r) the group whose offs range holds r; rows at or past offs[-1] are zeros."""
    scheme = spec.scheme()
    W = dequantize_experts(w, w_scale, scheme.weight_fmt, w_alpha, a.dtype, spec.fp6_layout,
                           e8m0_byte255=spec.w_e8m0_byte255, scale_order=spec.w_scale_order,
                           e8m0_byte0=spec.w_e8m0_byte0)
    aq = act_fake_quantize(a, scheme.act, a_global_scale)
    rows = torch.arange(a.shape[0], device=a.device)
    g = torch.searchsorted(offs.to(torch.int64), rows, right=True)  # group of each row; E if past the end
    # the reference's own bmm-style expert GEMM (bias on the fp32 accumulator; key E -> zeros)
    return expert_gemm(aq, W, g, w.shape[0], "bmm", bias)
