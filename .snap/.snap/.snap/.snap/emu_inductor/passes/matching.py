"""The one pattern-building API of the mxemu passes.

For pattern authors (public, re-exported by ``emu_inductor.passes``):

- ``fwd_only_post_grad``: the trace function to use for patterns matched by the mxemu
  pass. Inductor rewrites every ``aten.view`` to ``aten.reshape`` before the post-grad
  passes run, so a plain ``fwd_only`` pattern never matches (pitfall A).
- ``shape_agnostic_pattern`` / ``register_shape_agnostic_replacement``: patterns whose
  shape lists are ignored, so one pattern serves static and ``dynamic=True`` compiles
  (pitfall B). Their ``extra_check`` must then verify shapes and dtypes itself.
- ``register_replacement``: torch's ``register_replacement`` with our defaults, the
  2.11/2.13 keyword differences papered over, and a pattern name recorded on 2.11 too.
- ``meta_val`` / ``known_true``: read FakeTensor metadata in an ``extra_check`` without
  specialising symbolic sizes (``sym_eq(a, b)`` is ``known_true(a == b)``).

Shared with the built-in families (``passes.surgery`` builds their patterns): ``ANY_SHAPE``
(the one "any shape" sentinel) and ``SHAPE_ARGS`` (the one table of which op arguments
are sizes).

Rules (each learnt from a pattern that silently never matched): derive every dtype in a search
function from its inputs (``codes.to(x.dtype)``, pitfall C); pass Python scalars you
need to recover through ``scalar_workaround``; anchor patterns on the GEMM node, never
on a node consuming ``float8_e8m0fnu``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch._inductor import pattern_matcher as pm
from torch._inductor.fx_passes.post_grad import view_to_reshape
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import _compat

__all__ = [
    "ANY_SHAPE",
    "SHAPE_ARGS",
    "SIZE_SCALAR_ARGS",
    "DEFAULT_SHAPE_ARGS",
    "fwd_only_post_grad",
    "shape_agnostic_pattern",
    "register_replacement",
    "register_shape_agnostic_replacement",
    "meta_val",
    "known_true",
    "sym_eq",
    "guard_eq",
    "pattern_name_of",
]

aten = torch.ops.aten
prims = torch.ops.prims


class _AnyShape:
    """Sentinel put in place of a shape list; ``fx_to_pattern`` ignores it."""

    _instance: _AnyShape | None = None

    def __new__(cls) -> _AnyShape:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ANY_SHAPE"

    def __reduce__(self) -> Any:
        return (_AnyShape, ())


#: Stands for "any shape" in a pattern built by ``shape_agnostic_pattern``.
ANY_SHAPE = _AnyShape()


#: op -> positions of its size arguments (shape lists; a slice's start/end: row counts,
#: the gate/up split point). ``shape_agnostic_pattern`` replaces the lists among them by
#: ANY_SHAPE; ``surgery.build_pattern`` replaces every value there.
SHAPE_ARGS: Mapping[Any, tuple[int, ...]] = {
    aten.reshape.default: (1,),
    aten.view.default: (1,),
    aten.expand.default: (1,),
    aten._unsafe_view.default: (1,),
    aten.full.default: (0,),
    aten.empty.memory_format: (0,),
    aten.zeros.default: (0,),
    aten.ones.default: (0,),
    aten.new_zeros.default: (1,),
    aten.new_empty.default: (1,),
    aten.new_full.default: (1,),
    aten.empty_strided.default: (0, 1),
    aten.slice.Tensor: (2, 3),
}

#: Numbers that may be symbolic in the user's graph (sizes): ignored in these args.
SIZE_SCALAR_ARGS: Mapping[Any, tuple[int, ...]] = {
    aten.arange.default: (0,),
    aten.arange.start: (0, 1),
    prims.iota.default: (0,),
}

#: The former name of SHAPE_ARGS (``emu_inductor.passes.DEFAULT_SHAPE_ARGS``).
DEFAULT_SHAPE_ARGS = SHAPE_ARGS


def fwd_only_post_grad(fn: Callable[..., Any], args: Sequence[Any], **kwargs: Any) -> torch.fx.GraphModule:
    """``fwd_only`` + ``view_to_reshape``: traces a search/replace function into the form
    the post-grad graph has. ``**kwargs`` pass through (2.13 calls
    ``trace_fn(fn, args, get_decomp_fn=...)``, 2.11 calls ``trace_fn(fn, args)``)."""
    gm = pm.fwd_only(fn, args, **kwargs)
    view_to_reshape(gm)
    gm.recompile()
    return gm


def _argnames(fn: Callable[..., Any]) -> list[str]:
    return [*inspect.signature(fn).parameters.keys()]


def shape_agnostic_pattern(
    search_fn: Callable[..., Any],
    example_inputs: Sequence[Any],
    *,
    argnames: Sequence[str] | None = None,
    trace_fn: Callable[..., Any] = fwd_only_post_grad,
    shape_args: Mapping[Any, int | Iterable[int]] | None = None,
    ignore_types: Iterable[type] = (),
    scalar_workaround: Mapping[str, float | int] | None = None,
    exclusive_arg_names: Sequence[str] = (),
) -> Any:
    """Trace ``search_fn`` once and return a pattern with its shape lists ignored.

    Constants (masks, offsets, dtypes) stay exact; the size argument of every op in
    ``shape_args`` (default ``SHAPE_ARGS``: reshape/view/expand/_unsafe_view, the factory
    ops and slice bounds; only list/tuple values) becomes ``ANY_SHAPE`` and matches anything, and so do arguments of
    the types in ``ignore_types`` (``torch.device`` always: patterns are
    device-agnostic). Use it as ``register_replacement(..., search_fn_pattern=pat)``
    (or call ``register_shape_agnostic_replacement``), and check shapes/dtypes in
    ``extra_check``: torch skips its exact re-trace when a pattern is given.

    Why a sentinel: ``ignore_types=(list,)`` does not work (FX args are
    ``immutable_list``) and ignoring ``immutable_list`` would also wipe ``cat``'s list of
    nodes.
    """
    gm = trace_fn(search_fn, list(example_inputs))
    table: dict[Any, tuple[int, ...]] = dict(SHAPE_ARGS)
    for k, v in (shape_args or {}).items():
        table[k] = (v,) if isinstance(v, int) else tuple(v)
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in table:
            continue
        args = list(node.args)
        for i in table[node.target]:
            if i < len(args) and isinstance(args[i], (list, tuple)):
                args[i] = ANY_SHAPE
        node.args = tuple(args)
    gm.recompile()
    return pm.fx_to_pattern(
        gm,
        ignore_types=(_AnyShape, torch.device, *ignore_types),
        argnames=list(argnames) if argnames is not None else _argnames(search_fn),
        scalar_workaround=dict(scalar_workaround or {}),
        exclusive_arg_names=exclusive_arg_names,
    )


def _entries_of(pass_dicts: Any) -> list[Any]:
    dicts = pass_dicts if isinstance(pass_dicts, (list, tuple)) else [pass_dicts]
    out: list[Any] = []
    for d in dicts:
        patterns = d.patterns if isinstance(d, pm.PatternMatcherPass) else d
        for entries in patterns.values():
            out.extend(entries)
    return out


def pattern_name_of(entry: Any) -> str | None:
    """The pattern name of a pattern-matcher entry (ours on 2.11, torch's on 2.13)."""
    return getattr(entry, "_mxemu_pattern_name", None) or getattr(entry, "pattern_name", None)


def register_replacement(
    search_fn: Callable[..., Any],
    replace_fn: Callable[..., Any],
    example_inputs: Sequence[Any],
    pass_dicts: Any,
    *,
    trace_fn: Callable[..., Any] = fwd_only_post_grad,
    extra_check: Callable[[Any], bool] | None = None,
    scalar_workaround: Mapping[str, float | int] | None = None,
    exclusive_arg_names: Sequence[str] = (),
    search_fn_pattern: Any = None,
    skip_duplicates: bool = False,
    pattern_name: str | None = None,
) -> Any:
    """torch's ``register_replacement`` for mxemu pattern families.

    Note the argument order: ``pass_dicts`` (the ``pm_pass`` your family's init received)
    comes 4th, and ``trace_fn`` is a keyword defaulting to ``fwd_only_post_grad``.
    ``pattern_name`` (default: ``search_fn.__name__``) is what explain() shows.

    How torch matches: a loose pattern (ints, floats, lists, devices, dtypes ignored)
    finds candidates; then ``search_fn`` is re-traced with the candidate's FakeTensor
    values and must match exactly; then ``extra_check(match)`` runs; then ``replace_fn``
    is traced with the same fake arguments. All of that runs inside the mxemu pass's
    guard: an exception leaves the candidate alone and is reported, never raised.
    """
    kwargs: dict[str, Any] = {
        "scalar_workaround": dict(scalar_workaround) if scalar_workaround else None,
        "exclusive_arg_names": tuple(exclusive_arg_names),
        "search_fn_pattern": search_fn_pattern,
        "skip_duplicates": skip_duplicates,
        "pattern_name": pattern_name or getattr(search_fn, "__name__", None),
    }
    if extra_check is not None:
        kwargs["extra_check"] = extra_check
    before = {id(e) for e in _entries_of(pass_dicts)}
    result = _compat.register_replacement(search_fn, replace_fn, example_inputs, trace_fn,
                                          pass_dicts, **kwargs)
    name = kwargs["pattern_name"]
    for entry in _entries_of(pass_dicts):
        if id(entry) not in before:
            entry._mxemu_pattern_name = name
    return result


def register_shape_agnostic_replacement(
    search_fn: Callable[..., Any],
    replace_fn: Callable[..., Any],
    example_inputs: Sequence[Any],
    pass_dicts: Any,
    *,
    extra_check: Callable[[Any], bool] | None,
    trace_fn: Callable[..., Any] = fwd_only_post_grad,
    shape_args: Mapping[Any, int | Iterable[int]] | None = None,
    ignore_types: Iterable[type] = (),
    scalar_workaround: Mapping[str, float | int] | None = None,
    exclusive_arg_names: Sequence[str] = (),
    pattern_name: str | None = None,
) -> Any:
    """``shape_agnostic_pattern`` + ``register_replacement(search_fn_pattern=...)``.

    ``extra_check`` is required (pass None explicitly to opt out): with a precomputed
    pattern torch does not re-check shapes, so the check must verify dtypes, packing
    and block-size relations (use ``meta_val`` and ``known_true``).
    """
    pat = shape_agnostic_pattern(
        search_fn, example_inputs, trace_fn=trace_fn, shape_args=shape_args,
        ignore_types=ignore_types, scalar_workaround=scalar_workaround,
        exclusive_arg_names=exclusive_arg_names,
    )
    return register_replacement(
        search_fn, replace_fn, example_inputs, pass_dicts, trace_fn=trace_fn,
        extra_check=extra_check, scalar_workaround=scalar_workaround,
        exclusive_arg_names=exclusive_arg_names, search_fn_pattern=pat,
        pattern_name=pattern_name,
    )


def meta_val(node_or_value: Any) -> Any:
    """The FakeTensor (or SymInt, ...) behind a matched node; values pass through."""
    if isinstance(node_or_value, torch.fx.Node):
        return node_or_value.meta.get("val")
    return node_or_value


def known_true(cond: Any) -> bool:
    """True only if ``cond`` (a bool or SymBool) is statically known to hold. Never adds a
    guard or specialises a symbolic size, unlike ``bool()``/``int()``."""
    return bool(statically_known_true(cond))


def sym_eq(a, b) -> bool:
    """a == b provable without guarding or specialising (SymInts stay symbolic)."""
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # pragma: no cover - defensive
        return False


def guard_eq(a, b) -> bool:
    """a == b, specialising a symbolic size to its current value when that is what it is:
    the comparison installs a shape-env guard (Dynamo checks it on every call and recompiles
    when it fails), so use it only for sizes that are constants in practice (a LUT's 8)."""
    if sym_eq(a, b):
        return True
    try:
        return bool(a == b)  # SymBool -> guard on the hint's answer
    except Exception:  # pragma: no cover - no hint: cannot decide, leave the graph alone
        return False
