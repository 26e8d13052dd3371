"""load_checkpoint: fill a transformers model skeleton from a quantized safetensors
checkpoint, swapping its MoE blocks for EmulatedMoEBlock and its quantized linear layers
for QuantizedLinear, in place."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..formats import NVFP4
from ..models.adapters import MoEAdapter
from ..models.experts import BiasedQuantizedExperts
from ..models.linear import RowQuantizedLinear
from ..models.quantize import default_gemm_style, set_submodule, build_block, find_moe_blocks
from ..reference import QuantizedExperts, QuantizedLinear, get_scheme
from .io import SafetensorsCheckpoint, open_checkpoint
from .layouts import GptOssMXFP4, Layout, ProjectionTensors, detect_layout, get_layout

__all__ = ["load_checkpoint", "read_experts", "read_linear"]


def _resolve_scheme(scheme, layout: Layout, have_act: bool, where: str, missing_act_name: str):
    fmt = layout.fmt
    if scheme is None:
        if fmt is NVFP4:
            return get_scheme("nvfp4_w4a4" if have_act else "nvfp4_w4a16")
        return get_scheme("w_mxfp4")
    sch = get_scheme(scheme)
    if sch.weight_fmt is not fmt:
        raise ValueError(f"scheme: {sch.name} has {sch.weight_fmt.name} weights but {where} holds "
                         f"{fmt.name} weights ({layout.name})")
    needs_static = sch.act is not None and sch.act.kind == "block" and sch.act.fmt.has_global_scale
    if needs_static and not have_act:
        raise ValueError(f"{missing_act_name}: missing activation global scale, needed by scheme {sch.name}")
    return sch


def _candidates(prefix: str, aliases: dict) -> list:
    out = [prefix]
    for name, alts in aliases.items():
        if prefix == name or prefix.startswith(name + "."):
            out += [a + prefix[len(name):] for a in alts]
    return out


def read_experts(ckpt: SafetensorsCheckpoint, layout: Layout, block_prefixes: list, adapter: MoEAdapter,
                 block: nn.Module, *, scheme=None, gemm_style: Optional[str] = None,
                 w13_global_scale: str = "per_projection", check_data: bool = True) -> QuantizedExperts:
    """QuantizedExperts (BiasedQuantizedExperts for GPT-OSS) of one MoE block."""
    E, H, I = adapter.dims(block)
    act = adapter.activation(block)
    dtype = adapter.dtype(block)
    style = gemm_style or default_gemm_style(dtype)
    if isinstance(layout, GptOssMXFP4):
        if adapter.layout != "gpt_oss":
            raise ValueError(f"layout: {layout.name} holds GPT-OSS experts; {type(block).__name__} is not GPT-OSS")
        for p in block_prefixes:
            if f"{p}.experts.gate_up_proj_blocks" in ckpt:
                base = p
                break
        else:
            base = block_prefixes[0]
        w13, s13, b13 = layout.read_fused(ckpt, f"{base}.experts", "gate_up_proj", E, 2 * I, H, check_data)
        w2, s2, b2 = layout.read_fused(ckpt, f"{base}.experts", "down_proj", E, H, I, check_data)
        sch = _resolve_scheme(scheme, layout, False, f"{base}.experts", "")
        return BiasedQuantizedExperts(
            w13, s13, w2, s2, scheme=sch, activation=act, gemm_style=style,
            w13_bias=None if b13 is None else b13.to(dtype), w2_bias=None if b2 is None else b2.to(dtype))
    if adapter.layout == "gpt_oss":
        raise ValueError(f"layout: {layout.name} per-expert projections are not read for GPT-OSS experts "
                         "(their checkpoints use gpt-oss-mxfp4 blocks)")
    gname, uname, dname = adapter.checkpoint_names
    for p in block_prefixes:
        if layout.has_projection(ckpt, f"{p}.experts.0.{gname}"):
            base = p
            break
    else:
        ckpt.get(f"{block_prefixes[0]}.experts.0.{gname}.{layout.packed_suffix}", what="packed expert weight")
    projs: dict = {gname: [], uname: [], dname: []}
    for e in range(E):
        for name, shape in ((gname, (I, H)), (uname, (I, H)), (dname, (H, I))):
            projs[name].append(layout.read_projection(ckpt, f"{base}.experts.{e}.{name}", shape,
                                                      check_data=check_data))
    gate: list[ProjectionTensors] = projs[gname]
    up, down = projs[uname], projs[dname]
    w13 = torch.stack([torch.cat([g.packed, u.packed]) for g, u in zip(gate, up)])
    s13 = torch.stack([torch.cat([g.scale, u.scale]) for g, u in zip(gate, up)])
    w2 = torch.stack([d.packed for d in down])
    s2 = torch.stack([d.scale for d in down])
    a13 = a2 = g1 = g2 = None
    have = [p.act_dequant is not None for p in gate + up + down]
    if layout.fmt is NVFP4:
        if w13_global_scale == "per_projection":
            a13 = torch.stack([torch.stack([g.alpha, u.alpha]) for g, u in zip(gate, up)])
        elif w13_global_scale == "gate":  # vLLM: w13_weight_scale_2[:, 0] for both halves (issue #54974)
            a13 = torch.stack([g.alpha for g in gate])
        else:
            raise ValueError(f"w13_global_scale: expected 'per_projection' or 'gate', got {w13_global_scale!r}")
        a2 = torch.stack([d.alpha for d in down])
        if any(have) and not all(have):
            i = have.index(False)
            e, which = (i % E, (gname, uname, dname)[i // E])
            suffix = "input_global_scale" if layout.name.startswith("compressed") else "input_scale"
            raise ValueError(f"{base}.experts.{e}.{which}.{suffix}: missing, while other experts of the layer have one")
    suffix = "input_global_scale" if layout.name.startswith("compressed") else "input_scale"
    sch = _resolve_scheme(scheme, layout, bool(have) and all(have), f"{base}.experts",
                          f"{base}.experts.0.{gname}.{suffix}")
    if sch.act is not None and sch.act.kind == "block" and sch.act.fmt.has_global_scale:
        # vLLM's emulation: one global scale per layer, the smallest quantize-direction one
        g1 = (1.0 / torch.stack([p.act_dequant for p in gate + up]).max()).to(torch.float32)
        g2 = (1.0 / torch.stack([p.act_dequant for p in down]).max()).to(torch.float32)
    return QuantizedExperts(w13, s13, w2, s2, scheme=sch, w13_alpha=a13, w2_alpha=a2, a1_global_scale=g1,
                            a2_global_scale=g2, activation=act, gemm_style=style)


def read_linear(ckpt: SafetensorsCheckpoint, layout: Layout, prefix: str, module: nn.Linear, *, scheme=None,
                check_data: bool = True) -> QuantizedLinear:
    """QuantizedLinear for the nn.Linear `module` from `<prefix>.*`."""
    p = layout.read_projection(ckpt, prefix, (module.out_features, module.in_features), check_data=check_data)
    suffix = "input_global_scale" if layout.name.startswith("compressed") else "input_scale"
    sch = _resolve_scheme(scheme, layout, p.act_quant is not None, prefix, f"{prefix}.{suffix}")
    needs = sch.act is not None and sch.act.kind == "block" and sch.act.fmt.has_global_scale
    bias = None
    if module.bias is not None:
        b = ckpt.get(f"{prefix}.bias", what="bias")
        if tuple(b.shape) != (module.out_features,) or not b.is_floating_point():
            raise ValueError(f"{prefix}.bias: expected a float tensor of shape ({module.out_features},), "
                             f"got {b.dtype} {tuple(b.shape)}")
        bias = b.to(module.weight.dtype)
    return RowQuantizedLinear(p.packed, p.scale, scheme=sch, alpha=p.alpha,
                           input_global_scale=p.act_quant if needs else None, bias=bias)


def _assign(owner: nn.Module, attr: str, old: torch.Tensor, val: torch.Tensor, replaced: dict):
    if id(old) in replaced:
        new = replaced[id(old)]
    elif isinstance(old, nn.Parameter):
        new = nn.Parameter(val.to(old.dtype), requires_grad=old.requires_grad)
    else:
        new = val.to(old.dtype)
    replaced[id(old)] = new
    if attr in owner._parameters:
        owner._parameters[attr] = new
    else:
        owner._buffers[attr] = new


def _rebuild_meta_buffers(model: nn.Module) -> None:
    """A skeleton built on the meta device keeps meta non-persistent buffers (rotary
    `inv_freq`), which no checkpoint holds: rebuild their modules from the model config."""
    cfg = getattr(model, "config", None)
    for name, mod in list(model.named_modules()):
        metas = [b for b, t in mod._buffers.items() if t is not None and t.is_meta]
        if not metas:
            continue
        try:
            new = type(mod)(cfg)
        except Exception as e:  # noqa: BLE001 - report which buffer could not be made
            raise ValueError(f"{name}.{metas[0]}: still on the meta device after loading and "
                             f"{type(mod).__name__} could not be rebuilt from the config ({e!r})") from e
        for b, t in mod._buffers.items():  # keep the skeleton's dtypes (`.to(bf16)` casts inv_freq too)
            if t is not None and new._buffers.get(b) is not None:
                new._buffers[b] = new._buffers[b].to(t.dtype)
        set_submodule(model, name, new)


def load_checkpoint(model: nn.Module, path, *, layout=None, scheme=None, strict: bool = True,
                    gemm_style: Optional[str] = None, w13_global_scale: str = "per_projection",
                    check_data: bool = True) -> nn.Module:
    """Load a quantized safetensors checkpoint into `model` (a transformers model built
    from the checkpoint's config), in place; returns `model`.

    Every MoE block of a supported architecture becomes an EmulatedMoEBlock whose experts
    hold the checkpoint's packed weights and scales as they are; every nn.Linear with
    quantized tensors becomes a QuantizedLinear; all other tensors are copied in.

    layout: "compressed-tensors-nvfp4", "modelopt-nvfp4", "gpt-oss-mxfp4",
        "compressed-tensors-mxfp4" (detected from tensor names when None).
    scheme: emulation scheme (default: nvfp4_w4a4 where activation scales are present,
        nvfp4_w4a16 where not; w_mxfp4 for MXFP4); its weight format must match.
    strict: every model tensor must be in the checkpoint and every checkpoint tensor used.
    w13_global_scale: "per_projection" (exact gate and up global scales) or "gate"
        (vLLM's choice: the gate's for both halves).
    check_data: reject NaN / negative / zero-over-nonzero-codes block scales.
    Malformed files raise ValueError naming the tensor. The skeleton may be built on
    the meta device (`with torch.device("meta"): Model(config)`): every tensor comes from
    the checkpoint, and modules holding non-persistent buffers (rotary embeddings) are
    rebuilt from `model.config`.
    """
    ckpt = path if isinstance(path, SafetensorsCheckpoint) else open_checkpoint(path)
    lay = detect_layout(ckpt) if layout is None else get_layout(layout)
    blocks = find_moe_blocks(model)
    aliases = {}
    for name, _, adapter in blocks:
        parent = name.rpartition(".")[0]
        aliases[name] = [f"{parent}.{a}" if parent else a for a in adapter.checkpoint_block_names]
    for name, block, adapter in blocks:
        experts = read_experts(ckpt, lay, _candidates(name, aliases), adapter, block, scheme=scheme,
                               gemm_style=gemm_style, w13_global_scale=w13_global_scale, check_data=check_data)
        set_submodule(model, name, build_block(block, adapter, experts))
    for name, mod in list(model.named_modules()):
        if type(mod) is not nn.Linear:
            continue
        for p in _candidates(name, aliases):
            if lay.has_projection(ckpt, p):
                set_submodule(model, name, read_linear(ckpt, lay, p, mod, scheme=scheme, check_data=check_data))
                break
    replaced: dict = {}
    missing = []
    for key, t in model.state_dict(keep_vars=True).items():
        owner_name, _, attr = key.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if isinstance(owner, (QuantizedExperts, QuantizedLinear)):
            continue
        if id(t) in replaced:  # tied weights
            _assign(owner, attr, t, None, replaced)
            continue
        ck = next((c for c in _candidates(key, aliases) if c in ckpt), None)
        if ck is None:
            missing.append(key)
            continue
        val = ckpt.get(ck)
        if tuple(val.shape) != tuple(t.shape):
            raise ValueError(f"{ck}: expected shape {tuple(t.shape)} for {key}, got {tuple(val.shape)}")
        if t.is_floating_point() != val.is_floating_point():
            raise ValueError(f"{ck}: expected a {'float' if t.is_floating_point() else 'integer'} tensor for "
                             f"{key}, got {val.dtype}")
        with torch.no_grad():
            _assign(owner, attr, t, val, replaced)
    if strict and missing:
        raise ValueError(f"{missing[0]}: missing tensor in the checkpoint ({ckpt.describe()})"
                         + (f"; {len(missing) - 1} more missing" if len(missing) > 1 else ""))
    if not missing:
        _rebuild_meta_buffers(model)
    unused = ckpt.unused()
    if strict and unused:
        raise ValueError(f"{unused[0]}: tensor in the checkpoint that no module of {type(model).__name__} uses"
                         + (f" ({len(unused) - 1} more)" if len(unused) > 1 else "")
                         + "; pass strict=False to ignore")
    return model
