"""Activation fake-QDQ (quantize-dequantize) variants, as search functions.

A `QDQStyle` is `fn(x, global_scale) -> x'` in x's dtype plus the `ActQuant` it
computes (which fixes the fused op's arithmetic variant: the NVFP4 recipe, i.e. which
reciprocal, or the MX scale rounding). Styles:
  reference   emu_inductor.reference.act_fake_quantize for each ActQuant:
              NVFP4 recipe "vllm" (vLLM Triton kernel: x * (gs / s)) and "vllm_ref"
              (vLLM torch reference: x * 1/(s * 1/gs) with the 1e8 zero guard);
              MX element formats with scale_mode floor / even / rceil / ceil;
              per-tensor FP8 (vLLM `a_fp8`).
  reference_static  per-tensor FP8 with a static (calibrated) scale.
  vllm_torch  vLLM's `ref_nvfp4_quant` + dequant, written as vLLM writes it (masked
              in-place E2M1 rounding) -> ActQuant(nvfp4, recipe "vllm_ref").
Each factory is registered in `catalogue` with the GEMM forms it applies to; which
weight formats a QDQ pairs with is `emu_inductor.spec.compat`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..formats import FORMATS
from ..reference.qdq import act_fake_quantize
from ..spec.schemes import ActQuant
from .catalogue import qdq_style

__all__ = ["QDQStyle", "qdq_styles", "fp8_static_styles", "vllm_torch_styles", "vllm_ref_nvfp4_quant_dequant"]


@dataclasses.dataclass(frozen=True)
class QDQStyle:
    name: str
    act: ActQuant
    fn: Callable  # (x, global_scale) -> x'
    has_global_scale: bool

    @property
    def key(self) -> str:
        a = self.act
        return f"{self.name}:{a.kind}:{a.fmt.name if a.fmt else '-'}:{a.scale_mode or a.recipe or '-'}:{a.rounding}"


def _reference(act: ActQuant):
    def fn(x, gs):
        return act_fake_quantize(x, act, gs)
    return fn


# --- vLLM torch reference, as written in nvfp4_emulation_utils.py ---------------------------


def _vllm_cast_to_fp4(x):
    sign = torch.sign(x)
    x = torch.abs(x)
    x[(x >= 0.0) & (x <= 0.25)] = 0.0
    x[(x > 0.25) & (x < 0.75)] = 0.5
    x[(x >= 0.75) & (x <= 1.25)] = 1.0
    x[(x > 1.25) & (x < 1.75)] = 1.5
    x[(x >= 1.75) & (x <= 2.5)] = 2.0
    x[(x > 2.5) & (x < 3.5)] = 3.0
    x[(x >= 3.5) & (x <= 5.0)] = 4.0
    x[x > 5.0] = 6.0
    return x * sign


def _get_reciprocal(x):
    return 1.0 / (x + (x == 0).to(x.dtype) * 1e8) if isinstance(x, torch.Tensor) else 1.0 / x


def vllm_ref_nvfp4_quant_dequant(x, global_scale):
    """`ref_nvfp4_quant(x, gs, 16)` then `q * (s / gs)` in x's dtype (vLLM torch path)."""
    m, n = x.shape
    block = 16
    vec_max = torch.max(torch.abs(x.reshape(m, n // block, block)), dim=-1, keepdim=True)[0].to(torch.float32)
    scale = global_scale * (vec_max * (1.0 / 6.0))
    scale = torch.clamp(scale, -448.0, 448.0).to(torch.float8_e4m3fn).to(torch.float32)
    output_scale = _get_reciprocal(scale * _get_reciprocal(global_scale))
    scaled_x = x.to(torch.float32).reshape(m, n // block, block) * output_scale
    clipped_x = torch.clamp(scaled_x, -6.0, 6.0).reshape(m, n)
    q = _vllm_cast_to_fp4(clipped_x)
    scale = scale.squeeze(-1)  # ref_nvfp4_quant returns the block scales [m, n/16]
    out = (q.reshape(m, n // block, block) * (scale.unsqueeze(-1) / global_scale)).reshape(m, n)
    return out.to(x.dtype)


@qdq_style("linear", "loop", "grouped_mm")
def qdq_styles() -> list[QDQStyle]:
    nv = FORMATS["nvfp4"]
    out = [
        QDQStyle("reference", ActQuant("block", nv, recipe="vllm"), _reference(ActQuant("block", nv, recipe="vllm")), True),
        QDQStyle("reference", ActQuant("block", nv, recipe="vllm_ref"),
                 _reference(ActQuant("block", nv, recipe="vllm_ref")), True),
    ]
    for fmt in ("mxfp4", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp8_e4m3"):
        for mode in ("even", "floor", "rceil", "ceil"):
            a = ActQuant("block", FORMATS[fmt], scale_mode=mode)
            out.append(QDQStyle("reference", a, _reference(a), False))
    a = ActQuant("fp8_tensor")
    out.append(QDQStyle("reference", a, _reference(a), False))
    return out


@qdq_style("linear", "grouped_mm")
def fp8_static_styles() -> list[QDQStyle]:
    """Per-tensor E4M3 QDQ with a static (calibrated) scale, vLLM's `input_scale`:
    `(e4m3(clamp(x * (1/s))) * s).to(x.dtype)` with s a graph input."""
    a = ActQuant("fp8_tensor")
    return [QDQStyle("reference_static", a, _reference(a), True)]


@qdq_style("linear")
def vllm_torch_styles() -> list[QDQStyle]:
    """The vLLM-torch-written NVFP4 QDQ (2-D activations only)."""
    nv = FORMATS["nvfp4"]
    return [QDQStyle("vllm_torch", ActQuant("block", nv, recipe="vllm_ref"), vllm_ref_nvfp4_quant_dequant, True)]
