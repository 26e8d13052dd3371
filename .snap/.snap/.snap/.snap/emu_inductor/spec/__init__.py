"""What a fused op computes, as data (layer 2: imports only `emu_inductor.formats`).

schemes      Scheme / ActQuant / SCHEMES / get_scheme: the named weight x activation
             configurations users pick (vLLM/Quark names plus NVFP4 w4a4/w4a16)
compat       the one weight-format x activation compatibility table
activations  the MoE activations as data (function, gate/up layout), swigluoai's constants
opspec       OpSpec: the hashable configuration the mxemu ops carry as a string and
             the generated kernels are keyed by
"""

from .activations import ACTIVATION_NAMES, SWIGLUOAI_ALPHA, SWIGLUOAI_LIMIT, check_activation, is_gated
from .compat import ACT_FOR_WEIGHT, FUSED_MX_INF_AMAX, FUSED_MX_SCALE_MODES, act_name, is_compatible
from .opspec import OpSpec
from .schemes import ALIASES, SCHEMES, ActQuant, Scheme, get_scheme

__all__ = [
    "ACTIVATION_NAMES", "SWIGLUOAI_ALPHA", "SWIGLUOAI_LIMIT", "check_activation", "is_gated", "ACT_FOR_WEIGHT",
    "FUSED_MX_SCALE_MODES", "FUSED_MX_INF_AMAX", "act_name", "is_compatible", "OpSpec", "ALIASES", "SCHEMES", "ActQuant", "Scheme",
    "get_scheme",
]
