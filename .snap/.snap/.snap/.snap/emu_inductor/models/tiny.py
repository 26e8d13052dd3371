"""Tiny random-weight transformers models of each supported architecture, built from
their configs (nothing is downloaded): for tests, demos and quick experiments.

Every model has 2 decoder layers, hidden size 64, a few experts and bf16 weights.
DeepSeek-V3's first layer is dense (`first_k_dense_replace=1`), as in the real model.
"""

from __future__ import annotations

import torch

__all__ = ["TINY_ARCHITECTURES", "tiny_config", "tiny_model"]

_COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, tie_word_embeddings=False)

_SPECS = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(moe_intermediate_size=32, intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                       head_dim=16, norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                     sliding_window=16, layer_types=["sliding_attention", "full_attention"])),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8,
                         num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
                         first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
                         qk_rope_head_dim=16, v_head_dim=16, routed_scaling_factor=2.5)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(moe_intermediate_size=32, intermediate_size=64, shared_expert_intermediate_size=32,
                       num_experts=8, num_experts_per_tok=2)),
}
TINY_ARCHITECTURES = tuple(_SPECS)


def tiny_config(arch: str, **overrides):
    """The transformers config of the tiny `arch` model (imports transformers)."""
    if arch not in _SPECS:
        raise ValueError(f"arch: expected one of {TINY_ARCHITECTURES}, got {arch!r}")
    import transformers

    cfg_name, _, kw = _SPECS[arch]
    args = dict(_COMMON)
    args.update(kw)
    args.update(overrides)
    return getattr(transformers, cfg_name)(**args)


def tiny_model(arch: str, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16, **overrides):
    """A tiny `arch` causal LM with random weights (seeded), in eval mode.

    Weights are drawn with std 0.02 (transformers' init), except the routers, drawn
    larger so routing is not a near-tie everywhere, and GPT-OSS / DeepSeek routing
    biases, which get small random values.
    """
    import transformers

    cfg = tiny_config(arch, **overrides)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = getattr(transformers, _SPECS[arch][1])(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and name.endswith(("gate.weight", "router.weight")) and "shared_expert_gate" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif name.endswith(("router.bias", "gate_up_proj_bias", "down_proj_bias")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.01)
    return model.to(dtype).eval()
