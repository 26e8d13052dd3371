"""GEMM forms users write around a dequantized weight W ([N, K] or [E, N, K]).

Each form is a plain function of the (already QDQ'd) activation and W. They are the
anchors of the fused patterns (the GEMM node, never an e8m0-consuming node).
  linear         F.linear(a, W[, bias])  (mm / addmm after decomposition): one expert
  matmul         a @ W.t()
  grouped_mm     torch._grouped_mm(a[order], W.transpose(-2, -1), offs=offs): rows
                 sorted by expert (the gather is part of the form or done earlier)
  bmm            torch.bmm(a.unsqueeze(1), W[key].transpose(-2, -1)).squeeze(1):
                 every row gathers its expert's weight
"""

from __future__ import annotations

import torch

__all__ = ["linear", "linear_bias", "matmul", "grouped_mm_gathered", "grouped_mm_sorted", "bmm_gathered"]


def linear(a, W):
    return torch.nn.functional.linear(a, W)


def linear_bias(a, W, bias):
    return torch.nn.functional.linear(a, W, bias)


def matmul(a, W):
    return a @ W.t()


def grouped_mm_gathered(a, W, order, offs):
    """The reference's grouped_mm: rows gathered into expert order inside the form."""
    return torch._grouped_mm(a[order], W.transpose(-2, -1), offs=offs)


def grouped_mm_sorted(a, W, offs):
    """Rows already sorted by expert."""
    return torch._grouped_mm(a, W.transpose(-2, -1), offs=offs)


def bmm_gathered(a, W, key):
    """The reference's bmm style: key in [0, E) per row (clamped by the caller)."""
    wg = W[key]
    return torch.bmm(a.unsqueeze(1), wg.transpose(-2, -1)).squeeze(1)
