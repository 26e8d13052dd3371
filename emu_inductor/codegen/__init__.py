"""Generated Triton kernels for the mxemu ops (layer: imports formats, reference, ops.spec).

template    renders Triton source from a KernelSpec (one template family, every scheme)
cache       per-user, hash-verified file cache of rendered modules (EMU_INDUCTOR_CACHE_DIR)
autotune    tile configs per token-count regime, disk-cached autotuning, pinning
launcher    routing prep and the fused MoE / grouped GEMM / linear pipelines
"""

from .autotune import TileConfig, pin_config
from .kernel_spec import KernelSpec
from .template import render

__all__ = ["KernelSpec", "TileConfig", "pin_config", "render"]
