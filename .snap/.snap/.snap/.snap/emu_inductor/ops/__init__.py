"""Fused ops: `torch.ops.mxemu.{moe, linear, grouped_mm}`, their dispatch to a backend
("triton": emu_inductor.kernels, "reference": the eager emulation) and all argument
validation at the op boundary (layer: imports formats, spec, reference, kernels).

library         the torch.library custom ops, fake implementations, backend dispatch
validate        argument checks (ValueError naming the argument; no device sync)
reference_impl  the ops computed by the eager reference
triton_impl     the ops computed by the generated kernels (imported lazily)
"""

from . import library
from ..kernels.autotune import autotune_time
from ..spec.opspec import OpSpec
from .library import OP_NAMES, register_backend_impl, select_backend

# autotune_time: the kernels' autotuning cost, for the compile report (passes reach the
# kernels only through this layer)
__all__ = ["OpSpec", "OP_NAMES", "register_backend_impl", "select_backend", "library", "autotune_time"]
