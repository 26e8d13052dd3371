"""The ``mxemu`` torch.compile backend: stock Inductor plus our post-grad pattern pass.

Three ways in::

    torch.compile(model, backend="mxemu")                 # entry point, no import needed
    torch.compile(model, backend="mxemu", options={"mxemu.emulate_precision_casts": False,
                                                   "max_autotune": True})
    torch.compile(model, backend=emu_inductor.backend(emulate_precision_casts=False))

    with emu_inductor.enable():                          # stock backend="inductor"
        torch.compile(model)(x)

``emu_inductor.backend`` is this module *and* a callable: calling it with keywords
returns a configured ``MxemuBackend`` (same as ``make_backend``); calling it with
``(gm, example_inputs)`` compiles, so ``backend=emu_inductor.backend`` works too. The
module's class is swapped for a callable ModuleType subclass (see
``_compat.make_module_callable``); the entry point ``emu_inductor.backend:mxemu`` stays
a plain function. This module never calls ``register_backend("mxemu")``: the entry
point registers it, and a second registration raises "duplicate name".

How a compile is set up (spec 1.2-1.3): ``mode`` is translated with
``torch._inductor.list_mode_options`` (a custom backend gets the raw mode string);
``options`` keys starting with ``mxemu.`` are ours, the rest are Inductor config
patches (validated like ``torch.compile`` does for the inductor backend); ``freezing``
is patched to False unless the options ask for it (constant folding could dequantise
weights before our pass sees them); our ``MxemuPass`` is installed as
``post_grad_custom_pre_pass``, after any pass already configured there; then
``torch._inductor.compile_fx.compile_fx(gm, example_inputs, config_patches=...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch._dynamo.utils import counters
from torch._inductor import config, list_mode_options
from torch._inductor.compile_fx import compile_fx, compile_fx_inner
from torch._inductor.exc import InductorError
from torch._inductor.virtualized import V

from . import _compat
from ._logging import get_logger
from .passes import (MxemuPass, cache_replay, chain_passes, describe_error, note, registry,
                     strip_mxemu_passes)
from .passes.timings import CompileReport, compile_report, compile_timer

log = get_logger("backend")

__all__ = ["mxemu", "MxemuBackend", "make_backend", "enable", "disable", "EnableHandle",
           "compile_report", "CompileReport"]

_PREFIX = "mxemu."


def _split_options(options: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    ours: dict[str, Any] = {}
    inductor: dict[str, Any] = {}
    for key, value in (options or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"option names must be strings, got {key!r}")
        if key.startswith(_PREFIX):
            ours[key[len(_PREFIX):]] = value
        else:
            inductor[key.replace("-", "_")] = value
    return ours, inductor


def _check_inductor_options(options: Mapping[str, Any]) -> None:
    if not options:
        return
    known = config.get_config_copy()
    for key in options:
        if key not in known:
            raise RuntimeError(
                f"Unexpected optimization option {key!r} for the mxemu backend: not an "
                "Inductor config name (mxemu's own options start with 'mxemu.'; see "
                "emu_inductor.passes.CORE_OPTIONS)"
            )


def _mode_options(mode: str | None) -> dict[str, Any]:
    if not mode or mode == "default":
        return {}
    return dict(list_mode_options(mode))


def _inner_compile(*args: Any, **kwargs: Any) -> Any:
    """Inductor's ``compile_fx_inner`` (one forward or backward graph) under ``cache_replay``."""
    with cache_replay(), compile_timer():
        return compile_fx_inner(*args, **kwargs)


class MxemuBackend:
    """A configured mxemu backend (what ``emu_inductor.backend(**options)`` returns).

    mode:             default torch.compile mode ("max-autotune", ...); a ``mode=`` given
                      to torch.compile wins.
    inductor_options: default Inductor config patches; torch.compile ``options=`` win.
    **options:        mxemu options without the ``mxemu.`` prefix, e.g.
                      ``emulate_precision_casts=False``, ``enabled_patterns=["..."]``,
                      ``strict=True``, or options declared by pattern families.
    """

    __name__ = "mxemu"  # torch.compile uses it as the compiler name

    def __init__(self, *, mode: str | None = None,
                 inductor_options: Mapping[str, Any] | None = None, **options: Any) -> None:
        registry.load_builtin_families()
        self.mode = mode
        ours, ind = _split_options(inductor_options)
        if ours:
            raise ValueError(f"pass mxemu options as keywords, not in inductor_options: {sorted(ours)}")
        self.inductor_options = ind
        self.options = dict(options)
        registry.resolve_options(self.options, check_families=False)  # names only: fail early
        _check_inductor_options(self.inductor_options)
        _mode_options(mode)  # validate

    def config_patches(self, *, mode: str | None = None,
                       options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The Inductor ``config_patches`` a compile with these arguments uses."""
        call_ours, call_ind = _split_options(options)
        ours = {**self.options, **call_ours}
        ind = {**self.inductor_options, **call_ind}
        _check_inductor_options(ind)
        pass_ = MxemuPass(ours)
        patches: dict[str, Any] = _mode_options(mode if mode is not None else self.mode)
        patches["freezing"] = False
        patches["emulate_precision_casts"] = pass_.options["emulate_precision_casts"]
        patches.update(ind)
        existing = patches.get("post_grad_custom_pre_pass", config.post_grad_custom_pre_pass)
        patches["post_grad_custom_pre_pass"] = chain_passes(existing, pass_)
        return patches

    def __call__(self, gm: Any, example_inputs: Any, *, mode: str | None = None,
                 options: Mapping[str, Any] | None = None) -> Callable[..., Any]:
        patches = self.config_patches(mode=mode, options=options)
        self._cudagraphs = bool(patches.get("triton.cudagraphs"))
        log.debug("mxemu backend: compiling a graph of %d nodes (mode=%s, patches=%s)",
                  len(gm.graph.nodes), mode or self.mode,
                  {k: v for k, v in patches.items() if k != "post_grad_custom_pre_pass"})
        # a cache hit skips the pass: cache_replay() credits the replayed counts to
        # counters["mxemu"] (the lazily compiled backward graph through _inner_compile)
        # Dynamo's example inputs are the real tensors: the recogniser reads the values of
        # small inputs from them (a module-global LUT Dynamo lifted to a graph input,
        # recognize/leaves.py); every value a proof relies on is asserted at run time
        with cache_replay(), compile_timer(), V.set_real_inputs(example_inputs):
            try:
                return compile_fx(gm, example_inputs, inner_compile=_inner_compile,
                                  config_patches=patches)
            except InductorError as e:
                # only Inductor's own compile errors: Dynamo / AOTAutograd steer with
                # exceptions too (RestartAnalysis, TensorifyScalarRestartAnalysis), which
                # must pass through untouched
                strict = {**self.options, **_split_options(options)[0]}.get("strict")
                if strict:
                    raise
                # Inductor failed on a graph our pass may have rewritten (a node that
                # lowers nowhere, a layout a kernel does not take): compile the graph as
                # stock Inductor would rather than fail the user's compile. An error of
                # the user's own graph fails this second compile the same way.
                stock = dict(patches)
                stock["post_grad_custom_pre_pass"] = strip_mxemu_passes(patches["post_grad_custom_pre_pass"])
                why = describe_error(e)
                log.warning("emu_inductor: Inductor failed on the mxemu-rewritten graph; compiling it "
                            "without the mxemu pass (mxemu.strict=True re-raises): %s", why)
                note(f"compile fell back to stock Inductor: {why}")
                counters["mxemu"]["compile_fallbacks"] += 1
        return compile_fx(gm, example_inputs, inner_compile=_inner_compile, config_patches=stock)

    def reset(self) -> None:
        """Called by ``torch._dynamo.reset()``; mirrors the inductor backend's reset."""
        if getattr(self, "_cudagraphs", False) or config.triton.cudagraphs:
            try:
                from torch._inductor.cudagraph_trees import reset_cudagraph_trees

                reset_cudagraph_trees()
            except Exception:  # pragma: no cover - best effort
                pass

    def __repr__(self) -> str:
        parts = [f"{k}={v!r}" for k, v in self.options.items()]
        if self.mode:
            parts.insert(0, f"mode={self.mode!r}")
        if self.inductor_options:
            parts.append(f"inductor_options={self.inductor_options!r}")
        return f"MxemuBackend({', '.join(parts)})"


def make_backend(*, mode: str | None = None, inductor_options: Mapping[str, Any] | None = None,
                 **options: Any) -> MxemuBackend:
    """``emu_inductor.backend(**options)``: a backend callable with these options."""
    return MxemuBackend(mode=mode, inductor_options=inductor_options, **options)


_default: MxemuBackend | None = None


def _default_backend() -> MxemuBackend:
    global _default
    if _default is None:
        _default = MxemuBackend()
    return _default


def mxemu(gm: Any, example_inputs: Any, *, mode: str | None = None,
          options: Mapping[str, Any] | None = None) -> Callable[..., Any]:
    """The ``mxemu`` backend (entry point ``emu_inductor.backend:mxemu``).

    ``torch.compile(model, backend="mxemu", mode=..., options={...})`` calls this with
    ``mode=`` / ``options=`` only when they are set. Options starting with ``mxemu.`` are
    ours (see ``emu_inductor.passes.CORE_OPTIONS``); the rest patch Inductor's config.
    """
    return _default_backend()(gm, example_inputs, mode=mode, options=options)


def _reset() -> None:
    if _default is not None:
        _default.reset()


mxemu.reset = _reset  # type: ignore[attr-defined]  # torch.compile wrapper calls .reset()


# --------------------------------------------------------------------------------------
# opt-in for the stock inductor backend
# --------------------------------------------------------------------------------------


class EnableHandle:
    """Returned by ``enable()``; as a context manager it restores the previous config."""

    def __init__(self, saved_pass: Any, saved_epc: bool, pass_: Any) -> None:
        self.saved_pass = saved_pass
        self.saved_emulate_precision_casts = saved_epc
        self.pass_ = pass_
        self.active = True

    def restore(self) -> None:
        if not self.active:
            return
        config.post_grad_custom_pre_pass = self.saved_pass
        config.emulate_precision_casts = self.saved_emulate_precision_casts
        # this restore also undoes every enable() made after this one
        idx = next((i for i, h in enumerate(_enabled) if h is self), None)
        if idx is not None:
            for h in _enabled[idx:]:
                h.active = False
            del _enabled[idx:]
        self.active = False
        _set_replay_callbacks(bool(_enabled))

    def __enter__(self) -> EnableHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def __repr__(self) -> str:
        return f"EnableHandle(active={self.active}, pass={self.pass_!r})"


_enabled: list[EnableHandle] = []
_replays: list[Any] = []  # open cache_replay() contexts of Dynamo compiles (enable() path)


def _replay_start(_args: Any) -> None:
    cm = cache_replay()
    cm.__enter__()
    _replays.append(cm)


def _replay_end(_args: Any) -> None:
    if _replays:
        _replays.pop().__exit__(None, None, None)


def _set_replay_callbacks(on: bool) -> None:
    """With the stock backend nothing of ours runs on a cache hit, so enable() hooks the
    Dynamo compile callbacks (one outermost compile, or a lazy backward) to credit
    replayed counts to counters["mxemu"]. torch._dynamo.reset() clears them."""
    from torch._dynamo.callback import callback_handler

    if not hasattr(callback_handler, "end_callbacks"):  # pragma: no cover - older torch
        return
    registered = _replay_end in callback_handler.end_callbacks
    if on and not registered:
        callback_handler.register_start_callback(_replay_start)
        callback_handler.register_end_callback(_replay_end)
    elif not on and registered:
        callback_handler.remove_start_callback(_replay_start)
        callback_handler.remove_end_callback(_replay_end)


def enable(**options: Any) -> EnableHandle:
    """Install the mxemu pass into the stock Inductor backend's config.

    Sets ``torch._inductor.config.post_grad_custom_pre_pass`` to the previous value
    chained with an ``MxemuPass(options)`` and, unless ``emulate_precision_casts=False``,
    ``torch._inductor.config.emulate_precision_casts = True``. Returns a handle; use it as
    ``with emu_inductor.enable(): ...`` to restore both values on exit, or call
    ``emu_inductor.disable()``. Takes the same keywords as ``emu_inductor.backend()``
    minus mode/inductor options.
    """

    pass_ = MxemuPass(options)
    handle = EnableHandle(config.post_grad_custom_pre_pass, config.emulate_precision_casts, pass_)
    config.post_grad_custom_pre_pass = chain_passes(config.post_grad_custom_pre_pass, pass_)
    if pass_.options["emulate_precision_casts"]:
        config.emulate_precision_casts = True
    _enabled.append(handle)
    _set_replay_callbacks(True)
    log.debug("mxemu pass enabled for the stock inductor backend: %r", pass_)
    return handle


def disable() -> None:
    """Undo ``enable()``: restore the config from before the first active ``enable()``;
    with none active, just remove any MxemuPass from ``post_grad_custom_pre_pass``."""

    if _enabled:
        _enabled[0].restore()
    else:
        config.post_grad_custom_pre_pass = strip_mxemu_passes(config.post_grad_custom_pre_pass)
        _set_replay_callbacks(False)


def _module_call(*args: Any, **kwargs: Any) -> Any:
    """``emu_inductor.backend(**options)`` -> ``MxemuBackend``; with ``(gm, example_inputs)``
    it compiles like ``mxemu`` (so ``backend=emu_inductor.backend`` works as well)."""
    if args:
        return mxemu(*args, **kwargs)
    return make_backend(**kwargs)


_compat.make_module_callable(__name__, _module_call)
