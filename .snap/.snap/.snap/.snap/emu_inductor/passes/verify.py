"""``mxemu.verify``: the fused graph checks itself against the subgraph it replaced.

The last line of defence against a proof with a hole (spec semantic_matching.md,
Soundness): with ``verify=N`` every fused replacement's output goes through
``mxemu_verify::check(fused_out, inputs, sizes, key)``. For the first N calls the op runs the
*original* subgraph eagerly on the same inputs and compares; a mismatch raises
``VerifyMismatch`` naming the subgraph (family, pattern, anchor node, the first original
nodes, user source line, max error and where). With ``verify="fallback"`` a mismatch
warns once (``VerifyWarning``) and that subgraph's original result is returned from then
on. After N clean calls the op only copies the fused output (no original, no sync).

How (compile time, inside ``MxemuPass``):
- ``wrap_entry`` wraps every rule's ``apply`` (outside the guard layer's wrapper): before
  the rewrite it extracts the match's cone (the match's nodes needed for its output;
  everything else becomes a placeholder) as a standalone ``GraphModule``; a cone that
  contains the output of an earlier fused replacement (``moe`` over two
  ``mxemu::grouped_mm``) inlines that replacement's original instead, so the check is
  always against what the user wrote. After the rewrite it notes which node now feeds the
  anchor's old users.
- ``finish_graph`` runs after every family (inserting the op earlier would hide the
  fused ops from later families) and puts ``mxemu_verify::check`` between each surviving fused
  output and those users.
- ``key`` carries the pickled original subgraph, its description and the mode, so a
  compiled graph loaded from the FX graph cache by another process can still check
  itself; the mode is part of the pass uuid (``verify`` is a rewrite option), so graphs
  compiled without verify are never reused for a verify compile or the reverse.

Costs, documented in docs/backend.md: a verified call runs the original subgraph eagerly
and compares on the host (a device sync); every call copies the fused output once
(custom ops may not return an input), also after the N checks; the op is tagged
``cudagraph_unsafe``. Inputs the original reads stay alive until the check (a QDQ shared
by several fused GEMMs is not dropped).
"""

from __future__ import annotations

import base64
import dataclasses
import math
import pickle
import threading
import uuid
import warnings
import zlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch._dynamo.utils import counters

from .._logging import get_logger
from . import recorder

log = get_logger("passes.verify")

__all__ = ["DEFAULT_VERIFY_CALLS", "VerifyMode", "VerifyMismatch", "VerifyWarning", "parse_verify",
           "compare", "wrap_entry", "begin_graph", "finish_graph", "end_graph", "reset_states"]

#: Calls verified when the option is ``True`` or ``"fallback"``.
DEFAULT_VERIFY_CALLS = 3
#: The contract for GEMM outputs (tests/corpus/oracle.assert_within_accumulation): an
#: fp32-accumulation ulp can flip a later fake-quantized element by a whole FP4 step, so
#: bound the size of the difference, not the count of differing elements.
MAX_ABS_FRACTION = 0.05
MEAN_ABS_FRACTION = 0.02
#: Original node names listed in a mismatch message.
_NAMES_SHOWN = 4
_KEY_PREFIX = "mxemu-verify-v1:"
#: Graph constants (LUTs) are embedded in the key up to this size; a bigger one: not verified.
_MAX_CONSTANT_BYTES = 1 << 16


class VerifyMismatch(RuntimeError):
    """A fused replacement disagreed with the subgraph it replaced (``mxemu.verify``)."""


class VerifyWarning(UserWarning):
    """``verify="fallback"``: a fused replacement disagreed; its original runs instead."""


@dataclasses.dataclass(frozen=True)
class VerifyMode:
    calls: int  # first N calls are checked
    fallback: bool  # on mismatch: warn and run the original instead of raising

    def __str__(self) -> str:
        return f"fallback:{self.calls}" if self.fallback else str(self.calls)


def parse_verify(value: Any, name: str = "mxemu.verify") -> VerifyMode | None:
    """The ``verify`` option: False/None/0 (off), True (3 calls), N >= 0, "fallback"
    (3 calls, fall back on mismatch) or "fallback:N". ValueError/TypeError otherwise."""
    if value is None or value is False:
        return None
    if value is True:
        return VerifyMode(DEFAULT_VERIFY_CALLS, False)
    if isinstance(value, VerifyMode):
        return value if value.calls > 0 else None
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{name} must be >= 0 (number of calls to verify), got {value}")
        return VerifyMode(value, False) if value else None
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "fallback":
            return VerifyMode(DEFAULT_VERIFY_CALLS, True)
        if text.startswith("fallback:"):
            count = text.split(":", 1)[1]
            if count.isdigit():
                return VerifyMode(int(count), True) if int(count) else None
        raise ValueError(f"{name}: expected True, a number of calls, 'fallback' or "
                         f"'fallback:N', got {value!r}")
    raise TypeError(f"{name} must be a bool, an int or a str ('fallback'), got "
                    f"{type(value).__name__} {value!r}")


# --------------------------------------------------------------------------------------
# run time: the op and its per-subgraph state
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Payload:
    gm: torch.fx.GraphModule
    kinds: tuple[str, ...]  # per original input: "t" (from tensors) or "s" (from sizes)
    description: str
    calls: int
    fallback: bool


class _State:
    def __init__(self, payload: _Payload) -> None:
        self.payload = payload
        self.checked = 0
        self.falling_back = False
        self.broken = False  # the original could not run: stop checking
        self.lock = threading.Lock()


_states: dict[str, _State] = {}
_states_lock = threading.Lock()


def reset_states() -> None:
    """Forget every subgraph's call count (the next calls are verified again)."""
    with _states_lock:
        _states.clear()


def _encode(payload: _Payload) -> str:
    raw = pickle.dumps({"gm": payload.gm, "kinds": payload.kinds, "description": payload.description,
                        "calls": payload.calls, "fallback": payload.fallback, "uid": uuid.uuid4().hex})
    return _KEY_PREFIX + base64.b64encode(zlib.compress(raw, 9)).decode("ascii")


def _decode(key: str) -> _Payload:
    if not key.startswith(_KEY_PREFIX):
        raise ValueError(f"mxemu_verify::check: key is not a verify payload: {key[:40]!r}")
    d = pickle.loads(zlib.decompress(base64.b64decode(key[len(_KEY_PREFIX):])))
    return _Payload(d["gm"], tuple(d["kinds"]), d["description"], int(d["calls"]), bool(d["fallback"]))


def _state(key: str) -> _State:
    st = _states.get(key)
    if st is None:
        with _states_lock:
            st = _states.get(key)
            if st is None:
                st = _states[key] = _State(_decode(key))
    return st


def _run_original(p: _Payload, tensors: Sequence[torch.Tensor], sizes: Sequence[int]) -> torch.Tensor:
    it_t, it_s = iter(tensors), iter(sizes)
    args = [next(it_t) if k == "t" else next(it_s) for k in p.kinds]
    with torch.no_grad():
        out = p.gm(*args)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the original subgraph returned {type(out).__name__}, not a Tensor")
    return out


def compare(fused: torch.Tensor, ref: torch.Tensor) -> str | None:
    """None when ``fused`` meets the contract against ``ref``, else what differs.

    Bit-equal passes; float outputs may also differ within fp32-accumulation rounding
    (max |d| <= 5% of max(1, max |ref|), mean |d| <= 2% of max(1e-3, mean |ref|)) with NaN
    in the same places; integer/bool outputs must be equal."""
    if fused.shape != ref.shape or fused.dtype != ref.dtype:
        return (f"shape/dtype {tuple(fused.shape)} {fused.dtype} (fused) vs "
                f"{tuple(ref.shape)} {ref.dtype} (original)")
    if fused.numel() == 0:
        return None
    if not (fused.is_floating_point() or fused.is_complex()):
        diff = fused != ref
        if not bool(diff.any()):
            return None
        where = _index(int(diff.flatten().nonzero()[0]), fused.shape)
        return (f"{int(diff.sum())} of {fused.numel()} elements differ; first at {where}: "
                f"{fused[where].item()} (fused) vs {ref[where].item()} (original)")
    f, r = fused.detach().double(), ref.detach().double()
    nan_f, nan_r = torch.isnan(f), torch.isnan(r)
    if not torch.equal(nan_f, nan_r):
        where = _index(int((nan_f != nan_r).flatten().nonzero()[0]), fused.shape)
        return (f"NaN in different places; first at {where}: {fused[where].item()} (fused) vs "
                f"{ref[where].item()} (original)")
    same_inf = (f == r) | nan_f  # equal infinities (and NaN/NaN) are no difference
    d = torch.where(same_inf, torch.zeros_like(f), (f - r).abs())
    d = torch.nan_to_num(d, nan=math.inf)  # inf vs finite
    ra = torch.where(torch.isfinite(r), r.abs(), torch.zeros_like(r))
    max_d, max_r, mean_d, mean_r = d.max().item(), ra.max().item(), d.mean().item(), ra.mean().item()
    if max_d == 0.0:
        return None
    tol_max = MAX_ABS_FRACTION * max(1.0, max_r)
    tol_mean = MEAN_ABS_FRACTION * max(1e-3, mean_r)
    if max_d <= tol_max and mean_d <= tol_mean:
        return None
    where = _index(int(d.flatten().argmax()), fused.shape)
    return (f"max |fused - original| = {max_d:.6g} at {where} ({fused[where].item():.6g} vs "
            f"{ref[where].item():.6g}; allowed {tol_max:.6g}), mean |diff| = {mean_d:.6g} "
            f"(allowed {tol_mean:.6g}), {int((d > 0).sum())} of {d.numel()} elements differ")


def _index(flat: int, shape: Sequence[int]) -> tuple[int, ...]:
    out = []
    for s in reversed(list(shape)):
        out.append(flat % s)
        flat //= s
    return tuple(reversed(out))


def _fresh_like(fused: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    # a new tensor with the fake implementation's layout (empty_like(fused)): custom ops
    # may not return (an alias of) an input, and Inductor reads the result with fused's strides
    return torch.empty_like(fused).copy_(value)


# a verified call syncs with the host: not capturable in a CUDA graph (Inductor then leaves
# the graph uncaptured or partitions it around the check)
_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


@torch.library.custom_op("mxemu_verify::check", mutates_args=(), tags=_TAGS)
def verify_op(fused: torch.Tensor, tensors: list[torch.Tensor], sizes: list[int], key: str) -> torch.Tensor:
    """``fused`` (a fresh copy), checked against the original subgraph in ``key`` run on
    ``tensors``/``sizes`` during the first calls (see the module docstring)."""
    st = _state(key)
    p = st.payload
    with st.lock:
        if st.falling_back:
            return _fresh_like(fused, _run_original(p, tensors, sizes))
        if st.broken or st.checked >= p.calls:
            return fused.clone()
        st.checked += 1
        try:
            ref = _run_original(p, tensors, sizes)
        except Exception as e:  # the original itself fails: cannot check, keep the fused result
            st.broken = True
            counters["mxemu_verify"]["errors"] += 1
            warnings.warn(f"emu_inductor verify: could not run the original subgraph of {p.description} "
                          f"({type(e).__name__}: {e}); it is not verified", VerifyWarning, stacklevel=2)
            return fused.clone()
        counters["mxemu_verify"]["checks"] += 1
        problem = compare(fused, ref)
        if problem is None:
            return fused.clone()
        counters["mxemu_verify"]["mismatches"] += 1
        msg = (f"emu_inductor verify: the fused replacement of {p.description} disagrees with "
               f"the original subgraph on call {st.checked}: {problem}")
        if not p.fallback or ref.shape != fused.shape or ref.dtype != fused.dtype:
            raise VerifyMismatch(msg + " (verify=N raises; verify='fallback' runs the original instead)")
        st.falling_back = True
        warnings.warn(msg + "; running the original subgraph from now on", VerifyWarning, stacklevel=2)
        return _fresh_like(fused, ref)


@verify_op.register_fake
def _verify_fake(fused, tensors, sizes, key):
    return torch.empty_like(fused)


# --------------------------------------------------------------------------------------
# compile time: extracting the original, inserting the op
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Original:
    """One fused replacement: the node now feeding the anchor's old users, and its original."""
    out: torch.fx.Node
    users: list[torch.fx.Node]
    gm: torch.fx.GraphModule
    inputs: list[torch.fx.Node]
    kinds: tuple[str, ...]
    description: str
    mode: VerifyMode


class _GraphState:
    def __init__(self, mode: VerifyMode) -> None:
        self.mode = mode
        self.done: list[_Original] = []
        self.by_out: dict[torch.fx.Node, _Original] = {}
        self.skipped: list[str] = []


_tls = threading.local()


def begin_graph(option: Any) -> None:
    """Called by MxemuPass before the families run on a graph (option: ``verify``)."""
    mode = parse_verify(option)
    _tls.state = _GraphState(mode) if mode is not None else None


def end_graph() -> None:
    _tls.state = None


def _current() -> _GraphState | None:
    return getattr(_tls, "state", None)


def _val_kind(node: torch.fx.Node) -> str | None:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return "t"
    if isinstance(val, (int, torch.SymInt)) and not isinstance(val, bool):
        return "s"
    return None


def _cone(match: Any, anchor: torch.fx.Node) -> set[torch.fx.Node]:
    """The nodes the rewrite replaces: the match's call_function nodes, plus every pure
    ancestor all of whose users are in the set (what dead-code elimination drops after
    the rewrite; a semantic-family match is only the GEMM, its dequant cone is not in it).
    Keeping those inside the original keeps them out of the compiled graph."""
    cone = {n for n in match.nodes if n.op == "call_function"} | {anchor}
    stack = list(cone)
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a in cone or a.op != "call_function" or a.is_impure():
                continue
            if all(u in cone for u in a.users):
                cone.add(a)
                stack.append(a)
    return cone


def _extract(match: Any, anchor: torch.fx.Node, st: _GraphState) -> tuple[torch.fx.GraphModule, list, tuple, set]:
    """The cone of ``anchor`` (``_cone``) as a GraphModule; an earlier replacement's output
    inside it is expanded into that replacement's original; the other nodes it reads
    become inputs."""
    graph = anchor.graph
    inside = _cone(match, anchor)
    inlined = {n: st.by_out[n] for n in inside if n in st.by_out}
    needed: set[torch.fx.Node] = set()
    stack = [anchor]
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        needed.add(n)
        if n in inlined:
            stack.extend(inlined[n].inputs)
        elif n in inside:
            stack.extend(n.all_input_nodes)
    order = [n for n in graph.nodes if n in needed]
    root = torch.nn.Module()
    constants = {n: _constant(graph, n) for n in order if n not in inside and n.op == "get_attr"}
    externals = [n for n in order if n not in inside and n not in constants]
    kinds = []
    for n in externals:
        kind = _val_kind(n)
        if kind is None:
            raise ValueError(f"input {n.name} of the original subgraph is neither a tensor nor a size")
        kinds.append(kind)
    g = torch.fx.Graph()
    env: dict[torch.fx.Node, Any] = {}
    for i, n in enumerate(externals):
        env[n] = g.placeholder(f"in{i}_{n.name}")
    for i, (n, value) in enumerate(constants.items()):
        root.register_buffer(f"c{i}", value)
        env[n] = g.get_attr(f"c{i}")
    for n in order:
        if n in env:
            continue
        if n in inlined:
            earlier = inlined[n]
            val_map = {p: env[src] for p, src in zip(earlier.gm.graph.find_nodes(op="placeholder"),
                                                     earlier.inputs)}
            env[n] = g.graph_copy(earlier.gm.graph, val_map)
        else:
            env[n] = g.node_copy(n, env.__getitem__)
    g.output(env[anchor])
    for n in g.nodes:
        n.meta = {}
    gm = torch.fx.GraphModule(root, g)
    return gm, externals, tuple(kinds), inside


def _constant(graph: torch.fx.Graph, node: torch.fx.Node) -> torch.Tensor:
    """A graph constant read by the original (a LUT): it travels inside the key (a real
    tensor cannot be an input of the op; Inductor re-runs the fake kernel on inputs)."""
    value = graph.owning_module
    for part in str(node.target).split("."):
        value = getattr(value, part)
    if not isinstance(value, torch.Tensor) or isinstance(value, torch._subclasses.FakeTensor) \
            or value.device.type == "meta":
        raise ValueError(f"constant {node.target} of the original subgraph has no real value")
    if value.numel() * value.element_size() > _MAX_CONSTANT_BYTES:
        raise ValueError(f"constant {node.target} of the original subgraph is too large to embed")
    return value.detach().clone()


def _describe(family: str, pattern: str, cone: set, anchor: torch.fx.Node) -> str:
    names = [n.name for n in anchor.graph.nodes if n in cone]
    shown = ", ".join(names[:_NAMES_SHOWN]) + (", ..." if len(names) > _NAMES_SHOWN else "")
    where = recorder.make_record(family, anchor, True, None, "").location
    name = pattern if pattern.startswith(f"{family}/") else f"{family}/{pattern}"
    return (f"subgraph {name} at node {anchor.name} ({anchor.target})"
            f"{' from ' + where if where else ''} (original nodes: {shown}; {len(names)} in all)")


def _use_positions(node: torch.fx.Node) -> list[tuple[torch.fx.Node, list[int]]]:
    out = []
    for u in node.users:
        leaves = pytree.tree_leaves((u.args, u.kwargs))
        out.append((u, [i for i, a in enumerate(leaves) if a is node]))
    return out


def wrap_entry(entry: Any, family: str, pattern: str) -> None:
    """Wrap one pattern-matcher entry's ``apply`` so that, in verify mode, the original
    of every rewrite is kept (see the module docstring). Never fails the rewrite."""
    if getattr(entry, "_mxemu_verify_wrapped", False):
        return
    orig_apply = entry.apply

    def apply(match: Any, graph: torch.fx.Graph, node: torch.fx.Node) -> Any:
        st = _current()
        if st is None:
            return orig_apply(match, graph, node)
        prep = None
        try:
            outs = [n for n in match.output_nodes() if n is not None]
            if len(outs) != 1:
                raise ValueError(f"the match has {len(outs)} outputs")
            anchor = outs[0]
            gm, inputs, kinds, cone = _extract(match, anchor, st)
            prep = (anchor, _use_positions(anchor), gm, inputs, kinds,
                    _describe(family, pattern, cone, anchor))
        except Exception as e:
            st.skipped.append(f"{family}/{pattern} at {node.name}: {e}")
            log.debug("verify: %s/%s at %s not verified: %r", family, pattern, node.name, e)
        result = orig_apply(match, graph, node)
        if prep is not None:
            anchor, uses, gm, inputs, kinds, desc = prep
            try:
                _record(st, uses, gm, inputs, kinds, desc)
            except Exception as e:
                st.skipped.append(f"{desc}: {e}")
                log.debug("verify: %s not verified: %r", desc, e)
        return result

    entry.apply = apply
    entry._mxemu_verify_wrapped = True


def _record(st: _GraphState, uses, gm, inputs, kinds, desc) -> None:
    """After the rewrite: which node replaced the anchor at each of its old uses."""
    new = None
    users = []
    for u, positions in uses:
        if u._erased:
            continue
        leaves = pytree.tree_leaves((u.args, u.kwargs))
        for i in positions:
            cand = leaves[i] if i < len(leaves) else None
            if not isinstance(cand, torch.fx.Node):
                raise ValueError(f"user {u.name} no longer reads a node where the anchor was")
            if new is None:
                new = cand
            elif cand is not new:
                raise ValueError("the anchor's users read different replacement nodes")
        users.append(u)
    if new is None or not users:
        raise ValueError("no user of the replaced output is left")
    rec = _Original(new, users, gm, inputs, kinds, desc, st.mode)
    st.done.append(rec)
    st.by_out[new] = rec


def finish_graph(graph: torch.fx.Graph) -> int:
    """Insert ``mxemu_verify::check`` after every fused output still in ``graph``; returns how
    many. Called by MxemuPass after every family ran; never raises."""
    st = _current()
    if st is None:
        return 0
    inserted = 0
    for rec in st.done:
        try:
            inserted += _insert(graph, rec)
        except Exception as e:
            st.skipped.append(f"{rec.description}: {e}")
            log.warning("emu_inductor verify: could not insert the check for %s: %r", rec.description, e)
    for text in st.skipped:
        recorder.note(f"verify: not checked: {text}")
    if inserted:
        recorder.note(f"verify: {inserted} fused output(s) checked against their original subgraph "
                      f"for the first {st.mode.calls} call(s)"
                      f"{', falling back to the original on a mismatch' if st.mode.fallback else ''}")
    return inserted


def _insert(graph: torch.fx.Graph, rec: _Original) -> int:
    live = [n for n in (rec.out, *rec.inputs, *rec.users)]
    if any(n._erased or n.graph is not graph for n in live):
        return 0  # absorbed by a later replacement (checked there) or the graph was restored
    users = [u for u in rec.users if rec.out in u.all_input_nodes]
    if not users:
        return 0
    val = rec.out.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise ValueError(f"the fused output {rec.out.name} has no tensor metadata")
    index = {n: i for i, n in enumerate(graph.nodes)}
    last = max([rec.out, *rec.inputs], key=index.__getitem__)
    if any(index[u] <= index[last] for u in users):
        raise ValueError("an input of the original is computed after a user of the fused output")
    tensors = [n for n, k in zip(rec.inputs, rec.kinds) if k == "t"]
    sizes = [n for n, k in zip(rec.inputs, rec.kinds) if k == "s"]
    key = _encode(_Payload(rec.gm, rec.kinds, rec.description, rec.mode.calls, rec.mode.fallback))
    fake_mode = getattr(val, "fake_mode", None)
    if fake_mode is not None:
        with fake_mode:
            out_val = torch.empty_like(val)  # its own storage: the op's result aliases nothing
    else:
        out_val = val
    # everything that can fail is done: from here on the graph changes
    with graph.inserting_after(last):
        v = graph.call_function(torch.ops.mxemu_verify.check.default, (rec.out, tensors, sizes, key))
    v.meta["val"] = out_val
    for k in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if k in rec.out.meta:
            v.meta[k] = rec.out.meta[k]
    for u in users:
        u.replace_input_with(rec.out, v)
    return 1
