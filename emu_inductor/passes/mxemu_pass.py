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
  under ``emu_inductor/`` and ``patterns/`` (plus files registered families name) and
  the pass configuration, so the FX graph cache can hit (spec 2.2).
- Fused counts go to ``counters["mxemu"][family]`` and, because only
  ``counters["inductor"]`` is replayed on an FX-graph-cache hit,
  ``counters["inductor"]["mxemu_" + family]`` too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from .. import _compat
from .._logging import get_logger
from . import recorder, registry
from .helpers import pattern_name_of

log = get_logger("passes")

__all__ = ["MxemuPass", "chain_passes", "strip_mxemu_passes", "pass_uuid_files"]

#: Options that do not change the rewrite and so stay out of the uuid.
_NON_REWRITE_OPTIONS = frozenset({"emulate_precision_casts", "report_unmatched"})

#: How often one family may fail to rewrite a candidate in one graph before we give up
#: on that family for that graph.
_MAX_APPLY_FAILURES = 8



def _counters() -> Any:
    from torch._dynamo.utils import counters

    return counters


# --------------------------------------------------------------------------------------
# uuid
# --------------------------------------------------------------------------------------

_SKIP_DIRS = {"__pycache__", ".git", ".pytest_cache", ".hypothesis", "build", "dist"}


def _py_files_under(root: str) -> list[str]:
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return out


def pass_uuid_files(extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The source files hashed into the pass uuid (sorted, real paths)."""
    roots = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]  # emu_inductor/
    try:
        spec = importlib.util.find_spec("emu_inductor.patterns")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        roots.extend(spec.submodule_search_locations)
    files = {os.path.realpath(f) for r in roots if os.path.isdir(r) for f in _py_files_under(r)}
    files.update(os.path.realpath(f) for f in extra if os.path.isfile(f))
    return tuple(sorted(files))


_digest_lock = threading.Lock()
_digest_cache: dict[tuple[str, ...], bytes] = {}


def _files_digest(files: tuple[str, ...]) -> bytes:
    # Cached per process: an edit to a pattern file while a process runs is not seen
    # (same as torch's own lru_cache). Debug pattern code with caches disabled.
    with _digest_lock:
        d = _digest_cache.get(files)
        if d is None:
            from torch._inductor.custom_graph_pass import get_hash_for_files

            d = _digest_cache[files] = get_hash_for_files(files)
        return d


def _stable_repr(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k!r}:{_stable_repr(value[k])}" for k in sorted(value)) + "}"
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(_stable_repr(v) for v in value) + ")"
    if isinstance(value, (set, frozenset)):
        return "{" + ",".join(sorted(_stable_repr(v) for v in value)) + "}"
    return repr(value)


# --------------------------------------------------------------------------------------
# graph snapshot / restore (public FX API only)
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# per-(family, graph) run state
# --------------------------------------------------------------------------------------


class _ApplyFailed(Exception):
    def __init__(self, key: int | None, anchor: str, pattern: str, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.key = key
        self.anchor = anchor
        self.pattern = pattern
        self.error = error


class _FamilyRun:
    def __init__(self, family: registry.PatternFamily, graph: torch.fx.Graph,
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


def _current_run() -> _FamilyRun | None:
    return getattr(_tls, "run", None)


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
    return _custom_ops_in(graph.nodes)


def _custom_ops_in(nodes: Iterable[torch.fx.Node]) -> str | None:
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


def _describe_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 300:
        first = first[:297] + "..."
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _guard_entry(family: registry.PatternFamily, entry: Any, default_name: str) -> None:
    """Wrap one pattern-matcher entry's extra_check and apply with our guards."""
    if getattr(entry, "_mxemu_guarded", False):
        return
    pname = pattern_name_of(entry) or default_name
    orig_check = entry.extra_check
    orig_apply = entry.apply  # bound method

    def extra_check(match: Any) -> bool:
        run = _current_run()
        if run is None or run.family is not family:
            return orig_check(match)
        anchor = _anchor_of(match)
        if run.index.get(anchor, -1) in run.excluded:
            return False
        ctx = recorder.CandidateContext(family.name, pname, anchor)
        try:
            with recorder.candidate_context(ctx):
                from torch.fx.experimental.symbolic_shapes import guard_or_false

                ok = guard_or_false(orig_check(match))
        except Exception as e:
            if run.strict:
                raise
            run.errors += 1
            msg = _describe_error(e)
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
        run = _current_run()
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
            raise _ApplyFailed(run.index.get(node), node.name, pname, e) from e
        run.fused += 1
        if before is not None:
            fused_rec.kernel = _custom_ops_in(n for n in graph.nodes if n not in before)
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


def _collapse(records: Sequence[recorder.CandidateRecord]) -> list[recorder.CandidateRecord]:
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


# --------------------------------------------------------------------------------------
# the pass
# --------------------------------------------------------------------------------------


def _graph_device(graph: torch.fx.Graph) -> torch.device | None:
    for n in graph.find_nodes(op="placeholder"):
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor):
            return v.device
    return None


def _has_anchor(graph: torch.fx.Graph, anchors: Iterable[Any]) -> bool:
    for a in anchors:
        targets = [a]
        if isinstance(a, torch._ops.OpOverloadPacket):
            targets = [getattr(a, o) for o in a.overloads()]
        for t in targets:
            if graph.find_nodes(op="call_function", target=t):
                return True
    return False


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
        from .. import __version__

        h = hashlib.sha256()
        h.update(f"emu_inductor {__version__}\n".encode())
        h.update(_files_digest(files))
        h.update(_stable_repr(self.pass_config).encode())
        h.update(_stable_repr([f.name for f in fams]).encode())
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
            self._run(graph)
        except Exception as e:
            if self.options.get("strict"):
                raise
            log.warning("emu_inductor: mxemu pass failed; the graph is left as Inductor "
                        "gave it: %s", _describe_error(e), exc_info=True)
            recorder.note(f"mxemu pass internal error: {_describe_error(e)}")
            _counters()["mxemu"]["internal_errors"] += 1
        finally:
            registry._set_current_options(prev)

    def _run(self, graph: torch.fx.Graph) -> None:
        fams = self._families()
        uuid = self.uuid()
        label = recorder.begin_graph(graph, uuid)
        _counters()["mxemu"]["pass_runs"] += 1
        log.debug("mxemu pass on graph %s (%d nodes), families %s, uuid %s", label,
                  len(graph.nodes), [f.name for f in fams], uuid)
        total = 0
        try:
            if not fams:
                return
            if self.options.get("remove_noop_ops"):
                from torch._inductor.fx_passes.post_grad import remove_noop_ops

                remove_noop_ops(graph)
            device = None
            for fam in fams:
                if fam.anchors and not _has_anchor(graph, fam.anchors):
                    log.debug("family %s skipped on graph %s: none of its anchor ops", fam.name,
                              label)
                    continue
                if fam.state == "new":
                    if device is None:
                        device = _graph_device(graph)
                    self._init_family(fam, device)
                if fam.state != "ready":
                    recorder.note(f"pattern family {fam.name} is disabled: {fam.error}")
                    continue
                total += self._run_family(fam, graph)
        finally:
            recorder.end_graph(label, total)
            log.debug("mxemu pass on graph %s done: %d candidate(s) fused", label, total)

    def _init_family(self, fam: registry.PatternFamily, device: torch.device | None) -> None:
        from torch._inductor.pattern_matcher import PatternMatcherPass

        with registry._lock:
            if fam.state != "new":
                return
            try:
                params = inspect.signature(fam.init_fn).parameters
                takes_device = "input_device" in params or any(
                    p.kind is p.VAR_KEYWORD for p in params.values())
            except (TypeError, ValueError):
                takes_device = False

            def _init(input_device: Any = None) -> Any:
                pm = PatternMatcherPass(pass_name=f"mxemu_{fam.name}")
                if takes_device:
                    fam.init_fn(pm, input_device=input_device)
                else:
                    fam.init_fn(pm)
                return pm

            try:
                pm = _compat.init_once_fakemode(_init)(device)
                n = 0
                for (_op, _target), entries in pm.patterns.items():
                    for entry in entries:
                        n += 1
                        _guard_entry(fam, entry, f"{fam.name}#{n}")
                fam.pm_pass = pm
                fam.state = "ready"
                log.debug("initialised pattern family %r: %d rule(s)", fam.name, n)
            except Exception as e:
                fam.state = "failed"
                fam.error = f"init failed: {_describe_error(e)}"
                log.warning("emu_inductor: pattern family %r failed to initialise and is "
                            "disabled for this process: %s", fam.name, _describe_error(e),
                            exc_info=True)
                _counters()["mxemu"]["internal_errors"] += 1
                if self.options.get("strict"):
                    raise

    def _run_family(self, fam: registry.PatternFamily, graph: torch.fx.Graph) -> int:
        strict = bool(self.options.get("strict"))
        excluded: set[int] = set()
        failures: list[recorder.CandidateRecord] = []
        counters = _counters()
        for _attempt in range(_MAX_APPLY_FAILURES + 1):
            run = _FamilyRun(fam, graph, excluded, strict)
            anchors = self._anchors(fam, graph) if self.options.get("report_unmatched") else []
            _tls.run = run
            try:
                with recorder.family_table(run.table):
                    fam.pm_pass.apply(graph)
            except _ApplyFailed as f:
                run.restore()
                counters["mxemu"]["internal_errors"] += 1
                log.warning("emu_inductor: pattern %s/%s failed while rewriting node %s; "
                            "graph restored, candidate left alone: %s", fam.name, f.pattern,
                            f.anchor, _describe_error(f.error), exc_info=True)
                failures.append(recorder.CandidateRecord(
                    kind=fam.name, node=f.anchor, target="", fused=False, kernel=None,
                    reason=f"internal error while rewriting with pattern {f.pattern}: "
                           f"{_describe_error(f.error)}",
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
                            _describe_error(e), exc_info=True)
                recorder.note(f"pattern family {fam.name} failed on graph "
                              f"{recorder._current_graph_label()}: {_describe_error(e)}")
                break
            finally:
                _tls.run = None
            self._commit(fam, run, failures, anchors)
            return run.fused
        # gave up on this family for this graph
        for rec in _collapse(failures):
            recorder.emit(rec)
        return 0

    @staticmethod
    def _anchors(fam: registry.PatternFamily, graph: torch.fx.Graph) -> list[torch.fx.Node]:
        out: list[torch.fx.Node] = []
        for op, target in fam.pm_pass.patterns:
            if op != "call_module":
                out.extend(graph.find_nodes(op=op, target=target))
        return out

    def _commit(self, fam: registry.PatternFamily, run: _FamilyRun,
                failures: list[recorder.CandidateRecord], anchors: list[torch.fx.Node]) -> None:
        order = {n.name: i for n, i in run.index.items()}
        records = sorted(_collapse([*failures, *run.table]),
                         key=lambda r: order.get(r.node, len(order)))
        seen = {r.node for r in records}
        for a in anchors:
            if not a._erased and a.name not in seen:
                records.append(recorder.make_record(
                    fam.name, a, False, None, f"no {fam.name} pattern matched at this node",
                    family=fam.name))
        for rec in records:
            recorder.emit(rec)
        counters = _counters()
        if run.fused:
            counters["mxemu"][fam.name] += run.fused
            counters["inductor"][f"mxemu_{fam.name}"] += run.fused
        if run.errors:
            counters["mxemu"]["internal_errors"] += run.errors


# --------------------------------------------------------------------------------------
# chaining with a pass the user already installed
# --------------------------------------------------------------------------------------


class _Chain(CustomGraphPass):
    """Runs several post-grad passes in order as ONE ``CustomGraphPass`` (torch 2.11
    accepts a single callable). ``uuid()`` combines the members' uuids and is None
    (no FX caching) if any member is not a ``CustomGraphPass`` or has no uuid."""

    def __init__(self, passes: Sequence[Any]) -> None:
        self.passes = tuple(passes)

    def __call__(self, graph: torch.fx.Graph) -> None:  # type: ignore[override]
        for p in self.passes:
            p(graph)

    def uuid(self) -> Any:
        ids = []
        for p in self.passes:
            if not isinstance(p, CustomGraphPass):
                return None
            u = p.uuid()
            if not u:
                return None
            ids.append(u)
        return ("mxemu-chain", *ids)

    def __repr__(self) -> str:
        return f"_Chain({', '.join(map(repr, self.passes))})"


if _compat.InferenceAwareGraphPass is not None:

    class _InferenceAwareChain(_Chain, _compat.InferenceAwareGraphPass):  # type: ignore[misc]
        """2.13: a chain holding a ``CustomInferenceAwareGraphPass`` must forward
        ``is_inference`` to it (post_grad only passes it to inference-aware passes)."""

        def __call__(self, graph: torch.fx.Graph, is_inference: bool = False) -> None:  # type: ignore[override]
            for p in self.passes:
                if isinstance(p, _compat.InferenceAwareGraphPass):
                    p(graph, is_inference=is_inference)
                else:
                    p(graph)
else:  # pragma: no cover - torch 2.11
    _InferenceAwareChain = None  # type: ignore[assignment,misc]


def _flatten(value: Any) -> list[Any]:
    out: list[Any] = []
    for p in _compat.flatten_custom_passes(value):
        if isinstance(p, _Chain):
            out.extend(_flatten(list(p.passes)))
        else:
            out.append(p)
    return out


def strip_mxemu_passes(value: Any) -> Any:
    """``value`` (a post_grad_custom_pre_pass setting) without any MxemuPass in it."""
    rest = [p for p in _flatten(value) if not isinstance(p, MxemuPass)]
    if not rest:
        return None
    if len(rest) == 1:
        return rest[0]
    return _make_chain(rest)


def _make_chain(passes: list[Any]) -> _Chain:
    if _InferenceAwareChain is not None and any(
            isinstance(p, _compat.InferenceAwareGraphPass) for p in passes):
        return _InferenceAwareChain(passes)
    return _Chain(passes)


def chain_passes(existing: Any, ours: MxemuPass) -> Any:
    """The value to install as ``post_grad_custom_pre_pass``: the user's existing
    pass(es) first, then ``ours``. An MxemuPass already in ``existing`` (from
    ``enable()`` or an outer backend) is dropped, so the pass never runs twice."""
    rest = [p for p in _flatten(existing) if not isinstance(p, MxemuPass)]
    if not rest:
        return ours
    return _make_chain([*rest, ours])
