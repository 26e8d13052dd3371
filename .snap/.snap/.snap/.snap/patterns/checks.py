"""Precondition checks on the tensors of a matched subgraph.

Each check takes the FakeTensors (shapes may be symbolic) and returns None when the
fused op computes exactly what the matched code computes, or a human-readable reason
(shown by explain()) when that is not proven. Sizes are compared with a caller-given
`eq(a, b)` that proves equality without guarding (statically_known_true), so a check
never specialises a dynamic dimension.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..formats import BlockFormat

__all__ = ["check_weight", "check_activation_input", "check_global_scale"]

Eq = Callable[[object, object], bool]


def _const(v) -> Optional[int]:
    try:
        return int(v) if not isinstance(v, torch.SymInt) or v.node.is_constant() else None
    except Exception:
        return None


def check_weight(w, scale, alpha, fmt: BlockFormat, eq: Eq, *, batched: bool, K=None,
                 weight_dtype=torch.uint8) -> Optional[str]:
    """Packed weight [.., N, Kp], block scales [.., N, K/block], alpha (NVFP4 global)."""
    if w is None or scale is None:
        return "weight or scale has no metadata"
    nd = 3 if batched else 2
    if w.dim() != nd:
        return f"weight is {w.dim()}-d, expected {nd}-d"
    if w.dtype != weight_dtype:
        return f"weight is {w.dtype}, expected {weight_dtype} ({fmt.name})"
    want_s = fmt.scale.storage_dtype
    if scale.dtype != want_s:
        return f"scales are {scale.dtype}, expected {want_s}"
    if scale.dim() != nd:
        return f"scales are {scale.dim()}-d, expected {nd}-d"
    Kl = fmt.logical_size(w.shape[-1]) if weight_dtype == torch.uint8 else w.shape[-1]
    if K is not None and not eq(K, Kl):
        return f"activation K={K} does not match the weight's K={Kl}"
    for i in range(nd - 1):
        if not eq(scale.shape[i], w.shape[i]):
            return f"scale shape {tuple(scale.shape)} does not match weight shape {tuple(w.shape)}"
    nb = scale.shape[-1]
    if not eq(nb * fmt.block_size, Kl):
        kc, nc = _const(Kl), _const(nb)
        if kc is not None and nc:
            bs = kc / nc
            bs_s = str(int(bs)) if bs == int(bs) else f"{bs:g}"
            return f"block size {bs_s} not supported ({fmt.name} uses {fmt.block_size})"
        return f"block size not provably {fmt.block_size}"
    if fmt.has_global_scale:
        if alpha is not None:
            if alpha.dtype != torch.float32:
                return f"global scale is {alpha.dtype}, expected float32"
            if batched:
                if not (alpha.dim() == 1 and eq(alpha.shape[0], w.shape[0])) and not eq(alpha.numel(), 1):
                    return f"global scale shape {tuple(alpha.shape)} not supported (one per expert [E])"
            elif not eq(alpha.numel(), 1):
                return f"global scale has shape {tuple(alpha.shape)}, expected one value"
    elif alpha is not None:
        return f"{fmt.name} has no global scale"
    return None


def check_activation_input(x, eq: Eq, dtypes=(torch.bfloat16, torch.float16, torch.float32),
                           ndim: Optional[int] = 2) -> Optional[str]:
    """dtype and rank of a GEMM's activation (ndim=None: any rank)."""
    if x is None:
        return "activation has no metadata"
    if x.dtype not in dtypes:
        return f"activation dtype {x.dtype} not supported"
    if ndim is not None and x.dim() != ndim:
        return f"activation is {x.dim()}-d, expected [rows, K]"
    return None


def check_global_scale(g, eq: Eq, name="activation global scale") -> Optional[str]:
    if g is None:
        return None
    if g.dtype != torch.float32:
        return f"{name} is {g.dtype}, expected float32"
    if not eq(g.numel(), 1):
        return f"{name} has {g.numel()} elements, expected one"
    return None
