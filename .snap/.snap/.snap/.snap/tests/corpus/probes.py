"""Activation probe rows (64 wide) that separate QDQ variants: E2M1 ties of both signs at
several block-scale exponents, block maxima at and one ulp around the scale-rounding
boundaries, zero / signed-zero / tiny blocks, and Gaussian rows from 2^-20 to 2^20.
Finite only: NaN / Inf blocks are the formats' edge cases, tested in test_formats_*."""

from __future__ import annotations

import torch

from .data import gen

_TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.125, 0.375]
_BOUNDARY_MANTISSAS = [1.0, 1.25, 1.5, 1.75, 1.875, 1.9375, 1.96875]


def _tie_row(k: int, sign: float, amax: float) -> list:
    row = []
    for blk in range(4):  # four 16-blocks: NVFP4 blocks; pairs of them are MX blocks
        vals = [amax] + [sign * t for t in _TIES[: 15]]
        if blk % 2:
            vals = [-v for v in vals]
        row += [v * 2.0 ** k for v in vals]
    return row


def probe_rows(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    rows = []
    for k in (-6, -1, 0, 3, 9):
        for sign in (1.0, -1.0):
            for amax in (6.0, 4.0):
                rows.append(_tie_row(k, sign, amax))
    eps = torch.finfo(dtype).eps
    for k in (-4, 0, 5):
        for m in _BOUNDARY_MANTISSAS:
            for d in (-eps, 0.0, eps):
                a = (m + d * m) * 2.0 ** k * 6.0 / 4.0  # around the MX/NVFP4 scale boundaries
                rows.append([a] + [a * (j % 7) / 7.0 * (-1) ** j for j in range(1, 64)])
                a = (m + d * m) * 2.0 ** k
                rows.append([a] + [a * ((j * 5) % 11) / 11.0 * (-1) ** (j // 3) for j in range(1, 64)])
    rows.append([0.0] * 64)
    rows.append([-0.0] * 32 + [0.0] * 32)
    rows.append([1e-30 * (j - 31) for j in range(64)])
    out = torch.tensor(rows, dtype=torch.float32)
    g = gen(seed)
    rnd = torch.randn(48, 64, generator=g) * torch.exp2(torch.linspace(-20, 20, 48)).unsqueeze(-1)
    return torch.cat([out, rnd]).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise bit equality (NaN == NaN when the payloads match, -0 != +0)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    iv = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    both_nan = torch.isnan(a) & torch.isnan(b)
    return (a.view(iv) == b.view(iv)) | both_nan
