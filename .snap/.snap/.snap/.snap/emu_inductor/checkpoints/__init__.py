"""Quantized safetensors checkpoints (compressed-tensors NVFP4 / MXFP4, NVIDIA ModelOpt
NVFP4, gpt-oss MXFP4) read into emulated modules. Safetensors only: never unpickles."""

from .io import PICKLE_SUFFIXES, SafetensorsCheckpoint, open_checkpoint
from .layouts import LAYOUTS, Layout, ProjectionTensors, check_block_scales, detect_layout, get_layout
from .load import load_checkpoint, read_experts, read_linear

__all__ = [
    "PICKLE_SUFFIXES", "SafetensorsCheckpoint", "open_checkpoint", "LAYOUTS", "Layout", "ProjectionTensors",
    "check_block_scales", "detect_layout", "get_layout", "load_checkpoint", "read_experts", "read_linear",
]
