"""Argument validation at the op boundary: every check of what a caller passes to an
mxemu op or its Triton launcher, before anything runs. The ops (`library`) call
`check_moe_op` / `check_linear_op` / `check_grouped_mm_op` before dispatching, so the
"triton" and "reference" backends reject exactly the same inputs.

Two kinds of checks:
  host facts   shapes, dtypes, devices, required arguments: checked eagerly, ValueError
               (TypeError for a wrong Python type) naming the argument as the op call
               names it. The MoE rules are the reference's own (`check_moe_args`,
               `check_bias`, `check_act_scale`).
  values       global / static scales (zero, negative, NaN, Inf; NVFP4 activation global
               scales below fp32's smallest normal, as `formats` rejects them), expert ids
               and expert-map entries out of range, grouped-GEMM offsets that decrease:
               on CPU a ValueError now (reading a CPU tensor costs no sync); on a CUDA
               device one Triton launch for all of an op's values (`kernels.checks`, a
               device assert), elsewhere `torch._assert_async`: both fail the stream
               later without a device-to-host sync and are captured by CUDA graphs. Skipped while the
               passes trace patterns on example tensors and under `is_compiling()` (the
               fake implementations never see values).

Scales and expert maps are module buffers that a decode step passes unchanged on every
call; re-checking them cost one launch per linear and most of the MoE check's arguments
(benchmarks/results/host_breakdown_h200.json). A tensor whose values were checked is
remembered with its version counter and address (`_CHECKED`): it is checked again only
after an in-place change (`copy_`, `fill_`, `load_state_dict`, ... bump the version) or
when another tensor object is passed. A failed check fails the stream, so no later call
relies on a bad remembered value. Writes through `.data` bypass the version counter;
EMU_INDUCTOR_VALUE_CHECK_MEMO=0 checks every call. Per-call values (expert ids, group
ends) are always checked.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..formats import FORMATS, MIN_GLOBAL_SCALE
from ..reference.moe import check_act_scale, check_bias, check_moe_args
from ..spec.opspec import OpSpec

__all__ = ["check_devices", "check_moe_inputs", "check_moe_biases", "check_grouped_bias", "check_packed_weight",
           "check_grouped_mm_inputs", "check_linear_inputs", "check_moe_op", "check_linear_op",
           "check_grouped_mm_op", "check_moe_values", "check_linear_values", "check_grouped_mm_values",
           "require", "MIN_ACT_GLOBAL_SCALE"]

#: The smallest NVFP4 activation global scale: the formats layer's own bound, read from it.
MIN_ACT_GLOBAL_SCALE = MIN_GLOBAL_SCALE


def _fail(arg, got, expected):
    raise ValueError(f"{arg}: expected {expected}, got {got}")


def check_devices(dev, **tensors):
    for name, t in tensors.items():
        if t is not None and t.device != dev:
            _fail(name, f"a tensor on {t.device}", f"a tensor on {dev} like the activations")


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


def _check_alpha(name, alpha, fmt, shapes: tuple, what: str) -> None:
    """A weight global scale (dequantize direction): None for MX; fp32 of one of `shapes`
    (or one value) for NVFP4, as the reference's MoE weight check has it."""
    if alpha is None:
        return
    if fmt.is_mx:
        _fail(name, "a tensor", f"None: {fmt.name} has no global scale")
    if alpha.dtype != torch.float32:
        _fail(name, alpha.dtype, "float32")
    if alpha.numel() != 1 and tuple(alpha.shape) not in shapes:
        _fail(name, f"shape {tuple(alpha.shape)}", f"one value or {what}")


def _check_act_scale_arg(name, g, spec: OpSpec) -> None:
    """An activation global / static scale: the reference's rule (`check_act_scale`),
    required where the scheme quantizes activations with a static NVFP4 global scale."""
    act = spec.scheme().act
    if act is None:
        return
    needs = act.kind == "block" and act.fmt.has_global_scale
    check_act_scale(name, g, required=needs, why=f"{spec.short_name()} quantizes activations with a static "
                                                 f"global scale")


def check_grouped_mm_inputs(a, w, w_scale, w_alpha, offs, a_global_scale, spec: OpSpec, bias=None) -> None:
    fmt = FORMATS[spec.weight_fmt]
    if a.dim() != 2 or a.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        _fail("a", f"{a.dtype} {tuple(a.shape)}", "a 2-d bf16/fp16/fp32 tensor")
    check_packed_weight("w", w, w_scale, fmt, a.shape[1], 1)
    E, N = w.shape[0], w.shape[1]
    if offs.dim() != 1 or offs.shape[0] != E or offs.dtype not in (torch.int32, torch.int64):
        _fail("offs", f"{offs.dtype} {tuple(offs.shape)}", f"1-d int32 [E={E}]")
    check_devices(a.device, w=w, w_scale=w_scale, w_alpha=w_alpha, offs=offs, a_global_scale=a_global_scale)
    _check_alpha("w_alpha", w_alpha, fmt, ((E,), (E, 1), (E, 2), (E, N)), f"[E]={E}, [E, 2] or [E, {N}]")
    _check_act_scale_arg("a_global_scale", a_global_scale, spec)
    check_bias("bias", bias, a, (E, N))


def check_linear_inputs(x, weight, weight_scale, alpha, input_global_scale, bias, spec: OpSpec) -> None:
    fmt = FORMATS[spec.weight_fmt]
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or x.dim() < 1:
        _fail("x", f"{x.dtype} {tuple(x.shape)}", "a bf16/fp16/fp32 tensor [..., K]")
    K = x.shape[-1]
    check_packed_weight("weight", weight, weight_scale, fmt, K, 0)
    N = weight.shape[0]
    check_devices(x.device, weight=weight, weight_scale=weight_scale, alpha=alpha,
                  input_global_scale=input_global_scale, bias=bias)
    _check_alpha("alpha", alpha, fmt, ((N,),), f"[N={N}]")
    _check_act_scale_arg("input_global_scale", input_global_scale, spec)
    # the reference adds the bias with F.linear in the activation dtype: same dtype, [N]
    check_bias("bias", bias, x, (N,))


# --- values (no device sync) ----------------------------------------------------------------


def require(name: str, ok: torch.Tensor, expected: str, got: Callable[[], object]) -> None:
    """`ok` (bool tensor) must be all True. On CPU: ValueError `name: expected ..., got
    ...` now. Elsewhere: `torch._assert_async` (no host sync; the failure surfaces at the
    next synchronising call, and CUDA graphs capture it)."""
    if ok.device.type == "cpu":
        if not bool(ok.all()):
            _fail(name, got(), expected)
    else:
        torch._assert_async(ok.all(), f"{name}: expected {expected}")


def _first_bad(t: torch.Tensor, ok: torch.Tensor):
    return t[~ok].flatten()[:4].tolist()


def _positive_scale(name: str, g: Optional[torch.Tensor]) -> None:
    # the reference's rule for weight global scales and fp8 static scales
    if g is not None:
        ok = torch.isfinite(g) & (g > 0)
        require(name, ok, "finite positive scales", lambda: _first_bad(g, ok))


def _act_scale_bound(spec: OpSpec) -> Optional[float]:
    """The smallest valid activation scale for `spec` (None: the scheme takes none): NVFP4
    block global scales must reach fp32's smallest normal, other scales be positive."""
    act = spec.scheme().act
    if act is None:
        return None
    return MIN_ACT_GLOBAL_SCALE if act.kind == "block" and act.fmt.has_global_scale else 0.0


def _act_scale_values(name: str, g: Optional[torch.Tensor], spec: OpSpec) -> None:
    lo = _act_scale_bound(spec)
    if g is None or lo is None:
        return
    if lo > 0:
        ok = torch.isfinite(g) & (g >= lo)
        require(name, ok, f"a finite positive global scale >= {lo:g} (fp32's smallest normal; "
                          f"below it the recipe's reciprocal overflows)", lambda: _first_bad(g, ok))
    else:
        _positive_scale(name, g)


def _values_checkable() -> bool:
    return not torch.compiler.is_compiling()


def _act_scale_rule(name: str, g: Optional[torch.Tensor], spec: OpSpec):
    """The same rule as `_act_scale_values`, as a `kernels.checks.FloatRule`."""
    lo = _act_scale_bound(spec)
    if g is None or lo is None:
        return None
    from ..kernels.checks import FloatRule

    if lo > 0:
        return FloatRule(g, f"{name}: expected a finite positive global scale >= {lo:g}", lo)
    return FloatRule(g, f"{name}: expected finite positive scales")


_CHECKED = WeakIdKeyDictionary()  # tensor -> (version, address) when its values were checked


def _stamp(t: torch.Tensor):
    try:
        return (t._version, t.data_ptr())
    except RuntimeError:  # an inference tensor has no version counter: never remembered
        return None


def _memo_on() -> bool:
    return os.environ.get("EMU_INDUCTOR_VALUE_CHECK_MEMO", "1") != "0"


def _unchecked(t: Optional[torch.Tensor]) -> bool:
    """`t` is given and its current values were not checked before (module docstring)."""
    if t is None:
        return False
    if not _memo_on():
        return True
    st = _CHECKED.get(t)
    return st is None or st != _stamp(t)


def _remember(*ts: Optional[torch.Tensor]) -> None:
    if not _memo_on():
        return
    for t in ts:
        if t is not None:
            st = _stamp(t)
            if st is not None:
                _CHECKED[t] = st


def _one_launch(device: torch.device) -> bool:
    """Value checks on a CUDA device run as one Triton launch (kernels.checks) instead of
    ~5 torch launches per argument; EMU_INDUCTOR_VALUE_CHECKS=torch keeps the latter."""
    return device.type == "cuda" and os.environ.get("EMU_INDUCTOR_VALUE_CHECKS", "triton") != "torch"


def check_moe_values(topk_ids, w13, w13_alpha, w2_alpha, a1_gs, a2_gs, expert_map, spec: OpSpec) -> None:
    """What the reference rejects by value, for mxemu::moe (no device sync)."""
    if not _values_checkable():
        return
    E = w13.shape[0]
    n_global = expert_map.shape[0] if expert_map is not None else E
    if _one_launch(topk_ids.device):
        from ..kernels.checks import FloatRule, IntRule, check_values

        # the scales and the expert map only when not checked before (_CHECKED); the ids always
        floats = [FloatRule(a, f"{n}: expected finite positive scales") for n, a in
                  (("w13_alpha", w13_alpha), ("w2_alpha", w2_alpha)) if _unchecked(a)]
        floats += [r for r in (_act_scale_rule("a1_global_scale", a1_gs, spec) if _unchecked(a1_gs) else None,
                               _act_scale_rule("a2_global_scale", a2_gs, spec) if _unchecked(a2_gs) else None)
                   if r is not None]
        ints = [IntRule(topk_ids, f"topk_ids: expected ids in [0, {n_global - 1}]", 0, n_global)]
        if _unchecked(expert_map):
            ints.append(IntRule(expert_map, f"expert_map: expected -1 or 0..{E - 1}", -1, E))
        check_values(floats, ints)
        _remember(w13_alpha, w2_alpha, a1_gs, a2_gs, expert_map)
        return
    _positive_scale("w13_alpha", w13_alpha)
    _positive_scale("w2_alpha", w2_alpha)
    _act_scale_values("a1_global_scale", a1_gs, spec)
    _act_scale_values("a2_global_scale", a2_gs, spec)
    ok = (topk_ids >= 0) & (topk_ids < n_global)
    require("topk_ids", ok, f"ids in [0, {n_global - 1}]", lambda: f"ids {_first_bad(topk_ids, ok)}")
    if expert_map is not None:
        okm = (expert_map >= -1) & (expert_map < E)
        require("expert_map", okm, f"-1 or 0..{E - 1}", lambda: f"values {_first_bad(expert_map, okm)}")


def check_linear_values(alpha, input_global_scale, spec: OpSpec) -> None:
    if not _values_checkable():
        return
    dev = alpha.device if alpha is not None else (input_global_scale.device if input_global_scale is not None else None)
    if dev is not None and _one_launch(dev):
        from ..kernels.checks import FloatRule, check_values

        # constant scales: checked once per value (_CHECKED), so a decode step launches nothing
        floats = [FloatRule(alpha, "alpha: expected finite positive scales")] if _unchecked(alpha) else []
        r = _act_scale_rule("input_global_scale", input_global_scale, spec) if _unchecked(input_global_scale) else None
        check_values(floats + ([r] if r is not None else []))
        _remember(alpha, input_global_scale)
        return
    _positive_scale("alpha", alpha)
    _act_scale_values("input_global_scale", input_global_scale, spec)


def check_grouped_mm_values(w_alpha, offs, a_global_scale, spec: OpSpec) -> None:
    if not _values_checkable():
        return
    if _one_launch(offs.device):
        from ..kernels.checks import FloatRule, IntRule, check_values

        floats = [FloatRule(w_alpha, "w_alpha: expected finite positive scales")] if _unchecked(w_alpha) else []
        r = _act_scale_rule("a_global_scale", a_global_scale, spec) if _unchecked(a_global_scale) else None
        # group ends: non-negative and non-decreasing (both backends find a row's group by
        # binary search, which is meaningless on unsorted ends)
        ints = [IntRule(offs, "offs: expected non-negative, non-decreasing group ends", 0, 2 ** 62,
                        nondecreasing=True)]
        check_values(floats + ([r] if r is not None else []), ints)
        _remember(w_alpha, a_global_scale)
        return
    _positive_scale("w_alpha", w_alpha)
    _act_scale_values("a_global_scale", a_global_scale, spec)
    # group ends: non-negative and non-decreasing (both backends find a row's group by
    # binary search, which is meaningless on unsorted ends)
    if offs.numel():
        ok = torch.cat([offs[:1] >= 0, offs[1:] >= offs[:-1]])
        require("offs", ok, "non-negative, non-decreasing group ends", lambda: offs.tolist()[:8])


# --- whole ops ------------------------------------------------------------------------------


def check_moe_op(x, w13, w13_scale, w13_alpha, w2, w2_scale, w2_alpha, topk_weights, topk_ids, a1_gs, a2_gs,
                 expert_map, spec: OpSpec, w13_bias=None, w2_bias=None, *, values: bool = True) -> None:
    """Every argument of mxemu::moe: host facts, then (values=True) values."""
    check_moe_inputs(x, w13, w13_scale, w13_alpha, w2, w2_scale, w2_alpha, topk_weights, topk_ids, a1_gs, a2_gs,
                     expert_map, spec, w13_bias=w13_bias, w2_bias=w2_bias)
    if values:
        check_moe_values(topk_ids, w13, w13_alpha, w2_alpha, a1_gs, a2_gs, expert_map, spec)


def check_linear_op(x, weight, weight_scale, alpha, input_global_scale, bias, spec: OpSpec, *,
                    values: bool = True) -> None:
    check_linear_inputs(x, weight, weight_scale, alpha, input_global_scale, bias, spec)
    if values:
        check_linear_values(alpha, input_global_scale, spec)


def check_grouped_mm_op(a, w, w_scale, w_alpha, offs, a_global_scale, spec: OpSpec, bias=None, *,
                        values: bool = True) -> None:
    check_grouped_mm_inputs(a, w, w_scale, w_alpha, offs, a_global_scale, spec, bias)
    if values:
        check_grouped_mm_values(w_alpha, offs, a_global_scale, spec)
