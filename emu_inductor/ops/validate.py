"""Argument validation at the op boundary: every check of what a caller passes to an
mxemu op or its Triton launcher, before anything runs (ValueError naming the argument;
no device synchronisation: value checks only on CPU tensors outside a compile).

The shape/dtype rules of the MoE arguments are the reference's own (`check_moe_args`,
`check_bias`), so the eager oracle and the fused ops accept exactly the same inputs.
"""

from __future__ import annotations

import torch

from ..formats import FORMATS
from ..reference.moe import check_bias, check_moe_args
from ..spec.opspec import OpSpec

__all__ = ["check_devices", "check_ids_cpu", "check_moe_inputs", "check_moe_biases", "check_packed_weight",
           "check_grouped_mm_inputs", "check_linear_inputs"]


def _fail(arg, got, expected):
    raise ValueError(f"{arg}: expected {expected}, got {got}")


def check_devices(dev, **tensors):
    for name, t in tensors.items():
        if t is not None and t.device != dev:
            _fail(name, f"a tensor on {t.device}", f"a tensor on {dev} like the activations")


def check_ids_cpu(topk_ids, n_global, expert_map, E):
    # value checks only where they cost no device sync (CPU tensors)
    if topk_ids.device.type == "cpu" and topk_ids.numel() and not torch.compiler.is_compiling():
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= n_global:
            _fail("topk_ids", f"ids in [{lo}, {hi}]", f"ids in [0, {n_global - 1}]")
        if expert_map is not None and expert_map.numel():
            if int(expert_map.max()) >= E or int(expert_map.min()) < -1:
                _fail("expert_map", f"values in [{int(expert_map.min())}, {int(expert_map.max())}]",
                      f"-1 or 0..{E - 1}")


def check_moe_inputs(x, w13, w13_scale, w13_alpha, w2, w2_scale, w2_alpha, topk_weights, topk_ids,
                     a1_gs, a2_gs, expert_map, spec: OpSpec, w13_bias=None, w2_bias=None):
    """Every argument of the fused MoE launcher; returns (T, H, E, I)."""
    check_devices(x.device, w13=w13, w13_scale=w13_scale, w13_alpha=w13_alpha, w2=w2, w2_scale=w2_scale,
                  w2_alpha=w2_alpha, topk_weights=topk_weights, topk_ids=topk_ids, a1_global_scale=a1_gs,
                  a2_global_scale=a2_gs, expert_map=expert_map, w13_bias=w13_bias, w2_bias=w2_bias)
    # shapes and dtypes (the reference's checker; its value checks run on CPU tensors only)
    T, H, E, I = check_moe_args(
        x, w13, w2, topk_weights, topk_ids, spec.scheme(), w13_scale=w13_scale, w2_scale=w2_scale,
        w13_alpha=w13_alpha, w2_alpha=w2_alpha, activation=spec.activation,
        apply_router_weight_on_input=spec.router_weight_on_input, expert_map=expert_map,
        a1_global_scale=a1_gs, a2_global_scale=a2_gs, w13_bias=w13_bias, w2_bias=w2_bias)
    return T, H, E, I


def check_moe_biases(hidden_states, w13, w13_bias, w2_bias) -> None:
    """The mxemu::moe op's biases (metadata only: also runs in the fake implementation)."""
    if w13_bias is None and w2_bias is None:
        return
    E = w13.shape[0] if w13.dim() == 3 else -1
    check_bias("w13_bias", w13_bias, hidden_states, (E, w13.shape[1] if w13.dim() == 3 else -1))
    check_bias("w2_bias", w2_bias, hidden_states, (E, hidden_states.shape[-1]))


def check_grouped_bias(a, w, bias) -> None:
    check_bias("bias", bias, a, (w.shape[0], w.shape[1]) if w.dim() == 3 else (-1, -1))


def check_packed_weight(name, w, scale, fmt, K, lead):
    if not isinstance(w, torch.Tensor) or w.dtype != torch.uint8:
        _fail(name, getattr(w, "dtype", type(w).__name__), "packed uint8 weights")
    if w.dim() != lead + 2 or fmt.logical_size(w.shape[-1]) != K:
        _fail(name, f"shape {tuple(w.shape)}", f"{lead + 2}-d with last dim {fmt.packed_size(K)} (K={K})")
    if scale.dtype != fmt.scale.storage_dtype or tuple(scale.shape) != (*w.shape[:-1], K // fmt.block_size):
        _fail(name + "_scale", f"{scale.dtype} {tuple(scale.shape)}",
              f"{fmt.scale.storage_dtype} {(*w.shape[:-1], K // fmt.block_size)}")


def check_grouped_mm_inputs(a, w, w_scale, w_alpha, offs, a_global_scale, spec: OpSpec, bias=None) -> None:
    fmt = FORMATS[spec.weight_fmt]
    if a.dim() != 2 or a.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        _fail("a", f"{a.dtype} {tuple(a.shape)}", "a 2-d bf16/fp16/fp32 tensor")
    check_packed_weight("w", w, w_scale, fmt, a.shape[1], 1)
    if offs.dim() != 1 or offs.shape[0] != w.shape[0] or offs.dtype not in (torch.int32, torch.int64):
        _fail("offs", f"{offs.dtype} {tuple(offs.shape)}", f"1-d int32 [E={w.shape[0]}]")
    check_devices(a.device, w=w, w_scale=w_scale, w_alpha=w_alpha, offs=offs, a_global_scale=a_global_scale)
    if bias is not None:
        check_bias("bias", bias, a, (w.shape[0], w.shape[1]))


def check_linear_inputs(x, weight, weight_scale, alpha, input_global_scale, bias, spec: OpSpec) -> None:
    fmt = FORMATS[spec.weight_fmt]
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or x.dim() < 1:
        _fail("x", f"{x.dtype} {tuple(x.shape)}", "a bf16/fp16/fp32 tensor [..., K]")
    K = x.shape[-1]
    check_packed_weight("weight", weight, weight_scale, fmt, K, 0)
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        _fail("bias", f"shape {tuple(bias.shape)}", f"[{weight.shape[0]}]")
    check_devices(x.device, weight=weight, weight_scale=weight_scale, alpha=alpha,
                  input_global_scale=input_global_scale, bias=bias)
    N = weight.shape[0]
    rows = x.numel() // K if K else 0
    # (an empty input returns before the global scale is read, so its shape is not checked then)
    if rows and alpha is not None and alpha.numel() != 1 and tuple(alpha.shape) != (N,):
        _fail("alpha", f"shape {tuple(alpha.shape)}", f"one value or [N={N}]")
