"""Concrete sizes of (possibly symbolic) shapes: the compile's size hints.

A post-grad graph compiled with dynamic shapes carries SymInts in its fake values and
shape arguments. Probes need real sizes; the hint (the size of the example the compile
was traced with) is the natural choice, and a verdict never depends on it: rows are
independent in every cone the recogniser accepts (the row factor is resized freely, see
`resize`), and a cone whose value depends on a symbolic size in another way is refused.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Optional

import torch

__all__ = ["hint", "concrete_shape", "is_symbolic", "assumed_sizes", "unhinted_symbols"]

#: sympy symbol -> int used as the hint of sizes that have none (see `assumed_sizes`)
_ASSUMED: contextvars.ContextVar = contextvars.ContextVar("mxemu_assumed_sizes", default={})


@contextlib.contextmanager
def assumed_sizes(values: dict):
    """Within the block, a size without a hint whose free symbols all have a value in
    `values` (sympy symbol -> int) gets that value as its hint. For a caller that proved the
    value does not matter: a per-expert loop's rows selected by `nonzero` have data-dependent
    counts (unbacked symbols), and a row-local QDQ over them is the same function at any row
    count, so it is evaluated at an assumed one (`resize` checks the row-locality)."""
    token = _ASSUMED.set({**_ASSUMED.get(), **values})
    try:
        yield
    finally:
        _ASSUMED.reset(token)


def unhinted_symbols(x) -> set:
    """Free symbols of a SymInt that has no hint (empty for ints and hinted sizes)."""
    if not isinstance(x, torch.SymInt):
        return set()
    try:
        hint(x)
        return set()
    except ValueError:
        return set(x.node.expr.free_symbols)


def hint(x) -> int:
    """int value of an int or SymInt (its hint); ValueError if it has none."""
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        node = x.node
        h = getattr(node, "hint", None)
        if h is not None:
            return int(h)
        env = getattr(node, "shape_env", None)
        if env is not None:
            try:
                return int(env.size_hint(node.expr))
            except Exception as e:  # no hint recorded (unbacked symbol)
                assumed = _ASSUMED.get()
                expr = node.expr
                if assumed and expr.free_symbols and all(s in assumed for s in expr.free_symbols):
                    return int(expr.xreplace(assumed))
                raise ValueError(f"size {x} has no hint") from e
    raise ValueError(f"size {x!r} is not an int or SymInt")


def is_symbolic(x) -> bool:
    return isinstance(x, torch.SymInt) and not isinstance(getattr(x.node, "maybe_as_int", lambda: None)(), int)


def concrete_shape(val) -> Optional[tuple[int, ...]]:
    """Hinted shape of a (fake) tensor value, None for non-tensors."""
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(hint(s) for s in val.shape)
