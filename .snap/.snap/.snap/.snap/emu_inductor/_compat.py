"""Shims over the differences between torch 2.11 (GPU machine) and 2.13 (CPU dev/CI).

Keep every ``hasattr``/signature probe of a private torch API in this file, so that a
torch upgrade is one file to review. Importing it imports torch._inductor (the probes
run at import): only the backend, explain and the passes import it, never
``import emu_inductor`` itself.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch._inductor.custom_graph_pass as cgp
from torch._inductor import config as inductor_config
from torch._inductor import pattern_matcher
from torch._inductor import utils as inductor_utils

__all__ = [
    "TORCH_VERSION",
    "PASS_LISTS_SUPPORTED",
    "InferenceAwareGraphPass",
    "flatten_custom_passes",
    "inductor_caches_disabled",
    "fresh_cache",
    "register_replacement",
    "init_once_fakemode",
    "make_module_callable",
]


def _parse_version(v: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", v)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


#: (major, minor) of the running torch, e.g. (2, 13).
TORCH_VERSION: tuple[int, int] = _parse_version(torch.__version__)


def _custom_graph_pass_module() -> types.ModuleType:
    return cgp


#: 2.13 accepts a list/tuple of passes in ``post_grad_custom_*_pass``; 2.11 only one.
#: We always install ONE object (our ``_Chain``) so the same code serves both.
PASS_LISTS_SUPPORTED: bool = hasattr(_custom_graph_pass_module(), "get_custom_graph_passes")

#: ``CustomInferenceAwareGraphPass`` (2.13 only; ``__call__(graph, is_inference)``), or None.
InferenceAwareGraphPass: type | None = getattr(
    _custom_graph_pass_module(), "CustomInferenceAwareGraphPass", None
)


def flatten_custom_passes(value: Any) -> list[Any]:
    """A ``post_grad_custom_*_pass`` config value as a list (None -> [])."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def fresh_cache() -> Any:
    """``torch._inductor.utils.fresh_cache()`` (named ``fresh_inductor_cache`` in old torch)."""
    fn = getattr(inductor_utils, "fresh_cache", None) or inductor_utils.fresh_inductor_cache
    return fn()


@contextmanager
def inductor_caches_disabled() -> Iterator[None]:
    """Make every Inductor compile in the block run the post-grad passes.

    Turns off the FX graph cache and the AOTAutograd cache (both of which would skip
    our pass on a hit) but keeps the C++/Triton kernel build caches, so it is much
    cheaper than ``fresh_cache()`` or ``force_disable_caches`` on the CPU box.
    """
    patches: dict[str, Any] = {"fx_graph_cache": False}
    if hasattr(inductor_config, "fx_graph_remote_cache"):
        patches["fx_graph_remote_cache"] = False
    fconfig = torch._functorch.config
    fpatches: dict[str, Any] = {}
    for name in ("enable_autograd_cache", "enable_remote_autograd_cache"):
        if hasattr(fconfig, name):
            fpatches[name] = False
    with inductor_config.patch(patches), fconfig.patch(fpatches):
        yield


# --------------------------------------------------------------------------------------
# pattern_matcher
# --------------------------------------------------------------------------------------


@functools.cache
def _register_replacement_params() -> frozenset[str]:
    return frozenset(inspect.signature(pattern_matcher.register_replacement).parameters)


def register_replacement(search_fn: Callable[..., Any], replace_fn: Callable[..., Any],
                         example_inputs: Any, trace_fn: Callable[..., Any], pass_dicts: Any,
                         **kwargs: Any) -> bool:
    """``pattern_matcher.register_replacement`` that drops keywords the running torch lacks.

    2.11 has no ``pattern_name`` / ``get_decomp_fn``; 2.13 requires ``example_inputs``
    to be a list or tuple (we convert).
    """
    params = _register_replacement_params()
    kwargs = {k: v for k, v in kwargs.items() if k in params}
    return pattern_matcher.register_replacement(
        search_fn, replace_fn, list(example_inputs), trace_fn, pass_dicts, **kwargs
    )


def init_once_fakemode(fn: Callable[..., Any]) -> Callable[..., Any]:
    """torch's ``init_once_fakemode``: runs ``fn`` outside the compile's fake mode, in a
    fresh ``FakeTensorMode``, once per argument set.

    2.11 calls ``fn(input_device)`` positionally, 2.13 passes ``input_device=`` /
    ``get_decomp_fn=`` only when ``fn`` declares them: define ``fn(input_device=None)``.
    """
    return pattern_matcher.init_once_fakemode(fn)


# --------------------------------------------------------------------------------------
# Python-level shim: a module that can be called like a function
# --------------------------------------------------------------------------------------


def make_module_callable(module_name: str, fn: Callable[..., Any]) -> None:
    """Make ``sys.modules[module_name](...)`` call ``fn(...)``.

    Used for ``emu_inductor.backend`` and ``emu_inductor.explain``: each is both a
    submodule (the entry point ``emu_inductor.backend:mxemu`` must stay valid) and the
    public callable of the same name. Importing a submodule always rebinds the package
    attribute to the module object, so a lazy package ``__getattr__`` alone cannot
    return a function there; swapping the module's class for a callable ModuleType
    subclass can (allowed since Python 3.5).
    """
    module = sys.modules[module_name]

    class _CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

    _CallableModule.__name__ = f"CallableModule[{module_name}]"
    _CallableModule.__call__.__doc__ = fn.__doc__
    module.__class__ = _CallableModule
