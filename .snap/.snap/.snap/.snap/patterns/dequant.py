"""Weight dequantization, in the styles users write.

Each style is a `DequantStyle`: a plain function `fn(w, scale, alpha, dtype) -> W`
(W = the dequantized weight [..., N, K] in `dtype`), the format it decodes, whether it
takes a global scale, and the extra tensor inputs it reads (a LUT). The search
functions are traced as written; nothing here is called at run time.

Styles:
  reference     emu_inductor.reference.dequantize_weight: bit-arithmetic decode of the
                element codes, E4M3 scales decoded from bits times alpha (NVFP4), E8M0
                bytes built into fp32 exponents (MX). Every format (FP4, FP6 quark
                layout, FP8), batched [E, N, K] or one matrix [N, K].
  vllm_lut      vLLM's `dequantize_to_dtype` torch path (NVFP4): `break_fp4_bytes`
                (nibble unpack, sign bit, LUT indexed by the magnitude code), scales
                `view(float8_e4m3fn).to(float32) * global_scale`. One matrix [N, K/2];
                the batched form flattens the experts first.
  mx_lut        the same LUT unpack for MXFP4 with E8M0 scales as `exp2(u - 127)`.
  fp8_upcast    MXFP8 (vLLM `dequant_mxfp8_to_bf16`): `w.view(float8).to(f32) *
                exp2(u.float() - 127)`.
  reference_gate_up  NVFP4 experts with separate gate/up global scales [E, 2] (the
                reference's `dequantize_experts` expands them per half of the rows).
Each family of styles is registered in `catalogue` with the GEMM forms it applies to.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from ..formats import FORMATS, BlockFormat
from ..reference.moe import dequantize_experts
from ..reference.qdq import dequantize_weight
from .catalogue import dequant_style

__all__ = ["DequantStyle", "E2M1_LUT", "break_fp4_bytes", "vllm_dequantize_to_dtype", "example_weight",
           "is_gate_up", "reference_gate_up_styles", "reference_styles", "lut_styles", "fp8_upcast_styles"]

#: The E2M1 magnitudes indexed by the 3-bit magnitude code (vLLM kE2M1ToFloat).
E2M1_LUT = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@dataclasses.dataclass(frozen=True)
class DequantStyle:
    name: str
    fmt: BlockFormat
    fn: Callable  # (w, scale, alpha, dtype, **extra) -> W
    has_alpha: bool
    batched: bool  # [E, N, K] (alpha per expert) vs one [N, K] matrix
    extra_inputs: tuple = ()  # names of extra tensor inputs (e.g. "lut")
    weight_dtype: torch.dtype = torch.uint8

    @property
    def key(self) -> str:
        return f"{self.name}:{self.fmt.name}:{'alpha' if self.has_alpha else 'noalpha'}:{'3d' if self.batched else '2d'}"


def is_gate_up(style: DequantStyle) -> bool:
    """A style whose global scales are per expert and half ([E, 2]: gate rows, up rows)."""
    return style.name.endswith("_gate_up")


# Registration order is matching order: the gate/up form (more specific alpha) first.
@dequant_style("grouped_mm")
def reference_gate_up_styles(batched: bool) -> list[DequantStyle]:
    """NVFP4 experts with separate gate/up global scales [E, 2] (the reference's
    `dequantize_experts` expands them with repeat_interleave(N // 2, dim=1))."""
    fmt = FORMATS["nvfp4"]

    def fn(w, scale, alpha, dtype):
        return dequantize_experts(w, scale, fmt, alpha, dtype)

    return [DequantStyle("reference_gate_up", fmt, fn, True, True)]


# --- reference style ---------------------------------------------------------------------


def _reference(fmt: BlockFormat, batched: bool, fp6_layout: str = "quark"):
    if batched:
        def fn(w, scale, alpha, dtype):
            return dequantize_experts(w, scale, fmt, alpha, dtype, fp6_layout)
    else:
        def fn(w, scale, alpha, dtype):
            return dequantize_weight(w, scale, fmt, alpha=alpha, dtype=dtype, fp6_layout=fp6_layout)
    return fn


# --- vLLM LUT style (nvfp4_emulation_utils.break_fp4_bytes / dequantize_to_dtype) ------------


def break_fp4_bytes(a: torch.Tensor, lut: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """vLLM's nibble unpack: [m, n] uint8 -> [m, 2n] values (low nibble first)."""
    m, n = a.shape
    a = a.flatten()
    high = (a & 0xF0) >> 4
    low = a & 0x0F
    combined = torch.stack((low, high), dim=1).flatten()
    signs = (combined & 0x08).to(torch.bool)
    abs_vals = (combined & 0x07).to(torch.long)
    values = lut[abs_vals] * torch.where(signs, -1.0, 1.0)
    return values.reshape(m, n * 2).to(dtype)


def vllm_dequantize_to_dtype(tensor_fp4, tensor_sf, global_scale, lut, dtype, block_size=16):
    """vLLM's `dequantize_to_dtype(fp4, sf, global_scale, dtype, 16, swizzle=False)` torch path."""
    m, packed_k = tensor_fp4.shape
    k = packed_k * 2
    tensor_f32 = break_fp4_bytes(tensor_fp4, lut, torch.float32)
    tensor_f32 = tensor_f32.reshape(m, k // block_size, block_size)
    tensor_sf = tensor_sf.view(torch.float8_e4m3fn)
    tensor_sf_dtype = tensor_sf.to(torch.float32) * global_scale
    out = (tensor_f32 * tensor_sf_dtype.unsqueeze(-1)).reshape(m, k)
    return out.to(dtype)


def _vllm_lut_2d(w, scale, alpha, dtype, lut):
    return vllm_dequantize_to_dtype(w, scale, alpha, lut, dtype)


def _mx_lut_2d(w, scale, alpha, dtype, lut):
    """MXFP4 with the LUT unpack and exp2 E8M0 scales (fork-style `dq_mxfp4_pytorch`)."""
    m, packed_k = w.shape
    k = packed_k * 2
    v = break_fp4_bytes(w, lut, torch.float32).reshape(m, k // 32, 32)
    s = torch.exp2(scale.to(torch.float32) - 127.0)
    return (v * s.unsqueeze(-1)).reshape(m, k).to(dtype)


def _fp8_upcast(w, scale, alpha, dtype):
    """MXFP8 (vLLM `dequant_mxfp8_to_bf16`): w float8_e4m3fn [.., N, K], scale uint8 [.., N, K/32]."""
    shape = w.shape
    v = w.to(torch.float32).reshape(*shape[:-1], shape[-1] // 32, 32)
    s = torch.exp2(scale.to(torch.float32) - 127.0)
    return (v * s.unsqueeze(-1)).reshape(shape).to(dtype)


@dequant_style("linear", "loop", "grouped_mm")
def reference_styles(batched: bool) -> list[DequantStyle]:
    """The reference decode for every format, with and without the NVFP4 global scale."""
    out = []
    for name in ("nvfp4", "mxfp4", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp8_e4m3", "mxfp8_e5m2"):
        fmt = FORMATS[name]
        alphas = (True, False) if fmt.has_global_scale else (False,)
        for has_alpha in alphas:
            out.append(DequantStyle("reference", fmt, _reference(fmt, batched), has_alpha, batched))
    return out


@dequant_style("linear")
def lut_styles(batched: bool) -> list[DequantStyle]:
    """The LUT unpacks, one [N, K/2] matrix each (NVFP4 vLLM, MXFP4 fork-style)."""
    return [DequantStyle("vllm_lut", FORMATS["nvfp4"], _vllm_lut_2d, True, False, ("lut",)),
            DequantStyle("mx_lut", FORMATS["mxfp4"], _mx_lut_2d, False, False, ("lut",))]


@dequant_style("linear", "loop", "grouped_mm")
def fp8_upcast_styles(batched: bool) -> list[DequantStyle]:
    return [DequantStyle("fp8_upcast", FORMATS[name], _fp8_upcast, False, batched, weight_dtype=torch.float8_e4m3fn)
            for name in ("mxfp8_e4m3",)]


def example_weight(style: DequantStyle, N: int, K: int, E: Optional[int] = None):
    """Small example inputs (w, scale, alpha or None, extras) for tracing `style`."""
    fmt = style.fmt
    lead = (E,) if style.batched else ()
    w = torch.zeros(*lead, N, fmt.packed_size(K), dtype=torch.uint8)
    if style.weight_dtype != torch.uint8:
        w = w.view(style.weight_dtype)
    scale = torch.ones(*lead, N, K // fmt.block_size, dtype=fmt.scale.storage_dtype) if fmt.is_mx else \
        torch.ones(*lead, N, K // fmt.block_size, dtype=torch.float32).to(torch.float8_e4m3fn)
    alpha = None
    if style.has_alpha:
        alpha = torch.ones(lead, dtype=torch.float32) if style.batched else torch.ones((), dtype=torch.float32)
    extras = {}
    if "lut" in style.extra_inputs:
        extras["lut"] = torch.tensor(E2M1_LUT, dtype=torch.float32)
    return w, scale, alpha, extras
