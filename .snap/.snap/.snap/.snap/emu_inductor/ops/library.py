"""The `mxemu::*` custom ops that the passes insert in place of matched subgraphs.

Opaque `torch.library.custom_op`s with fake implementations, so Dynamo, AOTAutograd
and Inductor treat them as ordinary extern ops (Inductor emits a direct call). Each op
dispatches at run time to an implementation backend:
  "triton"     generated fused Triton kernels (CUDA/ROCm, or CPU under TRITON_INTERPRET=1)
  "reference"  the eager emulation (CPU without the interpreter; logged once)
EMU_INDUCTOR_KERNEL_BACKEND=reference|triton overrides the choice.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from typing import Callable, Optional

import torch
from torch import Tensor

from ..reference.moe import check_bias
from ..spec.opspec import OpSpec
from .reference_impl import grouped_mm_reference, linear_reference, moe_reference
from .validate import check_grouped_bias, check_grouped_mm_op, check_linear_op, check_moe_biases, check_moe_op

__all__ = ["register_backend_impl", "select_backend", "OP_NAMES"]

log = logging.getLogger("emu_inductor.ops")

OP_NAMES = ("moe", "linear", "grouped_mm")
_REFERENCE: dict[str, Callable] = {"moe": moe_reference, "linear": linear_reference, "grouped_mm": grouped_mm_reference}
_BACKENDS: dict[str, dict[str, Callable]] = {"reference": dict(_REFERENCE)}
_logged: set = set()


def register_backend_impl(backend: str, op: str, fn: Callable) -> None:
    """Install `fn` (same arguments as the reference, spec parsed) for `op` on `backend`."""
    if op not in OP_NAMES:
        raise ValueError(f"op: expected one of {OP_NAMES}, got {op!r}")
    _BACKENDS.setdefault(backend, {})[op] = fn


def _log_once(key, msg, *args, level=logging.INFO):
    if key not in _logged:
        _logged.add(key)
        log.log(level, msg, *args)


def _load_triton_backend() -> bool:
    if "triton" in _BACKENDS:
        return True
    try:
        # lazy: Triton is optional at run time (missing or broken -> the reference)
        from . import triton_impl  # noqa: F401  (registers itself)
    except Exception as e:  # a missing/broken Triton must not break the user's model
        _log_once(("triton-import",), "emu_inductor: Triton kernels unavailable (%s); using the reference", e,
                  level=logging.WARNING)
        return False
    return "triton" in _BACKENDS


_PATTERN_TRACING = threading.local()


@contextlib.contextmanager
def pattern_tracing():
    """While the passes trace their search patterns on example tensors, the mxemu ops run
    the eager reference: only the graph's structure is kept, so there is no point in
    generating, loading and (on CPU) interpreting Triton kernels for the examples."""
    prev = getattr(_PATTERN_TRACING, "on", False)
    _PATTERN_TRACING.on = True
    try:
        yield
    finally:
        _PATTERN_TRACING.on = prev


def _check_values() -> bool:
    # the example tensors the passes trace patterns with carry no meaningful values
    return not getattr(_PATTERN_TRACING, "on", False)


def select_backend(device: torch.device) -> str:
    if getattr(_PATTERN_TRACING, "on", False):
        return "reference"
    forced = os.environ.get("EMU_INDUCTOR_KERNEL_BACKEND")
    if forced:
        if forced not in ("reference", "triton"):
            raise ValueError(f"EMU_INDUCTOR_KERNEL_BACKEND: expected reference or triton, got {forced!r}")
        if forced == "triton" and not _load_triton_backend():
            raise RuntimeError("EMU_INDUCTOR_KERNEL_BACKEND=triton, but the Triton kernels could not be loaded")
        return forced
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if (device.type != "cpu" or interp) and _load_triton_backend():
        return "triton"
    _log_once(("reference", device.type), "emu_inductor: running mxemu ops with the eager reference on %s "
              "(set TRITON_INTERPRET=1 to run the Triton kernels under the interpreter)", device.type)
    return "reference"


def _impl(op: str, device: torch.device) -> Callable:
    backend = select_backend(device)
    fn = _BACKENDS[backend].get(op)
    if fn is None:
        _log_once(("missing", backend, op), "emu_inductor: no %s kernel for mxemu::%s; using the reference", backend, op)
        fn = _REFERENCE[op]
    return fn


# --- op definitions -------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _parse_spec(spec: str) -> OpSpec:
    # the spec string is a constant of the compiled graph: parse it once, not on every call
    # (OpSpec is frozen, so sharing the parsed value is safe; a bad string raises every time)
    return OpSpec.from_str(spec)


def _bias_kwargs(**biases) -> dict:
    # only calls with a bias pass the keywords: implementations registered before biases
    # existed keep working for bias-less calls
    return biases if any(b is not None for b in biases.values()) else {}


@torch.library.custom_op("mxemu::moe", mutates_args=())
def moe(hidden_states: Tensor, w13: Tensor, w13_scale: Tensor, w13_alpha: Optional[Tensor], w2: Tensor,
        w2_scale: Tensor, w2_alpha: Optional[Tensor], topk_weights: Tensor, topk_ids: Tensor,
        a1_global_scale: Optional[Tensor], a2_global_scale: Optional[Tensor], expert_map: Optional[Tensor],
        spec: str, w13_bias: Optional[Tensor] = None, w2_bias: Optional[Tensor] = None) -> Tensor:
    """Whole emulated MoE layer (both GEMMs, activation, QDQs, top-k combine). Optional
    per-expert biases w13_bias [E, N1] / w2_bias [E, H] in the activation dtype are added
    to each GEMM's fp32 accumulator before its one rounding (vLLM's HAS_BIAS).

    Every argument is validated here, for every backend (`validate.check_moe_op`): host
    facts raise ValueError now, bad values (scales, ids) raise on CPU and fail a
    `torch._assert_async` on an accelerator (no device-to-host sync)."""
    op_spec = _parse_spec(spec)
    check_moe_op(hidden_states, w13, w13_scale, w13_alpha, w2, w2_scale, w2_alpha, topk_weights, topk_ids,
                 a1_global_scale, a2_global_scale, expert_map, op_spec, w13_bias, w2_bias, values=_check_values())
    return _impl("moe", hidden_states.device)(
        hidden_states, w13, w13_scale, w13_alpha, w2, w2_scale, w2_alpha, topk_weights, topk_ids,
        a1_global_scale, a2_global_scale, expert_map, op_spec,
        **_bias_kwargs(w13_bias=w13_bias, w2_bias=w2_bias))


@moe.register_fake
def _moe_fake(hidden_states, w13, w13_scale, w13_alpha, w2, w2_scale, w2_alpha, topk_weights, topk_ids,
              a1_global_scale, a2_global_scale, expert_map, spec, w13_bias=None, w2_bias=None):
    check_moe_biases(hidden_states, w13, w13_bias, w2_bias)  # (a meta bias dispatches here)
    return hidden_states.new_empty(hidden_states.shape)


@torch.library.custom_op("mxemu::linear", mutates_args=())
def linear(x: Tensor, weight: Tensor, weight_scale: Tensor, alpha: Optional[Tensor],
           input_global_scale: Optional[Tensor], bias: Optional[Tensor], spec: str) -> Tensor:
    """y = QDQ(x) @ dequant(weight).T + bias (the dense, one-expert case); validated here
    for every backend (`validate.check_linear_op`)."""
    op_spec = _parse_spec(spec)
    check_linear_op(x, weight, weight_scale, alpha, input_global_scale, bias, op_spec, values=_check_values())
    return _impl("linear", x.device)(x, weight, weight_scale, alpha, input_global_scale, bias, op_spec)


@linear.register_fake
def _linear_fake(x, weight, weight_scale, alpha, input_global_scale, bias, spec):
    if bias is not None:  # metadata only (no values: a fake tensor has none)
        check_bias("bias", bias, x, (weight.shape[0],))
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("mxemu::grouped_mm", mutates_args=())
def grouped_mm(a: Tensor, w: Tensor, w_scale: Tensor, w_alpha: Optional[Tensor], offs: Tensor,
               a_global_scale: Optional[Tensor], spec: str, bias: Optional[Tensor] = None) -> Tensor:
    """One grouped GEMM over expert-sorted rows with fused activation QDQ and weight dequant;
    optional per-expert bias [E, N] (activation dtype) added to the fp32 accumulator;
    validated here for every backend (`validate.check_grouped_mm_op`)."""
    op_spec = _parse_spec(spec)
    check_grouped_mm_op(a, w, w_scale, w_alpha, offs, a_global_scale, op_spec, bias, values=_check_values())
    return _impl("grouped_mm", a.device)(a, w, w_scale, w_alpha, offs, a_global_scale, op_spec,
                                          **_bias_kwargs(bias=bias))


@grouped_mm.register_fake
def _grouped_mm_fake(a, w, w_scale, w_alpha, offs, a_global_scale, spec, bias=None):
    if bias is not None:
        check_grouped_bias(a, w, bias)
    return a.new_empty(a.shape[0], w.shape[1])
