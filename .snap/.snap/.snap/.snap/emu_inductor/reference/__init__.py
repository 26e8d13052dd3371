"""The eager emulation users write: the numerics oracle (layer 3; imports formats, spec).

Scheme / ActQuant / SCHEMES / get_scheme live in `emu_inductor.spec.schemes`; they are
re-exported here (and `emu_inductor.reference.schemes` still imports) because users
pick schemes where they build the emulation.
"""

from .activations import ACTIVATIONS, apply_activation, is_gated
from .modules import EmulatedMoE, QuantizedExperts, QuantizedLinear, quantize_weight
from .moe import GEMM_STYLES, dequantize_experts, moe_emulated
from .qdq import act_fake_quantize, dequantize_weight, fp8_tensor_fake_quantize
from .routing import sigmoid_topk, softmax_topk
from ..spec.schemes import SCHEMES, ActQuant, Scheme, get_scheme

__all__ = [
    "ACTIVATIONS", "apply_activation", "is_gated", "EmulatedMoE", "QuantizedExperts", "QuantizedLinear",
    "quantize_weight", "GEMM_STYLES", "dequantize_experts", "moe_emulated", "act_fake_quantize",
    "dequantize_weight", "fp8_tensor_fake_quantize", "sigmoid_topk", "softmax_topk", "SCHEMES", "ActQuant",
    "Scheme", "get_scheme",
]
