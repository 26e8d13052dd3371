"""Random weights and inputs for corpus layers, and the emu-layout view of stored bytes."""

from __future__ import annotations

import torch

from emu_inductor.formats import QDQOptions, QuantizedTensor, get_format


def gen(seed: int) -> torch.Generator:
    # On the default device, so benchmarks/bench_corpus.py can build layers on a GPU under
    # `with torch.device("cuda")` (construction only: forward does not rely on it).
    return torch.Generator(device=torch.get_default_device()).manual_seed(seed)


def weight(g: torch.Generator, *shape, dtype=torch.bfloat16, spread: float = 1.0) -> torch.Tensor:
    """Gaussian rows with per-row magnitudes over a few octaves (varied block scales)."""
    w = torch.randn(*shape, generator=g) * torch.exp2(torch.randn(*shape[:-1], 1, generator=g) * spread) / 8
    return w.to(dtype)


def moe_weights(g: torch.Generator, E: int, H: int, I: int, dtype=torch.bfloat16):
    """(router [E, H], w13 [E, 2I, H] gate rows then up rows, w2 [E, H, I])."""
    return weight(g, E, H, dtype=dtype), weight(g, E, 2 * I, H, dtype=dtype), weight(g, E, H, I, dtype=dtype)


def tokens(seed: int, T: int, K: int, dtype=torch.bfloat16) -> torch.Tensor:
    g = gen(seed + 1000)
    return (torch.randn(T, K, generator=g) * torch.exp2(torch.randn(T, 1, generator=g))).to(dtype)


def qtensor(fmt: str, packed: torch.Tensor, scale: torch.Tensor, global_scale=None) -> QuantizedTensor:
    """emu_inductor's QuantizedTensor over bytes already in its layout: element 2j in the
    low nibble, quantized axis last; scale uint8 E8M0 (MX) or float8_e4m3fn (NVFP4)."""
    f = get_format(fmt)
    shape = torch.Size([*packed.shape[:-1], packed.shape[-1] * 8 // f.pack_bits])
    opts = QDQOptions.resolve(f, "floor") if f.is_mx else QDQOptions.resolve(f)
    return QuantizedTensor(packed.contiguous(), scale.contiguous(), global_scale, f, shape, -1, opts)
