"""Emulated quantization of whole transformers models (Qwen3-MoE, Qwen2-MoE, Mixtral,
DeepSeek-V3, GPT-OSS): `quantize_model` swaps MoE blocks for EmulatedMoEBlock and linear
layers for QuantizedLinear, in place. Imports torch only; transformers is never
imported here (the adapters recognize HF blocks by class name)."""

from .adapters import ADAPTERS, ExpertWeights, MoEAdapter, find_adapter
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

__all__ = [
    "ADAPTERS", "ExpertWeights", "MoEAdapter", "find_adapter", "EmulatedMoEBlock", "BiasedQuantizedExperts",
    "moe_emulated_with_bias", "RowQuantizedLinear", "DEFAULT_IGNORE", "build_block", "calibrate", "find_moe_blocks", "quantize_model",
    "quantized_modules", "resolve_linear_targets",
]
