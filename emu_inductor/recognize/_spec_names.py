"""The spec-layer names the recogniser hands to the pass (ActQuant), from wherever the
tree currently keeps them (`emu_inductor.spec`, formerly `emu_inductor.reference`)."""

try:
    from ..spec import ActQuant
except ImportError:  # pragma: no cover - before the spec layer existed
    from ..reference import ActQuant

__all__ = ["ActQuant"]
