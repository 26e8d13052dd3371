"""One-launch routing prep for small token counts (decode): a single Triton program builds
what `launch.moe_align` builds with ~15 torch launches (histogram, block prefix sum,
stable scatter, block -> expert table, row -> position map).

Not scheme-specific, so it is written by hand rather than rendered. One program (a CTA)
does it all: two passes over the R rows in chunks of BR with one-hot [BR, BE] compares
(cost ~R*E, hence only used while R*E is small), a barrier between filling the padding
and scattering the rows. Stable order within an expert (same layout as the torch path).
No host sync: every size is derived from shapes.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["moe_align_kernel"]


@triton.jit(do_not_specialize=["R", "NG"])
def moe_align_kernel(ids_ptr, map_ptr, sorted_ptr, bexp_ptr, pos_ptr, R, E, NG, P, MAXB,
                     HAS_MAP: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BE: tl.constexpr,
                     BF: tl.constexpr):
    e_ar = tl.arange(0, BE)
    e_ok = e_ar < E
    # pass 1: rows per local expert
    counts = tl.zeros([BE], dtype=tl.int32)
    for r0 in range(0, R, BR):
        r = r0 + tl.arange(0, BR)
        rm = r < R
        ids = tl.load(ids_ptr + r, mask=rm, other=-1).to(tl.int32)
        if HAS_MAP:
            ok = (ids >= 0) & (ids < NG) & rm
            loc = tl.load(map_ptr + tl.where(ok, ids, 0), mask=ok, other=-1).to(tl.int32)
        else:
            loc = ids
        oh = ((loc[:, None] == e_ar[None, :]) & e_ok[None, :] & rm[:, None]).to(tl.int32)
        counts += tl.sum(oh, axis=0)
    nblk = (counts + BM - 1) // BM
    blk_end = tl.cumsum(nblk, axis=0)
    blk_start = blk_end - nblk
    # padding everywhere, and the block -> expert table (E past the last used block)
    for p0 in range(0, P, BF):
        p = p0 + tl.arange(0, BF)
        tl.store(sorted_ptr + p, tl.zeros([BF], dtype=tl.int32) + R, mask=p < P)
    for b0 in range(0, MAXB, BF):
        b = b0 + tl.arange(0, BF)
        be = tl.sum(((blk_end[None, :] <= b[:, None]) & e_ok[None, :]).to(tl.int32), axis=1)
        tl.store(bexp_ptr + b, be, mask=b < MAXB)
    tl.debug_barrier()
    # pass 2: stable positions (rank among earlier rows of the same expert)
    seen = tl.zeros([BE], dtype=tl.int32)
    for r0 in range(0, R, BR):
        r = r0 + tl.arange(0, BR)
        rm = r < R
        ids = tl.load(ids_ptr + r, mask=rm, other=-1).to(tl.int32)
        if HAS_MAP:
            ok = (ids >= 0) & (ids < NG) & rm
            loc = tl.load(map_ptr + tl.where(ok, ids, 0), mask=ok, other=-1).to(tl.int32)
        else:
            loc = ids
        oh = ((loc[:, None] == e_ar[None, :]) & e_ok[None, :] & rm[:, None]).to(tl.int32)
        before = tl.cumsum(oh, axis=0) - oh
        rank = tl.sum(oh * (before + seen[None, :]), axis=1)
        start = tl.sum(oh * blk_start[None, :], axis=1)
        valid = tl.sum(oh, axis=1) > 0
        pos = tl.where(valid, start * BM + rank, P)
        tl.store(sorted_ptr + pos, r, mask=valid)
        tl.store(pos_ptr + r, pos.to(tl.int64), mask=rm)
        seen += tl.sum(oh, axis=0)
