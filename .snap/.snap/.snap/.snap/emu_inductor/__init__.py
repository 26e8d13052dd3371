"""emu_inductor: fast microscaling (NVFP4 / MXFP4 / MXFP6 / MXFP8) MoE emulation for
torch.compile.

Layers (docs/architecture.md; enforced by tests/test_layering.py), each importing only
layers below it: formats <- spec <- reference <- patterns (the repo-root folder,
installed as emu_inductor.patterns) and recognize <- passes; spec <- kernels <- ops <-
passes (which call the ops only as torch.ops.mxemu.*) <- backend <- explain / demo / cli.
"""

from __future__ import annotations

import importlib as _importlib

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

__version__ = "0.1.0"

# Lazy re-exports: `import emu_inductor` imports neither transformers nor torch._inductor.
# `backend` and `explain` are submodules that are also callable (see
# emu_inductor/_compat.py::make_module_callable), so `emu_inductor.backend(**options)`
# and `emu_inductor.explain(model, *inputs)` work whether or not the submodule was
# imported before; `enable` / `disable` live in emu_inductor.backend.
_LAZY = {"backend": "backend", "explain": "explain", "enable": "backend", "disable": "backend",
         "compile_report": "backend"}  # compile-time split (passes/timings.py)
# Whole-model emulation (emu_inductor.models / .checkpoints import no transformers either).
_LAZY.update({"quantize_model": "models", "calibrate": "models", "load_checkpoint": "checkpoints"})
# Declaring user custom ops with a known format's semantics (patterns/opaque.py).
_LAZY.update({"register_dequant_op": "patterns.opaque", "register_qdq_op": "patterns.opaque"})


def __getattr__(name: str):
    mod_name = _LAZY.get(name)
    if mod_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = _importlib.import_module(f"{__name__}.{mod_name}")
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
    "compile_report",
    "quantize_model",
    "calibrate",
    "load_checkpoint",
    "register_dequant_op",
    "register_qdq_op",
]
