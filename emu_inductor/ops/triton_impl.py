"""Backend "triton" of the mxemu ops: the generated fused kernels (emu_inductor.codegen).

Imported lazily by emu_inductor.ops.library, which falls back to the reference when
Triton is unavailable; on CPU it is chosen only under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import triton  # noqa: F401  (fail the import here, not at the first call, without Triton)

from ..codegen.launcher import grouped_mm_triton, linear_triton, moe_triton
from .library import register_backend_impl

__all__ = ["moe_impl", "linear_impl", "grouped_mm_impl"]


def moe_impl(hidden_states, w13, w13_scale, w13_alpha, w2, w2_scale, w2_alpha, topk_weights, topk_ids,
             a1_global_scale, a2_global_scale, expert_map, spec, w13_bias=None, w2_bias=None):
    return moe_triton(hidden_states, w13, w13_scale, w13_alpha, w2, w2_scale, w2_alpha, topk_weights, topk_ids,
                      a1_global_scale, a2_global_scale, expert_map, spec, w13_bias=w13_bias, w2_bias=w2_bias)


def linear_impl(x, weight, weight_scale, alpha, input_global_scale, bias, spec):
    return linear_triton(x, weight, weight_scale, alpha, input_global_scale, bias, spec)


def grouped_mm_impl(a, w, w_scale, w_alpha, offs, a_global_scale, spec, bias=None):
    return grouped_mm_triton(a, w, w_scale, w_alpha, offs, a_global_scale, spec, bias=bias)


register_backend_impl("triton", "moe", moe_impl)
register_backend_impl("triton", "linear", linear_impl)
register_backend_impl("triton", "grouped_mm", grouped_mm_impl)
