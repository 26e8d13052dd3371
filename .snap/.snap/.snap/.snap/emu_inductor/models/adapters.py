"""Per-architecture knowledge of transformers' (5.x) MoE blocks.

An adapter says how to recognize a model's sparse MoE block, where its router is, how
to read the experts' weights out of transformers' fused 3-D parameters and turn them
into vLLM's layout, and how the block combines routed and shared experts.

The entries of ADAPTERS are matched by class name first (they know things the module
tree does not show: shared-expert combines, GPT-OSS's biases and return value). Any other
module holding `experts` is matched by structure (`structure.match_structure`: a router
with an [E, H] weight plus fused or listed gated experts), which yields an adapter of
the same form for that block; that is how OLMoE, PhiMoE, GraniteMoE(-Shared), Jamba and
user-written blocks are read.

transformers 5.x stores experts fused (checked against transformers 5.17.0):
  Qwen3-MoE, Qwen2-MoE, Mixtral, DeepSeek-V3   experts.gate_up_proj [E, 2I, H] (gate rows,
      then up rows: `linear(x, W).chunk(2)`), experts.down_proj [E, H, I] -> vLLM w13 and
      w2 as they are.  (A model whose experts class sets `is_transposed` stores them
      [E, H, 2I] / [E, I, H]; `is_concatenated=False` means gate/up interleaved.)
  GPT-OSS  experts.gate_up_proj [E, H, 2I] with gate/up *interleaved* along 2I
      (`gate_up[..., ::2]`, `[..., 1::2]`), experts.down_proj [E, I, H], both used as
      `x @ W`, plus biases gate_up_proj_bias [E, 2I] and down_proj_bias [E, H]
      -> w13 = gate_up_proj^T [E, 2I, H] (interleaved rows: vLLM's swigluoai layout),
      w2 = down_proj^T [E, H, I].
Routers (called unchanged, so routing is HF's own, bit for bit):
  Qwen3-MoE / Qwen2-MoE  softmax (fp32) -> top-k -> optional renorm -> weights cast to
                          the logits' dtype (bf16)
  Mixtral                 softmax (fp32) -> top-k -> renorm, weights stay fp32
  GPT-OSS                 logits with bias -> top-k on logits -> softmax over the k (bf16)
  DeepSeek-V3             fp32 logits -> sigmoid -> + e_score_correction_bias for the
                          choice -> group top-2 sums -> topk_group groups -> top-k ->
                          renorm (+1e-20) -> * routed_scaling_factor (fp32)
Shared experts:
  DeepSeek-V3  out = routed + shared_experts(x)
  Qwen2-MoE    out = routed + sigmoid(shared_expert_gate(x)) * shared_expert(x)
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

__all__ = ["MoEAdapter", "ADAPTERS", "find_adapter", "ExpertWeights", "RoutingRecipe"]


@dataclasses.dataclass
class ExpertWeights:
    """Float expert weights in vLLM's layout (plus optional biases)."""

    w13: torch.Tensor  # [E, 2I, H] (gate rows then up rows; interleaved for swigluoai)
    w2: torch.Tensor  # [E, H, I]
    activation: str
    w13_bias: Optional[torch.Tensor] = None  # [E, 2I]
    w2_bias: Optional[torch.Tensor] = None  # [E, H]


_HF_ACT = {"silu": "silu", "swish": "silu", "gelu": "gelu"}


def _activation_from_config(block: nn.Module) -> str:
    experts = block.experts
    cfg = getattr(experts, "config", None)
    name = getattr(cfg, "hidden_act", None)
    if name is None:
        act = getattr(experts, "act_fn", None)
        name = {"SiLU": "silu", "SiLUActivation": "silu", "GELUActivation": "gelu"}.get(type(act).__name__)
    if name not in _HF_ACT:
        raise ValueError(
            f"{type(block).__name__}.experts: activation {name!r} has no emulated counterpart; "
            f"expected one of {sorted(_HF_ACT)}"
        )
    return _HF_ACT[name]


def _check_swigluoai(ex: nn.Module) -> None:
    alpha, limit = float(getattr(ex, "alpha", 1.702)), float(getattr(ex, "limit", 7.0))
    if alpha != 1.702 or limit != 7.0:
        raise ValueError(
            f"{type(ex).__name__}: swigluoai with alpha={alpha}, limit={limit}; the emulation "
            "implements alpha=1.702, limit=7.0 (vLLM SWIGLUOAI)"
        )


@dataclasses.dataclass(frozen=True)
class RoutingRecipe:
    """The routing of a block whose router is a plain `nn.Linear` (the math then lives in
    the block's forward, which cannot be called on its own): transformers 4.x's
    Mixtral / Qwen-MoE recipe, softmax over the experts in fp32 -> top-k -> optional
    renormalization -> weights cast to the hidden states' dtype."""

    top_k: int
    norm_topk_prob: bool

    def __call__(self, router_logits: torch.Tensor, dtype: torch.dtype):
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(dtype), ids


@dataclasses.dataclass(frozen=True)
class MoEAdapter:
    """How one architecture's MoE block is read and rebuilt.

    `block_classes`: HF class names of the sparse block. `router_attr`: the router child
    (called as `router(x2d) -> (logits, topk_weights, topk_ids)`, or, with `routing`, a
    plain Linear giving logits that `routing` turns into weights and ids). `shared`:
    None, "deepseek" (`shared_experts`) or "qwen2" (`shared_expert` + `shared_expert_gate`).
    `returns_router_scores`: the block returns `(hidden, router_scores)` (GPT-OSS).
    `layout`: "fused_gate_up" (3-D `gate_up_proj` / `down_proj`; `transposed` None means
    the experts' own `is_transposed` flag), "gpt_oss", or "expert_list" (a ModuleList of
    gated MLPs whose Linears are named `expert_names` = (gate, up, down)).
    `checkpoint_names`: per-expert projection names in checkpoints (gate, up, down).
    `checkpoint_block_names`: names the block has in checkpoints besides its module path
    (Mixtral checkpoints say `block_sparse_moe` where transformers 5 says `mlp`).
    `matched_by`: "class" for the entries of ADAPTERS, "structure" for an adapter that
    `structure.match_structure` derived from one block.
    """

    name: str
    model_types: tuple
    block_classes: tuple
    router_attr: str = "gate"
    shared: Optional[str] = None
    returns_router_scores: bool = False
    layout: str = "fused_gate_up"  # or "gpt_oss", "expert_list"
    checkpoint_names: tuple = ("gate_proj", "up_proj", "down_proj")
    checkpoint_block_names: tuple = ()
    routing: Optional[RoutingRecipe] = None
    expert_names: tuple = ()
    transposed: Optional[bool] = None
    activation_name: Optional[str] = None  # set by the structural match; else read from the block
    matched_by: str = "class"

    def matches(self, module: nn.Module) -> bool:
        return type(module).__name__ in self.block_classes

    def _is_transposed(self, ex: nn.Module) -> bool:
        if self.transposed is not None:
            return self.transposed
        return bool(getattr(ex, "is_transposed", False))

    def expert_weights(self, block: nn.Module) -> ExpertWeights:
        ex = block.experts
        if self.layout == "expert_list":
            g, u, d = self.expert_names
            w13 = torch.stack([torch.cat([getattr(e, g).weight.detach(), getattr(e, u).weight.detach()]) for e in ex])
            w2 = torch.stack([getattr(e, d).weight.detach() for e in ex])
            return ExpertWeights(w13, w2, self.activation(block))
        gu, dn = ex.gate_up_proj.detach(), ex.down_proj.detach()
        if self.layout == "gpt_oss":
            _check_swigluoai(ex)
            b13 = ex.gate_up_proj_bias.detach() if getattr(ex, "gate_up_proj_bias", None) is not None else None
            b2 = ex.down_proj_bias.detach() if getattr(ex, "down_proj_bias", None) is not None else None
            return ExpertWeights(gu.transpose(1, 2).contiguous(), dn.transpose(1, 2).contiguous(),
                                 "swigluoai", b13, b2)
        if self._is_transposed(ex):
            gu, dn = gu.transpose(1, 2), dn.transpose(1, 2)
        if getattr(ex, "has_bias", False):
            raise ValueError(f"{type(ex).__name__}: experts with biases are only supported for GPT-OSS")
        act = self.activation(block)
        if not getattr(ex, "is_concatenated", True):
            # interleaved gate/up rows -> gate rows then up rows
            gu = torch.cat([gu[:, 0::2], gu[:, 1::2]], dim=1)
        return ExpertWeights(gu.contiguous(), dn.contiguous(), act)

    def num_experts(self, block: nn.Module) -> int:
        return self.dims(block)[0]

    def dims(self, block: nn.Module) -> tuple:
        """(E, H, I): experts, hidden size, expert intermediate size."""
        ex = block.experts
        if self.layout == "expert_list":
            I, H = getattr(ex[0], self.expert_names[0]).weight.shape
            return len(ex), int(H), int(I)
        E, a, b = ex.gate_up_proj.shape
        if self.layout == "gpt_oss" or self._is_transposed(ex):
            return int(E), int(a), int(b) // 2
        return int(E), int(b), int(a) // 2

    def dtype(self, block: nn.Module) -> torch.dtype:
        """The experts' weight dtype."""
        ex = block.experts
        if self.layout == "expert_list":
            return getattr(ex[0], self.expert_names[0]).weight.dtype
        return ex.gate_up_proj.dtype

    def activation(self, block: nn.Module) -> str:
        if self.layout == "gpt_oss":
            _check_swigluoai(block.experts)
            return "swigluoai"
        if self.activation_name is not None:
            return self.activation_name
        return _activation_from_config(block)


ADAPTERS: dict[str, MoEAdapter] = {
    a.name: a
    for a in (
        MoEAdapter("qwen3_moe", ("qwen3_moe",), ("Qwen3MoeSparseMoeBlock",)),
        MoEAdapter("qwen2_moe", ("qwen2_moe",), ("Qwen2MoeSparseMoeBlock",), shared="qwen2"),
        MoEAdapter("mixtral", ("mixtral",), ("MixtralSparseMoeBlock",),
                   checkpoint_names=("w1", "w3", "w2"), checkpoint_block_names=("block_sparse_moe",)),
        MoEAdapter("deepseek_v3", ("deepseek_v3",), ("DeepseekV3MoE",), shared="deepseek"),
        MoEAdapter("gpt_oss", ("gpt_oss",), ("GptOssMLP",), router_attr="router",
                   returns_router_scores=True, layout="gpt_oss"),
    )
}


def find_adapter(module: nn.Module, config=None) -> Optional[MoEAdapter]:
    """The adapter for `module`: the ADAPTERS entry whose block class it is; else, when
    it holds an `experts` child, the adapter its structure gives (`structure.
    match_structure`, which raises ValueError naming what it could not recognise);
    else None. `config`: the model's config, read for the routing recipe of plain-Linear
    routers."""
    for a in ADAPTERS.values():
        if a.matches(module):
            return a
    # imported here: structure.py builds MoEAdapter instances and imports this module
    from .structure import is_candidate, match_structure

    if is_candidate(module):
        return match_structure(module, config)
    return None
