"""Probe data: what the candidate cones and the known variants are evaluated on.

Weight decode has a finite domain. Every output element is a function of its code byte
(its position inside the block's bytes), its block's scale byte and its expert's float
scale. `weight_rounds` lays blocks out so that over the rounds every byte value appears at
every byte position of a block under every scale byte (256 x 256 (phase, scale) pairs:
block g gets scale byte g // 256 and bytes (g + p) mod 256 at position p), with float
scales cycled through a list of awkward values, then adds random rounds (random bytes,
random scale bytes, random scales) that exercise the index maps with unstructured data.

Activation QDQ is not enumerable: `act_blocks` builds blocks that separate the known
variants. For each element format and several scale exponents: every rounding tie (both
signs) under an amax that pins the block scale; amax exactly at and one and two ulps (of
the graph's dtype) around each scale-rounding boundary (floor / ceil / even / rceil
differ there); for NVFP4, block amaxes whose E4M3 block scale lands on and beside every
E4M3 midpoint for the global scale in use; all-zero, -0, subnormal, tiny, huge,
saturating, NaN and +-Inf blocks; random blocks at magnitudes 2^-30 .. 2^30. Per-tensor
fp8 gets whole-tensor probes (`fp8_tensors`). Every probe carries a label so that a
rejection can say which probe told two functions apart.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterator, Optional

import torch

from ..formats import E2M1, E4M3, decode

__all__ = ["WeightRound", "weight_rounds", "WEIGHT_SCALES", "GLOBAL_SCALES", "ActBlocks", "act_blocks",
           "fp8_tensors", "STATIC_FP8_SCALES"]

#: Per-tensor / per-expert float scales tried on the weight side (dequantize or quantize
#: direction alike): not powers of two (so every product order rounds differently),
#: powers of two, tiny and large.
WEIGHT_SCALES = (0.01731, 1.0, 2.0 ** -15, 0.0025, 117.3, 3.7e-7, 3.1e5, 0.7071)
#: NVFP4 activation global scales (quantize direction, 448*6/amax ~ 2688/amax).
#: 6 * 2^-k (= 2688 / (448 * 2^k)) puts bf16 block amaxes exactly on E4M3 midpoints, where
#: g*(amax*(1/6)) and amax*(g*(1/6)) (vLLM vs TransformerEngine) round apart.
#: 0.9979166388511658 (fp32, just below 1) makes the dequantization products (v*s)*g and
#: v*(g*s) round to different bf16 values for some E4M3 block scales (torchao_moe vs
#: torchao: equal after bf16 rounding for the other scales here, different functions).
GLOBAL_SCALES = (1.0, 6.0, 0.1875, 7.0, 71.68, 0.0123, 2.688, 1.0e4, 0.9979166388511658)
#: Static per-tensor fp8 scales.
STATIC_FP8_SCALES = (0.0625, 0.0173, 1.0, 3.7)
N_PAIRS = 256 * 256


@dataclasses.dataclass
class WeightRound:
    label: str
    codes: torch.Tensor  # uint8, the codes leaf's (resized) shape
    scale: torch.Tensor  # uint8
    alpha: Optional[torch.Tensor]  # float32 or None


def weight_rounds(codes_shape, scale_shape, alpha_shape, *, seed: int = 0, random_rounds: int = 1,
                  max_rounds: int = 4096) -> Iterator[WeightRound]:
    """Rounds of probe leaves (see the module docstring). Raises ValueError when full
    coverage would take more than `max_rounds` rounds (the cone could not be resized)."""
    nblocks = math.prod(scale_shape)
    nbytes = math.prod(codes_shape)
    if nblocks == 0 or nbytes % nblocks:
        raise ValueError(f"codes {tuple(codes_shape)} and scales {tuple(scale_shape)} do not tile into blocks")
    per = nbytes // nblocks  # bytes per block
    rounds = -(-N_PAIRS // nblocks)
    if rounds > max_rounds:
        raise ValueError(f"full coverage needs {rounds} evaluations of {nblocks} blocks (limit {max_rounds})")
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(per, dtype=torch.int64)
    for r in range(rounds + random_rounds):
        if r < rounds:
            g = torch.arange(nblocks, dtype=torch.int64) + r * nblocks
            g = g % N_PAIRS
            scale = (g // 256).to(torch.uint8)
            codes = ((g[:, None] + pos[None, :]) % 256).to(torch.uint8)
            label = f"coverage round {r}"
        else:
            scale = torch.randint(0, 256, (nblocks,), generator=gen, dtype=torch.int64).to(torch.uint8)
            codes = torch.randint(0, 256, (nblocks, per), generator=gen, dtype=torch.int64).to(torch.uint8)
            label = f"random round {r - rounds}"
        alpha = None
        if alpha_shape is not None:
            n = math.prod(alpha_shape)
            base = torch.tensor(WEIGHT_SCALES, dtype=torch.float32)
            idx = (torch.arange(n) + r) % len(WEIGHT_SCALES)
            alpha = base[idx]
            if r >= rounds:
                alpha = alpha * torch.exp(torch.randn(n, generator=gen)).to(torch.float32)
            alpha = alpha.reshape(alpha_shape)
        yield WeightRound(label, codes.reshape(codes_shape), scale.reshape(scale_shape), alpha)


# --- activations ---------------------------------------------------------------------------


@dataclasses.dataclass
class ActBlocks:
    """Probe blocks [B, bs] (already in the graph dtype) with a label per block."""

    blocks: torch.Tensor
    labels: list


def _grid(elem) -> torch.Tensor:
    """Non-negative finite values of an element type, ascending."""
    codes = torch.arange(elem.num_codes // 2, dtype=torch.int32).to(torch.uint8)
    v = decode(codes, elem)
    v = v[torch.isfinite(v)]
    return torch.unique(v)


def _midpoints(elem) -> torch.Tensor:
    g = _grid(elem).to(torch.float64)
    return ((g[1:] + g[:-1]) / 2).to(torch.float32)


def _exact(v: torch.Tensor, dtype) -> bool:
    c = v.to(dtype).to(torch.float32)
    return bool(torch.all((c == v) | (torch.isnan(c) & torch.isnan(v))))


def _ulp_step(v: torch.Tensor, dtype, steps: int) -> torch.Tensor:
    """v (positive, already in dtype) moved by `steps` ulps of dtype."""
    idt = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[dtype]
    return (v.to(dtype).view(idt) + steps).view(dtype)


def _dtype_specials(dtype) -> dict:
    fi = torch.finfo(dtype)
    return {"max": fi.max, "tiny": fi.tiny, "subnormal": fi.smallest_normal * fi.eps}


class _Builder:
    def __init__(self, bs: int, dtype, seed: int):
        self.bs, self.dtype = bs, dtype
        self.rows: list = []
        self.labels: list = []
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, values, label: str, need_exact: Optional[torch.Tensor] = None):
        v = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
        if v.numel() > self.bs:
            raise AssertionError("block overflow")
        if need_exact is not None and not _exact(need_exact, self.dtype):
            return
        if v.numel() < self.bs:
            v = torch.cat([v, torch.zeros(self.bs - v.numel())])
        self.rows.append(v.to(self.dtype))
        self.labels.append(label)

    def fill(self, amax: torch.Tensor, n: int) -> torch.Tensor:
        """n random values in (-amax, amax) (dtype-rounded, never above amax)."""
        u = torch.rand(n, generator=self.gen) * 2 - 1
        return (u * amax).to(self.dtype).to(torch.float32)

    def result(self) -> ActBlocks:
        return ActBlocks(torch.stack(self.rows), self.labels)


def _tie_blocks(b: _Builder, elem, unit: float, top: float, name: str):
    """Blocks [top*unit, ties*unit ...]: every midpoint of `elem` (both signs) scaled by unit."""
    mids = _midpoints(elem)
    ties = torch.cat([mids, -mids]) * unit
    amax = torch.tensor([top * unit])
    n = b.bs - 1
    for i in range(0, ties.numel(), n):
        chunk = ties[i:i + n]
        vals = torch.cat([amax, chunk])
        b.add(vals, f"ties of {elem.name} under amax {top:g}*{unit:g} (block {i // n})", need_exact=vals)


def _in_dtype_blocks(b: _Builder, elem, unit: float, name: str):
    """microxcaling's element rounding, computed in the graph's dtype (formats'
    "microxcaling_*" roundings), differs from an exact one at a single value per scale: the
    dtype's largest value below half the smallest subnormal quantum rounds up. Under amax
    2^emax*unit, that value (both signs) and its neighbours."""
    c = torch.tensor([0.5 - torch.finfo(b.dtype).eps / 4], dtype=torch.float64)
    q = 2.0 ** (elem.emin - elem.mbits) * unit
    vals = torch.cat([torch.tensor([2.0 ** elem.emax * unit], dtype=torch.float64), c * q, -c * q,
                      torch.tensor([0.5 * q, -0.25 * q], dtype=torch.float64)]).to(torch.float32)
    b.add(vals, f"{name} value below half its smallest subnormal under amax {2.0 ** elem.emax:g}*{unit:g}",
          need_exact=vals)


def _underflow_blocks(b: _Builder, elem, name: str):
    """Negatives that underflow to -0.0 in the graph's dtype once scaled (2^-140 under amax
    2^60): zeros whose sign depends on the dtype the scaling is computed in."""
    tiny = 2.0 ** (-80 - elem.emax)
    vals = torch.tensor([2.0 ** 60, -tiny, -3 * tiny, tiny, -0.0])
    b.add(vals, f"{name} negatives underflowing in the dtype once scaled", need_exact=vals)


def _boundary_blocks(b: _Builder, amaxes: torch.Tensor, label: str):
    for a in amaxes.reshape(-1):
        a = a.reshape(1)
        av = a.to(b.dtype).to(torch.float32)
        if not torch.isfinite(av).all() or av.item() == 0:
            continue
        vals = torch.cat([av, b.fill(av, b.bs - 1)])
        b.add(vals, f"{label}: amax {av.item():.9g}")


def _ulps_around(v: float, dtype, n: int = 2) -> torch.Tensor:
    base = torch.tensor([v], dtype=torch.float32).to(dtype)
    outs = [_ulp_step(base, dtype, s).to(torch.float32) for s in range(-n, n + 1)]
    return torch.cat(outs)


def _common_blocks(b: _Builder, dtype):
    sp = _dtype_specials(dtype)
    bs = b.bs
    b.add(torch.zeros(bs), "all-zero block")
    b.add(torch.tensor([-0.0] * bs), "all -0 block")
    b.add(torch.tensor([0.0, -0.0] * (bs // 2)), "+-0 block")
    sub = torch.tensor([sp["subnormal"]], dtype=torch.float32)
    b.add(sub * torch.arange(1, bs + 1), "subnormal block (dtype)")
    b.add(torch.tensor([sp["tiny"]] * bs) * torch.linspace(1, 1.9, bs), "tiny normal block (dtype)")
    for e in (-126, -127, -133, -140):
        v = torch.tensor([2.0 ** e], dtype=torch.float64).to(torch.float32)
        b.add(torch.cat([v, -v * 0.75, v * 0.25]), f"2^{e} block")
    b.add(torch.tensor([sp["max"]] + [sp["max"] / 3] * (bs - 1)), "dtype max block")
    b.add(torch.tensor([2.0 ** 100, 2.0 ** -100, -3.0]), "2^100 with tiny neighbours")
    for v, name in ((float("nan"), "NaN"), (float("inf"), "+Inf"), (float("-inf"), "-Inf")):
        vals = torch.linspace(-3, 5, bs)
        vals[bs // 3] = v
        b.add(vals, f"{name} in a normal block")
    b.add(torch.tensor([float("inf"), float("-inf")] + [1.0] * (bs - 2)), "+Inf and -Inf block")
    b.add(torch.tensor([float("nan"), float("inf")] + [1.0] * (bs - 2)), "NaN and +Inf block")
    # finite neighbours big enough to survive the Inf block's scale: 2^127 (inf_amax "max")
    # and 2^126 ("exponent": 2^128 / 2^emax) give them different values
    b.add(torch.tensor([float("inf")] + [sp["max"] * f for f in (0.375, -0.3, 0.2, 0.45)] + [1.0] * (bs - 5)),
          "+Inf with huge neighbours")


def _random_blocks(b: _Builder, n: int):
    e = torch.randint(-30, 31, (n, 1), generator=b.gen).to(torch.float32)
    x = torch.randn(n, b.bs, generator=b.gen) * torch.exp2(e)
    for i in range(n):
        b.add(x[i], f"random block 2^{int(e[i, 0])}")


def act_blocks(bs: int, dtype, elements, *, global_scale: Optional[float] = None, seed: int = 0,
               random_blocks: int = 256) -> ActBlocks:
    """Probe blocks for block size `bs` in `dtype`, separating the variants of `elements`
    (ElementSpecs). NVFP4 (E4M3 block scales) needs `global_scale`. Built once per
    process and argument set (callers must not modify the tensors)."""
    return _act_blocks(bs, dtype, tuple(elements), global_scale, seed, random_blocks)


@functools.lru_cache(maxsize=64)
def _act_blocks(bs, dtype, elements, global_scale, seed, random_blocks) -> ActBlocks:
    b = _Builder(bs, dtype, seed)
    nvfp4 = global_scale is not None
    ks = (-20, -3, 0, 4, 20)
    for elem in elements:
        if nvfp4:
            # block scale s0 on the E4M3 grid: amax 6*s0/g pins it, ties mid*s0/g
            for s0 in (1.0, 2.0 ** -3, 4.0, 0.75, 1.5 * 2 ** -5, 1.25 * 2 ** 4):
                unit = s0 / global_scale
                _tie_blocks(b, elem, unit, elem.max_normal, elem.name)
        else:
            for k in ks:
                unit = 2.0 ** k
                _tie_blocks(b, elem, unit, 2.0 ** elem.emax, elem.name)
                _tie_blocks(b, elem, unit, elem.max_normal, elem.name)
                _in_dtype_blocks(b, elem, unit, elem.name)
                # scale-rounding boundaries: floor/ceil at powers of two, rceil at
                # max_normal*2^j, even at (2 - 2^-(mbits+1))*2^j
                top = 2.0 ** (elem.emax + k)
                for m in (1.0, elem.max_normal / 2 ** elem.emax, 2.0 - 2.0 ** -(elem.mbits + 1), 1.5, 1.75):
                    _boundary_blocks(b, _ulps_around(m * top, dtype), f"{elem.name} scale boundary {m:g}*2^{elem.emax + k}")
            _underflow_blocks(b, elem, elem.name)
    if nvfp4:
        # E4M3 block-scale rounding: amax/6*g on and around every E4M3 value and midpoint
        grid = _grid(E4M3)
        targets = torch.cat([grid[1:], _midpoints(E4M3)])
        amax = (targets.to(torch.float64) * E2M1.max_normal / global_scale).to(torch.float32)
        for a in amax:
            _boundary_blocks(b, _ulps_around(float(a), dtype, 1), f"E4M3 block-scale boundary (g={global_scale:g})")
    _common_blocks(b, dtype)  # after the ties, so a rejection names the most telling probe
    _random_blocks(b, random_blocks)
    return b.result()


def fp8_tensors(shape, dtype, *, seed: int = 0) -> list:
    """[(label, tensor of `shape` in dtype)] separating per-tensor fp8 QDQ spellings
    (built once per process and argument set)."""
    return _fp8_tensors(tuple(shape), dtype, seed)


@functools.lru_cache(maxsize=16)
def _fp8_tensors(shape, dtype, seed) -> list:
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    out = []
    mids = _midpoints(E4M3)
    ties = torch.cat([mids, -mids])
    for k in (-8, 0, 5):
        unit = 2.0 ** k
        t = ties[torch.arange(n) % ties.numel()] * unit
        t[0] = 448.0 * unit
        if _exact(t, dtype):
            out.append((f"E4M3 ties under amax 448*2^{k}", t.reshape(shape).to(dtype)))
    for e in (-20, 0, 12):
        out.append((f"random 2^{e}", (torch.randn(shape, generator=gen) * 2.0 ** e).to(dtype)))
    for v in _ulps_around(448.0 * 3, dtype, 2):
        t = (torch.rand(shape, generator=gen) * 2 - 1) * v
        t.view(-1)[0] = v
        out.append((f"amax {v.item():.9g} near 448*3", t.to(dtype)))
    out.append(("all-zero tensor", torch.zeros(shape, dtype=dtype)))
    out.append(("tiny tensor (below the dynamic-scale floor)", (torch.randn(shape, generator=gen) * 1e-7).to(dtype)))
    t = torch.randn(shape, generator=gen)
    t.view(-1)[n // 2] = float("nan")
    out.append(("NaN in tensor", t.to(dtype)))
    t = torch.randn(shape, generator=gen)
    t.view(-1)[n // 2] = float("inf")
    out.append(("+Inf in tensor", t.to(dtype)))
    return out
