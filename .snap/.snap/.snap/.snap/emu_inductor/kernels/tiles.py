"""Tile strategy: the TileConfig value and which configs to try per regime.

A new tile strategy is a change here alone: `candidates` lists the configs autotuning
tries per rows-per-expert regime (the first is the heuristic pick without autotuning),
`interpreter_config` sizes the tiles for Triton's interpreter. `autotune` chooses among
them; the launchers only read the chosen config.
"""

from __future__ import annotations

import dataclasses
import os

__all__ = ["TileConfig", "token_bucket", "interpreter_config", "candidates", "heuristic", "auto_split", "dq_enabled"]


@dataclasses.dataclass(frozen=True)
class TileConfig:
    BM: int = 16
    BN: int = 64
    BK: int = 128
    num_warps: int = 4
    num_stages: int = 3
    # MoE decode: split1 > 1 splits GEMM1's K loop over that many programs (fp32 partial
    # sums, then act_epilogue_kernel); split2 >= 1 writes GEMM2's fp32 partial sums over
    # split2 K ranges and combine_kernel does bias, per-slot rounding, router weight and the
    # top-k sum in one launch (no atomics, deterministic); 0 = the atomic / row-store path.
    # -1 in either: chosen from the grid size (`auto_split`)
    split1: int = 1
    split2: int = 0
    # 1: the GEMMs compute W @ A^T (dequantized weights as the left, register operand)
    swap: int = 0
    # 1: each K step issues the next step's packed-weight and scale loads before decoding its
    # own (register double buffering: the weight bytes are not dot operands, so Triton's
    # pipeliner leaves their global-memory latency exposed otherwise)
    prefetch: int = 0
    # > 0: the register cap handed to ptxas (Triton's maxnreg). The prefill GEMMs are
    # latency-bound at 8 warps per SM; a cap that fits two 8-warp programs per SM doubles the
    # warps that hide the decode -> shared memory -> wgmma chain (0: the compiler's choice)
    maxnreg: int = 0
    # 1 (MoE prefill): dequantize each weight once per call into a bf16 workspace (bounded,
    # in chunks of output rows) and run both GEMMs on torch._grouped_mm; BM is then the
    # routing's row padding (launch.dq_applies says which calls it covers)
    dq: int = 0

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TileConfig":
        """A config from a stored dict; fields this version no longer has are dropped (an
        autotune cache written by an older version stays readable)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def auto_split(programs: int, k_tiles: int, sms: int = 132) -> int:
    """K splits so that `programs` (the grid without splitting) fills about 4 programs per
    SM: decode grids have a handful of row blocks, so without splitting most SMs idle
    while each program streams a whole K range. A power of two, at most k_tiles."""
    s = 1
    while programs * s < 4 * sms and s * 2 <= k_tiles:
        s *= 2
    return s


def token_bucket(T: int) -> int:
    b = 1
    while b < T and b < 8192:
        b *= 2
    return b


def _pow2_at_least(n: int, lo: int, hi: int) -> int:
    b = lo
    while b < n and b < hi:
        b *= 2
    return b


def interpreter_config(N: int, K: int, rows: int) -> TileConfig:
    """Big tiles that cover tiny test problems (the interpreter costs ~ms per program)."""
    return TileConfig(BM=_pow2_at_least(min(rows, 64), 16, 64), BN=_pow2_at_least(N, 32, 128),
                      BK=_pow2_at_least(K, 32, 128), num_warps=4, num_stages=1)


def candidates(rows_per_expert: float) -> list[TileConfig]:
    """Small per-regime sets. Decode (<= 16 rows per expert): the weight stream and its
    in-register dequant dominate, so more programs (narrow N tiles), K split to fill the
    SMs, deeper pipelines; prefill: tiles whose weight loads are prefetched one K step
    ahead (H200 measurements in docs/kernels.md)."""
    if rows_per_expert <= 16:
        # decode: K split to fill the SMs (auto), GEMM2 through fp32 partials + combine_kernel
        return [TileConfig(16, 64, 128, 4, 3, split1=-1, split2=-1), TileConfig(16, 32, 128, 4, 4, split1=-1, split2=-1),
                TileConfig(16, 64, 256, 4, 3, split1=-1, split2=-1), TileConfig(16, 128, 128, 8, 3, split1=-1, split2=-1),
                TileConfig(16, 64, 128, 4, 3, split1=-1, split2=-1, swap=1),
                TileConfig(16, 128, 128, 8, 3, split1=-1, split2=-1, swap=1),
                TileConfig(16, 64, 128, 4, 3, split1=-1, split2=-1, prefetch=1),
                TileConfig(16, 32, 256, 4, 4), TileConfig(16, 64, 128, 4, 4)]
    if rows_per_expert <= 64:
        return [TileConfig(32, 64, 128, 4, 3), TileConfig(16, 64, 128, 4, 4), TileConfig(64, 64, 128, 4, 3),
                TileConfig(32, 128, 64, 4, 3), TileConfig(64, 128, 64, 8, 3),
                TileConfig(32, 64, 128, 4, 3, prefetch=1), TileConfig(64, 64, 64, 4, 4, prefetch=1)]
    # prefill: the fastest of the H200 quick comparisons at 2048 / 8192 tokens (Qwen3;
    # moe_kernels_prefill_quick_{swap,regs}_*): 128-row tiles with prefetched weight bytes
    # first (NVFP4's best: 1.04 / 2.90 ms); the swapped product with its wgmma pipelined is
    # MXFP4's best (0.98 / 2.86 ms, 10% under the first) and slower for NVFP4 (register-bound)
    fused = [TileConfig(128, 64, 64, 4, 3, prefetch=1), TileConfig(128, 64, 64, 4, 3, swap=1, prefetch=1),
            TileConfig(64, 64, 64, 4, 4, prefetch=1), TileConfig(128, 64, 64, 8, 3, prefetch=1),
            TileConfig(64, 64, 64, 4, 4, swap=1, prefetch=1), TileConfig(256, 64, 64, 8, 3, prefetch=1),
            # dequantize once per call, library GEMM (where launch.dq_applies /
            # linear_dq_applies; else the same as the fused default): rows padded to 16 per
            # expert. Its workspaces exceed the fused path's (docs/kernels.md, sixth session):
            # EMU_INDUCTOR_DQ=0 leaves it out
            TileConfig(16, 64, 64, 4, 3, dq=1)]
    return fused if dq_enabled() else [c for c in fused if not c.dq]


def dq_enabled() -> bool:
    """The dequantize-once path may be chosen (EMU_INDUCTOR_DQ=0: never, also not from a
    cached autotune result)."""
    return os.environ.get("EMU_INDUCTOR_DQ", "1") != "0"


def heuristic(rows_per_expert: float) -> TileConfig:
    return candidates(rows_per_expert)[0]
