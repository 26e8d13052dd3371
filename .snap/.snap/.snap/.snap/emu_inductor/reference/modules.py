"""nn.Modules around the eager emulation: QuantizedExperts (MoE), QuantizedLinear (the
dense one-expert case) and EmulatedMoE (router + experts, the demo's layer).

NVFP4 activation global scales (w4a4 schemes) are static per layer. A module built
without them calibrates on its first call: each scale still NaN (never given, loaded or
written) becomes 2688 / amax of that call's activations, as `calibrate_()` on that batch
sets it; logged once. NaN marks "not set" so an uncalibrated scale can never be used
silently (the reference rejects it), and the choice is a `torch.where`, not a branch on
the data: the same code runs in eager and in a compiled graph, without a host sync.
Under torch.compile the first call's graph holds the calibration and flips `calibrated`,
so the second call compiles once more, without it (two graphs, no graph break, tested
in tests/test_reference_calibration.py).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..formats import default_global_scale, quantize
from .activations import check_activation
from .moe import check_moe_args, dequantize_experts, moe_emulated
from .qdq import act_fake_quantize, dequantize_weight
from .routing import sigmoid_topk, softmax_topk
from .schemes import get_scheme

__all__ = ["QuantizedExperts", "QuantizedLinear", "EmulatedMoE", "quantize_weight"]

log = logging.getLogger("emu_inductor.reference")
_first_call_warned = False


def _report_first_call_calibration(module_name: str, scheme_name: str, was_unset: torch.Tensor,
                                   scales: torch.Tensor) -> None:
    """Log the activation global scales a module set from its first batch (`was_unset`
    marks which of `scales` were NaN before): a WARNING the first time in a process (the
    output depends on that batch), INFO after; nothing if every scale had been set."""
    global _first_call_warned
    if not bool(was_unset.any()):
        return
    level = logging.INFO if _first_call_warned else logging.WARNING
    _first_call_warned = True
    values = ", ".join(f"{float(g):.6g}" for g, u in zip(scales.tolist(), was_unset.tolist()) if u)
    log.log(level, "%s (%s): no activation global scale was given; set from the first batch "
            "(2688/amax = %s). Call calibrate_() with representative data, or "
            "emu_inductor.calibrate(model, data), before the first forward to choose it.",
            module_name, scheme_name, values)


# Under torch.compile this call runs after the first graph (Dynamo defers registered
# logging functions, with their tensor arguments, instead of breaking the graph);
# disable() keeps Dynamo from compiling the logger call itself as a frame of its own.
_report_first_call_calibration = torch._dynamo.disable(_report_first_call_calibration)
if hasattr(torch._dynamo.config, "reorderable_logging_functions"):
    torch._dynamo.config.reorderable_logging_functions.add(_report_first_call_calibration)


def _all_finite(*tensors) -> bool:
    return all(t is not None and bool(torch.isfinite(t).all()) for t in tensors)


def _uncalibrated_scale(device) -> torch.Tensor:
    return torch.full((), math.nan, dtype=torch.float32, device=device)


@torch.no_grad()
def _fill_unset_scales(module, calibrate, scales) -> None:
    """Run `calibrate()` (which overwrites `scales` in place), then put back every scale
    that was set before (not NaN); log the ones that were not."""
    before = torch.stack([g.reshape(()) for g in scales])
    calibrate()
    for g, b in zip(scales, before.unbind()):
        g.copy_(torch.where(torch.isnan(b), g.reshape(()), b).reshape(g.shape))
    _report_first_call_calibration(type(module).__name__, module.scheme.name, torch.isnan(before),
                                   torch.stack([g.reshape(()) for g in scales]))


def quantize_weight(w: torch.Tensor, fmt, *, per_row_block: bool = True, fp6_layout: str = "quark",
                    name: str = "w"):
    """Quantize a bf16 weight [..., N, K] along K. Returns (packed, scale, alpha).
    `name` is the argument errors name (the caller's, e.g. "w13").

    NVFP4 uses the vLLM recipe with one global scale per leading index (per expert),
    `gs = 2688 / amax`, and returns alpha = 1/gs (the dequantize-direction value a
    compressed-tensors checkpoint hands vLLM). MX uses the OCP floor scale.
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(w).__name__}")
    if not w.is_floating_point() or w.dim() < 2:
        raise ValueError(f"{name}: expected a float tensor [..., N, K], got {w.dtype} of shape {tuple(w.shape)}")
    if w.shape[-1] % fmt.block_size:
        raise ValueError(f"{name}: reduction size K={w.shape[-1]} (last dim of shape {tuple(w.shape)}) is not "
                         f"divisible by the {fmt.name} block size {fmt.block_size}")
    if fmt.has_global_scale:
        lead = w.shape[:-2]
        amax = w.abs().reshape(*lead, -1).amax(-1).to(torch.float32) if lead else w.abs().amax().float()
        gs = default_global_scale(amax, "vllm")
        q = quantize(w, fmt, global_scale=gs if lead else gs.reshape(1))
        return q.qdata, q.scale, (1.0 / gs).to(torch.float32)
    q = quantize(w, fmt, fp6_layout=fp6_layout) if fmt.pack_bits == 6 else quantize(w, fmt)
    return q.qdata, q.scale, None


class QuantizedExperts(nn.Module):
    """Experts of one MoE layer with emulated-quantized weights in vLLM's layout."""

    def __init__(self, w13, w13_scale, w2, w2_scale, *, scheme, w13_alpha=None, w2_alpha=None,
                 a1_global_scale=None, a2_global_scale=None, activation="silu",
                 apply_router_weight_on_input=False, expert_map=None, gemm_style="grouped_mm"):
        super().__init__()
        self.scheme = get_scheme(scheme)
        check_activation(activation)
        self.activation = activation
        self.apply_router_weight_on_input = apply_router_weight_on_input
        self.gemm_style = gemm_style
        for name, t in (("w13", w13), ("w13_scale", w13_scale), ("w2", w2), ("w2_scale", w2_scale),
                        ("w13_alpha", w13_alpha), ("w2_alpha", w2_alpha), ("expert_map", expert_map)):
            self.register_buffer(name, t)
        act = self.scheme.act
        needs_gs = act is not None and act.kind == "block" and act.fmt.has_global_scale
        for name, g in (("a1_global_scale", a1_global_scale), ("a2_global_scale", a2_global_scale)):
            if g is not None and not isinstance(g, torch.Tensor):
                raise TypeError(f"{name}: expected a float32 tensor (e.g. torch.tensor([{g!r}])), got {type(g).__name__}")
            self.register_buffer(name, g if g is not None else (_uncalibrated_scale(w13.device) if needs_gs else None))
        # False: the NVFP4 activation global scales are set from the first call (module docstring).
        self.calibrated = not needs_gs or _all_finite(self.a1_global_scale, self.a2_global_scale)

    @classmethod
    def from_float(cls, w13: torch.Tensor, w2: torch.Tensor, *, scheme, **kwargs) -> "QuantizedExperts":
        """Quantize bf16 expert weights w13 [E, 2I, H], w2 [E, H, I]."""
        sch = get_scheme(scheme)
        for name, w in (("w13", w13), ("w2", w2)):
            if not isinstance(w, torch.Tensor):
                raise TypeError(f"{name}: expected a tensor, got {type(w).__name__}")
        if w13.dim() != 3 or w2.dim() != 3:
            raise ValueError(f"w13, w2: expected 3-d [E, N, K] tensors, got {tuple(w13.shape)}, {tuple(w2.shape)}")
        if w2.shape[0] != w13.shape[0]:
            raise ValueError(f"w2: expected {w13.shape[0]} experts as in w13, got shape {tuple(w2.shape)}")
        if w2.shape[1] != w13.shape[2]:
            raise ValueError(f"w2: expected hidden size {w13.shape[2]} (w13's last dim) as dim 1, "
                             f"got shape {tuple(w2.shape)}")
        q13, s13, a13 = quantize_weight(w13, sch.weight_fmt, name="w13")
        q2, s2, a2 = quantize_weight(w2, sch.weight_fmt, name="w2")
        return cls(q13, s13, q2, s2, scheme=sch, w13_alpha=a13, w2_alpha=a2, **kwargs)

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @torch.no_grad()
    def calibrate_(self, hidden_states: torch.Tensor, topk_weights, topk_ids) -> "QuantizedExperts":
        """Set NVFP4 activation global scales (2688/amax) from one bf16 pass of the layer."""
        check_moe_args(
            hidden_states, self.w13, self.w2, topk_weights, topk_ids, self.scheme, w13_scale=self.w13_scale,
            w2_scale=self.w2_scale, w13_alpha=self.w13_alpha, w2_alpha=self.w2_alpha, activation=self.activation,
            apply_router_weight_on_input=self.apply_router_weight_on_input, expert_map=self.expert_map,
            a1_global_scale=None, a2_global_scale=None, gemm_style=self.gemm_style, check_act_scales=False,
        )
        if self.a1_global_scale is None:
            self.calibrated = True
            return self
        fmt, dt = self.scheme.weight_fmt, hidden_states.dtype
        W13 = dequantize_experts(self.w13, self.w13_scale, fmt, self.w13_alpha, dt)
        ids = topk_ids.reshape(-1).long()
        local = self.expert_map.long()[ids] if self.expert_map is not None else ids
        x_rows = hidden_states.repeat_interleave(topk_ids.shape[1], 0)
        c1 = torch.einsum("rk,rnk->rn", x_rows.float(), W13[local.clamp(min=0)].float()).to(dt)
        from .activations import apply_activation

        c2 = apply_activation(c1, self.activation)
        for buf, t in ((self.a1_global_scale, hidden_states), (self.a2_global_scale, c2)):
            amax = t.abs().amax().float()
            buf.copy_(default_global_scale(amax, "vllm"))
        self.calibrated = True
        return self

    def calibrate_on_first_call(self, hidden_states, topk_weights, topk_ids) -> None:
        """calibrate_() from this batch if no scales were given (module docstring); a
        no-op afterwards. Subclasses that override forward call it first."""
        if not self.calibrated:
            _fill_unset_scales(self, lambda: self.calibrate_(hidden_states, topk_weights, topk_ids),
                               (self.a1_global_scale, self.a2_global_scale))

    def forward(self, hidden_states, topk_weights, topk_ids):
        self.calibrate_on_first_call(hidden_states, topk_weights, topk_ids)
        return moe_emulated(
            hidden_states, self.w13, self.w2, topk_weights, topk_ids, scheme=self.scheme,
            w13_scale=self.w13_scale, w2_scale=self.w2_scale, w13_alpha=self.w13_alpha, w2_alpha=self.w2_alpha,
            a1_global_scale=self.a1_global_scale, a2_global_scale=self.a2_global_scale,
            activation=self.activation, apply_router_weight_on_input=self.apply_router_weight_on_input,
            expert_map=self.expert_map, gemm_style=self.gemm_style,
        )


class QuantizedLinear(nn.Module):
    """y = QDQ_a(x) @ dequant(W).T + bias: the dense, one-expert case."""

    def __init__(self, weight, weight_scale, *, scheme, alpha=None, input_global_scale=None, bias=None):
        super().__init__()
        self.scheme = get_scheme(scheme)
        fmt = self.scheme.weight_fmt
        if weight.dtype != torch.uint8 or weight.dim() != 2:
            raise ValueError(f"weight: expected a 2-d packed uint8 tensor, got {weight.dtype} {tuple(weight.shape)}")
        if weight_scale.dtype != fmt.scale.storage_dtype:
            raise ValueError(f"weight_scale: expected dtype {fmt.scale.storage_dtype} for {fmt.name}, got {weight_scale.dtype}")
        self.in_features = fmt.logical_size(weight.shape[1])
        self.out_features = weight.shape[0]
        if tuple(weight_scale.shape) != (self.out_features, self.in_features // fmt.block_size):
            raise ValueError(f"weight_scale: expected shape {(self.out_features, self.in_features // fmt.block_size)}, got {tuple(weight_scale.shape)}")
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("alpha", alpha)
        act = self.scheme.act
        needs_gs = act is not None and act.kind == "block" and act.fmt.has_global_scale
        if input_global_scale is not None and not isinstance(input_global_scale, torch.Tensor):
            raise TypeError(f"input_global_scale: expected a float32 tensor (e.g. torch.tensor([{input_global_scale!r}])), "
                            f"got {type(input_global_scale).__name__}")
        if needs_gs and input_global_scale is None:
            input_global_scale = _uncalibrated_scale(weight.device)
        self.register_buffer("input_global_scale", input_global_scale)
        self.register_buffer("bias", bias)
        # False: the NVFP4 input global scale is set from the first call (module docstring).
        self.calibrated = not needs_gs or _all_finite(self.input_global_scale)

    @classmethod
    def from_float(cls, weight: torch.Tensor, *, scheme, bias=None, input_global_scale=None) -> "QuantizedLinear":
        sch = get_scheme(scheme)
        q, s, a = quantize_weight(weight, sch.weight_fmt, name="weight")
        return cls(q, s, scheme=sch, alpha=a, input_global_scale=input_global_scale, bias=bias)

    @torch.no_grad()
    def calibrate_(self, x: torch.Tensor) -> "QuantizedLinear":
        """Set the NVFP4 input global scale (2688/amax) from activations `x`."""
        if self.input_global_scale is not None:
            self.input_global_scale.copy_(default_global_scale(x.abs().amax().float(), "vllm"))
        self.calibrated = True
        return self

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last dim {self.in_features}, got {x.shape[-1]}")
        if not self.calibrated:
            _fill_unset_scales(self, lambda: self.calibrate_(x), (self.input_global_scale,))
        w = dequantize_weight(self.weight, self.weight_scale, self.scheme.weight_fmt, alpha=self.alpha, dtype=x.dtype)
        a = act_fake_quantize(x, self.scheme.act, self.input_global_scale)
        return torch.nn.functional.linear(a, w, self.bias)


class EmulatedMoE(nn.Module):
    """A sparse MoE block: bf16 router, top-k routing, QuantizedExperts."""

    def __init__(self, router_weight: torch.Tensor, experts: QuantizedExperts, top_k: int,
                 *, renormalize: bool = True, scoring: str = "softmax"):
        super().__init__()
        if scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring: expected 'softmax' or 'sigmoid', got {scoring!r}")
        self.router = nn.Linear(router_weight.shape[1], router_weight.shape[0], bias=False)
        self.router.weight = nn.Parameter(router_weight, requires_grad=False)
        self.experts = experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.scoring = scoring

    def route(self, x):
        logits = self.router(x)
        fn = softmax_topk if self.scoring == "softmax" else sigmoid_topk
        return fn(logits, self.top_k, renormalize=self.renormalize)

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        w, ids = self.route(x2)
        return self.experts(x2, w, ids).reshape(shape)
