"""Quantized-checkpoint layouts: reading one projection, a dense layer or a layer's
experts into the tensors `QuantizedLinear` / `QuantizedExperts` take.

Scale directions (checked against each library's own code, see docs/models.md):

  compressed-tensors `nvfp4-pack-quantized` (compressed_tensors 0.20,
  `lifecycle/forward_helpers.py::_dequantize`: `scale = scale / global_scale`;
  `utils/helpers.py::generate_gparam`: `448 * 6 / amax`):
      <p>.weight_packed        uint8 [N, K/2]   E2M1 codes, element 2j in the low nibble
      <p>.weight_scale         float8_e4m3fn [N, K/16]
      <p>.weight_global_scale  float32 [1]      QUANTIZE direction (~2688/amax_w)
      <p>.input_global_scale   float32 [1]      QUANTIZE direction (~2688/amax_x), w4a4 only
    -> alpha = 1 / weight_global_scale (vLLM: `w13_scale_2 = 1.0 / w13_weight_global_scale`)
  NVIDIA ModelOpt NVFP4 (modelopt 0.47, `qtensor/nvfp4_tensor.py`: `weight_scale_2 =
  amax / (6 * 448)`, dequant `e2m1 * (weight_scale * weight_scale_2)`; input scale
  `amax / (6 * 448)`):
      <p>.weight               uint8 [N, K/2]
      <p>.weight_scale         float8_e4m3fn [N, K/16]
      <p>.weight_scale_2       float32 [] or [1]  DEQUANTIZE direction
      <p>.input_scale          float32 [] or [1]  DEQUANTIZE direction, w4a4 only
    -> alpha = weight_scale_2
  gpt-oss MXFP4 (transformers 5.17 `integrations/mxfp4.py::_convert_moe_packed_tensors`:
  `scales - 127`, low nibble = even element, `ldexp`):
      <blk>.experts.gate_up_proj_blocks  uint8 [E, 2I, H/32, 16]  (gate/up interleaved rows)
      <blk>.experts.gate_up_proj_scales  uint8 [E, 2I, H/32]      E8M0, value 2^(u-127)
      <blk>.experts.gate_up_proj_bias    float [E, 2I]
      <blk>.experts.down_proj_blocks     uint8 [E, H, I/32, 16]
      <blk>.experts.down_proj_scales     uint8 [E, H, I/32]
      <blk>.experts.down_proj_bias       float [E, H]
  compressed-tensors `mxfp4-pack-quantized`: weight_packed uint8 [N, K/2] and
  weight_scale uint8 [N, K/32] (E8M0 bytes), no global scale.

MoE activation global scales follow vLLM's emulation (`convert_to_nvfp4_moe_kernel_format`):
one per layer, `a1 = 1 / max_e,proj(dequant-direction input scale of w1/w3)`, `a2 = 1 /
max_e(... of w2)`. Weight global scales stay exact per expert and per gate/up
projection (`w13_alpha` [E, 2]); vLLM uses the gate's for both (`w13_global_scale="gate"`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..formats import MXFP4, NVFP4, BlockFormat
from .io import SafetensorsCheckpoint

__all__ = ["LAYOUTS", "Layout", "ProjectionTensors", "detect_layout", "get_layout", "check_block_scales"]


@dataclasses.dataclass
class ProjectionTensors:
    """One quantized [N, K] projection as read from a checkpoint."""

    packed: torch.Tensor  # uint8 [N, K*bits/8]
    scale: torch.Tensor  # float8_e4m3fn (NVFP4) or uint8 E8M0 [N, K/block]
    alpha: Optional[torch.Tensor]  # fp32 0-d, dequantize direction (NVFP4)
    act_quant: Optional[torch.Tensor]  # fp32 0-d activation global scale, quantize direction
    act_dequant: Optional[torch.Tensor]  # the same, dequantize direction


def _fail(name: str, msg: str):
    raise ValueError(f"{name}: {msg}")


def _check_dtype(name, t, dtype):
    if t.dtype != dtype:
        _fail(name, f"expected dtype {dtype}, got {t.dtype}")


def _check_shape(name, t, shape, why=""):
    if tuple(t.shape) != tuple(shape):
        _fail(name, f"expected shape {tuple(shape)}{why}, got {tuple(t.shape)}")


def _scalar(name: str, t: torch.Tensor) -> torch.Tensor:
    """A one-element fp32 global scale, finite and positive, as a 0-d tensor."""
    _check_dtype(name, t, torch.float32)
    if t.numel() != 1 or t.dim() > 1:
        _fail(name, f"expected one value (shape [] or [1]), got shape {tuple(t.shape)}")
    v = t.reshape(())
    if not bool(torch.isfinite(v) & (v > 0)):
        _fail(name, f"expected a finite positive global scale, got {v.item()}")
    return v


def check_block_scales(name_scale: str, scale: torch.Tensor, packed: torch.Tensor, fmt: BlockFormat) -> None:
    """Data checks of block scales against the packed codes they scale.

    NVFP4 (E4M3): NaN bytes (0x7F/0xFF) and negative scales are corrupt; a zero scale
    over a block whose codes are not all zero disagrees with the packed data (every
    value would read 0). MX (E8M0): byte 255 is NaN.
    """
    if fmt.is_mx:
        bad = scale == 255
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            _fail(name_scale, f"E8M0 byte 255 (NaN) at index {idx}")
        return
    b = scale.view(torch.uint8)
    nan = (b & 0x7F) == 0x7F
    if bool(nan.any()):
        _fail(name_scale, f"E4M3 NaN block scale at index {tuple(int(i) for i in nan.nonzero()[0])}")
    neg = ((b & 0x80) != 0) & ((b & 0x7F) != 0)
    if bool(neg.any()):
        _fail(name_scale, f"negative E4M3 block scale at index {tuple(int(i) for i in neg.nonzero()[0])}")
    if fmt.pack_bits == 4:
        codes = torch.stack([packed & 0x0F, packed >> 4], -1).reshape(*packed.shape[:-1], -1)
        blocks = codes.reshape(*codes.shape[:-1], codes.shape[-1] // fmt.block_size, fmt.block_size)
        nonzero = ((blocks & 0x7) != 0).any(-1)
        bad = (b & 0x7F == 0) & nonzero
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            _fail(name_scale, f"block scale is 0 at index {idx} but its packed codes are not all zero: "
                              "the scales disagree with the packed data")


class Layout:
    """Base: per-projection tensors under a module prefix."""

    name = ""
    fmt: BlockFormat = NVFP4
    packed_suffix = ""
    scale_dtype = torch.float8_e4m3fn

    def has_projection(self, ckpt: SafetensorsCheckpoint, prefix: str) -> bool:
        return f"{prefix}.{self.packed_suffix}" in ckpt

    def _global(self, ckpt, prefix, want_act=True) -> tuple:  # (alpha, act_quant, act_dequant)
        return None, None, None

    def read_projection(self, ckpt: SafetensorsCheckpoint, prefix: str, shape: Optional[tuple] = None,
                        *, want_act: bool = True, check_data: bool = True) -> ProjectionTensors:
        """Read and validate one projection; `shape` is the logical (N, K) if known."""
        fmt = self.fmt
        pname, sname = f"{prefix}.{self.packed_suffix}", f"{prefix}.weight_scale"
        packed = ckpt.get(pname, what="packed weight")
        _check_dtype(pname, packed, torch.uint8)
        if packed.dim() != 2:
            _fail(pname, f"expected a 2-d [N, K/2] tensor, got shape {tuple(packed.shape)}")
        if shape is not None:
            _check_shape(pname, packed, (shape[0], fmt.packed_size(shape[1])), f" for a [{shape[0]}, {shape[1]}] weight")
        N, K = packed.shape[0], fmt.logical_size(packed.shape[1])
        if K % fmt.block_size:
            _fail(pname, f"K={K} is not a multiple of the {fmt.name} block size {fmt.block_size}")
        scale = ckpt.get(sname, what="block scale")
        _check_dtype(sname, scale, self.scale_dtype)
        _check_shape(sname, scale, (N, K // fmt.block_size), f" to match {pname} {tuple(packed.shape)}")
        if check_data:
            check_block_scales(sname, scale, packed, fmt)
        alpha, aq, ad = self._global(ckpt, prefix, want_act)
        return ProjectionTensors(packed, scale, alpha, aq, ad)


class CompressedTensorsNVFP4(Layout):
    name = "compressed-tensors-nvfp4"
    packed_suffix = "weight_packed"

    def _global(self, ckpt, prefix, want_act=True):
        gs = _scalar(f"{prefix}.weight_global_scale", ckpt.get(f"{prefix}.weight_global_scale", what="global scale"))
        alpha = (1.0 / gs).to(torch.float32)
        aq = ad = None
        name = f"{prefix}.input_global_scale"
        if name in ckpt:
            t = ckpt.get(name)
            if want_act:
                aq = _scalar(name, t)
                ad = (1.0 / aq).to(torch.float32)
        return alpha, aq, ad


class ModelOptNVFP4(Layout):
    name = "modelopt-nvfp4"
    packed_suffix = "weight"

    def has_projection(self, ckpt, prefix):
        return f"{prefix}.weight_scale_2" in ckpt

    def _global(self, ckpt, prefix, want_act=True):
        alpha = _scalar(f"{prefix}.weight_scale_2", ckpt.get(f"{prefix}.weight_scale_2", what="global scale"))
        aq = ad = None
        name = f"{prefix}.input_scale"
        if name in ckpt:
            t = ckpt.get(name)
            if want_act:
                ad = _scalar(name, t)
                aq = (1.0 / ad).to(torch.float32)
        return alpha, aq, ad


class CompressedTensorsMXFP4(Layout):
    name = "compressed-tensors-mxfp4"
    fmt = MXFP4
    packed_suffix = "weight_packed"
    scale_dtype = torch.uint8


class GptOssMXFP4(Layout):
    """Experts only (fused [E, ...] blocks and scales); dense layers are unquantized."""

    name = "gpt-oss-mxfp4"
    fmt = MXFP4
    scale_dtype = torch.uint8

    def has_projection(self, ckpt, prefix):
        return False

    def read_fused(self, ckpt: SafetensorsCheckpoint, prefix: str, proj: str, E: int, N: int, K: int,
                   check_data: bool = True):
        """(w [E, N, K/2], scale [E, N, K/32], bias or None) of `<prefix>.<proj>_*`."""
        bname, sname, biasname = f"{prefix}.{proj}_blocks", f"{prefix}.{proj}_scales", f"{prefix}.{proj}_bias"
        blocks = ckpt.get(bname, what="MXFP4 blocks")
        _check_dtype(bname, blocks, torch.uint8)
        _check_shape(bname, blocks, (E, N, K // 32, 16), f" for {E} experts of [{N}, {K}]")
        scales = ckpt.get(sname, what="MXFP4 scales")
        _check_dtype(sname, scales, torch.uint8)
        _check_shape(sname, scales, tuple(blocks.shape[:-1]), f" to match {bname} {tuple(blocks.shape)}")
        if check_data:
            check_block_scales(sname, scales, blocks, MXFP4)
        bias = ckpt.get_optional(biasname)
        if bias is not None:
            if not bias.is_floating_point():
                _fail(biasname, f"expected a float tensor, got {bias.dtype}")
            _check_shape(biasname, bias, (E, N))
        return blocks.reshape(E, N, K // 2), scales, bias


LAYOUTS = {lay.name: lay for lay in (CompressedTensorsNVFP4(), ModelOptNVFP4(), CompressedTensorsMXFP4(), GptOssMXFP4())}
_ALIASES = {"compressed-tensors": "compressed-tensors-nvfp4", "nvfp4-pack-quantized": "compressed-tensors-nvfp4",
            "mxfp4-pack-quantized": "compressed-tensors-mxfp4", "modelopt": "modelopt-nvfp4",
            "gpt-oss": "gpt-oss-mxfp4", "mxfp4": "gpt-oss-mxfp4"}


def get_layout(layout) -> Layout:
    if isinstance(layout, Layout):
        return layout
    name = _ALIASES.get(layout, layout)
    if name not in LAYOUTS:
        raise ValueError(f"layout: unknown layout {layout!r}; expected one of {sorted(LAYOUTS)} or {sorted(_ALIASES)}")
    return LAYOUTS[name]


def detect_layout(ckpt: SafetensorsCheckpoint) -> Layout:
    """The layout from the tensor names (and scale dtypes) in the checkpoint."""
    found = []
    keys = list(ckpt.keys())
    if any(k.endswith(".weight_scale_2") for k in keys):
        found.append("modelopt-nvfp4")
    packed = [k for k in keys if k.endswith(".weight_packed")]
    if packed:
        if any(k.endswith(".weight_global_scale") for k in keys):
            found.append("compressed-tensors-nvfp4")
        else:
            found.append("compressed-tensors-mxfp4")
    if any(k.endswith("_blocks") and k[: -len("_blocks")] + "_scales" in ckpt for k in keys):
        found.append("gpt-oss-mxfp4")
    if not found:
        raise ValueError(f"{ckpt.describe()}: no quantized tensors of a known layout (expected *.weight_packed, "
                         "*.weight_scale_2 or *_blocks/*_scales)")
    if len(found) > 1:
        raise ValueError(f"{ckpt.describe()}: tensors of several layouts {found}; pass layout=")
    return LAYOUTS[found[0]]
