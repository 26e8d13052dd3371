"""The eager emulation users write: the numerics oracle (layer 2; imports only formats)."""

from .activations import ACTIVATIONS, apply_activation, is_gated
from .modules import EmulatedMoE, QuantizedExperts, QuantizedLinear, quantize_weight
from .moe import GEMM_STYLES, dequantize_experts, moe_emulated
from .qdq import act_fake_quantize, dequantize_weight, fp8_tensor_fake_quantize
from .routing import sigmoid_topk, softmax_topk
from .schemes import SCHEMES, ActQuant, Scheme, get_scheme

__all__ = [
    "ACTIVATIONS", "apply_activation", "is_gated", "EmulatedMoE", "QuantizedExperts", "QuantizedLinear",
    "quantize_weight", "GEMM_STYLES", "dequantize_experts", "moe_emulated", "act_fake_quantize",
    "dequantize_weight", "fp8_tensor_fake_quantize", "sigmoid_topk", "softmax_topk", "SCHEMES", "ActQuant",
    "Scheme", "get_scheme",
]
