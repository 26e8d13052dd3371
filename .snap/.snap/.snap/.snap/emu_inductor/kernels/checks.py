"""Value checks of an op's arguments in one launch, without a device-to-host sync.

The ops reject what the reference rejects by value (global scales that are zero,
negative, NaN, Inf or below a bound; expert ids and expert-map entries out of range).
On an accelerator each such check used to be a `torch._assert_async` over a small
boolean expression: about five launches per argument, 20-25 per `mxemu::moe` call, more
device time than the whole decode GEMM at one token. `check_values` does them all in one
single-program kernel whose `tl.device_assert` (compiled with debug=True, so it is kept)
fails the stream like `torch._assert_async` does: asynchronously, surfacing at the next
synchronising call, with the message naming the argument; CUDA graphs capture it.

Slots: up to four float tensors (finite, > 0 and >= a lower bound) and two integer
tensors (lo <= v < hi); an unused slot has n = 0.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

__all__ = ["FloatRule", "IntRule", "check_values"]


@dataclasses.dataclass(frozen=True)
class FloatRule:
    """`tensor` must be finite and > 0 (and >= `lo`); `message` names the argument."""

    tensor: torch.Tensor
    message: str
    lo: float = 0.0


@dataclasses.dataclass(frozen=True)
class IntRule:
    """`lo <= tensor < hi` elementwise; `message` names the argument."""

    tensor: torch.Tensor
    message: str
    lo: int
    hi: int


@triton.jit(debug=True, do_not_specialize=["n0", "n1", "n2", "n3", "ni0", "ni1", "lo_i0", "hi_i0", "lo_i1",
                                           "hi_i1"])
def _check_values_kernel(f0, n0, lo0, f1, n1, lo1, f2, n2, lo2, f3, n3, lo3,
                         i0, ni0, lo_i0, hi_i0, i1, ni1, lo_i1, hi_i1,
                         M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr,
                         MI0: tl.constexpr, MI1: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    for start in range(0, n0, BLOCK):
        m = start + offs < n0
        x = tl.load(f0 + start + offs, mask=m, other=1.0).to(tl.float32)
        tl.device_assert(((tl.abs(x) < float("inf")) & (x > 0.0) & (x >= lo0)) | ~m, M0)
    for start in range(0, n1, BLOCK):
        m = start + offs < n1
        x = tl.load(f1 + start + offs, mask=m, other=1.0).to(tl.float32)
        tl.device_assert(((tl.abs(x) < float("inf")) & (x > 0.0) & (x >= lo1)) | ~m, M1)
    for start in range(0, n2, BLOCK):
        m = start + offs < n2
        x = tl.load(f2 + start + offs, mask=m, other=1.0).to(tl.float32)
        tl.device_assert(((tl.abs(x) < float("inf")) & (x > 0.0) & (x >= lo2)) | ~m, M2)
    for start in range(0, n3, BLOCK):
        m = start + offs < n3
        x = tl.load(f3 + start + offs, mask=m, other=1.0).to(tl.float32)
        tl.device_assert(((tl.abs(x) < float("inf")) & (x > 0.0) & (x >= lo3)) | ~m, M3)
    for start in range(0, ni0, BLOCK):
        m = start + offs < ni0
        v = tl.load(i0 + start + offs, mask=m, other=lo_i0).to(tl.int64)
        tl.device_assert(((v >= lo_i0) & (v < hi_i0)) | ~m, MI0)
    for start in range(0, ni1, BLOCK):
        m = start + offs < ni1
        v = tl.load(i1 + start + offs, mask=m, other=lo_i1).to(tl.int64)
        tl.device_assert(((v >= lo_i1) & (v < hi_i1)) | ~m, MI1)


_PLACEHOLDERS: dict = {}


def _placeholders(dev: torch.device):
    """Pointer arguments of unused slots (never read: their n is 0), cached per device so a
    call costs one launch, not two fills besides it."""
    key = str(dev)
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = (torch.ones(1, dtype=torch.float32, device=dev),
                              torch.zeros(1, dtype=torch.int32, device=dev))
    return _PLACEHOLDERS[key]


def check_values(floats: Sequence[FloatRule] = (), ints: Sequence[IntRule] = (),
                 device: Optional[torch.device] = None) -> None:
    """Launch the one-program check (up to 4 float and 2 integer rules; empty tensors and
    missing slots are skipped)."""
    floats = [r for r in floats if r.tensor.numel()]
    ints = [r for r in ints if r.tensor.numel()]
    if len(floats) > 4 or len(ints) > 2:
        raise ValueError(f"check_values: at most 4 float and 2 integer rules, got {len(floats)} and {len(ints)}")
    if not floats and not ints:
        return
    dev = device or (floats or ints)[0].tensor.device
    dummy_f, dummy_i = _placeholders(dev)
    fargs, fmsgs = [], []
    for j in range(4):
        if j < len(floats):
            r = floats[j]
            fargs += [r.tensor.reshape(-1).contiguous(), r.tensor.numel(), float(r.lo)]
            fmsgs.append(r.message)
        else:
            fargs += [dummy_f, 0, 0.0]
            fmsgs.append("unused")
    iargs, imsgs = [], []
    for j in range(2):
        if j < len(ints):
            r = ints[j]
            iargs += [r.tensor.reshape(-1).contiguous(), r.tensor.numel(), int(r.lo), int(r.hi)]
            imsgs.append(r.message)
        else:
            iargs += [dummy_i, 0, 0, 1]
            imsgs.append("unused")
    _check_values_kernel[(1,)](*fargs, *iargs, M0=fmsgs[0], M1=fmsgs[1], M2=fmsgs[2], M3=fmsgs[3],
                               MI0=imsgs[0], MI1=imsgs[1], BLOCK=128)
