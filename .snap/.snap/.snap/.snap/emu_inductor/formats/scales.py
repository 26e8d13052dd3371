"""Block scales: E8M0 exponent rules for MX, E8M0 decoding, and the NVFP4 recipes.

All E8M0 rules work on the fp32 bit fields of the block amax (exact), never on `log2`
in a narrow dtype (microxcaling's bf16 `log2` lands one too high on ~0.7% of blocks).

MX `scale_mode` (unbiased exponent before clamping; `m` = amax's fp32 mantissa field):
  floor  OCP MX v1.0 Algorithm 1: floor(log2 amax) - emax              (default)
  ceil   floor(log2 amax) + (m != 0) - emax                             (torchao CEIL)
  even   round amax to the element's mantissa width, half up, then floor
         (torchao EVEN, AMD Quark "even" = vLLM's MX emulation, compressed-tensors MXFP4)
  rceil  ceil(log2(amax * fp32(1/max_normal)))  (torchao main's inference and MoE
         training, cuBLAS/cuDNN round-up)
  rceil_log2  ceil(fl32(log2(fl32(amax / max_normal)))), clamped to [-127, 127]: the
         eager formula of torchao 0.18's RCEIL and of ModelOpt 0.47's MXFP4 qtensor, a true
         division and a correctly rounded fp32 log2, which lands on the integer below when
         amax / max_normal is within a few ulp above a power of two (fp32 inputs only).
         Computed as log2 in float64 rounded once to fp32 (equal to torch's CPU fp32 log2
         under ceil on 5.5 M probes, powers of two +-3000 ulp included).
  even_fp4  "even" with the amax rounded to FP4's single mantissa bit whatever the
         element (compressed-tensors 0.20's MXFP8, whose generate_mx_scales hard-codes
         FP4_E2M1's mantissa width for every format but FP6)
  floor_log2  floor(log2 amax) - emax with log2 rounded to amax's own dtype (the input
         dtype): microxcaling's `_shared_exponents` (Python path, its 2^-126 zero guard
         included), where an amax just below 2^k gets exponent k. Computed exactly from the
         exponent bits and per-binade thresholds (formats.log2_floor), equal to torch's
         CPU log2 in fp32, bf16 and fp16; pass the amax in the input dtype.
All-zero blocks give byte 0 (2^-127); a block holding NaN gives byte 255, and one holding
+-Inf too unless `inf_amax` says otherwise (INF_AMAX_MODES).
"""

from __future__ import annotations

import torch

from .elements import check_element, check_tensor
from .log2_floor import LOG2_DTYPE_BITS, log2_floor_exponent
from .spec import ElementSpec

__all__ = [
    "MX_SCALE_MODES",
    "INF_AMAX_MODES",
    "BYTE0_INVERSE_MODES",
    "E8M0_BYTE255",
    "E8M0_BYTE0",
    "e8m0_scale",
    "e8m0_decode",
    "e8m0_multiply",
    "e8m0_inverse",
]

MX_SCALE_MODES = ("floor", "ceil", "even", "rceil", "rceil_log2", "even_fp4", "floor_log2")
# The scale of a block whose amax is +-Inf, or (for "even") a finite amax that the
# rounding carries past fp32's largest binade:
#   "nan"              Inf -> byte 255 (the block dequantizes to NaN); a rounding carry
#                      counts as 2^128 (OCP; torchao main's EVEN)           (default)
#   "nan_or_overflow"  both -> byte 255 (compressed-tensors: log2(inf) -> inf scale)
#   "exponent"         both count as 2^128, exponent 128 - emax: the finite elements
#                      flush towards 0 and the Inf saturates (torchao 0.18 FLOOR/CEIL/EVEN)
#   "max"              both -> byte 254, 2^127 (torchao 0.18 RCEIL, Quark's even_round)
INF_AMAX_MODES = ("nan", "nan_or_overflow", "exponent", "max")
# The multiplier that scales a byte-0 block (2^-127) into element range when quantizing:
#   "pow2"        2^127, exact (default)
#   "min_normal"  2^126: torchao 0.18 FLOOR/CEIL/EVEN clamp the fp32 scale to 2^-126
#   "one"         1.0: torchao 0.18 RCEIL's eager reciprocal special-cases byte 0
BYTE0_INVERSE_MODES = ("pow2", "min_normal", "one")
# How readers decode the two edge bytes. OCP/torch/ml_dtypes/torchao: 255 is NaN;
# compressed-tensors, ModelOpt and Quark's HIP kernels produce +inf. "ldexp" is
# transformers' gpt-oss `convert_moe_packed_tensors`: `torch.ldexp(v, u - 127)` scales by
# 2^128 exactly, so under byte 255 a zero element stays +-0 (not 0 * inf = NaN), 0.5
# becomes 2^127 (finite) and |v| >= 1 overflows to +-inf; it equals "inf" on every other
# byte. Byte 0 is 2^-127 everywhere except Quark's Triton dequant, which builds 0.0.
E8M0_BYTE255 = ("nan", "inf", "ldexp")
E8M0_BYTE0 = ("pow2", "zero")

_MANT_MASK = 0x007FFFFF


def e8m0_scale(
    amax: torch.Tensor, elem: ElementSpec, scale_mode: str = "floor", *, inf_amax: str = "nan"
) -> torch.Tensor:
    """E8M0 scale bytes (uint8) for block maxima `amax` (any float dtype, >= 0 or NaN).

    Only "floor_log2" reads amax's dtype (the dtype its log2 is rounded to)."""
    if scale_mode not in MX_SCALE_MODES:
        raise ValueError(f"scale_mode: got {scale_mode!r}, expected one of {MX_SCALE_MODES}")
    if inf_amax not in INF_AMAX_MODES:
        raise ValueError(f"inf_amax: got {inf_amax!r}, expected one of {INF_AMAX_MODES}")
    check_tensor(amax, "amax")
    check_element(elem)
    log2_dtype = amax.dtype
    if scale_mode == "floor_log2":
        if log2_dtype not in LOG2_DTYPE_BITS:
            raise ValueError(f"amax: scale_mode 'floor_log2' rounds log2 to amax's dtype, one of "
                             f"{list(LOG2_DTYPE_BITS)}; got {log2_dtype}")
        if elem.emax < 1:  # subnormal amax would need their own thresholds (see below)
            raise ValueError(f"elem: scale_mode 'floor_log2' needs an element with emax >= 1, got {elem.name}")
    amax = amax.to(torch.float32)
    nan = torch.isnan(amax)
    inf = torch.isinf(amax)
    overflow = torch.zeros_like(inf)  # a finite amax the "even" rounding carries to 2^128
    if scale_mode == "rceil_log2":
        d = amax / elem.max_normal  # true fp32 division, as the libraries write it
        lg = torch.log2(d.to(torch.float64)).to(torch.float32)
        e = torch.clamp(torch.ceil(lg), min=-127.0, max=127.0)
        u = torch.where(torch.isfinite(e), e, torch.zeros_like(e)).to(torch.int32) + 127
    elif scale_mode == "rceil":
        d = amax * (1.0 / elem.max_normal)  # fp32 multiply, as torchao does
        bits = d.view(torch.int32)
        exp_field = (bits >> 23) & 0xFF
        mant = bits & _MANT_MASK
        normal_u = exp_field + (mant != 0).to(torch.int32)
        # fp32 subnormal descale: 2^-127 covers it iff d <= 2^-127 (mantissa <= 2^22).
        sub_u = (mant > (1 << 22)).to(torch.int32)
        u = torch.where(exp_field == 0, sub_u, normal_u)
        u = torch.clamp(u, max=254)
    elif scale_mode == "floor_log2":
        # fp32-subnormal and zero amax give -127 (floor(log2) <= -126 there; every MX
        # element has emax >= 2, so the clamp below makes both byte 0)
        e = log2_floor_exponent(amax, log2_dtype)
        u = torch.clamp(e - elem.emax, min=-127, max=127) + 127
    else:
        bits = amax.view(torch.int32)
        if scale_mode in ("even", "even_fp4"):
            mbits = 1 if scale_mode == "even_fp4" else elem.mbits
            bits = (bits + (1 << (22 - mbits))) & 0x7F800000
            overflow = (((bits >> 23) & 0xFF) == 255) & ~inf & ~nan
        exp_field = (bits >> 23) & 0xFF
        e = exp_field - 127  # zero and fp32-subnormal amax count as 2^-127
        if scale_mode == "ceil":
            e = e + ((amax.view(torch.int32) & _MANT_MASK) != 0).to(torch.int32)
        # exponent 128 (Inf, or a carry) stays 128 - emax: OCP's rule applied to 2^128
        u = torch.clamp(e - elem.emax, min=-127, max=127) + 127
    if inf_amax == "nan":
        u = torch.where(inf, torch.full_like(u, 255), u)
    elif inf_amax == "nan_or_overflow":
        u = torch.where(inf | overflow, torch.full_like(u, 255), u)
    elif inf_amax == "max":
        u = torch.where(inf | overflow, torch.full_like(u, 254), u)
    elif scale_mode in ("rceil", "rceil_log2"):
        # "exponent" for the ratio rules: Inf / max_normal is Inf, whose exponent field
        # (255) is past E8M0's largest finite byte; saturate as torchao's clamp does
        u = torch.where(inf, torch.full_like(u, 254), u)
    u = torch.where(nan, torch.full_like(u, 255), u)
    return u.to(torch.uint8)


def e8m0_decode(u: torch.Tensor, *, byte255: str = "nan", byte0: str = "pow2") -> torch.Tensor:
    """fp32 value 2^(u-127) of E8M0 bytes, built from bits (exact, no exp2/pow).

    Byte 0 is the fp32 subnormal 2^-127 (0x00400000), so this needs a non-FTZ context.
    Under byte255="ldexp" byte 255 is 2^128, which as an fp32 value is +inf: readers that
    multiply element values by it must use `e8m0_multiply`, which keeps the product exact.
    """
    if byte255 not in E8M0_BYTE255:
        raise ValueError(f"byte255: got {byte255!r}, expected one of {E8M0_BYTE255}")
    if byte0 not in E8M0_BYTE0:
        raise ValueError(f"byte0: got {byte0!r}, expected one of {E8M0_BYTE0}")
    check_tensor(u, "u")
    ui = u.to(torch.int32)
    bits = torch.where(ui == 0, torch.full_like(ui, 0x00400000 if byte0 == "pow2" else 0), ui << 23)
    special = 0x7FC00000 if byte255 == "nan" else 0x7F800000
    bits = torch.where(ui == 255, torch.full_like(ui, special), bits)
    return bits.view(torch.float32)


def e8m0_multiply(v: torch.Tensor, u: torch.Tensor, *, byte255: str = "nan", byte0: str = "pow2") -> torch.Tensor:
    """fp32 element values `v` times their E8M0 scales `u` (broadcast), as a reader reads them.

    For every byte but 255 under "ldexp" this is `v * e8m0_decode(u)` (exact for MX
    elements: a power of two times a value of a few significant bits, fp32 subnormals
    included). "ldexp" multiplies by 2^128 as (v * 2^127) * 2: both steps exact until the
    result overflows, so it is torch.ldexp's single rounding of v * 2^128 (0 stays +-0).
    """
    out = v * e8m0_decode(u, byte255=byte255, byte0=byte0)
    if byte255 == "ldexp":
        out = torch.where(u.to(torch.int32) == 255, (v * 2.0 ** 127) * 2.0, out)
    return out


def e8m0_inverse(u: torch.Tensor, *, byte0: str = "pow2") -> torch.Tensor:
    """fp32 2^(127-u), the exact multiplier that scales a block into element range.

    Byte 254 gives the fp32 subnormal 2^-127; byte 255 gives NaN. `byte0` picks the
    multiplier of byte 0 (BYTE0_INVERSE_MODES): 2^127, 2^126 or 1.0.
    """
    if byte0 not in BYTE0_INVERSE_MODES:
        raise ValueError(f"byte0: got {byte0!r}, expected one of {BYTE0_INVERSE_MODES}")
    check_tensor(u, "u")
    ui = u.to(torch.int32)
    e = 127 - ui
    bits = torch.where(e >= -126, ((e + 127).clamp(min=0)) << 23, torch.full_like(ui, 0x00400000))
    bits = torch.where(ui == 255, torch.full_like(ui, 0x7FC00000), bits)
    if byte0 != "pow2":
        b0 = (126 + 127) << 23 if byte0 == "min_normal" else 127 << 23
        bits = torch.where(ui == 0, torch.full_like(ui, b0), bits)
    return bits.view(torch.float32)

