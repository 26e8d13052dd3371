"""Packing element codes into bytes along the last axis, and back.

4-bit: two codes per byte, element 2j in the low nibble, 2j+1 in the high nibble
(vLLM `break_fp4_bytes`, compressed-tensors, torchao, ModelOpt all agree).
6-bit: four codes per three bytes. Layout "quark" (AMD Quark `Pack_fp6`, which vLLM's
`dequant_mxfp6` reads): W = b0 | b1<<8 | b2<<16, code j = (W >> 6j) & 0x3F. Layout
"unpacked": one code per byte (torchao since Dec 2025).
8-bit: one code per byte.
"""

from __future__ import annotations

import torch

__all__ = ["FP6_LAYOUTS", "pack", "unpack"]

FP6_LAYOUTS = ("quark", "unpacked")


def _check_codes(codes: torch.Tensor, arg: str) -> None:
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"{arg}: expected a uint8 tensor, got {type(codes).__name__}")
    if codes.dtype != torch.uint8:
        raise ValueError(f"{arg}: expected uint8 codes, got dtype {codes.dtype}")
    if codes.dim() == 0:
        raise ValueError(f"{arg}: expected at least one dimension (codes run along the last), got a 0-d tensor")


def pack(codes: torch.Tensor, bits: int, *, fp6_layout: str = "quark") -> torch.Tensor:
    """Pack uint8 codes (one per byte, low `bits` bits used) along the last axis."""
    _check_codes(codes, "codes")
    k = codes.shape[-1]
    if bits == 8:
        return codes
    if bits == 4:
        if k % 2:
            raise ValueError(f"codes: 4-bit packing needs an even last dim, got {k}")
        c = codes.reshape(*codes.shape[:-1], k // 2, 2)
        return (c[..., 0] & 0xF) | ((c[..., 1] & 0xF) << 4)
    if bits == 6:
        if fp6_layout == "unpacked":
            return codes & 0x3F
        if fp6_layout != "quark":
            raise ValueError(f"fp6_layout: got {fp6_layout!r}, expected one of {FP6_LAYOUTS}")
        if k % 4:
            raise ValueError(f"codes: 6-bit packing needs a last dim divisible by 4, got {k}")
        c = (codes & 0x3F).to(torch.int32).reshape(*codes.shape[:-1], k // 4, 4)
        w = c[..., 0] | (c[..., 1] << 6) | (c[..., 2] << 12) | (c[..., 3] << 18)
        b = torch.stack([w & 0xFF, (w >> 8) & 0xFF, (w >> 16) & 0xFF], dim=-1)
        return b.to(torch.uint8).reshape(*codes.shape[:-1], k * 3 // 4)
    raise ValueError(f"bits: expected 4, 6 or 8, got {bits}")


def unpack(packed: torch.Tensor, bits: int, *, fp6_layout: str = "quark") -> torch.Tensor:
    """Inverse of `pack`: uint8 codes, one per byte."""
    _check_codes(packed, "packed")
    n = packed.shape[-1]
    if bits == 8:
        return packed
    if bits == 4:
        low = packed & 0x0F
        high = packed >> 4
        return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], n * 2)
    if bits == 6:
        if fp6_layout == "unpacked":
            return packed & 0x3F
        if fp6_layout != "quark":
            raise ValueError(f"fp6_layout: got {fp6_layout!r}, expected one of {FP6_LAYOUTS}")
        if n % 3:
            raise ValueError(f"packed: 6-bit data needs a last dim divisible by 3, got {n}")
        b = packed.to(torch.int32).reshape(*packed.shape[:-1], n // 3, 3)
        w = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
        c = torch.stack([(w >> (6 * j)) & 0x3F for j in range(4)], dim=-1)
        return c.to(torch.uint8).reshape(*packed.shape[:-1], n * 4 // 3)
    raise ValueError(f"bits: expected 4, 6 or 8, got {bits}")
