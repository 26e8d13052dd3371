"""Generated Triton kernels for the mxemu ops (layer: imports formats, spec; never ops).

kernel_spec KernelSpec: an OpSpec plus the call facts that change the generated code
render      renders Triton source from a KernelSpec (one template family, every scheme);
            render_helpers: the rendered helper functions (rounding, decode, scales, QDQ)
            recipe_source: NVFP4 activation recipes traced from formats.nvfp4.RECIPES and
            written as Triton (an operation it cannot write exactly refuses the recipe)
cache       per-user, hash-verified file cache of rendered modules (EMU_INDUCTOR_CACHE_DIR)
tiles       TileConfig and the tile strategy (candidates per token-count regime)
autotune    choosing a config: pinned, cached, autotuned, heuristic
routing     the one-program Triton routing prep kernel (decode sizes)
launch      the fused MoE / grouped GEMM / linear pipelines and their config choice, taking
            validated arguments as small dataclasses (ops validates at the op boundary)
launch_common  what the launchers share: the dataclasses, routing prep (moe_align), device
            constants, launch keywords, the MoE stages both MoE paths run
dequant_once   the prefill path that decodes each weight once per call and runs the GEMMs
            on the library (torch._grouped_mm, F.linear)
"""

from .autotune import pin_config
from .kernel_spec import KernelSpec
from .render import render
from .tiles import TileConfig

__all__ = ["KernelSpec", "TileConfig", "pin_config", "render"]
