"""``MxemuPass``: the post-grad custom pre-pass that applies every pattern family.

Runs as ``torch._inductor.config.post_grad_custom_pre_pass`` (installed by the ``mxemu``
backend or ``emu_inductor.enable()``): after functionalization and ``view_to_reshape``,
before Inductor's own post-grad rewrites, once for the forward and once for the
backward graph.

Guarantees:
- A family's ``init_fn`` runs once per process, lazily, outside the compile's fake mode.
- An exception inside a family (its init, a match's extra_check, the re-trace of the
  search/replacement function, the graph rewrite itself) never reaches the user's
  compile: it is logged at WARNING, shown by explain() as "internal error", and the
  graph keeps its pre-rewrite form for that candidate (a failed rewrite restores the
  graph from a snapshot and re-runs the family without that candidate). Set
  ``mxemu.strict=True`` to re-raise instead while debugging pattern code.
- ``uuid()`` is a sha256 over the package version, the contents of every ``.py`` file
  under ``emu_inductor/`` and ``patterns/`` (plus files registered families name,
  ``fingerprint.pass_uuid_files``) and the pass configuration, so the FX graph cache can
  hit.
- Every rule runs behind ``guards.guard_entry``; chaining with a user's pass is ``chain``.
- Fused counts go to ``counters["mxemu"][family]`` and, because only
  ``counters["inductor"]`` is replayed on an FX-graph-cache hit,
  ``counters["inductor"]["mxemu_" + family]`` too; the backend's
  ``recorder.cache_replay()`` turns a replay back into ``counters["mxemu"]``.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.fx_passes.post_grad import remove_noop_ops
from torch._inductor.pattern_matcher import PatternMatcherPass

from .. import __version__, _compat
from .._logging import get_logger
from . import recorder, registry, timings, verify
from .fingerprint import files_digest, pass_uuid_files, stable_repr
from .matching import pattern_name_of
from .guards import ApplyFailed, FamilyRun, collapse, describe_error, guard_entry, set_current_run

log = get_logger("passes")

__all__ = ["MxemuPass"]

#: Options that do not change the rewrite and so stay out of the uuid.
_NON_REWRITE_OPTIONS = frozenset({"emulate_precision_casts", "report_unmatched"})
#: How often one family may fail to rewrite a candidate in one graph before we give up
#: on that family for that graph.
_MAX_APPLY_FAILURES = 8



def _graph_device(graph: torch.fx.Graph) -> torch.device | None:
    for n in graph.find_nodes(op="placeholder"):
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor):
            return v.device
    return None


def _anchor_nodes(graph: torch.fx.Graph, anchors: Iterable[Any]) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []
    for a in anchors:
        targets = [a]
        if isinstance(a, torch._ops.OpOverloadPacket):
            targets = [getattr(a, o) for o in a.overloads()]
        for t in targets:
            out.extend(graph.find_nodes(op="call_function", target=t))
    return out


def _has_anchor(graph: torch.fx.Graph, anchors: Iterable[Any]) -> bool:
    return bool(_anchor_nodes(graph, anchors))


def _input_dtypes(graph: torch.fx.Graph) -> frozenset:
    """dtypes of the graph's inputs and attributes (constants need not carry meta 'val')."""
    out = set()
    for n in graph.nodes:
        if n.op == "placeholder":
            v = n.meta.get("val")
        elif n.op == "get_attr":
            v = n.meta.get("val")
            if v is None:
                v = graph.owning_module
                for part in str(n.target).split("."):
                    v = getattr(v, part, None)
        else:
            continue
        if isinstance(v, torch.Tensor):
            out.add(v.dtype)
    return frozenset(out)


def _graph_dtypes(graph: torch.fx.Graph, anchors: Iterable[Any]) -> frozenset:
    """dtypes of the anchor nodes' values (of every node's without anchors): the rule sets
    a per-dtype family needs for this graph."""
    nodes = _anchor_nodes(graph, anchors) if anchors else [n for n in graph.nodes if n.op == "call_function"]
    out = set()
    for n in nodes:
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor):
            out.add(v.dtype)
    return frozenset(out)



class MxemuPass(CustomGraphPass):
    """Applies the registered pattern families (see module docstring).

    ``options``: mxemu options with or without the ``mxemu.`` prefix (see
    ``registry.CORE_OPTIONS`` and the families' declared options).
    """

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        registry.load_builtin_families()
        self.options: dict[str, Any] = registry.resolve_options(options)
        self._uuid: str | None = None

    # -- configuration ---------------------------------------------------------------

    @property
    def pass_config(self) -> dict[str, Any]:
        """The options that change the rewrite (hashed into the uuid)."""
        return {k: v for k, v in self.options.items() if k not in _NON_REWRITE_OPTIONS}

    def enabled_families(self) -> tuple[str, ...]:
        names = registry.registered_families()
        enabled = self.options.get("enabled_patterns")
        if enabled is not None:
            names = tuple(n for n in names if n in enabled)
        disabled = set(self.options.get("disabled_patterns") or ())
        return tuple(n for n in names if n not in disabled)

    def _families(self) -> list[registry.PatternFamily]:
        out = []
        for name in self.enabled_families():
            try:
                out.append(registry.get_pattern_family(name))
            except KeyError:  # unregistered meanwhile
                pass
        return out

    def uuid(self) -> str:
        fams = self._families()
        extra_files = [f for fam in fams for f in fam.files]
        files = pass_uuid_files(extra_files)
        h = hashlib.sha256()
        h.update(f"emu_inductor {__version__}\n".encode())
        h.update(files_digest(files))
        h.update(stable_repr(self.pass_config).encode())
        h.update(stable_repr([f.name for f in fams]).encode())
        uuid = "mxemu-" + h.hexdigest()
        if uuid != self._uuid:
            log.debug("mxemu pass uuid %s (%d source files, families=%s, config=%s)", uuid,
                      len(files), [f.name for f in fams], self.pass_config)
            self._uuid = uuid
        return uuid

    def __repr__(self) -> str:
        nondefault = {k: v for k, v in self.options.items()
                      if registry.resolve_options(None, check_families=False).get(k) != v}
        return f"MxemuPass({nondefault})"

    # -- running ---------------------------------------------------------------------

    def __call__(self, graph: torch.fx.Graph) -> None:
        prev = registry._set_current_options(self.options)
        try:
            with timings.timed("pass"):
                self._run(graph)
        except Exception as e:
            if self.options.get("strict"):
                raise
            log.warning("emu_inductor: mxemu pass failed; the graph is left as Inductor "
                        "gave it: %s", describe_error(e), exc_info=True)
            recorder.note(f"mxemu pass internal error: {describe_error(e)}")
            counters["mxemu"]["internal_errors"] += 1
        finally:
            registry._set_current_options(prev)

    def _run(self, graph: torch.fx.Graph) -> None:
        fams = self._families()
        uuid = self.uuid()
        label = recorder.begin_graph(graph, uuid)
        recorder.count_pass_run()
        log.debug("mxemu pass on graph %s (%d nodes), families %s, uuid %s", label,
                  len(graph.nodes), [f.name for f in fams], uuid)
        total = 0
        verify.begin_graph(self.options.get("verify"))
        try:
            if not fams:
                return
            if self.options.get("remove_noop_ops"):
                remove_noop_ops(graph)
            device = None
            held = None  # dtypes of the graph's values, for requires_dtypes
            for fam in fams:
                if fam.anchors and not _has_anchor(graph, fam.anchors):
                    log.debug("family %s skipped on graph %s: none of its anchor ops", fam.name,
                              label)
                    continue
                if fam.requires_dtypes:
                    held = _graph_dtypes(graph, ()) | _input_dtypes(graph) if held is None else held
                    if not held & fam.requires_dtypes:
                        log.debug("family %s skipped on graph %s: no value of %s", fam.name, label,
                                  sorted(map(str, fam.requires_dtypes)))
                        continue
                dtypes = _graph_dtypes(graph, fam.anchors) if fam.per_dtype else None
                if fam.state == "new" or (fam.state == "ready" and dtypes and not dtypes <= fam.dtypes_seen):
                    if device is None:
                        device = _graph_device(graph)
                    self._init_family(fam, device, dtypes)
                if fam.state != "ready":
                    recorder.note(f"pattern family {fam.name} is disabled: {fam.error}")
                    continue
                total += self._run_family(fam, graph)
            verify.finish_graph(graph)  # after every family: later ones match the fused ops
        finally:
            verify.end_graph()
            recorder.count_ops(graph)  # what runs: replayed with the graph on a cache hit
            recorder.end_graph(label, total)
            log.debug("mxemu pass on graph %s done: %d candidate(s) fused", label, total)

    def _init_family(self, fam: registry.PatternFamily, device: torch.device | None,
                     dtypes: frozenset | None = None) -> None:
        """Build the family's rules (once; a per-dtype family again for dtypes not seen yet,
        into the same PatternMatcherPass). New rules get the guard and verify wrappers."""
        with registry._lock:
            new = None
            if fam.per_dtype and dtypes is not None:
                new = frozenset(dtypes) - fam.dtypes_seen
            if fam.state == "failed" or (fam.state == "ready" and not new):
                return
            try:
                params = inspect.signature(fam.init_fn).parameters
                takes_device = "input_device" in params or any(
                    p.kind is p.VAR_KEYWORD for p in params.values())
            except (TypeError, ValueError):
                takes_device = False
            kwargs = {"dtypes": new} if new is not None else {}

            def _init(input_device: Any = None) -> Any:
                pm = fam.pm_pass if fam.pm_pass is not None else PatternMatcherPass(pass_name=f"mxemu_{fam.name}")
                if takes_device:
                    fam.init_fn(pm, input_device=input_device, **kwargs)
                else:
                    fam.init_fn(pm, **kwargs)
                return pm

            t0 = time.perf_counter()
            what = fam.name if new is None else f"{fam.name} ({', '.join(sorted(str(d) for d in new))})"
            timings.progress("building pattern rules for family %s (once per process) ...", what)
            before = {id(e) for entries in (fam.pm_pass.patterns.values() if fam.pm_pass is not None else ())
                      for e in entries}
            try:
                with timings.timed(f"rules:{fam.name}"):
                    pm = _compat.init_once_fakemode(_init)(device)
                n, added = len(before), 0
                for (_op, _target), entries in pm.patterns.items():
                    for entry in entries:
                        if id(entry) in before:
                            continue  # built for an earlier graph: already wrapped
                        n += 1
                        added += 1
                        guard_entry(fam, entry, f"{fam.name}#{n}")
                        # outside the guard: keeps the original of each rewrite (mxemu.verify)
                        verify.wrap_entry(entry, fam.name,
                                          pattern_name_of(entry) or f"{fam.name}#{n}")
                fam.pm_pass = pm
                fam.state = "ready"
                if new is not None:
                    fam.dtypes_seen = fam.dtypes_seen | new
                timings.progress("built %d pattern rule(s) for family %s in %.1f s", added, what,
                                 time.perf_counter() - t0)
            except Exception as e:
                fam.state = "failed"
                fam.error = f"init failed: {describe_error(e)}"
                log.warning("emu_inductor: pattern family %r failed to initialise and is "
                            "disabled for this process: %s", fam.name, describe_error(e),
                            exc_info=True)
                counters["mxemu"]["internal_errors"] += 1
                if self.options.get("strict"):
                    raise

    def _run_family(self, fam: registry.PatternFamily, graph: torch.fx.Graph) -> int:
        strict = bool(self.options.get("strict"))
        excluded: set[int] = set()
        failures: list[recorder.CandidateRecord] = []
        for _attempt in range(_MAX_APPLY_FAILURES + 1):
            run = FamilyRun(fam, graph, excluded, strict)
            anchors = self._anchors(fam, graph) if self.options.get("report_unmatched") else []
            set_current_run(run)
            try:
                with recorder.family_table(run.table), timings.timed(f"matching:{fam.name}"):
                    fam.pm_pass.apply(graph)
            except ApplyFailed as f:
                run.restore()
                counters["mxemu"]["internal_errors"] += 1
                log.warning("emu_inductor: pattern %s/%s failed while rewriting node %s; "
                            "graph restored, candidate left alone: %s", fam.name, f.pattern,
                            f.anchor, describe_error(f.error), exc_info=True)
                failures.append(recorder.CandidateRecord(
                    kind=fam.name, node=f.anchor, target="", fused=False, kernel=None,
                    reason=f"internal error while rewriting with pattern {f.pattern}: "
                           f"{describe_error(f.error)}",
                    family=fam.name, pattern=f.pattern, graph=recorder._current_graph_label()))
                if f.key is None or f.key in excluded:
                    break  # cannot single it out: leave the whole family out of this graph
                excluded.add(f.key)
                continue
            except Exception as e:
                if strict:
                    raise
                run.restore()
                counters["mxemu"]["internal_errors"] += 1
                log.warning("emu_inductor: pattern family %s failed on graph %s; graph "
                            "restored: %s", fam.name, recorder._current_graph_label(),
                            describe_error(e), exc_info=True)
                recorder.note(f"pattern family {fam.name} failed on graph "
                              f"{recorder._current_graph_label()}: {describe_error(e)}")
                break
            finally:
                set_current_run(None)
            self._commit(fam, run, failures, anchors)
            return run.fused
        # gave up on this family for this graph
        for rec in collapse(failures):
            recorder.emit(rec)
        return 0

    @staticmethod
    def _anchors(fam: registry.PatternFamily, graph: torch.fx.Graph) -> list[torch.fx.Node]:
        out: list[torch.fx.Node] = []
        for op, target in fam.pm_pass.patterns:
            if op != "call_module":
                out.extend(graph.find_nodes(op=op, target=target))
        return out

    def _commit(self, fam: registry.PatternFamily, run: FamilyRun,
                failures: list[recorder.CandidateRecord], anchors: list[torch.fx.Node]) -> None:
        order = {n.name: i for n, i in run.index.items()}
        records = sorted(collapse([*failures, *run.table]),
                         key=lambda r: order.get(r.node, len(order)))
        seen = {r.node for r in records}
        for a in anchors:
            if not a._erased and a.name not in seen:
                records.append(recorder.make_record(
                    fam.name, a, False, None, f"no {fam.name} pattern matched at this node",
                    family=fam.name))
        for rec in records:
            recorder.emit(rec)
        if run.fused:
            recorder.count_fused(fam.name, run.fused)
        if run.errors:
            counters["mxemu"]["internal_errors"] += run.errors
