"""Public quantize / dequantize / fake_quantize over the block formats in `spec`.

Both directions share `_qdq_values` and `_dequant_values`, so `fake_quantize(x)` is
bit-identical to `dequantize(quantize(x), x.dtype)` by construction (and tested).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import torch

from . import nvfp4 as _nv
from .elements import NAN_ELEMENT_MODES, ROUNDING_MODES, SIGNED_ZERO_MODES, decode, encode, round_to_element
from .packing import FP6_LAYOUTS, pack, unpack
from .scales import (
    BYTE0_INVERSE_MODES,
    E8M0_BYTE0,
    E8M0_BYTE255,
    INF_AMAX_MODES,
    MX_SCALE_MODES,
    e8m0_inverse,
    e8m0_multiply,
    e8m0_scale,
)
from .spec import E4M3, BlockFormat, get_format
from .variants import get_variant

__all__ = ["QuantizedTensor", "QDQOptions", "quantize", "dequantize", "fake_quantize", "MIN_GLOBAL_SCALE"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class QDQOptions:
    """The variant knobs of one quantizer, validated once.

    scale_mode (MX only): floor | ceil | even | rceil | rceil_log2 | even_fp4 | floor_log2.  recipe (NVFP4 only):
    see `emu_inductor.formats.nvfp4`.  rounding: rne | half_away | half_toward_zero | microxcaling_nearest |
    microxcaling_even (the last two computed in the input dtype: elements.round_in_dtype).
    signed_zero: keep | lt0 | le0 | positive (NVFP4: the recipe's own when omitted).
    nan_element: nan | max.  inf_amax (MX): nan | nan_or_overflow | exponent | max.
    byte0_inverse (MX): pow2 | min_normal | one.  e8m0_byte255 / e8m0_byte0: how a reader
    decodes the edge scale bytes.  fp6_layout: quark | unpacked.  `variant` names the MX
    library preset (formats.variants.MX_VARIANTS) the other values started from.
    """

    scale_mode: Optional[str] = None
    recipe: Optional[str] = None
    rounding: str = "rne"
    e8m0_byte255: str = "nan"
    e8m0_byte0: str = "pow2"
    fp6_layout: str = "quark"
    signed_zero: str = "keep"
    nan_element: str = "nan"
    inf_amax: str = "nan"
    byte0_inverse: str = "pow2"
    variant: Optional[str] = None

    @staticmethod
    def resolve(fmt: BlockFormat, scale_mode=None, recipe=None, rounding=None,
                e8m0_byte255=None, e8m0_byte0=None, fp6_layout=None, *, signed_zero=None,
                nan_element=None, inf_amax=None, byte0_inverse=None, variant=None) -> "QDQOptions":
        given = dict(scale_mode=scale_mode, rounding=rounding, e8m0_byte255=e8m0_byte255,
                     e8m0_byte0=e8m0_byte0, signed_zero=signed_zero, nan_element=nan_element,
                     inf_amax=inf_amax, byte0_inverse=byte0_inverse)
        if variant is not None:
            v = get_variant(variant)
            if not fmt.is_mx:
                raise ValueError(f"variant: MX variants do not apply to {fmt.name} (use recipe=); got {v.name!r}")
            if fmt.name not in v.formats:
                raise ValueError(f"variant: {v.name!r} reproduces {', '.join(v.formats)}, not {fmt.name}")
            for key, val in v.options_for(fmt.name).items():
                if given[key] is None:
                    given[key] = val
            variant = v.name
        scale_mode = given["scale_mode"]
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
            for key in ("inf_amax", "byte0_inverse"):
                if given[key] is not None:
                    raise ValueError(f"{key}: applies to MX E8M0 scales, not {fmt.name}; got {given[key]!r}")
            recipe = _nv.get_recipe(recipe).name
            if given["signed_zero"] is None:
                given["signed_zero"] = _nv.get_recipe(recipe).signed_zero
        defaults = dict(rounding="rne", e8m0_byte255="nan", e8m0_byte0="pow2", signed_zero="keep",
                        nan_element="nan", inf_amax="nan", byte0_inverse="pow2")
        choices = dict(rounding=ROUNDING_MODES, e8m0_byte255=E8M0_BYTE255, e8m0_byte0=E8M0_BYTE0,
                       signed_zero=SIGNED_ZERO_MODES, nan_element=NAN_ELEMENT_MODES,
                       inf_amax=INF_AMAX_MODES, byte0_inverse=BYTE0_INVERSE_MODES)
        for key, allowed in choices.items():
            if given[key] is None:
                given[key] = defaults[key]
            elif given[key] not in allowed:
                raise ValueError(f"{key}: got {given[key]!r}, expected one of {allowed}")
        fp6_layout = "quark" if fp6_layout is None else fp6_layout
        if fp6_layout not in FP6_LAYOUTS:
            raise ValueError(f"fp6_layout: got {fp6_layout!r}, expected one of {FP6_LAYOUTS}")
        return QDQOptions(scale_mode, recipe, given["rounding"], given["e8m0_byte255"],
                          given["e8m0_byte0"], fp6_layout, given["signed_zero"],
                          given["nan_element"], given["inf_amax"], given["byte0_inverse"], variant)


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
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise TypeError(f"axis: expected an int, got {type(axis).__name__}")
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


# Smallest global scale accepted: fp32's smallest normal. Below it the reciprocal that
# every recipe forms (1/g, g/s or s/g) overflows to Inf or loses all precision.
#: The smallest NVFP4 global scale accepted (fp32's smallest normal: below it every
#: recipe's reciprocal overflows). Public so the fused ops check the same bound.
MIN_GLOBAL_SCALE = torch.finfo(torch.float32).tiny


def _eager_cpu(t: torch.Tensor) -> bool:
    """Whether a check that reads `t`'s values is free: eager and on CPU (no device sync)."""
    return not torch.compiler.is_compiling() and t.device.type == "cpu"


def _check_global_scale(g, fmt: BlockFormat) -> Optional[torch.Tensor]:
    """Validate a caller's global scale; a Python float or int becomes a 0-d fp32 tensor."""
    if g is None:
        return None
    if not fmt.has_global_scale:
        raise ValueError(f"global_scale: {fmt.name} has no global scale; got a value")
    if isinstance(g, (float, int)) and not isinstance(g, bool):
        g = torch.tensor(float(g), dtype=torch.float32)
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"global_scale: expected a float32 tensor or a Python float, got {type(g).__name__}")
    if g.dtype != torch.float32:
        raise ValueError(f"global_scale: expected a float32 tensor, got {g.dtype}")
    if _eager_cpu(g) and g.numel():
        if not bool(torch.all(torch.isfinite(g) & (g > 0))):
            raise ValueError(f"global_scale: expected finite positive values, got {g.flatten()[:4].tolist()}")
        if bool(torch.any(g < MIN_GLOBAL_SCALE)):
            raise ValueError(
                f"global_scale: expected values >= {MIN_GLOBAL_SCALE:g} (fp32's smallest normal; "
                f"below it the recipe's reciprocal overflows), got {g.min().item():g}"
            )
    return g


def _warn_degenerate_global(amax: torch.Tensor, s: torch.Tensor, g: torch.Tensor) -> None:
    """Warn when a caller's global scale makes every non-zero block degenerate: all block
    scales underflow to 0 (the output is all zeros) or all saturate at 448 (clipped)."""
    if not _eager_cpu(s):
        return
    live = (amax > 0) & torch.isfinite(amax)
    if not bool(live.any()):
        return
    sl = s[live]
    if bool((sl == 0).all()):
        what = "underflows to 0, so every value quantizes to 0"
    elif bool((sl >= _nv.E4M3_MAX).all()) and live.sum() > 1:
        what = f"saturates at {_nv.E4M3_MAX:g}, so the blocks are clipped"
    else:
        return
    warnings.warn(
        f"global_scale={g.flatten()[:4].tolist()}: every non-zero block's E4M3 scale {what}; "
        f"the recipe's own scale for this tensor is default_global_scale(amax)",
        _nv.GlobalScaleWarning,
        stacklevel=4,
    )


def _check_quantized(q: "QuantizedTensor") -> None:
    """Dtypes and shapes of a QuantizedTensor, so dequantize never broadcasts silently."""
    fmt = q.fmt
    if not isinstance(fmt, BlockFormat):
        raise ValueError(f"q.fmt: expected a BlockFormat, got {type(fmt).__name__}")
    for name in ("qdata", "scale"):
        if not isinstance(getattr(q, name), torch.Tensor):
            raise ValueError(f"q.{name}: expected a tensor, got {type(getattr(q, name)).__name__}")
    expected_scale = fmt.scale.storage_dtype
    if q.scale.dtype != expected_scale:
        raise ValueError(f"q.scale: expected dtype {expected_scale} for {fmt.name}, got {q.scale.dtype}")
    if q.qdata.dtype != torch.uint8:
        raise ValueError(f"q.qdata: expected uint8 packed data, got {q.qdata.dtype}")
    shape = tuple(q.shape)
    if not shape or not -len(shape) <= q.axis < len(shape):
        raise ValueError(f"q.axis: {q.axis} is out of range for logical shape {shape}")
    ax = q.axis % len(shape)
    moved = shape[:ax] + shape[ax + 1:] + (shape[ax],)
    k = moved[-1]
    if k % fmt.block_size:
        raise ValueError(f"q.shape: quantized size {k} is not divisible by the {fmt.name} block size")
    unpacked = fmt.pack_bits == 6 and q.options.fp6_layout == "unpacked"
    want_q = moved[:-1] + (k if unpacked else fmt.packed_size(k),)
    if tuple(q.qdata.shape) != want_q:
        raise ValueError(f"q.qdata: expected shape {want_q} for logical shape {shape}, got {tuple(q.qdata.shape)}")
    want_s = moved[:-1] + (k // fmt.block_size,)
    if tuple(q.scale.shape) != want_s:
        raise ValueError(
            f"q.scale: expected shape {want_s} (one scale per block of {fmt.block_size}) for logical "
            f"shape {shape}, got {tuple(q.scale.shape)}"
        )
    g = q.global_scale
    if not fmt.has_global_scale:
        if g is not None:
            raise ValueError(f"q.global_scale: {fmt.name} has no global scale; got a value")
        return
    if not isinstance(g, torch.Tensor) or g.dtype != torch.float32:
        got = g.dtype if isinstance(g, torch.Tensor) else type(g).__name__
        raise ValueError(f"q.global_scale: expected a float32 tensor, got {got}")
    if g.dim() == 0:
        return
    # per leading index: [E, 1, ..., 1] broadcasting over [..., nb, bs] blocks
    blocks = moved[:-1] + (k // fmt.block_size, fmt.block_size)
    lead = g.dim() - len(blocks)
    ok = lead == 0 and all(gs in (1, bs) for gs, bs in zip(g.shape, blocks)) and g.shape[-2:] == (1, 1)
    if not ok:
        raise ValueError(
            f"q.global_scale: expected a 0-d tensor or shape [E, 1, ..., 1] broadcasting over the "
            f"blocks {blocks}, got {tuple(g.shape)}"
        )


# --- shared value paths ---------------------------------------------------------------


def _blocks(x: torch.Tensor, bs: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], x.shape[-1] // bs, bs)


def _qdq_values(x: torch.Tensor, fmt: BlockFormat, opts: QDQOptions, g: Optional[torch.Tensor],
                check_global: bool = False):
    """Quantize x (quantized axis last) to element values on the grid.

    Returns (values fp32 [..., nb, bs], scale_state, g) where scale_state is the E8M0
    byte tensor (MX) or the fp32 E4M3 block-scale values (NVFP4), shape [..., nb, 1].
    """
    xb = _blocks(x, fmt.block_size)
    amax_x = xb.abs().amax(dim=-1, keepdim=True)  # exact in x's dtype; NaN propagates
    amax = amax_x.to(torch.float32)
    x32 = xb.to(torch.float32)
    rnd = dict(rounding=opts.rounding, signed_zero=opts.signed_zero, nan_element=opts.nan_element, dtype=x.dtype)
    if fmt.is_mx:
        # the amax in x's dtype: "floor_log2" rounds its log2 there (the others read fp32)
        u = e8m0_scale(amax_x, fmt.element, opts.scale_mode, inf_amax=opts.inf_amax)
        y = x32 * e8m0_inverse(u, byte0=opts.byte0_inverse)  # exact power-of-two scaling
        v = round_to_element(y, fmt.element, **rnd)
        return v, u, None
    recipe = _nv.get_recipe(opts.recipe)
    s = recipe.block_scale(amax, amax_x, g)
    if check_global:
        _warn_degenerate_global(amax, s, g)
    y = recipe.scale_elements(x32, s, g)
    v = round_to_element(y, fmt.element, **rnd)  # includes the +-6 clamp
    return v, s, g


def _dequant_values(v, scale_state, g, fmt: BlockFormat, opts: QDQOptions, dtype, shape):
    if fmt.is_mx:
        out = e8m0_multiply(v, scale_state, byte255=opts.e8m0_byte255, byte0=opts.e8m0_byte0)
    else:
        recipe = _nv.get_recipe(opts.recipe)
        if recipe.negzero_decode == "positive":
            v = v + 0.0  # -0.0 + 0.0 is +0.0; every other value (NaN too) unchanged
        out = recipe.dequant(v, scale_state, g)
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
        # amax of an empty tensor is undefined: 0 (-> the 1.0 guard), nothing to warn about
        amax = x.abs().amax() if x.numel() else x.new_zeros((), dtype=torch.float32)
        return _nv.default_global_scale(amax, opts.recipe)
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
    rounding: Optional[str] = None,
    fp6_layout: Optional[str] = None,
    variant: Optional[str] = None,
    signed_zero: Optional[str] = None,
    nan_element: Optional[str] = None,
    inf_amax: Optional[str] = None,
    byte0_inverse: Optional[str] = None,
) -> QuantizedTensor:
    """Quantize `x` to `fmt` along `axis` (blocks of consecutive elements on that axis).

    MX formats take `scale_mode` (floor by default) or a library `variant`
    (formats.variants.MX_VARIANTS). NVFP4 takes `recipe` ("vllm" by default) and an
    optional fp32 `global_scale` in that recipe's native direction (computed from x's
    amax by the recipe's own rule when omitted). The remaining options are the knobs
    of `QDQOptions`; omitted ones come from the variant / recipe, else the defaults.
    """
    fmt = get_format(fmt)
    opts = QDQOptions.resolve(fmt, scale_mode, recipe, rounding, fp6_layout=fp6_layout,
                              signed_zero=signed_zero, nan_element=nan_element,
                              inf_amax=inf_amax, byte0_inverse=byte0_inverse, variant=variant)
    axis = _check_input(x, fmt, axis)
    global_scale = _check_global_scale(global_scale, fmt)
    xm = x.movedim(axis, -1)
    g = _resolve_global(xm, fmt, opts, global_scale, axis)
    v, scale_state, g = _qdq_values(xm, fmt, opts, g, check_global=global_scale is not None)
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
        for key, val, allowed in (("e8m0_byte255", e8m0_byte255, E8M0_BYTE255),
                                  ("e8m0_byte0", e8m0_byte0, E8M0_BYTE0)):
            if val is not None and val not in allowed:
                raise ValueError(f"{key}: got {val!r}, expected one of {allowed}")
        opts = dataclasses.replace(opts, e8m0_byte255=e8m0_byte255 or opts.e8m0_byte255,
                                   e8m0_byte0=e8m0_byte0 or opts.e8m0_byte0)
    _check_quantized(q)
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
    rounding: Optional[str] = None,
    e8m0_byte255: Optional[str] = None,
    e8m0_byte0: Optional[str] = None,
    variant: Optional[str] = None,
    signed_zero: Optional[str] = None,
    nan_element: Optional[str] = None,
    inf_amax: Optional[str] = None,
    byte0_inverse: Optional[str] = None,
) -> torch.Tensor:
    """Quantize then dequantize, in x's dtype; equal bit for bit to
    `dequantize(quantize(x, ...), x.dtype)` with the same options."""
    fmt = get_format(fmt)
    opts = QDQOptions.resolve(fmt, scale_mode, recipe, rounding, e8m0_byte255, e8m0_byte0,
                              signed_zero=signed_zero, nan_element=nan_element,
                              inf_amax=inf_amax, byte0_inverse=byte0_inverse, variant=variant)
    axis = _check_input(x, fmt, axis)
    global_scale = _check_global_scale(global_scale, fmt)
    xm = x.movedim(axis, -1)
    g = _resolve_global(xm, fmt, opts, global_scale, axis)
    v, scale_state, g = _qdq_values(xm, fmt, opts, g, check_global=global_scale is not None)
    return _dequant_values(v, scale_state, g, fmt, opts, x.dtype, xm.shape).movedim(-1, axis)
