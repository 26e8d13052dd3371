"""Candidate recorder behind ``emu_inductor.explain()`` and the debug log.

Pattern code reports what it decided about a candidate subgraph with::

    from emu_inductor.passes import record_candidate
    record_candidate("grouped_mm_dequant", match.output_node(), fused=False,
                     reason="K=48 is not a multiple of the 32-element block")

Pass the ANCHOR node (``match.output_node()``). Inside an ``extra_check`` run by the
mxemu pass the record is attached to the candidate being checked: if the check returns
False your reason is shown instead of the generic "check rejected it"; if the match
then fuses, a ``fused=True`` record you made supplies the kernel name. Records made
elsewhere (a graph-pattern handler, your own scan) are kept as they are.

The built-in families report through ``record`` (which also keeps the last records in
``RECORDS`` for tests and the debug log) and count fused variants with ``count``.

Records are plain data (dataclasses), so explain() reports need no torch objects.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch._dynamo.utils import counters

from .._logging import get_logger

log = get_logger("passes")

__all__ = [
    "CandidateRecord",
    "GraphRecord",
    "record_candidate",
    "recording",
    "record",
    "count",
    "RECORDS",
    "FusionCounts",
    "fusion_counts",
    "cache_replay",
]


@dataclasses.dataclass
class CandidateRecord:
    """One candidate subgraph and what the mxemu pass did with it."""

    kind: str  # short category, usually the pattern family name
    node: str  # anchor node name in the post-grad graph ("" if none)
    target: str  # anchor node target, e.g. "aten.mm.default"
    fused: bool
    kernel: str | None  # what it was fused into (op / kernel name), if fused
    reason: str  # why it was left alone (or a note on the fusion)
    family: str | None = None  # pattern family whose pass saw it
    pattern: str | None = None  # pattern (replacement) name within the family
    graph: str = ""  # which graph: "0:inference", "1:forward", "2:backward", ...
    location: str | None = None  # user source line (from node.meta["stack_trace"])

    @property
    def status(self) -> str:
        return "fused" if self.fused else "left alone"


@dataclasses.dataclass
class GraphRecord:
    """One run of the mxemu pass over a graph."""

    label: str
    num_nodes: int
    uuid: str | None = None
    fused: int = 0


class _Sink:
    def __init__(self) -> None:
        self.candidates: list[CandidateRecord] = []
        self.graphs: list[GraphRecord] = []
        self.notes: list[str] = []


_lock = threading.Lock()
_sinks: list[_Sink] = []
_tls = threading.local()


@contextmanager
def recording() -> Iterator[_Sink]:
    """Collect every record made while the block runs (used by ``explain()``)."""
    sink = _Sink()
    with _lock:
        _sinks.append(sink)
    try:
        yield sink
    finally:
        with _lock:
            _sinks.remove(sink)


def _active_sinks() -> list[_Sink]:
    with _lock:
        return list(_sinks)


# --------------------------------------------------------------------------------------
# helpers used by the pass
# --------------------------------------------------------------------------------------


def _graph_kind(graph: Any) -> str:
    """'forward' / 'backward' / 'inference' from AOTAutograd's placeholder names."""
    kind = "inference"
    for node in graph.find_nodes(op="placeholder"):
        name = str(node.target)
        if name.startswith("tangents"):
            return "backward"
        if name.startswith("primals"):
            kind = "forward"
    return kind


def _location(node: Any) -> str | None:
    """Last 'File "...", line N, in fn' frame of the node's user stack trace."""
    trace = getattr(node, "meta", {}).get("stack_trace") if node is not None else None
    if not trace:
        return None
    frames = [ln.strip() for ln in str(trace).splitlines() if ln.strip().startswith("File ")]
    if not frames:
        return None
    last = frames[-1]  # File "/path/model.py", line 12, in forward
    try:
        path = last.split('"')[1]
        rest = last.split('"', 2)[2]  # , line 12, in forward
        line = rest.split("line", 1)[1].split(",", 1)[0].strip()
        func = rest.rsplit(" in ", 1)[1].strip() if " in " in rest else "?"
        short = path.rsplit("/", 1)[-1]
        return f"{short}:{line} ({func})"
    except IndexError:
        return last


def _target_str(node: Any) -> str:
    """'aten.mm.default' for torch ops, the function name for Python callables."""
    target = getattr(node, "target", None) if node is not None else None
    if target is None:
        return ""
    if isinstance(target, str) or type(target).__module__.startswith("torch._ops"):
        return str(target)
    return getattr(target, "__name__", None) or str(target)


def begin_graph(graph: Any, uuid: str | None) -> str:
    """Register a pass run with the active sinks; returns the graph label."""
    kind = _graph_kind(graph)
    sinks = _active_sinks()
    label = kind
    for sink in sinks:
        label = f"{len(sink.graphs)}:{kind}"
        sink.graphs.append(GraphRecord(label=label, num_nodes=len(graph.nodes), uuid=uuid))
    _tls.graph_label = label
    return label


def end_graph(label: str, fused: int) -> None:
    for sink in _active_sinks():
        for g in reversed(sink.graphs):
            if g.label == label:
                g.fused = fused
                break
    _tls.graph_label = ""


def note(text: str) -> None:
    """A free-form line for explain() (e.g. a family that failed to initialise)."""
    for sink in _active_sinks():
        if text not in sink.notes:
            sink.notes.append(text)


def _current_graph_label() -> str:
    return getattr(_tls, "graph_label", "")


class CandidateContext:
    """The candidate whose ``extra_check`` (or replacement) is running right now."""

    def __init__(self, family: str | None, pattern: str | None, anchor: Any) -> None:
        self.family = family
        self.pattern = pattern
        self.anchor = anchor
        self.records: list[CandidateRecord] = []


def _ctx_stack() -> list[CandidateContext]:
    stack = getattr(_tls, "ctx_stack", None)
    if stack is None:
        stack = _tls.ctx_stack = []
    return stack


@contextmanager
def candidate_context(ctx: CandidateContext) -> Iterator[CandidateContext]:
    stack = _ctx_stack()
    stack.append(ctx)
    try:
        yield ctx
    finally:
        stack.pop()


def _family_table() -> list[CandidateRecord] | None:
    return getattr(_tls, "family_table", None)


@contextmanager
def family_table(table: list[CandidateRecord]) -> Iterator[list[CandidateRecord]]:
    """Route out-of-candidate records into ``table`` (the pass commits it later)."""
    prev = _family_table()
    _tls.family_table = table
    try:
        yield table
    finally:
        _tls.family_table = prev


def make_record(kind: str, node: Any, fused: bool, kernel: str | None, reason: str,
                *, family: str | None = None, pattern: str | None = None) -> CandidateRecord:
    return CandidateRecord(
        kind=kind,
        node=str(getattr(node, "name", "")) if node is not None else "",
        target=_target_str(node),
        fused=bool(fused),
        kernel=kernel,
        reason=reason,
        family=family,
        pattern=pattern,
        graph=_current_graph_label(),
        location=_location(node),
    )


def emit(record: CandidateRecord) -> None:
    """Send a final record to the log and to every active sink."""
    if record.fused:
        log.debug("mxemu candidate FUSED [%s] node=%s (%s) -> %s%s%s", record.kind, record.node,
                  record.target, record.kernel or "?",
                  f" at {record.location}" if record.location else "",
                  f": {record.reason}" if record.reason else "")
    else:
        log.debug("mxemu candidate left alone [%s] node=%s (%s)%s: %s", record.kind, record.node,
                  record.target, f" at {record.location}" if record.location else "",
                  record.reason)
    for sink in _active_sinks():
        sink.candidates.append(record)


# --------------------------------------------------------------------------------------
# public
# --------------------------------------------------------------------------------------


def record_candidate(kind: str | None = None, node: Any = None, fused: bool = False,
                     kernel: str | None = None, reason: str = "", *,
                     family: str | None = None, pattern: str | None = None) -> CandidateRecord:
    """Record what happened to a candidate subgraph (shown by ``explain()``, logged).

    kind:    short category, e.g. the pattern family name (defaults to ``family``).
    node:    the anchor ``torch.fx.Node`` of the candidate (``match.output_node()``), or None.
    fused:   True if it is (about to be) replaced by a fused op.
    kernel:  the op/kernel it is fused into, e.g. ``"mxemu::moe_gemm"`` (fused only).
    reason:  why it was left alone, in a few words a user can act on.
    family / pattern: override the family and pattern name (by default those of the
             candidate being checked, when called from inside the mxemu pass).
    """
    stack = _ctx_stack()
    ctx = stack[-1] if stack else None
    fam = family if family is not None else (ctx.family if ctx else None)
    pat = pattern if pattern is not None else (ctx.pattern if ctx else None)
    rec = make_record(kind or fam or "?", node, fused, kernel, reason, family=fam, pattern=pat)
    if ctx is not None:
        ctx.records.append(rec)
        return rec
    table = _family_table()
    if table is not None:
        table.append(rec)
    else:
        emit(rec)
    return rec


# --------------------------------------------------------------------------------------
# the built-in families' records (passes.guards.register_family_pattern)
# --------------------------------------------------------------------------------------

plog = get_logger("passes.patterns")  # the built-in families' logger (emu_inductor.passes.patterns)

RECORDS: list[dict] = []
_MAX_RECORDS = 1000


def record(family: str, pattern: str, node: Any, fused: bool, reason: str = "") -> None:
    """Record a candidate: to the infra recorder when present, else to RECORDS; log it."""
    entry = {"family": family, "pattern": pattern, "node": getattr(node, "name", None), "fused": fused,
             "reason": reason}
    try:  # the backend's explain() recorder (attaches to the candidate being checked)
        record_candidate(family, node, fused, None, reason, family=family, pattern=pattern)
    except Exception as e:  # pragma: no cover - recording must never break a compile
        plog.debug("mxemu: record_candidate failed: %r", e)
    RECORDS.append(entry)
    del RECORDS[:-_MAX_RECORDS]
    plog.debug("mxemu %s/%s at %s: %s%s", family, pattern, entry["node"], "fused" if fused else "left as written",
               f" ({reason})" if reason else "")


def count(name: str, n: int = 1) -> None:
    """counters["mxemu_patterns"][name]: which pattern variant fused (the family totals are
    counted by MxemuPass through ``count_fused``). Mirrored into counters["inductor"] so an
    FX-graph-cache hit replays it (see "fusion counters" below), except timings (``*_ms``),
    which describe the compile that ran, not the graph."""
    counters["mxemu_patterns"][name] += n
    if not name.endswith("_ms"):
        counters["inductor"][_VARIANT + name] += n


# --------------------------------------------------------------------------------------
# fusion counters that are right on an FX-graph-cache hit
# --------------------------------------------------------------------------------------
# On a cache hit the pass does not run; Inductor only replays the counters["inductor"]
# deltas stored with the cache entry (spec/inductor_integration.md 2.2). So every fusion
# count is written twice: to its own group (counters["mxemu"], ["mxemu_patterns"],
# ["mxemu_ops"]) and to counters["inductor"] under the keys below. ``cache_replay()``,
# wrapped around each compile by the backend (and around Dynamo compiles while
# ``enable()`` is active), adds what was replayed without the pass into the own groups,
# so counters["mxemu"] reads the same after a miss and after a hit.

_FAMILY = "mxemu_"  # + family name (family names cannot contain ':')
_VARIANT = "mxemu_patterns:"  # + variant name -> counters["mxemu_patterns"]
_OP = "mxemu_ops:"  # + op name -> counters["mxemu_ops"] (torch.ops.mxemu.* in the graph)
_GRAPHS = "mxemu:graphs"  # graphs the pass produced -> counters["mxemu"]["graphs_from_cache"]


def count_fused(family: str, n: int) -> None:
    """``n`` candidates fused by ``family`` in the graph being compiled."""
    counters["mxemu"][family] += n
    counters["inductor"][_FAMILY + family] += n


def count_pass_run() -> None:
    """One graph the pass runs on (forward and backward count separately)."""
    counters["mxemu"]["pass_runs"] += 1
    counters["inductor"][_GRAPHS] += 1


def count_ops(graph: Any) -> dict[str, int]:
    """Count the ``torch.ops.mxemu.*`` calls the rewritten graph holds (what will run)."""
    ops: dict[str, int] = {}
    for node in graph.nodes:
        target = node.target
        if node.op == "call_function" and getattr(target, "namespace", None) == "mxemu":
            name = target.name().split("::", 1)[-1].split(".", 1)[0]
            ops[name] = ops.get(name, 0) + 1
    for name, n in ops.items():
        counters["mxemu_ops"][name] += n
        counters["inductor"][_OP + name] += n
    return ops


def _replay_map() -> dict[str, tuple[str, str]]:
    """counters["inductor"] key -> (group, key) it stands for."""
    out: dict[str, tuple[str, str]] = {}
    for key in counters["inductor"]:
        if key == _GRAPHS:
            out[key] = ("mxemu", "pass_runs")
        elif key.startswith(_VARIANT):
            out[key] = ("mxemu_patterns", key[len(_VARIANT):])
        elif key.startswith(_OP):
            out[key] = ("mxemu_ops", key[len(_OP):])
        elif key.startswith(_FAMILY) and ":" not in key:
            out[key] = ("mxemu", key[len(_FAMILY):])
    return out


def _own(key: str, group: str, name: str) -> int:
    if key == _GRAPHS:  # graphs the pass ran on plus graphs already credited to the cache
        return counters["mxemu"]["pass_runs"] + counters["mxemu"]["graphs_from_cache"]
    return counters[group][name]


def _snapshot() -> dict[str, tuple[int, int]]:
    return {k: (counters["inductor"][k], _own(k, g, name)) for k, (g, name) in _replay_map().items()}


@contextmanager
def cache_replay() -> Iterator[None]:
    """Around a compile: whatever Inductor replayed into counters["inductor"] from an
    FX-graph (or AOTAutograd) cache entry without our pass running is added to
    counters["mxemu"] / ["mxemu_patterns"] / ["mxemu_ops"]; a replayed graph counts as
    ``counters["mxemu"]["graphs_from_cache"]`` (``pass_runs`` stays the runs that
    happened). Nested uses count once (each level adds only what the inner ones did not)."""
    before = _snapshot()
    try:
        yield
    finally:
        for key, (group, name) in _replay_map().items():
            i0, o0 = before.get(key, (0, 0))
            replayed = (counters["inductor"][key] - i0) - (_own(key, group, name) - o0)
            if replayed > 0:
                counters[group]["graphs_from_cache" if key == _GRAPHS else name] += replayed


@dataclasses.dataclass
class FusionCounts:
    """What the mxemu pass fused, read from the counters (right after a cache hit too)."""

    families: dict[str, int]  # candidates fused per pattern family
    ops: dict[str, int]  # torch.ops.mxemu.* calls in the compiled graphs, by op name
    variants: dict[str, int]  # pattern variants (counters["mxemu_patterns"])
    pass_runs: int  # graphs the pass ran on in this process
    graphs_from_cache: int  # graphs loaded from Inductor's caches (the pass did not run)

    def __str__(self) -> str:
        ops = ", ".join(f"mxemu::{k} x{v}" for k, v in sorted(self.ops.items())) or "none"
        fams = ", ".join(f"{k}={v}" for k, v in self.families.items()) or "none"
        src = f"{self.pass_runs} graph(s) rewritten"
        if self.graphs_from_cache:
            src += f", {self.graphs_from_cache} loaded from Inductor's cache with their counts"
        return f"fused ops: {ops}; pattern families fired: {fams} ({src})"


def fusion_counts() -> FusionCounts:
    """The fusion counters since the last ``counters.clear()`` (one source for
    ``counters["mxemu"]``, explain() and the demo)."""
    own = ("pass_runs", "internal_errors", "graphs_from_cache")
    mx = counters["mxemu"]
    return FusionCounts(
        families={k: v for k, v in mx.items() if v and k not in own},
        ops={k: v for k, v in counters["mxemu_ops"].items() if v},
        variants={k: v for k, v in counters["mxemu_patterns"].items() if v and not k.endswith("_ms")},
        pass_runs=mx["pass_runs"],
        graphs_from_cache=mx["graphs_from_cache"],
    )
