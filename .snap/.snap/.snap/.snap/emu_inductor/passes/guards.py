"""The guard layer: nothing a pattern family does may break the user's compile.

Two places, one job (contain a candidate's failure, say why in explain()):
- `register_family_pattern`, how the built-in families register a rule: the check
  returns None to fuse or a reason (recorded for explain()); an exception in it is a
  reason too; the handler inserts the run-time guards the match relies on
  (`runtime_guards`) before rewriting.
- `guard_entry`, applied by the mxemu pass to every rule of every family (built-in or
  user-registered) when the family is initialised: its extra_check runs inside a
  recorder candidate context, an exception leaves that candidate alone (or re-raises
  under `mxemu.strict`), and a failing rewrite raises `ApplyFailed`, on which the pass
  restores the graph from the `FamilyRun` snapshot and retries without the candidate.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional

import torch
from torch._inductor import pattern_matcher as pm
from torch.fx.experimental.symbolic_shapes import guard_or_false

from .._logging import get_logger
from . import recorder
from .matching import pattern_name_of
from .recorder import count, record
from .registry import PatternFamily
from .runtime_guards import assert_runtime_consts, assert_runtime_tensors, runtime_consts_reason

__all__ = ["register_family_pattern", "guard_entry", "FamilyRun", "ApplyFailed", "current_run", "set_current_run",
           "describe_error", "collapse", "custom_ops_in"]

log = get_logger("passes")
plog = get_logger("passes.patterns")


# --- the built-in families' rules ---------------------------------------------------------------

def register_family_pattern(
    pattern: pm.PatternExpr,
    pass_dict,
    *,
    family: str,
    name: str,
    check: Callable[[pm.Match], Optional[str]],
    replace: Callable[[pm.Match], None],
) -> None:
    """Register `pattern`: `check(match)` returns None to fuse or a reason to leave it;
    `replace(match)` rewrites the graph."""

    def extra_check(match: pm.Match) -> bool:
        try:
            reason = runtime_consts_reason(match) or check(match)
        except Exception as e:  # an internal error must never break the user's compile
            plog.warning("mxemu %s/%s: precondition check failed with %r; left as written", family, name, e)
            reason = f"internal error in the check: {e!r}"
        if reason is not None:
            record(family, name, match.output_node(), False, reason)
            return False
        return True

    def handler(match: pm.Match, *args, **kwargs):
        anchor = match.output_node()
        assert_runtime_consts(match, family, name)
        notes = assert_runtime_tensors(match, family, name)
        replace(match)
        count(f"{family}.{name}")
        if notes:  # explain(): the fusion holds only while the guarded inputs keep their values
            record(family, name, anchor, True, "; ".join(notes))

    pm.register_graph_pattern(pattern, extra_check=extra_check, pass_dict=pass_dict)(handler)
    # MxemuPass reads the pattern name for explain() from the entry
    entries = pass_dict.patterns[(pattern.op, pattern.fns[0])] if isinstance(pattern, pm.CallFunction) else []
    if entries:
        try:
            entries[-1]._mxemu_pattern_name = f"{family}/{name}"
        except Exception:
            pass


# --- every rule, as the pass runs it -------------------------------------------------------------

def _snapshot(graph: torch.fx.Graph) -> torch.fx.Graph:
    snap = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in graph.nodes:
        env[n] = snap.node_copy(n, env.__getitem__)
    return snap


def _restore(graph: torch.fx.Graph, snap: torch.fx.Graph) -> None:
    nodes = list(graph.nodes)
    for n in nodes:  # drop every use first: a half-done rewrite may not be topo-sorted
        n.args = ()
        n.kwargs = {}
    for n in reversed(nodes):
        graph.erase_node(n)
    # Let the copies get their old names back (erase_node keeps names reserved); purely
    # cosmetic (explain/log names stay valid), so skip it if the private field moved.
    used = getattr(getattr(graph, "_graph_namespace", None), "_used_names", None)
    if isinstance(used, set):
        used.difference_update(n.name for n in snap.nodes)
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in snap.nodes:
        env[n] = graph.node_copy(n, env.__getitem__)


class ApplyFailed(Exception):
    def __init__(self, key: int | None, anchor: str, pattern: str, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.key = key
        self.anchor = anchor
        self.pattern = pattern
        self.error = error


class FamilyRun:
    def __init__(self, family: PatternFamily, graph: torch.fx.Graph,
                 excluded: set[int], strict: bool) -> None:
        self.family = family
        self.graph = graph
        self.excluded = excluded
        self.strict = strict
        self.index = {n: i for i, n in enumerate(graph.nodes)}
        self.table: list[recorder.CandidateRecord] = []
        self.pending: dict[int, tuple[Any, recorder.CandidateContext]] = {}
        self.snapshot: torch.fx.Graph | None = None
        self.fused = 0
        self.errors = 0

    def ensure_snapshot(self) -> None:
        if self.snapshot is None:
            self.snapshot = _snapshot(self.graph)

    def restore(self) -> None:
        if self.snapshot is not None:
            _restore(self.graph, self.snapshot)
            self.snapshot = None



_tls = threading.local()


def current_run() -> FamilyRun | None:
    """The family run of the mxemu pass on this thread (None outside it)."""
    return getattr(_tls, "run", None)


def set_current_run(run: FamilyRun | None) -> None:
    _tls.run = run


def _anchor_of(match: Any) -> Any:
    try:
        nodes = match.output_nodes()
    except Exception:
        nodes = []
    for n in nodes:
        if n is not None:
            return n
    return match.nodes[-1] if getattr(match, "nodes", None) else None


def _kernel_of(match: Any) -> str | None:
    rg = getattr(match, "replacement_graph", None)
    if rg is None:
        return None
    graph = rg.graph if hasattr(rg, "graph") else rg
    return custom_ops_in(graph.nodes)


def custom_ops_in(nodes: Iterable[torch.fx.Node]) -> str | None:
    """'ns::op' names of the non-aten/prims ops among ``nodes`` (what a rewrite fused into)."""
    names: list[str] = []
    for n in nodes:
        if n.op != "call_function":
            continue
        schema = getattr(n.target, "_schema", None)
        ns = getattr(n.target, "namespace", None)
        if schema is None or ns in (None, "aten", "prims"):
            continue
        if schema.name not in names:
            names.append(schema.name)
    return ", ".join(names) or None


def describe_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 300:
        first = first[:297] + "..."
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def guard_entry(family: PatternFamily, entry: Any, default_name: str) -> None:
    """Wrap one pattern-matcher entry's extra_check and apply with our guards."""
    if getattr(entry, "_mxemu_guarded", False):
        return
    pname = pattern_name_of(entry) or default_name
    orig_check = entry.extra_check
    orig_apply = entry.apply  # bound method

    def extra_check(match: Any) -> bool:
        run = current_run()
        if run is None or run.family is not family:
            return orig_check(match)
        anchor = _anchor_of(match)
        if run.index.get(anchor, -1) in run.excluded:
            return False
        ctx = recorder.CandidateContext(family.name, pname, anchor)
        try:
            with recorder.candidate_context(ctx):
                ok = guard_or_false(orig_check(match))
        except Exception as e:
            if run.strict:
                raise
            run.errors += 1
            msg = describe_error(e)
            log.warning("emu_inductor: pattern %s/%s raised in its check on node %s; "
                        "leaving it alone: %s", family.name, pname,
                        getattr(anchor, "name", "?"), msg, exc_info=log.isEnabledFor(10))
            run.table.append(recorder.make_record(
                family.name, anchor, False, None,
                f"internal error in the check/replacement trace of pattern {pname}: {msg}",
                family=family.name, pattern=pname))
            return False
        if ok:
            run.pending[id(match)] = (match, ctx)
            return True
        if ctx.records:
            run.table.extend(_fill_from(ctx.records, recorder.make_record(
                family.name, anchor, False, None, "", family=family.name, pattern=pname)))
        else:
            run.table.append(recorder.make_record(
                family.name, anchor, False, None,
                f"pattern {pname} matched the structure but its check rejected it "
                "(exact shapes/dtypes/constants or extra_check)",
                family=family.name, pattern=pname))
        return False

    def apply(match: Any, graph: torch.fx.Graph, node: torch.fx.Node) -> None:
        run = current_run()
        if run is None or run.family is not family:
            return orig_apply(match, graph, node)
        _, ctx = run.pending.pop(id(match), (None, None))
        if ctx is None:
            ctx = recorder.CandidateContext(family.name, pname, node)
        kernel = _kernel_of(match)
        fused_rec = recorder.make_record(family.name, node, True, kernel, "",
                                         family=family.name, pattern=pname)
        before = set(graph.nodes) if kernel is None else None  # graph-pattern handlers
        run.ensure_snapshot()
        try:
            with recorder.candidate_context(ctx):
                orig_apply(match, graph, node)
        except Exception as e:
            if run.strict:
                raise
            raise ApplyFailed(run.index.get(node), node.name, pname, e) from e
        run.fused += 1
        if before is not None:
            fused_rec.kernel = custom_ops_in(n for n in graph.nodes if n not in before)
        records = _fill_from(ctx.records, fused_rec)
        run.table.extend(records)
        if not any(r.fused for r in records):
            run.table.append(fused_rec)

    entry.extra_check = extra_check
    entry.apply = apply
    entry._mxemu_guarded = True


def _fill_from(records: Sequence[recorder.CandidateRecord],
               anchor: recorder.CandidateRecord) -> list[recorder.CandidateRecord]:
    """Author records made without a node (or a kernel) get the candidate's."""
    for r in records:
        if not r.node:
            r.node, r.target, r.location = anchor.node, anchor.target, anchor.location
        if r.fused and not r.kernel:
            r.kernel = anchor.kernel
    return list(records)


def collapse(records: Sequence[recorder.CandidateRecord]) -> list[recorder.CandidateRecord]:
    """One candidate may be seen by several rules (dtype variants): if any fused it,
    keep only that; otherwise keep the distinct reasons."""
    groups: dict[tuple[str, str, str], list[recorder.CandidateRecord]] = {}
    for r in records:
        groups.setdefault((r.graph, r.node, r.kind), []).append(r)
    out: list[recorder.CandidateRecord] = []
    for recs in groups.values():
        fused = [r for r in recs if r.fused]
        keep = fused if fused else recs
        seen: set[tuple[Any, ...]] = set()
        for r in keep:
            key = (r.fused, r.kernel, r.reason, r.pattern)
            if key not in seen:
                seen.add(key)
                out.append(r)
    return out
