"""Emulated quantization of whole transformers models (Qwen3-MoE, Qwen2-MoE, Mixtral,
DeepSeek-V3, GPT-OSS by class; OLMoE, PhiMoE, GraniteMoE, Jamba and other blocks holding a
router plus fused or listed gated experts by structure): `quantize_model` swaps MoE
blocks for EmulatedMoEBlock and linear layers for QuantizedLinear, in place. Imports
torch only; transformers is never imported here (blocks are recognized by class name or
by the modules and parameters they hold)."""

from .adapters import ADAPTERS, ExpertWeights, MoEAdapter, RoutingRecipe, find_adapter
from .block import EmulatedMoEBlock
from .experts import BiasedQuantizedExperts, moe_emulated_with_bias
from .linear import RowQuantizedLinear
from .quantize import (
    DEFAULT_IGNORE,
    build_block,
    calibrate,
    find_moe_blocks,
    quantize_model,
    quantized_modules,
    resolve_linear_targets,
)
from .structure import match_structure

__all__ = [
    "ADAPTERS", "ExpertWeights", "MoEAdapter", "RoutingRecipe", "find_adapter", "match_structure", "EmulatedMoEBlock", "BiasedQuantizedExperts",
    "moe_emulated_with_bias", "RowQuantizedLinear", "DEFAULT_IGNORE", "build_block", "calibrate", "find_moe_blocks", "quantize_model",
    "quantized_modules", "resolve_linear_targets",
]
