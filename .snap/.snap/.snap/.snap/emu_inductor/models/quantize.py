"""quantize_model: swap a transformers model's MoE experts (and optionally its linear
layers) for emulated-quantized modules, in place."""

from __future__ import annotations

import re
from typing import Iterable, Optional, Union

import torch
from torch import nn

from ..formats import default_global_scale
from ..reference import QuantizedExperts, QuantizedLinear, get_scheme
from .adapters import MoEAdapter, find_adapter
from .block import EmulatedMoEBlock
from .experts import BiasedQuantizedExperts
from .linear import RowQuantizedLinear

__all__ = ["quantize_model", "quantized_modules", "calibrate", "build_block", "DEFAULT_IGNORE",
           "find_moe_blocks", "resolve_linear_targets"]

# Never quantized unless named explicitly in targets: the output head and the routers
# (vLLM and ModelOpt / compressed-tensors recipes keep them in high precision).
DEFAULT_IGNORE = ("lm_head", "re:(^|.*\\.)(gate|router)$", "re:.*shared_expert_gate$")

Targets = Union[str, Iterable[str]]


def _match(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def default_gemm_style(dtype: torch.dtype) -> str:
    return "grouped_mm" if dtype == torch.bfloat16 else "bmm"


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module, MoEAdapter]]:
    """(qualified name, module, adapter) of every sparse MoE block: the known
    architectures by class (adapters.ADAPTERS), every other module holding `experts` by
    structure (models.structure). A module holding `experts` that is not recognised
    raises ValueError naming it and what was missing."""
    config = getattr(model, "config", None)
    out, failed, inside = [], [], None
    for name, mod in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue  # the experts / router of a block already taken
        try:
            a = find_adapter(mod, config)
        except ValueError as exc:
            failed.append(f"{name or type(model).__name__}: {exc}")
            inside = name + "."
            continue
        if a is not None:
            out.append((name, mod, a))
            inside = name + "."
    if failed:
        more = f" (and {len(failed) - 3} more)" if len(failed) > 3 else ""
        raise ValueError("model: MoE block not recognised: " + "; ".join(failed[:3]) + more)
    return out


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def build_block(block: nn.Module, adapter: MoEAdapter, experts: QuantizedExperts) -> EmulatedMoEBlock:
    """An EmulatedMoEBlock that reuses `block`'s router and shared experts."""
    shared_modules = {}
    if adapter.shared == "deepseek":
        shared_modules["shared_experts"] = block.shared_experts
    elif adapter.shared == "qwen2":
        shared_modules["shared_expert"] = block.shared_expert
        shared_modules["shared_expert_gate"] = block.shared_expert_gate
    # Mixtral calls it `jitter_noise`, PhiMoE `input_jitter_noise` (training only)
    jitter = getattr(block, "input_jitter_noise", None) or getattr(block, "jitter_noise", None) or 0.0
    return EmulatedMoEBlock(
        architecture=adapter.name, router_attr=adapter.router_attr, router=getattr(block, adapter.router_attr),
        experts=experts, shared=adapter.shared, shared_modules=shared_modules,
        returns_router_scores=adapter.returns_router_scores, original_class=type(block).__name__,
        routing=adapter.routing, input_jitter_noise=jitter,
    )


def _quantize_block(block: nn.Module, adapter: MoEAdapter, scheme, gemm_style: Optional[str]) -> EmulatedMoEBlock:
    ew = adapter.expert_weights(block)
    style = gemm_style or default_gemm_style(ew.w13.dtype)
    kwargs = dict(scheme=scheme, activation=ew.activation, gemm_style=style)
    if ew.w13_bias is not None or ew.w2_bias is not None:
        experts = BiasedQuantizedExperts.from_float(ew.w13, ew.w2, w13_bias=ew.w13_bias, w2_bias=ew.w2_bias, **kwargs)
    else:
        experts = QuantizedExperts.from_float(ew.w13, ew.w2, **kwargs)
    return build_block(block, adapter, experts)


def resolve_linear_targets(model: nn.Module, targets: list[str], ignore: Iterable[str]) -> list[str]:
    """Names of the nn.Linear modules `targets` select ("linear" = all of them), less
    `ignore` (patterns named explicitly in targets win over ignore)."""
    ignore = list(ignore)
    pats = [t for t in targets if t not in ("experts", "moe", "linear")]
    all_linear = "linear" in targets
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        explicit = any(_match(name, p) for p in pats)
        if explicit or (all_linear and not any(_match(name, p) for p in ignore)):
            out.append(name)
    return out


def _quantize_linear(name: str, mod: nn.Linear, scheme, explicit: bool) -> Optional[QuantizedLinear]:
    bs = scheme.weight_fmt.block_size
    if mod.in_features % bs:
        if explicit:
            raise ValueError(
                f"{name}: in_features={mod.in_features} is not divisible by the {scheme.weight_fmt.name} "
                f"block size {bs}"
            )
        return None
    bias = mod.bias.detach() if mod.bias is not None else None
    return RowQuantizedLinear.from_float(mod.weight.detach(), scheme=scheme, bias=bias)


def quantize_model(model: nn.Module, scheme, *, targets: Targets = ("experts",), ignore: Iterable[str] = DEFAULT_IGNORE,
                   calibration_data=None, gemm_style: Optional[str] = None) -> nn.Module:
    """Swap `model`'s MoE experts (and, with targets, linear layers) for emulated-quantized
    modules, in place; returns `model`.

    scheme: a name from `emu_inductor.reference.SCHEMES` (nvfp4_w4a4, w_mxfp4_a_mxfp4,
        nvfp4_w4a16, ...) or a Scheme.
    targets: "experts" (every MoE block: Qwen3-MoE, Qwen2-MoE, Mixtral, DeepSeek-V3,
        GPT-OSS by class; any other block holding a router and fused or listed gated
        experts by structure -- OLMoE, PhiMoE, GraniteMoE, Jamba, ...; see
        models.structure), "linear" (every nn.Linear not in `ignore`), module names
        or "re:<regex>" patterns of nn.Linear modules (these win over `ignore`).
    calibration_data: optional model input (a tensor of input ids, a dict of kwargs, or
        a callable taking the model) run once after the swap to set the NVFP4 activation
        global scales (2688 / amax) of every swapped layer; without it they stay 1.0.
    gemm_style: QuantizedExperts' GEMM style (default grouped_mm for bf16, else bmm).
    """
    sch = get_scheme(scheme)
    targets = [targets] if isinstance(targets, str) else list(targets)
    unknown = [t for t in targets if not isinstance(t, str)]
    if unknown:
        raise ValueError(f"targets: expected strings, got {unknown!r}")
    if "experts" in targets or "moe" in targets:
        blocks = find_moe_blocks(model)
        if not blocks and not any(t not in ("experts", "moe") for t in targets):
            raise ValueError(
                f"model: no MoE block found in {type(model).__name__}: no module of a known architecture "
                "(Qwen3-MoE, Qwen2-MoE, Mixtral, DeepSeek-V3, GPT-OSS) and no module holding `experts` "
                "(fused gate_up_proj/down_proj or a ModuleList of gated MLPs) beside a router"
            )
        for name, block, adapter in blocks:
            set_submodule(model, name, _quantize_block(block, adapter, sch, gemm_style))
    names = resolve_linear_targets(model, targets, ignore)
    pats = [t for t in targets if t not in ("experts", "moe", "linear")]
    for name in names:
        mod = model.get_submodule(name)
        q = _quantize_linear(name, mod, sch, any(_match(name, p) for p in pats))
        if q is not None:
            set_submodule(model, name, q)
    if calibration_data is not None:
        calibrate(model, calibration_data)
    return model


def quantized_modules(model: nn.Module) -> dict[str, list[str]]:
    """Names of the emulated modules in `model`: {"moe": [...], "linear": [...]}."""
    out = {"moe": [], "linear": []}
    for name, mod in model.named_modules():
        if isinstance(mod, EmulatedMoEBlock):
            out["moe"].append(name)
        elif isinstance(mod, QuantizedLinear):
            out["linear"].append(name)
    return out


def _run(model, data):
    if callable(data):
        return data(model)
    if isinstance(data, dict):
        return model(**data)
    return model(data)


@torch.no_grad()
def calibrate(model: nn.Module, data) -> nn.Module:
    """Set the static activation global scales of every emulated NVFP4 layer from one
    forward pass over `data` (earlier layers already quantized, as the layer sees them)."""
    blocks = [m for m in model.modules() if isinstance(m, EmulatedMoEBlock)]
    hooks = []

    def _linear_hook(mod, args):
        x = args[0]
        amax = x.detach().abs().amax().float()
        mod.input_global_scale.copy_(default_global_scale(amax, "vllm"))

    for m in model.modules():
        if isinstance(m, QuantizedLinear) and m.input_global_scale is not None:
            hooks.append(m.register_forward_pre_hook(_linear_hook))
    for b in blocks:
        b.calibrating = True
    try:
        _run(model, data)
    finally:
        for b in blocks:
            b.calibrating = False
        for h in hooks:
            h.remove()
    return model
