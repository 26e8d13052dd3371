"""KernelSpec: everything the template needs to render one family of fused kernels.

It is derived from an `OpSpec` (the semantic configuration carried by the mxemu ops) plus
facts about the call that change the generated code: activation dtype, the shape class
of the weights' global scales (alpha), whether fp8 activation scales are static, and
whether the source targets Triton's interpreter (fp32 dot operands, exact integer
rounding for casts) or the GPU (bf16/fp16 dot operands, hardware RNE casts).

Tile sizes are not part of it: they are `tl.constexpr` arguments of the generated
kernels (one source file serves every tile config; Triton specialises per config).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Optional

import torch

from ..spec.opspec import OpSpec

__all__ = ["KernelSpec", "ALPHA_MODES", "alpha_mode_of"]

# How the NVFP4 weight global scale (dequantize direction) is shaped:
#   none (MX, or no alpha) | scalar (one value) | expert [E] / [E, 1] |
#   gate_up [E, 2] (first/second half of the weight's rows) | row [E, N]
ALPHA_MODES = ("none", "scalar", "expert", "gate_up", "row")

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def alpha_mode_of(alpha: Optional[torch.Tensor], E: int, N: int) -> str:
    if alpha is None:
        return "none"
    if alpha.numel() == 1:
        return "scalar"
    shape = tuple(alpha.shape)
    if shape in ((E,), (E, 1)):
        return "expert"
    if shape == (E, 2) and N != 2:
        return "gate_up"
    if shape == (E, N):
        return "row"
    raise ValueError(f"alpha: unsupported global-scale shape {shape} for E={E}, N={N}")


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    op: OpSpec
    dtype: str = "bf16"  # activation / output dtype: bf16 | fp16 | fp32
    alpha1: str = "none"  # alpha mode of the first GEMM's weight (w13 / linear / grouped weight)
    alpha2: str = "none"  # alpha mode of w2 (moe only)
    a1_static: bool = False  # fp8_tensor: static a1 scale given (else dynamic amax)
    a2_static: bool = False
    interpret: bool = False
    # per-expert GEMM biases (mxemu::moe / grouped_mm with bias): bias1 adds w13_bias[e] to
    # GEMM1's fp32 accumulator (gemm_act_kernel), bias2 makes gemm_out_kernel's bias
    # per expert ([E, NOUT], row e) instead of linear's one [NOUT] row. Left out of the
    # JSON (and so of the generated source and its digest) when False: bias-less kernels
    # render exactly as before these fields existed.
    bias1: bool = False
    bias2: bool = False

    def __post_init__(self):
        if self.dtype not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"dtype: expected bf16, fp16 or fp32, got {self.dtype!r}")
        for name in ("alpha1", "alpha2"):
            if getattr(self, name) not in ALPHA_MODES:
                raise ValueError(f"{name}: expected one of {ALPHA_MODES}, got {getattr(self, name)!r}")

    @staticmethod
    def dtype_name(dtype: torch.dtype) -> str:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: expected bfloat16, float16 or float32, got {dtype}")
        return _DTYPES[dtype]

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["op"] = self.op.to_dict()  # weight-reader fields only when not the default
        for k in ("bias1", "bias2"):
            if not d[k]:
                del d[k]
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def short_name(self) -> str:
        tag = "interp" if self.interpret else "gpu"
        bias = ("_b13" if self.bias1 else "") + ("_b2" if self.bias2 else "")
        return f"{self.op.short_name()}_{self.dtype}{bias}_{tag}".replace("-", "_").replace(".", "_")
