"""``emu_inductor.explain(model_or_fn, *example_inputs, **backend_options)``.

Compiles and runs ``model_or_fn(*example_inputs)`` once with the mxemu backend, with the
FX-graph and AOTAutograd caches off (a cache hit would skip the pass), and reports each
candidate subgraph the pattern families saw: fused (into which kernel) or left alone
(and why). ``print(report)`` renders a table; the records are in ``report.candidates``.

``emu_inductor.explain`` is this module and the function at once (the module is
callable, like ``emu_inductor.backend``); ``from emu_inductor.explain import explain``
works as well.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from . import _compat
from .backend import MxemuBackend
from .passes import FusionCounts, MxemuPass, fusion_counts, recording
from .passes.timings import CompileReport, compile_report, progress, progress_to
from .passes.recorder import CandidateRecord, GraphRecord, record_candidate

__all__ = ["explain", "ExplainReport", "CandidateRecord", "record_candidate"]


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


@dataclasses.dataclass
class ExplainReport:
    """What the mxemu pass did to a model's graphs."""

    candidates: list[CandidateRecord]
    graphs: list[GraphRecord]
    families: tuple[str, ...]
    notes: list[str]
    options: dict[str, Any]
    #: seconds per phase of this explain's compile (rule building, matching per family,
    #: semantic recognition, Inductor itself); see emu_inductor.compile_report()
    compile_time: CompileReport | None = None
    #: what the compiled graphs run: the same counters the demo and counters["mxemu"] read
    fusion: FusionCounts | None = None

    @property
    def fused(self) -> list[CandidateRecord]:
        return [c for c in self.candidates if c.fused]

    @property
    def left_alone(self) -> list[CandidateRecord]:
        return [c for c in self.candidates if not c.fused]

    def __str__(self) -> str:
        lines: list[str] = []
        fams = ", ".join(self.families) if self.families else "(none registered/enabled)"
        lines.append(f"mxemu explain: {len(self.graphs)} graph(s) passed through the mxemu pass; "
                     f"pattern families: {fams}")
        if not self.candidates:
            lines.append("no candidate subgraphs found")
            if not self.families:
                lines.append("  (no pattern families are registered or enabled, so nothing "
                             "could match)")
        else:
            lines.append(f"{len(self.candidates)} candidate subgraph(s): {len(self.fused)} fused, "
                         f"{len(self.left_alone)} left alone")
            header = ("#", "graph", "kind", "node (target)", "source", "result", "reason")
            rows = []
            for i, c in enumerate(self.candidates, 1):
                node = f"{c.node} ({c.target})" if c.target else c.node or "-"
                result = f"fused -> {c.kernel or '?'}" if c.fused else "left alone"
                reason = c.reason or (f"pattern {c.pattern}" if c.pattern else "")
                if c.fused and c.pattern and c.reason:
                    reason = f"pattern {c.pattern}: {c.reason}"
                rows.append((str(i), c.graph or "-", c.kind, _clip(node, 48),
                             _clip(c.location or "-", 40), _clip(result, 40), reason))
            widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header) - 1)]

            def fmt(row: tuple[str, ...]) -> str:
                cells = [row[j].ljust(widths[j]) for j in range(len(widths))]
                return " | ".join([*cells, row[-1]]).rstrip()

            lines.append(fmt(header))
            lines.append("-+-".join("-" * w for w in widths) + "-+-" + "-" * 6)
            lines.extend(fmt(r) for r in rows)
        if self.fusion is not None:
            lines.append(str(self.fusion))
        if self.compile_time is not None:
            lines.append(str(self.compile_time))
        if self.notes:
            lines.append("notes:")
            lines.extend(f"  - {n}" for n in self.notes)
        return "\n".join(lines)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython
        p.text(str(self))


def explain(model_or_fn: Callable[..., Any], *example_inputs: Any, dynamic: bool | None = None,
            verbose: bool = False, mode: str | None = None,
            inductor_options: Mapping[str, Any] | None = None,
            **backend_options: Any) -> ExplainReport:
    """Compile ``model_or_fn`` with the mxemu backend, run it on ``example_inputs`` once,
    and report every candidate subgraph the pattern families saw.

    dynamic:          passed to ``torch.compile``.
    verbose:          also list anchor nodes no pattern matched (``mxemu.report_unmatched``).
    mode / inductor_options / **backend_options: as for ``emu_inductor.backend(...)``.
    """
    opts = dict(backend_options)
    if verbose:
        opts["report_unmatched"] = True
    backend = MxemuBackend(mode=mode, inductor_options=inductor_options, **opts)
    families = MxemuPass(opts).enabled_families()
    t_before = compile_report()
    fused_before = fusion_counts()
    t0 = time.perf_counter()
    progress("explain: compiling and running the model once (first use builds the pattern "
             "rules) ...")
    with recording() as sink, _compat.inductor_caches_disabled(), progress_to(sys.stderr):
        compiled = torch.compile(model_or_fn, backend=backend, dynamic=dynamic)
        compiled(*example_inputs)
    timing = compile_report().since(t_before)
    progress("explain: done in %.1f s (%s)", time.perf_counter() - t0, timing)
    return ExplainReport(
        candidates=list(sink.candidates),
        graphs=list(sink.graphs),
        families=tuple(families),
        notes=list(sink.notes),
        options=dict(opts),
        compile_time=timing,
        fusion=_fusion_since(fused_before),
    )


def _fusion_since(before: FusionCounts) -> FusionCounts:
    now = fusion_counts()

    def sub(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
        return {k: v - b.get(k, 0) for k, v in a.items() if v - b.get(k, 0) > 0}

    return FusionCounts(families=sub(now.families, before.families), ops=sub(now.ops, before.ops),
                        variants=sub(now.variants, before.variants),
                        pass_runs=now.pass_runs - before.pass_runs,
                        graphs_from_cache=now.graphs_from_cache - before.graphs_from_cache)


_compat.make_module_callable(__name__, explain)
