"""Tile strategy: the TileConfig value and which configs to try per regime.

A new tile strategy is a change here alone: `candidates` lists the configs autotuning
tries per rows-per-expert regime (the first is the heuristic pick without autotuning),
`interpreter_config` sizes the tiles for Triton's interpreter. `autotune` chooses among
them; the launchers only read the chosen config.
"""

from __future__ import annotations

import dataclasses

__all__ = ["TileConfig", "token_bucket", "interpreter_config", "candidates", "heuristic"]


@dataclasses.dataclass(frozen=True)
class TileConfig:
    BM: int = 16
    BN: int = 64
    BK: int = 128
    num_warps: int = 4
    num_stages: int = 3
    wdq: int = 0  # MoE: 1 = dequantize every expert's weights once into a workspace, then plain GEMMs

    def to_dict(self):
        return dataclasses.asdict(self)


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


def candidates(rows_per_expert: float, allow_wdq: bool = False) -> list[TileConfig]:
    """Small per-regime sets. Decode (<= 16 rows per expert): the weight stream and its
    in-register dequant dominate, so more programs (narrow N tiles), more warps per tile
    and deeper pipelines; large: big tiles, and (allow_wdq) the dequantized-workspace
    path whose GEMMs are plain bf16 tiles."""
    if rows_per_expert <= 16:
        return [TileConfig(16, 32, 256, 4, 4), TileConfig(16, 64, 128, 4, 4), TileConfig(16, 32, 128, 4, 4),
                TileConfig(16, 64, 256, 8, 3), TileConfig(16, 128, 128, 8, 3)]
    if rows_per_expert <= 64:
        c = [TileConfig(32, 64, 128, 4, 3), TileConfig(16, 64, 128, 4, 4), TileConfig(64, 64, 128, 4, 3),
             TileConfig(32, 128, 64, 4, 3), TileConfig(64, 128, 64, 8, 3)]
        if allow_wdq and rows_per_expert > 32:
            c.append(TileConfig(64, 128, 64, 4, 4, wdq=1))
        return c
    c = [TileConfig(64, 128, 64, 8, 3), TileConfig(128, 128, 64, 8, 3), TileConfig(64, 128, 128, 8, 3)]
    if allow_wdq:
        c = [TileConfig(128, 128, 64, 8, 3, wdq=1), TileConfig(128, 128, 64, 8, 4, wdq=1),
             TileConfig(64, 128, 64, 4, 4, wdq=1)] + c
    return c


def heuristic(rows_per_expert: float, allow_wdq: bool = False) -> TileConfig:
    return candidates(rows_per_expert, allow_wdq)[0]
