"""Choosing a tile config: pinned, else cached (memory, then disk), else autotuned over
the candidates of `tiles`, else the heuristic.

Regimes are keyed by the token count, bucketed to the next power of two (`tiles.token_bucket`),
so a varying token count maps onto a handful of configs (the kernels take the row count as a
non-specialised runtime argument: no recompiles within a bucket).

Pinning: `pin_config(BM=.., BN=.., BK=.., num_warps=.., num_stages=..)` (or `None` to
unpin) or the environment variable EMU_INDUCTOR_KERNEL_CONFIG="BM=64,BN=128,BK=64,
num_warps=8,num_stages=3". EMU_INDUCTOR_AUTOTUNE=0 disables autotuning (default: on
for CUDA devices, never under CUDA-graph capture, never in the interpreter).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from typing import Callable, Optional

import torch

from .._logging import progress
from .cache import cache_dir
from .tiles import TileConfig, candidates, dq_enabled, heuristic, interpreter_config, token_bucket

__all__ = ["TileConfig", "pin_config", "pinned_config", "select_config", "token_bucket", "candidates",
           "interpreter_config", "heuristic", "autotune_time"]

log = logging.getLogger("emu_inductor.kernels")


_pinned: Optional[TileConfig] = None
_mem: dict[str, TileConfig] = {}
_lock = threading.Lock()
# seconds spent autotuning in this process and the number of keys tuned: on a GPU the first
# call of each shape bucket compiles and times every candidate (tens of seconds), which a user
# sees as part of the first step; explain() reports it next to the compile-time split
_tuned = {"seconds": 0.0, "count": 0}


def autotune_time() -> tuple[float, int]:
    """(seconds spent autotuning tile configs in this process, keys autotuned)."""
    with _lock:
        return _tuned["seconds"], _tuned["count"]


def pin_config(cfg: "TileConfig | dict | None" = None, **kw) -> None:
    """Pin one tile config for every kernel launch (None and no keywords: unpin)."""
    global _pinned
    if cfg is None and not kw:
        _pinned = None
        return
    d = dict(cfg.to_dict() if isinstance(cfg, TileConfig) else (cfg or {}))
    d.update(kw)
    _pinned = TileConfig(**d)


def _env_config() -> Optional[TileConfig]:
    s = os.environ.get("EMU_INDUCTOR_KERNEL_CONFIG")
    return _parse_env_config(s) if s else None


@functools.lru_cache(maxsize=16)
def _parse_env_config(s: str) -> TileConfig:  # read on every launch: parsed once per value
    try:
        d = json.loads(s) if s.lstrip().startswith("{") else {
            k.strip(): int(v) for k, v in (p.split("=") for p in s.split(",") if p.strip())}
        return TileConfig(**d)
    except Exception as e:
        raise ValueError(f"EMU_INDUCTOR_KERNEL_CONFIG: cannot parse {s!r} ({e})") from e


def pinned_config() -> Optional[TileConfig]:
    return _pinned or _env_config()


def _disk_path() -> str:
    return os.path.join(cache_dir(), "autotune.json")


def _disk_load() -> dict:
    try:
        with open(_disk_path()) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _disk_store(key: str, cfg: TileConfig) -> None:
    d = _disk_load()
    d[key] = cfg.to_dict()
    tmp = _disk_path() + f".{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(d, f, indent=1, sort_keys=True)
    os.replace(tmp, _disk_path())


def _autotune_enabled(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    if os.environ.get("EMU_INDUCTOR_AUTOTUNE", "1") in ("0", "", "false"):
        return False
    return not torch.cuda.is_current_stream_capturing()


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def select_config(key: str, device: torch.device, rows_per_expert: float,
                  bench: Optional[Callable[[TileConfig], float]] = None,
                  verify: Optional[Callable[[TileConfig], bool]] = None) -> TileConfig:
    """The config for `key` (which includes the token bucket): pinned, else cached in
    memory or on disk, else autotuned with `bench` (CUDA, not capturing), else heuristic.

    verify(cfg) -> False drops a candidate whose outputs disagree with the launcher's
    reference config on the call's own inputs: Triton 3.6 miscompiles a few tile shapes on
    the H200 (garbage, not rounding; docs/kernels.md), and a fast wrong config must never
    win."""
    p = pinned_config()
    if p is not None:
        return p
    dev_key = f"{_device_name(device)}|{key}"
    with _lock:
        if dev_key in _mem and (dq_enabled() or not _mem[dev_key].dq):
            return _mem[dev_key]
        disk = _disk_load().get(dev_key)
        if disk is not None and (dq_enabled() or not disk.get("dq")):
            _mem[dev_key] = TileConfig.from_dict(disk)
            return _mem[dev_key]
    if bench is None or not _autotune_enabled(device):
        return heuristic(rows_per_expert)
    best, best_t = None, float("inf")
    cands = list(candidates(rows_per_expert))
    t0 = time.perf_counter()
    progress("autotuning %s over %d tile configs (once per shape bucket; cached on disk) ...",
             dev_key, len(cands))
    for cfg in cands:
        try:
            t = bench(cfg)
            if verify is not None and not verify(cfg):
                log.warning("emu_inductor: tile config %s gave outputs different from the reference config on "
                            "%s; skipped (a compiler fault for this tile shape on this GPU)", cfg, dev_key)
                continue
        except Exception as e:  # a config that does not compile (registers, smem) is skipped
            log.debug("emu_inductor: config %s failed: %s", cfg, e)
            continue
        if t < best_t:
            best, best_t = cfg, t
    best = best or heuristic(rows_per_expert)
    progress("autotuned %s -> %s (%.4f ms) in %.1f s%s", dev_key, best, best_t, time.perf_counter() - t0,
             " (the dequantize-once path: faster here, with more workspace memory than the fused kernels; "
             "EMU_INDUCTOR_DQ=0 leaves it out)" if best.dq else "")
    with _lock:
        _tuned["seconds"] += time.perf_counter() - t0
        _tuned["count"] += 1
        _mem[dev_key] = best
        try:
            _disk_store(dev_key, best)
        except OSError as e:
            log.warning("emu_inductor: cannot write the autotune cache: %s", e)
    return best
