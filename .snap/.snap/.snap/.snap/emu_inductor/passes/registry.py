"""Pattern-family registry and the ``mxemu.*`` options.

A *pattern family* is a named group of pattern-matcher rules (e.g. all dtype variants
of "grouped GEMM over dequantised MXFP4 experts"). Pattern modules register a family at
import time; registration is cheap, because the rules are only traced when the mxemu
pass first runs (``init_fn`` is called lazily, once per process, outside the compile's
fake mode, through torch's ``init_once_fakemode``)::

    from emu_inductor.passes import register_pattern_family, register_replacement

    @register_pattern_family("linear_dequant", options={"linear_dequant.min_k": 32})
    def _init(pm_pass, input_device=None):
        register_replacement(search, replace, [torch.empty(8, 32), ...], pm_pass,
                             extra_check=_check, pattern_name="linear_dequant_bf16")

``init_fn(pm_pass)`` or ``init_fn(pm_pass, input_device=None)`` receives the family's
own ``torch._inductor.pattern_matcher.PatternMatcherPass`` and registers
``register_replacement`` / ``register_graph_pattern`` rules into it. A family whose rules
are traced once per dtype registers with ``per_dtype=True``: its ``init_fn`` also takes
``dtypes=`` (the dtypes of the anchor nodes' values in the graph being compiled) and is
called again, into the same pass, when a later graph brings dtypes it has not seen, so a
bf16 model never pays for the fp32 rules. Options a family
declares become valid ``mxemu.<name>`` backend options; read them at match time (in an
``extra_check``) with ``get_option(name)`` -- never at init time, which runs only once.

Built-in families: before its first run the pass imports, once, the modules listed in
``BUILTIN_FAMILY_MODULES``: ``emu_inductor.patterns`` (the repo-root ``patterns/``
folder, the catalogue of styles) and the family modules ``emu_inductor.passes.linear``,
``.grouped_mm`` and ``.moe``, which call ``register_pattern_family`` at import.

Registration only records data; no pattern is traced until the pass first runs.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .._logging import get_logger
from .recorder import note
from .timings import timed
from .verify import parse_verify

log = get_logger("passes")

__all__ = [
    "CORE_OPTIONS",
    "PACKED_DTYPES",
    "PatternFamily",
    "register_pattern_family",
    "unregister_pattern_family",
    "registered_families",
    "get_pattern_family",
    "load_builtin_families",
    "builtin_family_modules",
    "BUILTIN_FAMILY_MODULES",
    "resolve_options",
    "get_option",
    "current_options",
]

#: name -> (default, help). Valid as ``mxemu.<name>`` in ``torch.compile(options=...)``
#: and as keywords of ``emu_inductor.backend(...)`` / ``enable(...)`` / ``explain(...)``.
CORE_OPTIONS: dict[str, tuple[Any, str]] = {
    "emulate_precision_casts": (
        True,
        "set torch._inductor.config.emulate_precision_casts for the compile (round "
        "intermediates to their dtype like eager does)",
    ),
    "enabled_patterns": (None, "pattern families to run (names); None runs every registered one"),
    "disabled_patterns": ((), "pattern families not to run"),
    "strict": (
        False,
        "re-raise errors raised inside pattern families instead of leaving the graph "
        "unchanged (for debugging pattern code)",
    ),
    "remove_noop_ops": (False, "run Inductor's remove_noop_ops on the graph before matching"),
    "report_unmatched": (
        False,
        "also report anchor nodes (e.g. every aten.mm a family anchors on) that no pattern "
        "matched; explain(verbose=True) sets it",
    ),
    "verify": (
        False,
        "check every fused replacement against the subgraph it replaced during the first N "
        "calls: True (3 calls), N, 'fallback' or 'fallback:N' (warn and run the original on a "
        "mismatch instead of raising); see emu_inductor.passes.verify",
    ),
}

#: The dtypes packed weights and block scales are stored in: families whose every rule
#: dequantizes such a tensor declare ``requires_dtypes=PACKED_DTYPES`` and cost nothing on
#: graphs without one (an unquantized model).
PACKED_DTYPES = frozenset({torch.uint8, torch.int8, torch.float8_e4m3fn, torch.float8_e5m2} | (
    {torch.float8_e8m0fnu} if hasattr(torch, "float8_e8m0fnu") else set()))

#: Options the backend consumes itself; they are not part of the pass config/uuid.
BACKEND_ONLY_OPTIONS = frozenset({"emulate_precision_casts"})

OPTION_PREFIX = "mxemu."


@dataclasses.dataclass
class PatternFamily:
    name: str
    init_fn: Callable[..., Any]
    options: dict[str, Any]
    files: tuple[str, ...]
    description: str = ""
    order: int = 0
    anchors: tuple[Any, ...] = ()  # op targets; () = always run
    per_dtype: bool = False  # init_fn(..., dtypes=...) builds rules only for the dtypes it is given
    requires_dtypes: frozenset = frozenset()  # skip graphs holding no value of these dtypes
    # runtime state (owned by the pass)
    state: str = "new"  # "new" | "ready" | "failed"
    error: str | None = None
    pm_pass: Any = None  # PatternMatcherPass once initialised
    seq: int = 0
    dtypes_seen: frozenset = frozenset()  # per_dtype: the graph dtypes init_fn was given so far


_lock = threading.RLock()
_families: dict[str, PatternFamily] = {}
_seq = 0
_builtins_loaded = False


def _source_file(fn: Callable[..., Any]) -> str | None:
    try:
        path = inspect.getsourcefile(inspect.unwrap(fn))
    except (TypeError, OSError):
        return None
    return os.path.abspath(path) if path and os.path.exists(path) else None


def register_pattern_family(
    name: str,
    init_fn: Callable[..., Any] | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    files: Iterable[str] = (),
    description: str = "",
    order: int = 0,
    anchors: Iterable[Any] = (),
    replace: bool = False,
    per_dtype: bool = False,
    requires_dtypes: Iterable[Any] = (),
) -> Any:
    """Register a pattern family; usable as a decorator when ``init_fn`` is omitted.

    name:        unique family name; also the counter key (``counters["mxemu"][name]``,
                 ``counters["inductor"]["mxemu_" + name]``) and the explain() kind.
    init_fn:     ``init_fn(pm_pass)`` or ``init_fn(pm_pass, input_device=None)``; registers
                 rules into ``pm_pass``. Called lazily, once, outside fake mode.
    options:     ``{option_name: default}`` this family reads via ``get_option``. Names must
                 not clash with core options or other families' (prefix them with the
                 family name: ``"grouped_mm.min_tokens"``).
    files:       extra source files whose contents change the rewrite (hashed into the
                 pass uuid). The file defining ``init_fn`` and everything under
                 ``emu_inductor/`` and ``patterns/`` is always covered.
    order:       families run in ascending ``order``, then registration order.
    anchors:     optional op targets (``torch.ops.aten.mm.default`` or a whole packet like
                 ``torch.ops.aten._grouped_mm``) at least one of which every pattern of the
                 family contains. A graph without any of them skips the family entirely,
                 including its (possibly slow) first-use tracing. Recommended.
    replace:     allow re-registering an existing name (module reloads).
    per_dtype:   ``init_fn`` takes ``dtypes=`` (a frozenset of torch dtypes: those of the
                 anchor nodes' values, or of every node without anchors) and registers the
                 rules for those only; it is called again for dtypes a later graph brings.
    requires_dtypes: dtypes at least one node value of the graph must have for any rule
                 to match (``PACKED_DTYPES`` for families that dequantize packed weights);
                 other graphs skip the family, including its rule building.
    """
    if init_fn is None:
        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            register_pattern_family(name, fn, options=options, files=files,
                                    description=description, order=order, anchors=anchors,
                                    replace=replace, per_dtype=per_dtype,
                                    requires_dtypes=requires_dtypes)
            return fn

        return deco

    if not isinstance(name, str) or not name or not name.replace("_", "a").replace(".", "a").isalnum():
        raise ValueError(f"pattern family name must be a non-empty identifier-like string, got {name!r}")
    if not callable(init_fn):
        raise TypeError(f"init_fn must be callable, got {init_fn!r}")
    opts = dict(options or {})
    global _seq
    with _lock:
        if name in _families and not replace:
            raise ValueError(f"pattern family {name!r} is already registered "
                             "(unregister_pattern_family first, or pass replace=True)")
        for opt in opts:
            if opt in CORE_OPTIONS:
                raise ValueError(f"family {name!r}: option {opt!r} clashes with a core mxemu option")
            for other in _families.values():
                if other.name != name and opt in other.options:
                    raise ValueError(f"family {name!r}: option {opt!r} is already declared by "
                                     f"family {other.name!r}")
        all_files = [os.path.abspath(f) for f in files]
        src = _source_file(init_fn)
        if src:
            all_files.append(src)
        _seq += 1
        fam = PatternFamily(name=name, init_fn=init_fn, options=opts,
                            files=tuple(sorted(set(all_files))), description=description,
                            order=order, anchors=tuple(anchors), per_dtype=bool(per_dtype),
                            requires_dtypes=frozenset(requires_dtypes), seq=_seq)
        _families[name] = fam
    log.debug("registered pattern family %r (options=%s)", name, sorted(opts))
    return init_fn


def unregister_pattern_family(name: str) -> PatternFamily | None:
    """Remove a family (returns it, or None if it was not registered)."""
    with _lock:
        fam = _families.pop(name, None)
    if fam is not None:
        log.debug("unregistered pattern family %r", name)
    return fam


def get_pattern_family(name: str) -> PatternFamily:
    with _lock:
        return _families[name]


def registered_families() -> tuple[str, ...]:
    """Names of registered families, in application order."""
    with _lock:
        fams = sorted(_families.values(), key=lambda f: (f.order, f.seq))
    return tuple(f.name for f in fams)


def load_builtin_families() -> None:
    """Import the BUILTIN_FAMILY_MODULES once so they register their families."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    with _lock:
        if _builtins_loaded:
            return
        _builtins_loaded = True
        for mod in builtin_family_modules():
            try:
                with timed("families_import"):  # once per process: in compile_report()
                    importlib.import_module(mod)
            except Exception as e:  # never break a compile on a broken pattern module
                log.warning("emu_inductor: importing %s failed; its pattern families are "
                            "unavailable: %s: %s", mod, type(e).__name__, e, exc_info=True)
                note(f"importing {mod} failed: {type(e).__name__}: {e}")


#: Imported (once, lazily, in this order) to register the built-in families.
BUILTIN_FAMILY_MODULES = (
    "emu_inductor.patterns",
    "emu_inductor.passes.linear",
    "emu_inductor.passes.grouped_mm",
    "emu_inductor.passes.moe",
    "emu_inductor.passes.semantic",
    "emu_inductor.passes.semantic_bmm",
    "emu_inductor.passes.semantic_loop",
    "emu_inductor.passes.semantic_regather",
    "emu_inductor.passes.semantic_gate_up",
    "emu_inductor.passes.semantic_moe",
    "emu_inductor.passes.semantic_group",
    "emu_inductor.passes.semantic_loop_moe",
)


def builtin_family_modules() -> list[str]:
    """The modules imported to register the built-in families (``BUILTIN_FAMILY_MODULES``)."""
    return list(BUILTIN_FAMILY_MODULES)


# --------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------


def _all_declared() -> dict[str, Any]:
    declared = {k: v[0] for k, v in CORE_OPTIONS.items()}
    with _lock:
        for fam in _families.values():
            declared.update(fam.options)
    return declared


def _names(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
    try:
        names = tuple(value)
    except TypeError:
        raise TypeError(f"mxemu.{key} must be a family name or a list of names, got {value!r}") from None
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"mxemu.{key} must contain family names (str), got {n!r}")
    return names


def resolve_options(options: Mapping[str, Any] | None = None, *, check_families: bool = True) -> dict[str, Any]:
    """Validate and complete mxemu options (keys with or without the ``mxemu.`` prefix).

    Returns every declared option with its default filled in. Raises ValueError on
    unknown names (listing the valid ones) and on unknown family names in
    ``enabled_patterns`` / ``disabled_patterns``.
    """
    declared = _all_declared()
    out = dict(declared)
    for key, value in (options or {}).items():
        name = key[len(OPTION_PREFIX):] if key.startswith(OPTION_PREFIX) else key
        if name not in declared:
            raise ValueError(f"unknown mxemu option {key!r}; known options: "
                             f"{', '.join(sorted(declared))}")
        out[name] = value
    if out["enabled_patterns"] is not None:
        out["enabled_patterns"] = _names(out["enabled_patterns"], "enabled_patterns")
    out["disabled_patterns"] = _names(out["disabled_patterns"] or (), "disabled_patterns")
    for flag in ("strict", "remove_noop_ops", "emulate_precision_casts", "report_unmatched"):
        out[flag] = bool(out[flag])
    out["verify"] = parse_verify(out["verify"])  # VerifyMode or None (off)
    if check_families:
        known = set(registered_families())
        for key in ("enabled_patterns", "disabled_patterns"):
            for n in out[key] or ():
                if n not in known:
                    raise ValueError(f"mxemu.{key}: unknown pattern family {n!r}; registered: "
                                     f"{', '.join(sorted(known)) or '(none)'}")
    return out


_tls = threading.local()


def _set_current_options(opts: Mapping[str, Any] | None) -> Any:
    prev = getattr(_tls, "options", None)
    _tls.options = opts
    return prev


def current_options() -> Mapping[str, Any]:
    """Options of the mxemu pass running now (defaults outside a pass run)."""
    opts = getattr(_tls, "options", None)
    return opts if opts is not None else resolve_options(None, check_families=False)


def get_option(name: str, default: Any = None) -> Any:
    """Value of option ``name`` (no ``mxemu.`` prefix) for the pass running now."""
    if name.startswith(OPTION_PREFIX):
        name = name[len(OPTION_PREFIX):]
    return current_options().get(name, default)
