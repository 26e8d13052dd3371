"""NVFP4 recipes: each reference library's own block-scale formula, element multiplier,
zero-block rule and dequantization product, kept apart (they disagree bit for bit on
bf16 data; see docs/formats.md).

Notation: `x` is the input in fp32, `amax_b` the block's max |x|, `g` the recipe's
global scale in its *native direction* (see `RECIPES[name].global_direction`):
  "quantize"   g ~ 448*6/amax  (vLLM, TransformerEngine, compressed-tensors)
  "dequantize" g ~ amax/(448*6) (ModelOpt `weight_scale_2`, torchao `per_tensor_scale`)
`s` is the fp32 value of the E4M3 block scale.

  recipe              block scale s = e4m3(...)                zero block  y (into E2M1 RNE)    dequant
  vllm (default)      clamp(g*(amax_b*f32(1/6)), +-448)        s = 0       x*(g/s), 0 if s=0     q*(s/g)
  vllm_ref            same                                     s = 0       x*rcp(s*rcp(g))       q*(s/g)
  vllm_torch          same as vllm_ref, zero sign from y < 0 (sign(y) * R(|y|))
  te                  min(amax_b*(g*f32(1/6)), 448)            s = 0       x*min(1/(s*(1/g)),MAX) q*(s*(1/g))
  compressed_tensors  clamp(g*(amax_b/6 in x's dtype), +-448)  s = 0.125   x/(s/g)              q*(s/g)
  modelopt            clamp(amax_b/(6*g), 2^-9, 448), 0 -> 1   s = 1.0     x/(s*g)              q*(s*g)
  torchao             clamp((amax_b/6)/g, 2^-6, 448)           s = 2^-6    x*((1/g)/s)          q*(g*s)
  torchao_moe         same as torchao                                                          (q*s)*g
rcp(t) = 1/(t + (t==0)*1e8) is vLLM's graph-capture-safe zero guard. `signed_zero` is the
sign a zero result takes (elements.SIGNED_ZERO_MODES): compressed-tensors and ModelOpt
take it from x < 0, so -0.0 gives +0.0; vllm_torch from the scaled value y < 0 (vLLM's
torch `cast_to_fp4`: `sign(y) * R(|y|)`, so a y that underflowed to -0.0 gives +0.0);
the others keep the sign. ModelOpt stores the
-0 code 0x8 for tiny negatives but decodes it as +0.0 (`negzero_decode`).

Library-checked recipes (bit for bit, tests/test_formats_libraries.py; random bf16 and fp32
at many magnitudes, zero / +-0 / subnormal / saturating / NaN / +-Inf blocks, E2M1 ties,
tiny and huge blocks next to large ones):
  modelopt            nvidia-modelopt 0.47.0 NVFP4QTensor.quantize / dequantize
  compressed_tensors  compressed-tensors 0.20.1 calculate_qparams + fake_quantize (fp32
                      and bf16 observers), generate_gparam for the global scale
  torchao             torchao 0.18.0 nvfp4_quantize (two-level) + NVFP4Tensor dequant
  torchao_moe         torchao 0.18.0 nvfp4_quantize (two-level) + moe_training's
                      _nvfp4_dequantize(per_tensor_scale=) (its emulated grouped GEMMs'
                      order: block scale first, then the per-tensor scale); equal to
                      `torchao` after rounding to bf16 on random data, not in fp32
Recipes checked against the published algorithm only (float64 transcriptions with every
fp32 rounding emulated, tests/test_formats_quantize.py), because the library does not
install on this CPU beside torch 2.13:
  vllm, vllm_ref      vLLM (0.33 pulls torch 2.14): nvfp4_emulation_utils / the Triton
                      QDQ kernel as read in shared/spec/vllm_reference.md. These two keep
                      the sign of a zero; vLLM's torch emulation (`ref_nvfp4_quant` +
                      `cast_to_fp4`, `sign(y) * R(|y|)`) does not:
  vllm_torch          vLLM nvfp4_emulation_utils' torch QDQ with its zero sign (y < 0)
  te                  TransformerEngine (its torch extension needs CUDA), via torchao's
                      transcription nvfp4_reference.py
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable

import torch

from .elements import round_to_element
from .spec import E2M1, E4M3

__all__ = ["RECIPES", "NVFP4Recipe", "GlobalScaleWarning", "get_recipe", "default_global_scale"]


class GlobalScaleWarning(UserWarning):
    """An NVFP4 global scale was replaced (non-finite amax) or makes the result degenerate
    (every block scale underflows to zero, or every block saturates)."""

# Format facts, read from the specs: E2M1's and E4M3's largest values, E4M3's smallest
# normal (torchao's block-scale floor), and 448*6 = 2688 (global scale = 2688 / amax).
E2M1_MAX = E2M1.max_normal
E4M3_MAX = E4M3.max_normal
E4M3_MIN_NORMAL = E4M3.min_normal
GLOBAL_SCALE_NUMERATOR = E4M3_MAX * E2M1_MAX
_SIXTH = 1.0 / E2M1_MAX  # used as an fp32 multiplier, never a division by 6 (vLLM, TE)
_F32_MAX = torch.finfo(torch.float32).max


def _e4m3(s: torch.Tensor) -> torch.Tensor:
    """Round fp32 to E4M3 values (RNE, subnormals, saturating at 448), as fp32."""
    return round_to_element(s, E4M3)


def _vllm_rcp(t: torch.Tensor) -> torch.Tensor:
    return 1.0 / (t + (t == 0).to(t.dtype) * 1e8)


@dataclasses.dataclass(frozen=True)
class NVFP4Recipe:
    name: str
    global_direction: str  # "quantize" or "dequantize"
    # (amax_b in fp32, amax_b in the input dtype, g) -> fp32 E4M3 block-scale values
    block_scale: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    # (x fp32, s, g) -> y, the values rounded to E2M1 (after a +-6 clamp)
    scale_elements: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    # (v, s, g) -> the dequantized fp32 values from the E2M1 values v, in the library's
    # product order (v * f(s, g) for most; (v * s) * g for torchao_moe)
    dequant: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    # sign of a zero element (elements.SIGNED_ZERO_MODES)
    signed_zero: str = "keep"
    # the reader's value for the -0 code 0x8: -0.0, or +0.0 where the library decodes by
    # a table whose entry 8 is 0 (ModelOpt's e2m1_values)
    negzero_decode: str = "keep"


def _vllm_block(a32, a_x, g):
    return _e4m3(torch.clamp(g * (a32 * _SIXTH), -E4M3_MAX, E4M3_MAX))


def _vllm_mul(x, s, g):
    return x * torch.where(s == 0, torch.zeros_like(s), g / s)


def _vllm_ref_mul(x, s, g):
    return x * _vllm_rcp(s * _vllm_rcp(g))


def _s_over_g(v, s, g):
    return v * (s / g)


def _te_block(a32, a_x, g):
    return _e4m3(torch.clamp(a32 * (g * _SIXTH), max=E4M3_MAX))


def _te_mul(x, s, g):
    return x * torch.clamp(1.0 / (s * (1.0 / g)), max=_F32_MAX)


def _te_deq(v, s, g):
    return v * (s * (1.0 / g))


def _ct_block(a32, a_x, g):
    # amax_b / 6.0 runs in the observed (input) dtype, then promotes against fp32 g.
    s = _e4m3(torch.clamp(g * (a_x / E2M1_MAX).to(torch.float32), -E4M3_MAX, E4M3_MAX))
    return torch.where(s == 0, torch.full_like(s, 0.125), s)


def _ct_mul(x, s, g):
    return x / (s / g)


def _modelopt_block(a32, a_x, g):
    s = a32 / (E2M1_MAX * g)
    s = torch.where(s == 0, torch.ones_like(s), s)
    # ModelOpt 0.47 `_cast_per_block_scale_to_fp8` clamps to [2^-9, 448] before the cast,
    # so a tiny block next to a large one keeps E4M3's smallest subnormal, never 0.
    return _e4m3(torch.clamp(s, min=E4M3.min_subnormal, max=E4M3_MAX))


def _modelopt_mul(x, s, g):
    # s >= 2^-9, so s * g is 0 only when a tiny global scale underflows the product. Then
    # ModelOpt divides by 0: x != 0 gives +-inf (codes +-6, dequantized to +-0), and
    # x == 0 gives 0/0 = NaN, which its searchsorted encoder maps to code 0x7 (+6, also
    # dequantized to 0). Left as NaN here, fake_quantize would return NaN where
    # dequantize(quantize(x)) reads a zero code: use +inf, ModelOpt's code.
    d = s * g
    return torch.where((d == 0) & (x == 0), torch.full_like(x, float("inf")), x / d)


def _modelopt_deq(v, s, g):
    return v * (s * g)


def _torchao_block(a32, a_x, g):
    return _e4m3(torch.clamp((a32 / E2M1_MAX) / g, min=E4M3_MIN_NORMAL, max=E4M3_MAX))


def _torchao_mul(x, s, g):
    return x * ((1.0 / g) / s)


def _torchao_deq(v, s, g):
    return v * (g * s)


def _torchao_moe_deq(v, s, g):
    return (v * s) * g


RECIPES: dict[str, NVFP4Recipe] = {
    r.name: r
    for r in (
        NVFP4Recipe("vllm", "quantize", _vllm_block, _vllm_mul, _s_over_g),
        NVFP4Recipe("vllm_ref", "quantize", _vllm_block, _vllm_ref_mul, _s_over_g),
        NVFP4Recipe("vllm_torch", "quantize", _vllm_block, _vllm_ref_mul, _s_over_g, "lt0"),
        NVFP4Recipe("te", "quantize", _te_block, _te_mul, _te_deq),
        NVFP4Recipe("compressed_tensors", "quantize", _ct_block, _ct_mul, _s_over_g, "lt0"),
        NVFP4Recipe("modelopt", "dequantize", _modelopt_block, _modelopt_mul, _modelopt_deq, "lt0", "positive"),
        NVFP4Recipe("torchao", "dequantize", _torchao_block, _torchao_mul, _torchao_deq),
        NVFP4Recipe("torchao_moe", "dequantize", _torchao_block, _torchao_mul, _torchao_moe_deq),
    )
}


def get_recipe(recipe: "str | NVFP4Recipe | None") -> NVFP4Recipe:
    if recipe is None:
        return RECIPES["vllm"]
    if isinstance(recipe, NVFP4Recipe):
        return recipe
    if isinstance(recipe, str) and recipe in RECIPES:
        return RECIPES[recipe]
    raise ValueError(f"recipe: unknown NVFP4 recipe {recipe!r}; expected one of {sorted(RECIPES)}")


def default_global_scale(amax: torch.Tensor, recipe: "str | NVFP4Recipe | None" = None) -> torch.Tensor:
    """The recipe's own per-tensor global scale from a tensor amax, as fp32.

    quantize direction: 448*6/amax; dequantize direction: amax/(448*6). A zero or
    non-finite amax gives 1.0 (TransformerEngine's guard) so nothing divides by zero.
    A non-finite amax (one NaN or Inf anywhere in the tensor) would otherwise silently
    change the quantization of every other row: in eager on CPU this warns
    (GlobalScaleWarning) naming the global scale used. Under torch.compile or on an
    accelerator it does not check (that would need a device-to-host sync).
    """
    r = get_recipe(recipe)
    amax = amax.to(torch.float32)
    g = GLOBAL_SCALE_NUMERATOR / amax if r.global_direction == "quantize" else amax / GLOBAL_SCALE_NUMERATOR
    ok = torch.isfinite(g) & (g > 0)
    if not torch.compiler.is_compiling() and amax.device.type == "cpu" and amax.numel():
        bad = ~torch.isfinite(amax)
        if bool(bad.any()):
            what = "NaN" if bool(torch.isnan(amax).any()) else "Inf"
            warnings.warn(
                f"NVFP4 default global scale: the tensor amax is {what} (a NaN or Inf in the "
                f"input), so global_scale=1.0 was used for {int(bad.sum())} of {amax.numel()} "
                f"tensor(s) instead of {GLOBAL_SCALE_NUMERATOR:g}/amax; pass global_scale= "
                f"computed from the finite values to keep the other rows' quantization",
                GlobalScaleWarning,
                stacklevel=3,
            )
    return torch.where(ok, g, torch.ones_like(g))
