"""One-launch routing prep: a single Triton program builds what `launch.moe_align` builds
with ~15 torch launches (rows sorted by local expert, each expert padded to a multiple of BM
with the sentinel R; block -> expert table; row -> padded position map).

Not scheme-specific, so it is written by hand rather than rendered. Two kernels, same values
as the torch path (stable order within an expert; tested bit for bit):

- `moe_align_sort_kernel` (default, up to `launch_common.ROUTING_SORT_MAX_ROWS` rows): one lane
  per row. The key (local expert << log2(lanes)) | row is sorted in registers (bitonic,
  ~R log^2 R compare-exchanges spread over the CTA); rank within an expert = sorted index
  minus the expert's histogram prefix (tl.histogram, tl.cumsum, one tl.gather from the
  [E] table); a row whose rank is a multiple of BM opens a block, so a cumsum of those
  flags is each row's block index. Then padding and the block table are filled, a
  barrier, and rows, block experts and positions are scattered.
- `moe_align_kernel` (EMU_INDUCTOR_ROUTING=onehot; kept for A/B timing): two passes over
  the rows in chunks with one-hot [BR, BE] compares (cost ~R*E).

Ids outside [0, E_global) and map entries outside [-1, E) are compared in their own dtype
(an int64 value does not wrap into range) and count as not local. No host sync: every size
is derived from shapes.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["moe_align_kernel", "moe_align_sort_kernel", "moe_align_sort"]


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
        ids = tl.load(ids_ptr + r, mask=rm, other=-1)
        if HAS_MAP:
            ok = (ids >= 0) & (ids < NG) & rm
            loc = tl.load(map_ptr + tl.where(ok, ids, 0), mask=ok, other=-1)
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
        ids = tl.load(ids_ptr + r, mask=rm, other=-1)
        if HAS_MAP:
            ok = (ids >= 0) & (ids < NG) & rm
            loc = tl.load(map_ptr + tl.where(ok, ids, 0), mask=ok, other=-1)
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


@triton.jit
def _bit(n: tl.constexpr, j: tl.constexpr):
    # bit j of the flat index, as a [2] axis of the [2] * n hypercube (broadcasts)
    return tl.reshape(tl.arange(0, 2), [1] * (n - j - 1) + [2] + [1] * j)


@triton.jit
def _sort_distinct(x, N: tl.constexpr, LOG_N: tl.constexpr):
    """Ascending bitonic sort of N = 2**LOG_N distinct int32 keys below 2**30, written here
    rather than tl.sort: the partner of each key along a hypercube axis is the axis' sum minus
    the key (tl.sum, which the interpreter runs in numpy; tl.sort's xor_sum runs one Python
    combine per element there, ~5 s for 4096 keys). Same compare-exchange network as tl.sort."""
    h = tl.reshape(x, [2] * LOG_N)
    for stage in tl.static_range(1, LOG_N + 1):
        if stage < LOG_N:
            flip = _bit(LOG_N, stage)  # runs of 2**stage alternate up / down
        else:
            flip = 0
        for i in tl.static_range(stage):
            # compare-exchange along bit stage-1-i (hypercube axis LOG_N-stage+i)
            y = tl.sum(h, axis=LOG_N - stage + i, keep_dims=True) - h
            h = tl.where((h > y) != (flip ^ _bit(LOG_N, stage - 1 - i)), y, h)
    return tl.reshape(h, [N])


@triton.jit(do_not_specialize=["R", "NG"])
def moe_align_sort_kernel(ids_ptr, map_ptr, sorted_ptr, bexp_ptr, pos_ptr, R, E, NG, P, MAXB,
                          HAS_MAP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, LOG_BN: tl.constexpr,
                          BE: tl.constexpr, BF: tl.constexpr):
    moe_align_sort(ids_ptr, map_ptr, sorted_ptr, bexp_ptr, pos_ptr, R, E, NG, P, MAXB, HAS_MAP, BM, BN, LOG_BN, BE, BF)


@triton.jit
def moe_align_sort(ids_ptr, map_ptr, sorted_ptr, bexp_ptr, pos_ptr, R, E, NG, P, MAXB,
                   HAS_MAP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, LOG_BN: tl.constexpr,
                   BE: tl.constexpr, BF: tl.constexpr):
    # the sort kernel's body, for one program (also run by the generated MoE modules'
    # prep_kernel, which fake-quantizes the GEMM1 input rows in its other programs)
    # one lane per row (BN = next_pow2(R) >= R); padding lanes sort last and are never stored
    r = tl.arange(0, BN)
    rm = r < R
    ids = tl.load(ids_ptr + r, mask=rm, other=-1)
    # range checks in the ids' / map's own dtype (an int64 value must not wrap into range)
    if HAS_MAP:
        ok = (ids >= 0) & (ids < NG) & rm
        loc = tl.load(map_ptr + tl.where(ok, ids, 0), mask=ok, other=-1)
    else:
        loc = ids
    valid = (loc >= 0) & (loc < E) & rm
    loc = tl.where(valid, loc, E).to(tl.int32)
    # key = (local expert, row id): one sort gives the stable by-expert order (row id breaks
    # ties, so the torch path's stable argsort order); rows not on this rank get expert E
    key = (loc << LOG_BN) | r
    s = _sort_distinct(key, BN, LOG_BN)
    se = s >> LOG_BN
    sr = s & (BN - 1)
    sv = se < E
    # rank within the expert = sorted index - rows of smaller experts (histogram prefix,
    # looked up per element with a gather from the [BE] table)
    counts = tl.histogram(loc, BE, mask=valid)
    cnt_start = tl.cumsum(counts, axis=0) - counts
    rank = r - tl.gather(cnt_start, tl.where(sv, se, 0), 0)
    # every expert's run starts a new BM block; a row opening a block (rank % BM == 0) counts
    # one, so the inclusive count up to a row is its block index + 1
    lead = sv & (rank % BM == 0)
    blk = tl.cumsum(lead.to(tl.int32), axis=0) - 1
    pos = tl.where(sv, blk * BM + rank % BM, P)
    # padding everywhere and expert E in every block, then (after a barrier) the rows
    for p0 in range(0, P, BF):
        p = p0 + tl.arange(0, BF)
        tl.store(sorted_ptr + p, tl.zeros([BF], dtype=tl.int32) + R, mask=p < P)
    for b0 in range(0, MAXB, BF):
        b = b0 + tl.arange(0, BF)
        tl.store(bexp_ptr + b, tl.zeros([BF], dtype=tl.int32) + E, mask=b < MAXB)
    tl.debug_barrier()
    tl.store(sorted_ptr + pos, sr, mask=sv)
    tl.store(bexp_ptr + blk, se, mask=lead)
    tl.store(pos_ptr + sr, pos.to(tl.int64), mask=sr < R)
