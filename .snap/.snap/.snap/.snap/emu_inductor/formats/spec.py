"""Every microscaling format described once, as data.

Kernels, patterns and the reference read these objects; nothing downstream re-derives
a format fact (max normal, bias, block size, packing) on its own.

Sources for the numbers: OCP MX v1.0 §5.3 (as restated in torchao `constants.py` and
the MX paper, arXiv 2310.10537) and NVIDIA's NVFP4 description; see docs/formats.md
for what was checked against which library.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

__all__ = [
    "ElementSpec",
    "ScaleSpec",
    "BlockFormat",
    "E2M1",
    "E2M3",
    "E3M2",
    "E4M3",
    "E5M2",
    "E8M0_SCALE",
    "E4M3_SCALE",
    "NVFP4",
    "MXFP4",
    "MXFP6_E2M3",
    "MXFP6_E3M2",
    "MXFP8_E4M3",
    "MXFP8_E5M2",
    "ELEMENTS",
    "FORMATS",
    "get_format",
    "get_element",
]


@dataclasses.dataclass(frozen=True)
class ElementSpec:
    """A small floating-point element type (sign, `ebits` exponent, `mbits` mantissa).

    `max_normal` is the largest finite magnitude; `emax` is its unbiased exponent, which
    the OCP FLOOR scale rule subtracts (`shared_exp = floor(log2 amax) - emax`).
    `nan_codes` / `inf_codes` list magnitude codes (sign bit clear) with special meaning.
    """

    name: str
    bits: int
    ebits: int
    mbits: int
    bias: int
    max_normal: float
    has_inf: bool
    nan_codes: tuple[int, ...] = ()
    inf_codes: tuple[int, ...] = ()
    torch_dtype: Optional[torch.dtype] = None

    @property
    def emax(self) -> int:
        # Unbiased exponent of the largest normal (E2M1 2, E2M3 2, E3M2 4, E4M3 8, E5M2 15).
        import math

        return int(math.floor(math.log2(self.max_normal)))

    @property
    def emin(self) -> int:
        """Unbiased exponent of the smallest normal (also the subnormal exponent)."""
        return 1 - self.bias

    @property
    def min_normal(self) -> float:
        return 2.0 ** self.emin

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.mbits)

    @property
    def sign_bit(self) -> int:
        return 1 << (self.ebits + self.mbits)

    @property
    def num_codes(self) -> int:
        return 1 << self.bits


@dataclasses.dataclass(frozen=True)
class ScaleSpec:
    """The per-block scale type: E8M0 (a power of two) for MX, E4M3 for NVFP4."""

    name: str
    element: Optional[ElementSpec]  # None for E8M0 (pure exponent, bias 127)
    storage_dtype: torch.dtype  # what the checkpoint/graph carries
    bias: int = 127


@dataclasses.dataclass(frozen=True)
class BlockFormat:
    """A block-scaled format: elements of `element`, one `scale` per `block_size`
    consecutive elements along the reduction axis, optionally one fp32 global scale.

    `pack_bits` is the storage width per element: 4 (two per byte, even element in the
    low nibble), 6 (four per three bytes) or 8 (one per byte).
    """

    name: str
    element: ElementSpec
    block_size: int
    scale: ScaleSpec
    has_global_scale: bool
    pack_bits: int

    @property
    def is_mx(self) -> bool:
        return self.scale.name == "e8m0"

    def packed_size(self, k: int) -> int:
        """Bytes along the packed axis for `k` logical elements."""
        return k * self.pack_bits // 8

    def logical_size(self, packed: int) -> int:
        return packed * 8 // self.pack_bits

    def __repr__(self) -> str:  # short in logs and explain() output
        return f"BlockFormat({self.name})"


# --- element types ------------------------------------------------------------------
E2M1 = ElementSpec("e2m1", 4, 2, 1, 1, 6.0, has_inf=False)
E2M3 = ElementSpec("e2m3", 6, 2, 3, 1, 7.5, has_inf=False)
E3M2 = ElementSpec("e3m2", 6, 3, 2, 3, 28.0, has_inf=False)
# OCP E4M3 ("fn"): no Inf, S.1111.111 is NaN, so the top binade ends at 448.
E4M3 = ElementSpec(
    "e4m3", 8, 4, 3, 7, 448.0, has_inf=False, nan_codes=(0x7F,), torch_dtype=torch.float8_e4m3fn
)
# E5M2 is IEEE-like: exponent field 31 holds Inf (mantissa 0) and NaN.
E5M2 = ElementSpec(
    "e5m2",
    8,
    5,
    2,
    15,
    57344.0,
    has_inf=True,
    nan_codes=(0x7D, 0x7E, 0x7F),
    inf_codes=(0x7C,),
    torch_dtype=torch.float8_e5m2,
)

# --- scale types ----------------------------------------------------------------------
# MX scales are kept as raw uint8 exponent bytes: Inductor cannot compile
# float8_e8m0fnu on CPU (C++ codegen), and the pattern matcher skips e8m0 anchors.
E8M0_SCALE = ScaleSpec("e8m0", None, torch.uint8)
E4M3_SCALE = ScaleSpec("e4m3", E4M3, torch.float8_e4m3fn, bias=7)

# --- block formats --------------------------------------------------------------------
NVFP4 = BlockFormat("nvfp4", E2M1, 16, E4M3_SCALE, has_global_scale=True, pack_bits=4)
MXFP4 = BlockFormat("mxfp4", E2M1, 32, E8M0_SCALE, has_global_scale=False, pack_bits=4)
MXFP6_E2M3 = BlockFormat("mxfp6_e2m3", E2M3, 32, E8M0_SCALE, has_global_scale=False, pack_bits=6)
MXFP6_E3M2 = BlockFormat("mxfp6_e3m2", E3M2, 32, E8M0_SCALE, has_global_scale=False, pack_bits=6)
MXFP8_E4M3 = BlockFormat("mxfp8_e4m3", E4M3, 32, E8M0_SCALE, has_global_scale=False, pack_bits=8)
MXFP8_E5M2 = BlockFormat("mxfp8_e5m2", E5M2, 32, E8M0_SCALE, has_global_scale=False, pack_bits=8)

ELEMENTS: dict[str, ElementSpec] = {e.name: e for e in (E2M1, E2M3, E3M2, E4M3, E5M2)}
FORMATS: dict[str, BlockFormat] = {
    f.name: f for f in (NVFP4, MXFP4, MXFP6_E2M3, MXFP6_E3M2, MXFP8_E4M3, MXFP8_E5M2)
}


def get_format(fmt: "BlockFormat | str", *, arg: str = "fmt") -> BlockFormat:
    """Resolve a format given by object or name; unknown names are a ValueError naming `arg`."""
    if isinstance(fmt, BlockFormat):
        return fmt
    if isinstance(fmt, str) and fmt.lower() in FORMATS:
        return FORMATS[fmt.lower()]
    raise ValueError(f"{arg}: unknown block format {fmt!r}; expected one of {sorted(FORMATS)}")


def get_element(elem: "ElementSpec | str", *, arg: str = "elem") -> ElementSpec:
    if isinstance(elem, ElementSpec):
        return elem
    if isinstance(elem, str) and elem.lower() in ELEMENTS:
        return ELEMENTS[elem.lower()]
    raise ValueError(f"{arg}: unknown element type {elem!r}; expected one of {sorted(ELEMENTS)}")
