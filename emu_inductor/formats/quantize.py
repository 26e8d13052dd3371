"""Public quantize / dequantize / fake_quantize over the block formats in `spec`.

Both directions share `_qdq_values` and `_dequant_values`, so `fake_quantize(x)` is
bit-identical to `dequantize(quantize(x), x.dtype)` by construction (and tested).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from . import nvfp4 as _nv
from .elements import ROUNDING_MODES, decode, encode, round_to_element
from .packing import FP6_LAYOUTS, pack, unpack
from .scales import E8M0_BYTE0, E8M0_BYTE255, MX_SCALE_MODES, e8m0_decode, e8m0_inverse, e8m0_scale
from .spec import E4M3, BlockFormat, get_format

__all__ = ["QuantizedTensor", "QDQOptions", "quantize", "dequantize", "fake_quantize"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class QDQOptions:
    """The variant knobs of one quantizer, validated once.

    scale_mode (MX only): floor | ceil | even | rceil.  recipe (NVFP4 only): see
    `emu_inductor.formats.nvfp4`.  rounding: rne | half_away.  e8m0_byte255 /
    e8m0_byte0: how a reader decodes the edge scale bytes.  fp6_layout: quark | unpacked.
    """

    scale_mode: Optional[str] = None
    recipe: Optional[str] = None
    rounding: str = "rne"
    e8m0_byte255: str = "nan"
    e8m0_byte0: str = "pow2"
    fp6_layout: str = "quark"

    @staticmethod
    def resolve(fmt: BlockFormat, scale_mode=None, recipe=None, rounding="rne",
                e8m0_byte255="nan", e8m0_byte0="pow2", fp6_layout="quark") -> "QDQOptions":
        if fmt.is_mx:
            if recipe is not None:
                raise ValueError(f"recipe: NVFP4 recipes do not apply to {fmt.name}; got {recipe!r}")
            scale_mode = "floor" if scale_mode is None else scale_mode
            if scale_mode not in MX_SCALE_MODES:
                raise ValueError(f"scale_mode: got {scale_mode!r}, expected one of {MX_SCALE_MODES}")
        else:
            if scale_mode is not None:
                raise ValueError(
                    f"scale_mode: {fmt.name} has E4M3 block scales chosen by its recipe, "
                    f"not an E8M0 scale_mode; got {scale_mode!r} (use recipe=)"
                )
            recipe = _nv.get_recipe(recipe).name
        if rounding not in ROUNDING_MODES:
            raise ValueError(f"rounding: got {rounding!r}, expected one of {ROUNDING_MODES}")
        if e8m0_byte255 not in E8M0_BYTE255:
            raise ValueError(f"e8m0_byte255: got {e8m0_byte255!r}, expected one of {E8M0_BYTE255}")
        if e8m0_byte0 not in E8M0_BYTE0:
            raise ValueError(f"e8m0_byte0: got {e8m0_byte0!r}, expected one of {E8M0_BYTE0}")
        if fp6_layout not in FP6_LAYOUTS:
            raise ValueError(f"fp6_layout: got {fp6_layout!r}, expected one of {FP6_LAYOUTS}")
        return QDQOptions(scale_mode, recipe, rounding, e8m0_byte255, e8m0_byte0, fp6_layout)


@dataclasses.dataclass
class QuantizedTensor:
    """Packed elements, block scales and (NVFP4) the global scale of one tensor.

    `qdata` and `scale` keep the quantized axis last ([..., K*bits/8] and
    [..., K/block]); `shape` is the logical shape in the caller's axis order and `axis`
    the quantized axis in it. `scale` is float8_e4m3fn for NVFP4 and uint8 E8M0 bytes
    for MX. `global_scale` is fp32 in the recipe's native direction (NVFP4 only).
    """

    qdata: torch.Tensor
    scale: torch.Tensor
    global_scale: Optional[torch.Tensor]
    fmt: BlockFormat
    shape: torch.Size
    axis: int = -1
    options: QDQOptions = dataclasses.field(default_factory=QDQOptions)

    @property
    def codes(self) -> torch.Tensor:
        """Element codes, one per byte, quantized axis last."""
        return unpack(self.qdata, self.fmt.pack_bits, fp6_layout=self.options.fp6_layout)


# --- validation -----------------------------------------------------------------------


def _check_input(x: torch.Tensor, fmt: BlockFormat, axis: int) -> int:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x: expected a float32/bfloat16/float16 tensor, got dtype {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x: expected at least one dimension, got a 0-d tensor")
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis: {axis} is out of range for a {x.dim()}-d tensor")
    axis = axis % x.dim()
    k = x.shape[axis]
    if k % fmt.block_size:
        raise ValueError(
            f"x: size {k} of the quantized axis {axis} is not divisible by the "
            f"{fmt.name} block size {fmt.block_size}"
        )
    return axis


def _check_global_scale(g, fmt: BlockFormat) -> None:
    if g is None:
        return
    if not fmt.has_global_scale:
        raise ValueError(f"global_scale: {fmt.name} has no global scale; got a value")
    if not isinstance(g, torch.Tensor) or g.dtype != torch.float32:
        got = g.dtype if isinstance(g, torch.Tensor) else type(g).__name__
        raise ValueError(f"global_scale: expected a float32 tensor, got {got}")
    # A value check needs the data: only in eager, and only on CPU (no device sync).
    if not torch.compiler.is_compiling() and g.device.type == "cpu":
        if not bool(torch.all(torch.isfinite(g) & (g > 0))):
            raise ValueError(f"global_scale: expected finite positive values, got {g.flatten()[:4].tolist()}")


# --- shared value paths ---------------------------------------------------------------


def _blocks(x: torch.Tensor, bs: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], x.shape[-1] // bs, bs)


def _qdq_values(x: torch.Tensor, fmt: BlockFormat, opts: QDQOptions, g: Optional[torch.Tensor]):
    """Quantize x (quantized axis last) to element values on the grid.

    Returns (values fp32 [..., nb, bs], scale_state, g) where scale_state is the E8M0
    byte tensor (MX) or the fp32 E4M3 block-scale values (NVFP4), shape [..., nb, 1].
    """
    xb = _blocks(x, fmt.block_size)
    amax_x = xb.abs().amax(dim=-1, keepdim=True)  # exact in x's dtype; NaN propagates
    amax = amax_x.to(torch.float32)
    x32 = xb.to(torch.float32)
    if fmt.is_mx:
        u = e8m0_scale(amax, fmt.element, opts.scale_mode)
        y = x32 * e8m0_inverse(u)  # exact power-of-two scaling
        v = round_to_element(y, fmt.element, rounding=opts.rounding)
        return v, u, None
    recipe = _nv.get_recipe(opts.recipe)
    s = recipe.block_scale(amax, amax_x, g)
    y = recipe.scale_elements(x32, s, g)
    v = round_to_element(y, fmt.element, rounding=opts.rounding)  # includes the +-6 clamp
    return v, s, g


def _dequant_values(v, scale_state, g, fmt: BlockFormat, opts: QDQOptions, dtype, shape):
    if fmt.is_mx:
        s = e8m0_decode(scale_state, byte255=opts.e8m0_byte255, byte0=opts.e8m0_byte0)
        out = v * s
    else:
        out = v * _nv.get_recipe(opts.recipe).dequant_factor(scale_state, g)
    return out.reshape(shape).to(dtype)


def _resolve_global(x, fmt, opts, global_scale, axis=None):
    """The global scale shaped to broadcast over [..., nb, bs] blocks of x.

    `x` has the quantized axis moved last; `axis` is its (non-negative) position in the
    caller's tensor. A scalar (0-d or one element) applies to the whole tensor; an n-d
    tensor gives one value per index of x's n leading dims (per expert, say: shape [E]
    for [E, N, K]), which must all come before the quantized axis.
    """
    if not fmt.has_global_scale:
        return None
    if global_scale is None:
        return _nv.default_global_scale(x.abs().amax(), opts.recipe)
    g = global_scale.to(torch.float32)
    if g.numel() == 1:
        return g.reshape(())
    if axis is not None and g.dim() > axis:
        # movedim(axis, -1) keeps the dims before `axis` in place but shifts the later
        # ones: a per-slice scale reaching the quantized axis would silently index the
        # wrong dim.
        raise ValueError(
            f"global_scale: a per-slice global scale of shape {tuple(g.shape)} reaches the "
            f"quantized axis {axis}; it may only span the dims before it"
        )
    lead = tuple(x.shape[: g.dim()])
    if g.dim() >= x.dim() or tuple(g.shape) != lead:
        raise ValueError(
            f"global_scale: expected one element or shape {tuple(x.shape[:-1])[:1]} matching the "
            f"leading dims of x, got shape {tuple(g.shape)}"
        )
    return g.reshape(*g.shape, *([1] * (x.dim() + 1 - g.dim())))


# --- public API -----------------------------------------------------------------------


def quantize(
    x: torch.Tensor,
    fmt,
    *,
    scale_mode: Optional[str] = None,
    global_scale: Optional[torch.Tensor] = None,
    axis: int = -1,
    recipe: Optional[str] = None,
    rounding: str = "rne",
    fp6_layout: str = "quark",
) -> QuantizedTensor:
    """Quantize `x` to `fmt` along `axis` (blocks of consecutive elements on that axis).

    MX formats take `scale_mode` (floor by default). NVFP4 takes `recipe` ("vllm" by
    default) and an optional fp32 `global_scale` in that recipe's native direction
    (computed from x's amax by the recipe's own rule when omitted).
    """
    fmt = get_format(fmt)
    opts = QDQOptions.resolve(fmt, scale_mode, recipe, rounding, fp6_layout=fp6_layout)
    axis = _check_input(x, fmt, axis)
    _check_global_scale(global_scale, fmt)
    xm = x.movedim(axis, -1)
    g = _resolve_global(xm, fmt, opts, global_scale, axis)
    v, scale_state, g = _qdq_values(xm, fmt, opts, g)
    codes = encode(v, fmt.element).reshape(xm.shape)
    qdata = pack(codes, fmt.pack_bits, fp6_layout=opts.fp6_layout)
    if fmt.is_mx:
        scale = scale_state.squeeze(-1)
    else:
        scale = encode(scale_state, E4M3).squeeze(-1).view(torch.float8_e4m3fn)
    return QuantizedTensor(qdata, scale, g, fmt, x.shape, axis - x.dim(), opts)


def dequantize(
    q: QuantizedTensor,
    dtype: torch.dtype = torch.bfloat16,
    *,
    e8m0_byte255: Optional[str] = None,
    e8m0_byte0: Optional[str] = None,
) -> torch.Tensor:
    """Values of `q` in `dtype` (one rounding, from the fp32 product), logical shape.

    e8m0_byte255 / e8m0_byte0 override how this reader decodes the MX edge bytes.
    """
    if not isinstance(q, QuantizedTensor):
        raise ValueError(f"q: expected a QuantizedTensor, got {type(q).__name__}")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype: expected float32/bfloat16/float16, got {dtype}")
    fmt, opts = q.fmt, q.options
    if e8m0_byte255 is not None or e8m0_byte0 is not None:
        opts = QDQOptions.resolve(
            fmt, opts.scale_mode, opts.recipe, opts.rounding,
            e8m0_byte255 or opts.e8m0_byte255, e8m0_byte0 or opts.e8m0_byte0, opts.fp6_layout,
        )
    expected_scale = fmt.scale.storage_dtype
    if q.scale.dtype != expected_scale:
        raise ValueError(f"q.scale: expected dtype {expected_scale} for {fmt.name}, got {q.scale.dtype}")
    if q.qdata.dtype != torch.uint8:
        raise ValueError(f"q.qdata: expected uint8 packed data, got {q.qdata.dtype}")
    codes = q.codes
    moved_shape = codes.shape
    v = _blocks(decode(codes, fmt.element), fmt.block_size)
    if fmt.is_mx:
        scale_state = q.scale.unsqueeze(-1)
    else:
        scale_state = decode(q.scale.view(torch.uint8), E4M3).unsqueeze(-1)
    out = _dequant_values(v, scale_state, q.global_scale, fmt, opts, dtype, moved_shape)
    return out.movedim(-1, q.axis)


def fake_quantize(
    x: torch.Tensor,
    fmt,
    *,
    scale_mode: Optional[str] = None,
    global_scale: Optional[torch.Tensor] = None,
    axis: int = -1,
    recipe: Optional[str] = None,
    rounding: str = "rne",
    e8m0_byte255: str = "nan",
    e8m0_byte0: str = "pow2",
) -> torch.Tensor:
    """Quantize then dequantize, in x's dtype; equal bit for bit to
    `dequantize(quantize(x, ...), x.dtype)` with the same options."""
    fmt = get_format(fmt)
    opts = QDQOptions.resolve(fmt, scale_mode, recipe, rounding, e8m0_byte255, e8m0_byte0)
    axis = _check_input(x, fmt, axis)
    _check_global_scale(global_scale, fmt)
    xm = x.movedim(axis, -1)
    g = _resolve_global(xm, fmt, opts, global_scale, axis)
    v, scale_state, g = _qdq_values(xm, fmt, opts, g)
    return _dequant_values(v, scale_state, g, fmt, opts, x.dtype, xm.shape).movedim(-1, axis)
