"""Backend "triton" of the mxemu ops: the generated fused kernels (emu_inductor.kernels).

Imported lazily by emu_inductor.ops.library, which falls back to the reference when
Triton is unavailable; on CPU it is chosen only under TRITON_INTERPRET=1.

`moe_triton` / `linear_triton` / `grouped_mm_triton` are the launchers with the ops'
flat argument lists: they validate every argument (`ops.validate`) and hand the
kernels layer its dataclasses (`kernels.launch.GemmWeights`, `Routing`, `ActScales`).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton  # noqa: F401  (fail the import here, not at the first call, without Triton)

from ..kernels.launch import ActScales, GemmWeights, Routing, launch_grouped_mm, launch_linear, launch_moe
from ..kernels.tiles import TileConfig
from ..spec.opspec import OpSpec
from .library import register_backend_impl
from .validate import check_grouped_mm_op, check_linear_op, check_moe_op

__all__ = ["moe_triton", "linear_triton", "grouped_mm_triton", "moe_impl", "linear_impl", "grouped_mm_impl"]


def moe_triton(hidden_states, w13, w13_scale, w13_alpha, w2, w2_scale, w2_alpha, topk_weights, topk_ids,
               a1_global_scale, a2_global_scale, expert_map, spec: OpSpec, *, reduction: Optional[str] = None,
               config: Optional[TileConfig] = None, debug: bool = False, validate: bool = True,
               prequant: Optional[bool] = None, w13_bias: Optional[torch.Tensor] = None,
               w2_bias: Optional[torch.Tensor] = None):
    """The fused MoE: routing prep, GEMM1 (+QDQ_a1, dequant, activation, QDQ_a2), GEMM2
    (dequant, router weight, reduction). reduction: "atomic" (fp32 atomics) or
    "deterministic" (per-slot rows, then a fixed-order fp32 sum, the reference's order);
    default deterministic under the interpreter, atomic on GPU, or
    EMU_INDUCTOR_MOE_REDUCTION. debug=True returns a dict with the kernel's a1, c2, a2
    rows (indexed by row id t*k+slot) besides the output.

    prequant (default: on for schemes with activation QDQ): fake-quantize the GEMM1 input
    rows once (prequant_kernel, [T, H] or [T*k, H] with the router weight on the input)
    instead of once per N tile; bit-identical.

    w13_bias [E, N1] / w2_bias [E, H] (activation dtype, optional): per-expert biases added
    to GEMM1's / GEMM2's fp32 accumulators before their one rounding (kernel spec flags
    bias1 / bias2; bias-less calls run the unchanged bias-less kernels).

    validate=False skips the argument checks (the mxemu ops validate before dispatching)."""
    if validate:
        check_moe_op(hidden_states, w13, w13_scale, w13_alpha, w2, w2_scale, w2_alpha, topk_weights, topk_ids,
                     a1_global_scale, a2_global_scale, expert_map, spec, w13_bias, w2_bias)
    return launch_moe(hidden_states, GemmWeights(w13, w13_scale, w13_alpha, w13_bias),
                      GemmWeights(w2, w2_scale, w2_alpha, w2_bias), Routing(topk_weights, topk_ids, expert_map),
                      ActScales(a1_global_scale, a2_global_scale), spec, reduction=reduction, config=config,
                      debug=debug, prequant=prequant)


def grouped_mm_triton(a, w, w_scale, w_alpha, offs, a_global_scale, spec: OpSpec, *, config=None, bias=None,
                      validate: bool = True):
    """out[r] = QDQ(a[r]) @ dequant(W[g(r)]).T (+ bias[g(r)], [E, N], on the fp32
    accumulator) over expert-sorted rows (offs: int32 group ends); rows at or past
    offs[-1] are zeros."""
    if validate:
        check_grouped_mm_op(a, w, w_scale, w_alpha, offs, a_global_scale, spec, bias)
    return launch_grouped_mm(a, GemmWeights(w, w_scale, w_alpha, bias), offs, a_global_scale, spec, config=config)


def linear_triton(x, weight, weight_scale, alpha, input_global_scale, bias, spec: OpSpec, *, config=None,
                  validate: bool = True):
    """y = QDQ(x) @ dequant(weight).T + bias: the one-expert case of the same kernel."""
    if validate:
        check_linear_op(x, weight, weight_scale, alpha, input_global_scale, bias, spec)
    return launch_linear(x, GemmWeights(weight, weight_scale, alpha, bias), input_global_scale, spec, config=config)


# The backend implementations: the mxemu ops validated every argument before dispatching.


def moe_impl(hidden_states, w13, w13_scale, w13_alpha, w2, w2_scale, w2_alpha, topk_weights, topk_ids,
             a1_global_scale, a2_global_scale, expert_map, spec, w13_bias=None, w2_bias=None):
    return moe_triton(hidden_states, w13, w13_scale, w13_alpha, w2, w2_scale, w2_alpha, topk_weights, topk_ids,
                      a1_global_scale, a2_global_scale, expert_map, spec, w13_bias=w13_bias, w2_bias=w2_bias,
                      validate=False)


def linear_impl(x, weight, weight_scale, alpha, input_global_scale, bias, spec):
    return linear_triton(x, weight, weight_scale, alpha, input_global_scale, bias, spec, validate=False)


def grouped_mm_impl(a, w, w_scale, w_alpha, offs, a_global_scale, spec, bias=None):
    return grouped_mm_triton(a, w, w_scale, w_alpha, offs, a_global_scale, spec, bias=bias, validate=False)


register_backend_impl("triton", "moe", moe_impl)
register_backend_impl("triton", "linear", linear_impl)
register_backend_impl("triton", "grouped_mm", grouped_mm_impl)
