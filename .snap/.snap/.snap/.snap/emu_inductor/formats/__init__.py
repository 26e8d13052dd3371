"""Microscaling formats: element types, block formats, scale rules, (de)quantization.

Layer 1 of emu_inductor: imports nothing else from the package.
"""

from .elements import IN_DTYPE_ROUNDINGS, NAN_ELEMENT_MODES, ROUNDING_MODES, SIGNED_ZERO_MODES, decode, encode, round_to_element
from .nvfp4 import RECIPES as NVFP4_RECIPES, GlobalScaleWarning, default_global_scale
from .log2_floor import LOG2_DTYPE_BITS, log2_floor_exponent, log2_floor_runs, log2_floor_thresholds
from .packing import FP6_LAYOUTS, pack, unpack
from .quantize import MIN_GLOBAL_SCALE, QDQOptions, QuantizedTensor, dequantize, fake_quantize, quantize
from .scales import (BYTE0_INVERSE_MODES, INF_AMAX_MODES, MX_SCALE_MODES, e8m0_decode, e8m0_inverse, e8m0_multiply,
                     e8m0_scale)
from .variants import MX_VARIANTS, MXVariant
from .spec import (
    E2M1,
    E2M3,
    E3M2,
    E4M3,
    E4M3_SCALE,
    E5M2,
    E8M0_SCALE,
    ELEMENTS,
    FORMATS,
    MXFP4,
    MXFP6_E2M3,
    MXFP6_E3M2,
    MXFP8_E4M3,
    MXFP8_E5M2,
    NVFP4,
    BlockFormat,
    ElementSpec,
    ScaleSpec,
    get_element,
    get_format,
)
