"""emu_inductor: fast microscaling (NVFP4 / MXFP4 / MXFP6 / MXFP8) MoE emulation for
torch.compile.

Layers, each importing only the ones before it:
formats -> reference -> patterns -> codegen (kernel templates) / ops -> passes -> backend.
"""

from __future__ import annotations

import os as _os

from .formats import (
    FORMATS,
    MXFP4,
    MXFP6_E2M3,
    MXFP6_E3M2,
    MXFP8_E4M3,
    MXFP8_E5M2,
    NVFP4,
    BlockFormat,
    QuantizedTensor,
    dequantize,
    fake_quantize,
    pack,
    quantize,
    unpack,
)

# Running from a source checkout without `pip install`: the repo-root folder patterns/
# is this package's `emu_inductor.patterns` (pyproject maps it when installed).
# A finder for exactly that one name, rather than the repo root on __path__: with the
# root on __path__ every repo folder, emu_inductor itself included, became a subpackage
# (emu_inductor.emu_inductor.emu_inductor...), and torch's TORCH_LOGS="+emu_inductor" /
# set_logs(modules=...) walk of the package's submodules (torch 2.13) never ended.
_root_patterns = _os.path.join(_os.path.dirname(_os.path.dirname(__file__)), "patterns")
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "patterns")) and _os.path.isdir(
    _root_patterns
):
    import sys as _sys

    class _RootPatternsFinder:
        @staticmethod
        def find_spec(fullname, path=None, target=None):
            if fullname != __name__ + ".patterns":
                return None
            import importlib.util

            return importlib.util.spec_from_file_location(
                fullname,
                _os.path.join(_root_patterns, "__init__.py"),
                submodule_search_locations=[_root_patterns],
            )

    if not any(type(f).__name__ == "_RootPatternsFinder" for f in _sys.meta_path):
        _sys.meta_path.append(_RootPatternsFinder())

__version__ = "0.1.0"

# Lazy re-exports: `import emu_inductor` imports neither transformers nor torch._inductor.
# `backend` and `explain` are submodules that are also callable (see
# emu_inductor/_compat.py::make_module_callable), so `emu_inductor.backend(**options)`
# and `emu_inductor.explain(model, *inputs)` work whether or not the submodule was
# imported before; `enable` / `disable` live in emu_inductor.backend.
_LAZY = {"backend": "backend", "explain": "explain", "enable": "backend", "disable": "backend"}
# Whole-model emulation (emu_inductor.models / .checkpoints import no transformers either).
_LAZY.update({"quantize_model": "models", "calibrate": "models", "load_checkpoint": "checkpoints"})
# Declaring user custom ops with a known format's semantics (patterns/opaque.py).
_LAZY.update({"register_dequant_op": "patterns.opaque", "register_qdq_op": "patterns.opaque"})


def __getattr__(name: str):
    mod_name = _LAZY.get(name)
    if mod_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module = importlib.import_module(f"{__name__}.{mod_name}")
    return module if name == mod_name else getattr(module, name)


__all__ = [
    "FORMATS",
    "NVFP4",
    "MXFP4",
    "MXFP6_E2M3",
    "MXFP6_E3M2",
    "MXFP8_E4M3",
    "MXFP8_E5M2",
    "BlockFormat",
    "QuantizedTensor",
    "quantize",
    "dequantize",
    "fake_quantize",
    "pack",
    "unpack",
    "backend",
    "enable",
    "disable",
    "explain",
    "quantize_model",
    "calibrate",
    "load_checkpoint",
    "register_dequant_op",
    "register_qdq_op",
]
