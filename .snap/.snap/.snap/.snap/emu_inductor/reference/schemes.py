"""Compatibility name: the schemes moved to `emu_inductor.spec.schemes` (one definition)."""

from ..spec.schemes import ALIASES, SCHEMES, ActQuant, Scheme, get_scheme

__all__ = ["Scheme", "SCHEMES", "get_scheme", "ActQuant", "ALIASES"]
