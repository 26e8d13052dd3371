"""Where the mxemu backend's compile time goes, and progress lines for long steps
(``progress`` / ``progress_to`` live in ``emu_inductor._logging`` so the kernels use them too).

Phases (seconds, accumulated in this process since the last ``reset()``):

- ``rules``: building a family's pattern rules (tracing the catalogue's styles into
  shape-agnostic patterns; once per process per family, on its first graph), per family;
- ``families_import``: importing the built-in family modules (once per process);
- ``matching``: running a family's rules over a graph, per family (checks included);
- ``semantic``: probe evaluation by ``emu_inductor.recognize`` inside the semantic family
  (part of its matching time; from counters["mxemu_patterns"]["semantic.check_ms"]);
- ``pass``: the whole mxemu pass; ``compile``: the backend's Inductor compiles,
  outermost call only; ``inductor`` = compile - pass (Dynamo tracing before the backend
  is called is not included);
- ``autotune``: the fused kernels' tile-config autotuning (``kernels.autotune``), paid by the
  first call of each shape bucket on a GPU, not by the compile.

``emu_inductor.compile_report()`` returns them; ``explain()`` shows them. Long steps
also report through ``progress()``: an INFO log line on the ``emu_inductor`` logger and,
while ``progress_to(stream)`` is active (the demo and explain()), a line on that stream.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch._dynamo.utils import counters

from .._logging import get_logger, progress, progress_to
from ..ops import autotune_time

log = get_logger("compile")

__all__ = ["CompileReport", "compile_report", "reset", "timed", "progress", "progress_to"]

_lock = threading.Lock()
_totals: dict[str, float] = defaultdict(float)
_tls = threading.local()


def reset() -> None:
    """Forget the accumulated times (rule building is not repeated: it is per process)."""
    with _lock:
        _totals.clear()


def _add(key: str, seconds: float) -> None:
    with _lock:
        _totals[key] += seconds


@contextmanager
def timed(key: str) -> Iterator[None]:
    """Add the block's wall time to ``key`` (e.g. ``"matching:linear"``)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _add(key, time.perf_counter() - t0)


@contextmanager
def compile_timer() -> Iterator[None]:
    """Around the backend's Inductor compile: outermost level only (the backward graph's
    inner compile nests inside the forward's when it is not lazy)."""
    depth = getattr(_tls, "depth", 0)
    _tls.depth = depth + 1
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _tls.depth = depth
        if depth == 0:
            _add("compile", time.perf_counter() - t0)
            _add("compiles", 1.0)


@dataclasses.dataclass
class CompileReport:
    """Seconds spent in each phase of the mxemu backend's compiles (see module doc)."""

    rules_s: dict[str, float]  # per family: building its pattern rules (once per process)
    families_import_s: float
    matching_s: dict[str, float]  # per family: matching + checks + rewrites
    semantic_s: float  # recognize's probe evaluation (inside matching_s["semantic"])
    pass_s: float  # the whole mxemu pass (rules built on first use included)
    compile_s: float  # the backend's Inductor compiles (pass included)
    compiles: int
    # tile-config autotuning of the fused kernels (first call of each shape bucket on a GPU;
    # run time, not compile time, but paid once like it; cached on disk afterwards)
    autotune_s: float = 0.0
    autotunes: int = 0

    @property
    def inductor_s(self) -> float:
        """Inductor itself: the backend's compiles minus the mxemu pass."""
        return max(0.0, self.compile_s - self.pass_s)

    @property
    def rules_total_s(self) -> float:
        return sum(self.rules_s.values()) + self.families_import_s

    def since(self, earlier: CompileReport) -> CompileReport:
        """The time spent between ``earlier`` and this report."""
        def sub(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
            return {k: v - b.get(k, 0.0) for k, v in a.items() if v - b.get(k, 0.0) > 0}

        return CompileReport(
            rules_s=sub(self.rules_s, earlier.rules_s),
            families_import_s=self.families_import_s - earlier.families_import_s,
            matching_s=sub(self.matching_s, earlier.matching_s),
            semantic_s=max(0.0, self.semantic_s - earlier.semantic_s),
            pass_s=self.pass_s - earlier.pass_s,
            compile_s=self.compile_s - earlier.compile_s,
            compiles=self.compiles - earlier.compiles,
            autotune_s=max(0.0, self.autotune_s - earlier.autotune_s),
            autotunes=self.autotunes - earlier.autotunes,
        )

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["inductor_s"] = self.inductor_s
        d["rules_total_s"] = self.rules_total_s
        return d

    def __str__(self) -> str:
        def fmt(d: dict[str, float]) -> str:
            return ", ".join(f"{k} {v:.2f}" for k, v in d.items()) or "-"

        return (f"compile time (s): Inductor {self.inductor_s:.2f} + mxemu pass {self.pass_s:.2f} "
                f"over {self.compiles} compile(s); pattern rules {self.rules_total_s:.2f} "
                f"(import {self.families_import_s:.2f}; {fmt(self.rules_s)}); matching "
                f"{fmt(self.matching_s)}; semantic recognition {self.semantic_s:.2f}"
                + (f"; kernel autotuning {self.autotune_s:.2f} over {self.autotunes} shape bucket(s) (first "
                   f"calls on the GPU; cached on disk)" if self.autotunes else ""))


def compile_report() -> CompileReport:
    """The compile-time split accumulated in this process (since ``reset()``)."""
    with _lock:
        t = dict(_totals)
    tune_s, tunes = autotune_time()

    def per(prefix: str) -> dict[str, float]:
        return {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}

    return CompileReport(
        rules_s=per("rules:"),
        families_import_s=t.get("families_import", 0.0),
        matching_s=per("matching:"),
        semantic_s=counters["mxemu_patterns"]["semantic.check_ms"] / 1000.0,
        pass_s=t.get("pass", 0.0),
        compile_s=t.get("compile", 0.0),
        compiles=int(t.get("compiles", 0.0)),
        autotune_s=tune_s,
        autotunes=tunes,
    )
