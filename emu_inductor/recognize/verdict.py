"""What recognition returns, and the cache that makes 48 identical layers cost one check.

A verdict names the graph nodes by role (codes, scale, float scale; activation x and its
global scale) and the matched variant; `guards` lists graph inputs whose VALUES the
verdict relied on (a LUT buffer, a constant held in a buffer): the pass must assert them
at run time (`_assert_async`), as its LUT guard does, or not fuse. A `Rejection` says why
nothing was matched; its `reason` is the text explain() shows.

Cache entries are keyed by a structural hash of the cone (op targets, literal arguments,
leaf dtypes and shapes, attribute-tensor bytes) and hold the verdict with its nodes
replaced by leaf positions, so the same cone elsewhere in the graph (the next layer)
maps back onto its own nodes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from typing import Optional

import torch
from torch.fx import Node

from .shapes import concrete_shape
from .variants import ActVariant, WeightVariant

__all__ = ["Guard", "WeightVerdict", "ActVerdict", "Rejection", "cone_key", "VerdictCache", "CACHE"]


@dataclasses.dataclass(frozen=True)
class Guard:
    """`node` (a graph input) must hold exactly `values` (float32 bits) at run time."""

    node: Node
    values: tuple
    what: str


@dataclasses.dataclass
class WeightVerdict:
    """The weight operand of a GEMM is `variant` applied to these leaves.

    codes [.., N, K*bits/8] and scale [.., N, K/block] are graph nodes (1-byte dtypes);
    alpha is the float scale node (None if the variant has none): a graph input, or a
    node computed from one (e.g. 1/weight_global_scale) that the cone reads.
    transpose: the operand is the dequantized [.., N, K] tensor transposed (.mT).
    kmajor: (codes, scale) each stored K-major, [.., K*bits/8, N] / [.., K/block, N]:
    the canonical tensor is that leaf transposed (.mT).
    """

    variant: WeightVariant
    codes: Node
    scale: Node
    alpha: Optional[Node]
    transpose: bool
    out_dtype: torch.dtype
    guards: tuple = ()
    equivalent: tuple = ()  # names of other variants that agreed on every probe
    separated: tuple = ()  # (variant name, probe text) for variants told apart (a few)
    seconds: float = 0.0
    cached: bool = False
    key: str = ""
    kmajor: tuple = (False, False)

    @property
    def kernel_supported(self) -> bool:
        return self.variant.kernel_supported

    @property
    def unsupported_reason(self) -> Optional[str]:
        return self.variant.unsupported_reason()

    def reference(self, codes, scale, alpha=None) -> torch.Tensor:
        """The GEMM operand this verdict says the cone computes, from the canonical
        [.., N, K*bits/8] / [.., N, K/block] tensors (a K-major leaf transposed)."""
        out = self.variant.reference(codes, scale, alpha, self.out_dtype)
        return out.mT if self.transpose else out

    def describe(self) -> str:
        s = f"weight: {self.variant.name}"
        if not self.kernel_supported:
            s += f" (not fused: {self.unsupported_reason})"
        return s


@dataclasses.dataclass
class ActVerdict:
    """The GEMM's activation operand is `post` applied to `variant`(x[, global_scale]).

    output: the QDQ result node (x's shape and dtype); post: layout nodes (row gathers,
    leading-dim reshapes) between it and the GEMM operand, innermost first. For
    variant.kind == "none" the operand is not quantized (x is the operand's source).
    global_value: the constant global scale an NVFP4 variant was proven with when the
    graph has none (global_scale is None; single-level NVFP4 is g = 1.0): the fused op
    must be given exactly this value."""

    variant: ActVariant
    x: Node
    global_scale: Optional[Node]
    output: Node
    post: tuple = ()
    guards: tuple = ()
    equivalent: tuple = ()
    separated: tuple = ()
    seconds: float = 0.0
    cached: bool = False
    key: str = ""
    global_value: Optional[float] = None

    @property
    def kernel_supported(self) -> bool:
        return self.variant.kernel_supported

    @property
    def unsupported_reason(self) -> Optional[str]:
        return self.variant.unsupported_reason()

    def act_quant(self):
        """The spec layer's ActQuant for this variant (None: not quantized)."""
        return self.variant.act_quant()

    def reference(self, x, global_scale=None) -> torch.Tensor:
        if global_scale is None and self.global_value is not None:
            global_scale = torch.tensor(self.global_value, dtype=torch.float32)
        return self.variant.reference(x, global_scale)

    def describe(self) -> str:
        s = f"activation: {self.variant.name}"
        if self.global_value is not None:
            s += f" at constant global scale {self.global_value:g} (the graph has none)"
        if not self.kernel_supported:
            s += f" (not fused: {self.unsupported_reason})"
        return s


@dataclasses.dataclass
class Rejection:
    """Nothing recognised; `reason` is for explain()."""

    side: str  # "weight" | "activation"
    node: Node  # the GEMM
    reason: str
    seconds: float = 0.0
    cached: bool = False
    key: str = ""

    kernel_supported = False

    def describe(self) -> str:
        return f"{self.side}: {self.reason}"


# --- structural hash --------------------------------------------------------------------------


def _arg_repr(a, index: dict) -> str:
    if isinstance(a, Node):
        return f"%{index[a]}" if a in index else f"?{type(a.meta.get('val')).__name__}"
    if isinstance(a, (list, tuple)):
        return "[" + ",".join(_arg_repr(x, index) for x in a) + "]"
    if isinstance(a, dict):
        return "{" + ",".join(f"{k}:{_arg_repr(v, index)}" for k, v in sorted(a.items())) + "}"
    if isinstance(a, torch.SymInt):
        return "sym"
    if isinstance(a, float):
        return float.hex(a)
    return repr(a)


def _leaf_repr(leaf: Node, attr_bytes) -> str:
    v = leaf.meta.get("val")
    if isinstance(v, torch.Tensor):
        try:
            shp = concrete_shape(v)
        except ValueError:
            shp = "sym"
        s = f"{leaf.op}:{v.dtype}:{shp}"
    else:
        s = f"{leaf.op}:{type(v).__name__}"
    if leaf.op == "get_attr":
        t = attr_bytes(leaf)
        if t is not None:
            s += ":" + hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
    return s


def cone_key(side: str, cone, attr_bytes, extra: str = "") -> str:
    """sha256 of the cone's structure (leaves in order, then each node's target and args)."""
    index = {leaf: i for i, leaf in enumerate(cone.leaves)}
    parts = [side, extra] + [_leaf_repr(leaf, attr_bytes) for leaf in cone.leaves]
    for i, n in enumerate(cone.nodes):
        index[n] = len(cone.leaves) + i
        parts.append(f"{n.target}({_arg_repr(n.args, index)};{_arg_repr(n.kwargs, index)})")
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor):
            parts.append(str(v.dtype))
    parts.append(f"out=%{index.get(cone.output, -1)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class VerdictCache:
    """key -> (abstract verdict, roles as leaf positions). Thread-safe, process-wide."""

    def __init__(self, max_entries: int = 4096):
        self._lock = threading.Lock()
        self._d: dict = {}
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0

    def get(self, key: str):
        with self._lock:
            e = self._d.get(key)
            if e is None:
                self.misses += 1
            else:
                self.hits += 1
            return e

    def put(self, key: str, entry) -> None:
        with self._lock:
            if len(self._d) >= self.max_entries:
                self._d.pop(next(iter(self._d)))
            self._d[key] = entry

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self.hits = self.misses = 0


CACHE = VerdictCache()
