"""Block scales: E8M0 exponent rules for MX, E8M0 decoding, and the NVFP4 recipes.

All E8M0 rules work on the fp32 bit fields of the block amax (exact), never on `log2`
in a narrow dtype (microxcaling's bf16 `log2` lands one too high on ~0.7% of blocks).

MX `scale_mode` (unbiased exponent before clamping; `m` = amax's fp32 mantissa field):
  floor  OCP MX v1.0 Algorithm 1: floor(log2 amax) - emax              (default)
  ceil   floor(log2 amax) + (m != 0) - emax                             (torchao CEIL)
  even   round amax to the element's mantissa width, half up, then floor
         (torchao EVEN, AMD Quark "even" = vLLM's MX emulation, compressed-tensors MXFP4)
  rceil  ceil(log2(amax * fp32(1/max_normal)))  (torchao inference and MoE training,
         ModelOpt, cuBLAS/cuDNN round-up)
All-zero blocks give byte 0 (2^-127); a block holding NaN or Inf gives byte 255.
"""

from __future__ import annotations

import torch

from .spec import ElementSpec

__all__ = [
    "MX_SCALE_MODES",
    "E8M0_BYTE255",
    "E8M0_BYTE0",
    "e8m0_scale",
    "e8m0_decode",
    "e8m0_inverse",
]

MX_SCALE_MODES = ("floor", "ceil", "even", "rceil")
# How readers decode the two edge bytes. OCP/torch/ml_dtypes/torchao: 255 is NaN;
# compressed-tensors, ModelOpt and Quark's HIP kernels produce +inf. Byte 0 is 2^-127
# everywhere except Quark's Triton dequant, which builds 0.0.
E8M0_BYTE255 = ("nan", "inf")
E8M0_BYTE0 = ("pow2", "zero")

_MANT_MASK = 0x007FFFFF


def e8m0_scale(amax: torch.Tensor, elem: ElementSpec, scale_mode: str = "floor") -> torch.Tensor:
    """E8M0 scale bytes (uint8) for block maxima `amax` (any float dtype, >= 0 or NaN)."""
    if scale_mode not in MX_SCALE_MODES:
        raise ValueError(f"scale_mode: got {scale_mode!r}, expected one of {MX_SCALE_MODES}")
    amax = amax.to(torch.float32)
    finite = torch.isfinite(amax)
    if scale_mode == "rceil":
        d = amax * (1.0 / elem.max_normal)  # fp32 multiply, as torchao does
        bits = d.view(torch.int32)
        exp_field = (bits >> 23) & 0xFF
        mant = bits & _MANT_MASK
        normal_u = exp_field + (mant != 0).to(torch.int32)
        # fp32 subnormal descale: 2^-127 covers it iff d <= 2^-127 (mantissa <= 2^22).
        sub_u = (mant > (1 << 22)).to(torch.int32)
        u = torch.where(exp_field == 0, sub_u, normal_u)
        u = torch.clamp(u, max=254)
    else:
        bits = amax.view(torch.int32)
        if scale_mode == "even":
            bits = (bits + (1 << (22 - elem.mbits))) & 0x7F800000
        exp_field = (bits >> 23) & 0xFF
        e = exp_field - 127  # zero and fp32-subnormal amax count as 2^-127
        if scale_mode == "ceil":
            e = e + ((amax.view(torch.int32) & _MANT_MASK) != 0).to(torch.int32)
        u = torch.clamp(e - elem.emax, min=-127, max=127) + 127
    u = torch.where(finite, u, torch.full_like(u, 255))
    return u.to(torch.uint8)


def e8m0_decode(u: torch.Tensor, *, byte255: str = "nan", byte0: str = "pow2") -> torch.Tensor:
    """fp32 value 2^(u-127) of E8M0 bytes, built from bits (exact, no exp2/pow).

    Byte 0 is the fp32 subnormal 2^-127 (0x00400000), so this needs a non-FTZ context.
    """
    if byte255 not in E8M0_BYTE255:
        raise ValueError(f"byte255: got {byte255!r}, expected one of {E8M0_BYTE255}")
    if byte0 not in E8M0_BYTE0:
        raise ValueError(f"byte0: got {byte0!r}, expected one of {E8M0_BYTE0}")
    ui = u.to(torch.int32)
    bits = torch.where(ui == 0, torch.full_like(ui, 0x00400000 if byte0 == "pow2" else 0), ui << 23)
    special = 0x7FC00000 if byte255 == "nan" else 0x7F800000
    bits = torch.where(ui == 255, torch.full_like(ui, special), bits)
    return bits.view(torch.float32)


def e8m0_inverse(u: torch.Tensor) -> torch.Tensor:
    """fp32 2^(127-u), the exact multiplier that scales a block into element range.

    Byte 254 gives the fp32 subnormal 2^-127; byte 255 gives NaN.
    """
    ui = u.to(torch.int32)
    e = 127 - ui
    bits = torch.where(e >= -126, ((e + 127).clamp(min=0)) << 23, torch.full_like(ui, 0x00400000))
    bits = torch.where(ui == 255, torch.full_like(ui, 0x7FC00000), bits)
    return bits.view(torch.float32)

