"""Bit-for-bit comparison of a cone's output with a variant's, and where they first differ."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["same_bits", "first_difference", "difference"]

_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _mismatch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bool mask of elements whose bits differ (any NaN equals any NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"cannot compare {a.dtype}{tuple(a.shape)} with {b.dtype}{tuple(b.shape)}")
    if a.is_floating_point():
        it = _INT[a.element_size()]
        diff = a.contiguous().view(it) != b.contiguous().view(it)
        if diff.any():  # NaN payloads may differ; only then is the NaN test worth its cost
            diff &= ~(torch.isnan(a) & torch.isnan(b))
        return diff
    return a != b


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return not bool(_mismatch(a, b).any())


def first_difference(a: torch.Tensor, b: torch.Tensor) -> Optional[int]:
    """Flat index of the first element whose bits differ, None if none (shape/dtype
    mismatches count as a difference at 0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return 0
    m = _mismatch(a, b).reshape(-1)
    idx = torch.nonzero(m)
    return int(idx[0, 0]) if idx.numel() else None


def difference(a: torch.Tensor, b: torch.Tensor) -> tuple:
    """(flat index of the first differing element or None, number of differing elements)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return 0, max(a.numel(), b.numel())
    m = _mismatch(a, b).reshape(-1)
    idx = torch.nonzero(m)
    return (int(idx[0, 0]) if idx.numel() else None), int(idx.shape[0])
