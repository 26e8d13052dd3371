"""The one catalogue of emulation styles, each registered with the GEMM forms it applies to.

A style module declares a factory with a decorator::

    @dequant_style("linear", "loop", "grouped_mm")
    def my_dequant_styles(batched: bool) -> list[DequantStyle]: ...

    @qdq_style("linear")
    def my_qdq_styles() -> list[QDQStyle]: ...

and the pattern families ask the catalogue, never a hand-kept list:
``dequant_styles_for("grouped_mm")``, ``qdq_styles_for("linear")``.

GEMM forms (``GEMM_FORMS``), i.e. where the passes use a style:
  linear      one [N, K] weight, ``mm`` / ``addmm`` (``passes.linear``); dequant
              factories are called with batched=False
  loop        ``gemm_style="loop"``: a per-expert ``mm`` on one batched [E, N, K]
              dequant (``passes.linear``); batched=True
  grouped_mm  ``torch._grouped_mm`` / gathered ``bmm`` over batched weights
              (``passes.grouped_mm``, and so ``passes.moe``); batched=True
Order matters: styles are tried in registration order (module import order in
``patterns/__init__.py``, then definition order), which decides the bigger match first.
Each call returns fresh style objects (the factories run again), as the families expect.
Which QDQ goes with which dequant is not decided here: ``emu_inductor.spec.compat``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

__all__ = ["GEMM_FORMS", "dequant_style", "qdq_style", "dequant_styles_for", "qdq_styles_for", "registered"]

GEMM_FORMS = ("linear", "loop", "grouped_mm")


@dataclasses.dataclass(frozen=True)
class _Entry:
    factory: Callable
    forms: frozenset


_DEQUANT: list[_Entry] = []
_QDQ: list[_Entry] = []


def _register(table: list, forms: tuple) -> Callable:
    if not forms:
        raise ValueError(f"forms: expected at least one of {GEMM_FORMS}")
    for f in forms:
        if f not in GEMM_FORMS:
            raise ValueError(f"forms: unknown GEMM form {f!r}; expected one of {GEMM_FORMS}")

    def deco(factory: Callable) -> Callable:
        table[:] = [e for e in table if e.factory.__qualname__ != factory.__qualname__
                    or e.factory.__module__ != factory.__module__]  # a module reload replaces its entry
        table.append(_Entry(factory, frozenset(forms)))
        return factory

    return deco


def dequant_style(*forms: str) -> Callable:
    """Register ``factory(batched: bool) -> list[DequantStyle]`` for the given GEMM forms."""
    return _register(_DEQUANT, forms)


def qdq_style(*forms: str) -> Callable:
    """Register ``factory() -> list[QDQStyle]`` for the given GEMM forms."""
    return _register(_QDQ, forms)


def _check_form(form: str) -> None:
    if form not in GEMM_FORMS:
        raise ValueError(f"form: unknown GEMM form {form!r}; expected one of {GEMM_FORMS}")


def dequant_styles_for(form: str) -> list:
    """Every registered dequant style that applies to `form`, in registration order."""
    _check_form(form)
    batched = form != "linear"
    return [s for e in _DEQUANT if form in e.forms for s in e.factory(batched)]


def qdq_styles_for(form: str) -> list:
    """Every registered activation QDQ style that applies to `form`, in registration order."""
    _check_form(form)
    return [s for e in _QDQ if form in e.forms for s in e.factory()]


def registered() -> dict[str, list[tuple[str, tuple[str, ...]]]]:
    """{"dequant": [(factory name, forms)], "qdq": [...]} (docs, tests)."""
    def rows(table):
        return [(e.factory.__name__, tuple(f for f in GEMM_FORMS if f in e.forms)) for e in table]
    return {"dequant": rows(_DEQUANT), "qdq": rows(_QDQ)}
