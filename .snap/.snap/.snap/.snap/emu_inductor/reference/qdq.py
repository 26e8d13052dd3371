"""Activation fake-quantization and weight dequantization as the emulation does them."""

from __future__ import annotations

from typing import Optional

import torch

from ..formats import BlockFormat, decode, e8m0_decode, e8m0_multiply, fake_quantize, round_to_element, unpack
from ..formats import E4M3
from ..spec.opspec import W_SCALE_ORDERS as _SCALE_ORDERS
from ..spec.schemes import ActQuant

__all__ = ["act_fake_quantize", "fp8_tensor_fake_quantize", "dequantize_weight"]

_FP8_MAX = E4M3.max_normal
_FP8_MIN_SCALE = 1.0 / (_FP8_MAX * 512.0)  # vLLM's dynamic-fp8 floor, so all-zero input gives 0


def fp8_tensor_fake_quantize(x: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-tensor E4M3 QDQ (vLLM `scaled_fp8_quant` + dequant): dynamic when scale is None
    (s = max(amax/448, 1/(448*512)) in fp32), `q = e4m3(clamp(x * (1/s), +-448))`,
    `out = (q * s).to(x.dtype)`."""
    if scale is None:
        # an empty tensor has no amax: its (unused) scale is the floor, like an all-zero one
        amax = x.abs().amax() if x.numel() else x.new_zeros(())
        s = torch.clamp(amax.to(torch.float32) / _FP8_MAX, min=_FP8_MIN_SCALE)
    else:
        s = scale.to(torch.float32)
    q = round_to_element(x.to(torch.float32) * (1.0 / s), E4M3)
    return (q * s).to(x.dtype)


def act_fake_quantize(x: torch.Tensor, act: Optional[ActQuant], global_scale=None) -> torch.Tensor:
    """Fake-quantize activations per row along the last dim; identity for weight-only."""
    if act is None:
        return x
    if act.kind == "fp8_tensor":
        return fp8_tensor_fake_quantize(x, global_scale)
    # MX edge cases (zero sign, Inf blocks) as the ActQuant says; NVFP4 recipes fix their own
    mx = {"signed_zero": act.signed_zero, "inf_amax": act.inf_amax,
          "byte0_inverse": act.byte0_inverse} if act.fmt.is_mx else {}
    return fake_quantize(
        x, act.fmt, scale_mode=act.scale_mode, recipe=act.recipe, rounding=act.rounding,
        global_scale=global_scale if act.fmt.has_global_scale else None, **mx,
    )


def dequantize_weight(
    w: torch.Tensor,
    scale: torch.Tensor,
    fmt: BlockFormat,
    *,
    alpha: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.bfloat16,
    fp6_layout: str = "quark",
    e8m0_byte255: str = "nan",
    scale_order: str = "s*a",
    e8m0_byte0: str = "pow2",
) -> torch.Tensor:
    """Packed weights [..., N, K*bits/8] with block scales [..., N, K/block] -> [..., N, K].

    NVFP4 follows vLLM's `dequantize_to_dtype`: `dtype(e2m1 * (fp32(e4m3) * alpha))`,
    the scale-times-alpha product formed first; `alpha` is the dequantize-direction
    global scale (ModelOpt `weight_scale_2`, 1/compressed-tensors `weight_global_scale`),
    one value per leading index (per expert) or per expert and output row ([E, N]).
    `scale_order` spells the NVFP4 product otherwise: "s/g" is `e2m1 * (fp32(e4m3) / g)`
    with `alpha` the quantize-direction global g (compressed-tensors, vLLM's
    `dequantize_to_dtype` given `weight_global_scale`), "(v*s)*a" is `(e2m1 * e4m3) * a`.
    MX: `dtype(value * 2^(u-127))`, exact; `e8m0_byte255="inf"` reads byte 255 as +inf
    (the exponent-bit readers: compressed-tensors, ModelOpt, Quark's HIP kernels);
    "ldexp" multiplies by 2^128 exactly (transformers' gpt-oss `torch.ldexp`: 0 stays 0).
    `e8m0_byte0="zero"` reads byte 0 as 0.0 instead of 2^-127 (readers that build the scale
    from the exponent bits, `(u << 23).view(float32)`; Quark's Triton dequant).
    """
    if scale_order not in _SCALE_ORDERS:
        raise ValueError(f"scale_order: expected one of {_SCALE_ORDERS}, got {scale_order!r}")
    codes = unpack(w, fmt.pack_bits, fp6_layout=fp6_layout)
    v = decode(codes, fmt.element)
    vb = v.reshape(*v.shape[:-1], v.shape[-1] // fmt.block_size, fmt.block_size)
    a = None
    if fmt.is_mx:
        s = e8m0_decode(scale, byte255=e8m0_byte255, byte0=e8m0_byte0)
    else:
        s = decode(scale.view(torch.uint8), E4M3)
        if alpha is not None:
            a = alpha.to(torch.float32)
            a = a.reshape(*a.shape, *([1] * (s.dim() - a.dim())))
            if scale_order == "s*a":
                s = s * a
            elif scale_order == "s/g":
                s = s / a
    if fmt.is_mx and e8m0_byte255 == "ldexp":
        # e8m0_multiply keeps the "ldexp" reader's byte-255 product exact (0 * 2^128 = 0)
        out = e8m0_multiply(vb, scale.unsqueeze(-1), byte255=e8m0_byte255, byte0=e8m0_byte0)
    else:
        # decode, then broadcast: the op order the traced weight patterns are built from
        out = vb * s.unsqueeze(-1)
    if a is not None and scale_order == "(v*s)*a":
        out = out * a.unsqueeze(-1)
    return out.reshape(v.shape).to(dtype)
