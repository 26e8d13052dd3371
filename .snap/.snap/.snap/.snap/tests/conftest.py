"""Test setup shared by every test module.

TRITON_INTERPRET is read when a @triton.jit decorator runs, so it is set here, before
any module that defines kernels is imported: on a machine without a GPU the generated
kernels run under Triton's interpreter.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests run from a source checkout as well as from an installed package.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _ops_on_gpu() -> None:
    """EMU_INDUCTOR_TEST_ON_GPU=1 (on a CUDA machine): the kernel tests' calls of the Triton
    ops run the compiled GPU kernels -- arguments moved to the GPU, results moved back -- so
    the same CPU reference checks (bit for bit where the tests ask for it) verify the GPU
    code generator's variants, not the interpreter's. Patched before any test module
    imports the ops."""
    import functools

    import emu_inductor.ops.triton_impl as ti

    def move(x, dev):
        if isinstance(x, torch.Tensor):
            return x if x.device.type == "meta" else x.to(dev)  # meta: validation must refuse it first
        if isinstance(x, dict):
            return {k: move(v, dev) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(move(v, dev) for v in x)
        return x

    def on_gpu(fn):
        @functools.wraps(fn)
        def run(*args, **kw):
            return move(fn(*move(args, "cuda"), **move(kw, "cuda")), "cpu")
        return run

    for name in ("linear_triton", "grouped_mm_triton", "moe_triton"):
        setattr(ti, name, on_gpu(getattr(ti, name)))


if os.environ.get("EMU_INDUCTOR_TEST_ON_GPU") and torch.cuda.is_available():
    _ops_on_gpu()
