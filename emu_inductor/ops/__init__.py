"""Fused ops (layer 4): `torch.ops.mxemu.{moe, linear, grouped_mm}` and their backends."""

from . import library
from .library import OP_NAMES, register_backend_impl, select_backend
from .spec import OpSpec

__all__ = ["OpSpec", "OP_NAMES", "register_backend_impl", "select_backend", "library"]
