"""Recognize a sparse MoE block by what it holds, not by its class name.

A module qualifies when it has an `experts` child and, beside it, exactly one router:

* experts, either fused -- 3-D `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I]
  parameters (or [E, H, 2I] / [E, I, H]: the orientation is the experts' own
  `is_transposed` flag where they have one, else the one the router's hidden size fits;
  `is_concatenated=False` means gate/up rows interleaved), as transformers 5.x stores
  OLMoE, PhiMoE, GraniteMoE, Jamba and most others -- or a ModuleList of gated MLPs
  whose bias-free Linears are `gate_proj`/`up_proj`/`down_proj` or `w1`/`w3`/`w2`
  (transformers 4.x, many user models), stacked into vLLM's `w13 = [gate; up]`, `w2`;
* a router: a child whose `weight` is [E, H] (or that holds one such parameter). Called once on probe rows at match time:
  a router that returns `(logits, weights, ids)` (every transformers 5.x router, PhiMoE's
  sparsemixer included) is kept and called unchanged, so routing stays HF's own bit for
  bit; one that returns logits only (a plain `nn.Linear`) gets the `RoutingRecipe`
  (softmax fp32 -> top-k -> renorm -> hidden dtype), its top-k and `norm_topk_prob` read
  from the block or the model config.

Anything else the block owns (shared experts, gates, extra parameters such as a routing
bias) makes the match fail, since how the block combines it is not visible in its
structure: those need an explicit entry in `adapters.ADAPTERS`. What the module tree
cannot show -- that the forward is "route the rows, run the experts
(`down(act(gate(x)) * up(x))`, weighted), reshape back", and that the recipe is the
block's routing -- is then checked by evaluation: the block's own forward on 16 probe
rows must agree with router + experts rebuilt from the adapter in fp32 (relative error
<= 3%; bf16 rounding gives ~0.5%, a missed renormalization, scale factor, score function or
gate/up layout is > 10%). That is a screen, not a proof: bit-for-bit routing is
guaranteed only where HF's router module is called as is. Every failure is a ValueError
naming the block's class and what was missing or not understood.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..reference import apply_activation
from .adapters import MoEAdapter, RoutingRecipe
from .block import EmulatedMoEBlock

__all__ = ["is_candidate", "match_structure", "GATED_MLP_NAMES"]

# (gate, up, down) Linear names of one expert, transformers' and Mixtral-style.
GATED_MLP_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
_ROUTER_NAMES = ("gate", "router")  # preferred when more than one child has an [E, H] weight
# Config fields that change a plain-Linear router's math away from RoutingRecipe, with the
# values that leave it unchanged.
_ROUTING_CONFIG = {"scoring_func": (None, "softmax"), "topk_method": (None, "greedy"),
                   "routed_scaling_factor": (None, 1.0), "n_group": (None, 1), "topk_group": (None, 1)}


def is_candidate(module: nn.Module) -> bool:
    """Whether `module` holds an `experts` child (and is not already emulated)."""
    return isinstance(module._modules.get("experts"), nn.Module) and not isinstance(module, EmulatedMoEBlock)


def _members(mod: nn.Module) -> list:
    return [n for n, _ in mod.named_children()] + [n for n, _ in mod.named_parameters(recurse=False)]


def _fused(ex: nn.Module) -> Optional[tuple]:
    gu, dn = getattr(ex, "gate_up_proj", None), getattr(ex, "down_proj", None)
    if isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == 3 and dn.dim() == 3:
        return gu, dn
    return None


def _gated_names(cls: str, ex: nn.Module) -> Optional[tuple]:
    """(gate, up, down) names if `ex` is a ModuleList of gated MLPs; None if it is not a
    list; ValueError if it is a list whose experts are not gated MLPs."""
    if not isinstance(ex, nn.ModuleList):
        return None
    if len(ex) == 0:
        raise ValueError(f"{cls}.experts: an empty ModuleList")
    for names in GATED_MLP_NAMES:
        if all(isinstance(getattr(ex[0], n, None), nn.Linear) for n in names):
            break
    else:
        raise ValueError(
            f"{cls}.experts.0 ({type(ex[0]).__name__}): not a gated MLP: expected nn.Linear members "
            f"{' / '.join('+'.join(n) for n in GATED_MLP_NAMES)}, found {_members(ex[0])}"
        )
    g0, _, d0 = (getattr(ex[0], n).weight.shape for n in names)
    for i, e in enumerate(ex):
        for n, shape in zip(names, (g0, g0, d0)):
            lin = getattr(e, n, None)
            if not isinstance(lin, nn.Linear):
                raise ValueError(f"{cls}.experts.{i}: missing the nn.Linear {n!r} that experts.0 has")
            if tuple(lin.weight.shape) != tuple(shape):
                raise ValueError(f"{cls}.experts.{i}.{n}: weight {tuple(lin.weight.shape)}, experts.0 has {tuple(shape)}")
            if lin.bias is not None:
                raise ValueError(f"{cls}.experts.{i}.{n}: has a bias; expert biases are supported only for GPT-OSS")
    for i, e in enumerate(ex):
        other = [n for n, _ in list(e.named_parameters()) + list(e.named_buffers())
                 if n not in tuple(f"{x}.weight" for x in names)]
        if other:
            raise ValueError(f"{cls}.experts.{i}: tensors {other} beside the {'/'.join(names)} weights; how the "
                             "expert uses them is not known")
    if tuple(d0) != (g0[1], g0[0]):
        raise ValueError(f"{cls}.experts.0: {names[2]} weight {tuple(d0)} does not fit {names[0]} weight {tuple(g0)}")
    return names


def _activation(cls: str, act: Optional[nn.Module], config) -> str:
    """The emulation's name for the experts' gated activation."""
    if act is not None:
        if isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation":
            return "silu"
        if isinstance(act, nn.GELU) and act.approximate == "none":
            return "gelu"
        if type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is F.gelu:
            return "gelu"
        raise ValueError(f"{cls}.experts: activation {type(act).__name__} has no emulated counterpart; "
                         "supported: SiLU and exact GELU (gated)")
    name = getattr(config, "hidden_act", None)
    if name in ("silu", "swish"):
        return "silu"
    if name == "gelu":
        return "gelu"
    raise ValueError(f"{cls}.experts: no `act_fn` and config.hidden_act={name!r}; "
                     "supported: SiLU and exact GELU (gated)")


def _orientation(cls: str, ex: nn.Module, gu: torch.Tensor, dn: torch.Tensor, H: int) -> bool:
    """True when the fused experts are stored [E, H, 2I] / [E, I, H] (used as `x @ W`)."""
    E = gu.shape[0]
    plain = gu.shape[2] == H and dn.shape[1] == H and gu.shape[1] == 2 * dn.shape[2]
    trans = gu.shape[1] == H and dn.shape[2] == H and gu.shape[2] == 2 * dn.shape[1]
    flag = getattr(ex, "is_transposed", None)
    if flag is not None and (trans if flag else plain):
        return bool(flag)
    if plain != trans:
        return trans
    raise ValueError(
        f"{cls}.experts: gate_up_proj {tuple(gu.shape)} and down_proj {tuple(dn.shape)} fit neither "
        f"[E={E}, 2I, H={H}] / [E, H, I] nor [E, H, 2I] / [E, I, H] for the router's hidden size {H}"
    )


def _router_weight(m: nn.Module, E: int) -> Optional[torch.Tensor]:
    """The [E, H] weight of a router candidate: its own `weight`, else its one 2-D
    parameter with E rows (a router module wrapping a Linear, as AFMoE's)."""
    w = getattr(m, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == E:
        return w
    inner = [p for p in m.parameters() if p.dim() == 2 and p.shape[0] == E]
    return inner[0] if len(inner) == 1 else None


def _find_router(cls: str, block: nn.Module, E: int) -> tuple:
    """(name, module, weight [E, H]) of the block's one router."""
    found = []
    for n, m in block.named_children():
        w = _router_weight(m, E) if n != "experts" else None
        if w is not None:
            found.append((n, m, w))
    if len(found) > 1:
        found = [f for f in found if f[0] in _ROUTER_NAMES]
    if len(found) != 1:
        what = "no" if not found else "more than one"
        raise ValueError(
            f"{cls}: {what} router: expected one child module beside `experts` with a weight [E={E}, hidden] "
            f"(an nn.Linear or a router module); children: {[n for n, _ in block.named_children()]}"
        )
    return found[0]


def _probe_router(cls: str, name: str, router: nn.Module, w: torch.Tensor, E: int) -> Optional[int]:
    """Call the router on two probe rows (in eval mode: no jitter, no RNG drawn).
    Returns None when it gives logits only, else the top-k it returns."""
    H = int(w.shape[1])
    rows = torch.zeros(2, H, dtype=w.dtype, device=w.device)
    was = router.training
    router.eval()
    try:
        with torch.no_grad():
            out = router(rows)
    except Exception as exc:  # any failure means: not callable the way the block is replaced
        raise ValueError(f"{cls}.{name} ({type(router).__name__}): calling the router on [T, {H}] rows "
                         f"failed ({type(exc).__name__}: {exc}); a router must take the rows alone") from exc
    finally:
        router.train(was)
    if isinstance(out, torch.Tensor) and tuple(out.shape) == (2, E):
        return None
    if (isinstance(out, (tuple, list)) and len(out) == 3 and all(isinstance(t, torch.Tensor) for t in out)
            and tuple(out[0].shape) == (2, E) and out[1].dim() == 2 and out[1].shape == out[2].shape
            and out[1].shape[0] == 2 and not out[2].is_floating_point()):
        return int(out[1].shape[1])
    desc = (f"a tensor {tuple(out.shape)}" if isinstance(out, torch.Tensor) else
            f"{type(out).__name__} of {[tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in out]}"
            if isinstance(out, (tuple, list)) else type(out).__name__)
    raise ValueError(f"{cls}.{name} ({type(router).__name__}): returned {desc}; expected logits [T, E={E}] or "
                     "(logits [T, E], weights [T, k], integer ids [T, k])")


def _recipe(cls: str, block: nn.Module, config, E: int) -> RoutingRecipe:
    for field, neutral in _ROUTING_CONFIG.items():
        v = getattr(config, field, None)
        if v not in neutral:
            raise ValueError(f"{cls}: the router is a plain Linear and config.{field}={v!r}; only softmax -> "
                             "top-k (-> renorm) routing is reproduced for plain-Linear routers")

    def read(*names):
        for src in (block, config):
            for n in names:
                v = getattr(src, n, None)
                if v is not None:
                    return v
        return None

    top_k = read("top_k", "num_experts_per_tok")
    norm = read("norm_topk_prob")
    missing = [n for n, v in (("top_k / num_experts_per_tok", top_k), ("norm_topk_prob", norm)) if v is None]
    if missing:
        raise ValueError(f"{cls}: the router is a plain Linear, so the routing recipe needs {missing} "
                         "(on the block or the model config), not found")
    if not 1 <= int(top_k) <= E:
        raise ValueError(f"{cls}: top_k={top_k} outside 1..{E}")
    return RoutingRecipe(int(top_k), bool(norm))


# The block's own forward vs router + experts rebuilt from the adapter, on probe rows:
# relative error allowed (bf16 forward vs fp32 rebuild: 4e-3..5e-3 measured on the tested
# blocks; a missed renormalization: 0.09, sigmoid scores: 0.47, a wrong gate/up layout: 1.4).
_CHECK_ROWS, _CHECK_RTOL = 16, 0.03


def _check_forward(cls: str, block: nn.Module, adapter: MoEAdapter) -> None:
    """Evaluate the block as written and as rebuilt (HF's router or the recipe, the
    experts read into vLLM's layout, fp32); ValueError when they disagree. Skipped on
    the meta device (nothing to evaluate)."""
    ew = adapter.expert_weights(block)
    if ew.w13.device.type == "meta":
        return
    router = getattr(block, adapter.router_attr)
    H = ew.w13.shape[-1]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, _CHECK_ROWS, H, generator=gen).to(ew.w13.dtype).to(ew.w13.device)
    was = block.training
    block.eval()
    try:
        with torch.no_grad():
            try:
                ref = block(x.clone())  # HF blocks take [B, S, H]
            except Exception as exc:  # noqa: BLE001 - any failure: try rows, then give up naming it
                try:
                    ref = block(x[0].clone())  # some user blocks take [T, H] rows
                except Exception:  # noqa: BLE001
                    raise ValueError(f"{cls}: calling the block on [1, T, {H}] hidden states failed "
                                     f"({type(exc).__name__}: {exc})") from exc
            x2 = x.reshape(-1, H)
            if adapter.routing is None:
                _, w, ids = router(x2)
            else:
                w, ids = adapter.routing(router(x2), x2.dtype)
            ids = ids.long()
            out = torch.zeros(x2.shape, dtype=torch.float32, device=x2.device)
            for e in ids.unique().tolist():  # one expert at a time: fp32 copies of one expert only
                tok, slot = torch.where(ids == e)
                a = apply_activation(x2[tok].float() @ ew.w13[e].float().T, ew.activation)
                out.index_add_(0, tok, w[tok, slot].float()[:, None] * (a @ ew.w2[e].float().T))
    finally:
        block.train(was)
    if isinstance(ref, (tuple, list)):
        ref = ref[0]
    if not isinstance(ref, torch.Tensor) or ref.numel() != out.numel():
        raise ValueError(f"{cls}: its forward returned {type(ref).__name__} "
                         f"{tuple(ref.shape) if isinstance(ref, torch.Tensor) else ''}, expected [1, T, {H}]")
    rel = float((ref.reshape(out.shape).float() - out).norm() / out.norm().clamp(min=1e-30))
    if not rel <= _CHECK_RTOL:
        how = "HF's router" if adapter.routing is None else f"the routing recipe {adapter.routing}"
        raise ValueError(
            f"{cls}: its own forward differs from {how} + experts read as w13 [E, 2I, H] / w2 [E, H, I] "
            f"({ew.activation}) by {rel:.3g} (relative, > {_CHECK_RTOL}) on probe rows: the block does "
            "something its structure does not show (routing, scaling, combine or expert layout)"
        )


def match_structure(block: nn.Module, config=None) -> MoEAdapter:
    """The adapter for a block recognized by structure (see the module docstring);
    ValueError naming what was missing or unsupported."""
    cls = type(block).__name__
    ex = block._modules.get("experts")
    if not isinstance(ex, nn.Module):
        raise ValueError(f"{cls}: no `experts` child module")
    fused = _fused(ex)
    names = None if fused is not None else _gated_names(cls, ex)
    if fused is None and names is None:
        raise ValueError(
            f"{cls}.experts ({type(ex).__name__}): no recognisable experts: expected 3-D `gate_up_proj` and "
            f"`down_proj` parameters or a ModuleList of gated MLPs ({' / '.join('+'.join(n) for n in GATED_MLP_NAMES)} "
            f"Linears); found {_members(ex)}"
        )
    E = int(fused[0].shape[0]) if fused is not None else len(ex)
    rname, router, rweight = _find_router(cls, block, E)
    extra = [n for n in _members(block) if n not in ("experts", rname)]
    extra += [n for n, _ in block.named_buffers(recurse=False)]
    if extra:
        raise ValueError(
            f"{cls}: members {extra} beside router `{rname}` and `experts`: a block matched by structure is "
            "replaced by router + experts only, and how it combines these members is not known; "
            "such a block needs an entry in emu_inductor.models.adapters.ADAPTERS"
        )
    H = int(rweight.shape[1])
    transposed = None
    if fused is not None:
        gu, dn = fused
        if any(getattr(ex, b, None) is not None for b in ("gate_up_proj_bias", "down_proj_bias")) or getattr(
                ex, "has_bias", False):
            raise ValueError(f"{cls}.experts: expert biases are supported only for GPT-OSS (explicit adapter)")
        other = [n for n, _ in ex.named_parameters()] + [n for n, _ in ex.named_buffers()]
        other = [n for n in other if n not in ("gate_up_proj", "down_proj")]
        if other:
            raise ValueError(f"{cls}.experts: tensors {other} beside gate_up_proj / down_proj; how the experts "
                             "use them is not known")
        transposed = _orientation(cls, ex, gu, dn, H)
        act = _activation(cls, getattr(ex, "act_fn", None), config)
    else:
        if getattr(ex[0], names[0]).weight.shape[1] != H:
            raise ValueError(f"{cls}.experts.0.{names[0]}: weight {tuple(getattr(ex[0], names[0]).weight.shape)} "
                             f"does not take the router's hidden size {H}")
        acts = {type(getattr(e, "act_fn", None)) for e in ex}
        if len(acts) != 1:
            raise ValueError(f"{cls}.experts: the experts' activations differ: {sorted(a.__name__ for a in acts)}")
        act = _activation(cls, getattr(ex[0], "act_fn", None), config)
    k = _probe_router(cls, rname, router, rweight, E)
    routing = _recipe(cls, block, config, E) if k is None else None
    adapter = MoEAdapter(
        name=f"structure:{cls}", model_types=(getattr(config, "model_type", None),), block_classes=(cls,),
        router_attr=rname, layout="fused_gate_up" if fused is not None else "expert_list",
        checkpoint_names=names or ("gate_proj", "up_proj", "down_proj"), routing=routing,
        expert_names=names or (), transposed=transposed, activation_name=act, matched_by="structure",
    )
    _check_forward(cls, block, adapter)
    return adapter
