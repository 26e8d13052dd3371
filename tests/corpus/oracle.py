"""emu_inductor's reference of a corpus entry's named variant.

Only emu_inductor's public API is used (formats.dequantize / fake_quantize on the stored
bytes, reference.apply_activation); the corpus layer's own code is never called here, except
its router (routing is not what the variant describes).
"""

from __future__ import annotations

import dataclasses

import torch

from emu_inductor.formats import QDQOptions, QuantizedTensor, dequantize, fake_quantize
from emu_inductor.reference import apply_activation, dequantize_weight

from . import Variant, WeightVariant


class MissingVariant(NotImplementedError):
    """The entry names a function emu_inductor.formats does not define (yet)."""


def _negzero_as_zero(packed: torch.Tensor) -> torch.Tensor:
    """Packed FP4 bytes with every 0x8 nibble (the -0 code) replaced by 0x0 (+0)."""
    b = packed.view(torch.uint8)
    lo, hi = b & 0x0F, b >> 4
    lo = torch.where(lo == 8, torch.zeros_like(lo), lo)
    hi = torch.where(hi == 8, torch.zeros_like(hi), hi)
    return (lo | (hi << 4)).view(packed.dtype)


def weight_reference(qt: QuantizedTensor, wv: WeightVariant, dtype: torch.dtype) -> torch.Tensor:
    """The stored weight dequantized by emu_inductor with the variant's product, in dtype."""
    fmt = qt.fmt
    if wv.negzero == "positive":  # code 0x8 read as code 0x0 (+0), nothing else changes
        qt = dataclasses.replace(qt, qdata=_negzero_as_zero(qt.qdata))
    elif wv.negzero != "keep":
        raise MissingVariant(f"negzero reader {wv.negzero!r}")
    if fmt.is_mx:
        opts = QDQOptions.resolve(fmt, "floor")  # the scale rule does not matter to dequant
        return dequantize(dataclasses.replace(qt, options=opts), dtype, e8m0_byte255=wv.e8m0_byte255,
                          e8m0_byte0=wv.e8m0_byte0)
    g = qt.global_scale.to(torch.float32)
    if wv.recipe is None:
        if wv.product != "q*(s*a)":
            raise MissingVariant(f"emu_inductor has no NVFP4 weight product {wv.product!r} without a recipe")
        return dequantize_weight(qt.qdata, qt.scale, fmt, alpha=g.reshape(-1) if g.numel() > 1 else g, dtype=dtype)
    lead = qt.qdata.dim() - 1  # per leading index (per expert): [E] -> [E, 1, 1, 1] over [E, N, nb, bs]
    g = g.reshape(()) if g.numel() == 1 else g.reshape(*g.shape, *([1] * (lead + 2 - g.dim())))
    try:
        opts = QDQOptions.resolve(fmt, recipe=wv.recipe)
    except ValueError as e:
        raise MissingVariant(str(e)) from e
    return dequantize(dataclasses.replace(qt, global_scale=g, options=opts), dtype)


def act_reference(x: torch.Tensor, variant: Variant, global_scale=None) -> torch.Tensor:
    if variant.act is None:
        return x
    kw = dict(variant.act)
    fmt = kw.pop("fmt")
    try:
        return fake_quantize(x, fmt, global_scale=global_scale, **kw)
    except ValueError as e:  # an option emu_inductor does not have (yet)
        raise MissingVariant(str(e)) from e


def linear_reference(layer, x: torch.Tensor, variant: Variant) -> torch.Tensor:
    view = layer.emu_view()
    w = weight_reference(view["weight"], variant.weight, x.dtype)
    a = act_reference(x, variant, view.get("a1_global"))
    return torch.nn.functional.linear(a, w, view.get("bias"))  # a layer's bias as its emu_view gives it


def moe_reference(layer, x: torch.Tensor, variant: Variant) -> torch.Tensor:
    """Per (token, slot) row: QDQ, GEMM1 with its expert, activation, QDQ, GEMM2; the k
    rows weighted by the router in fp32 and summed in fp32, one cast (emu_inductor's
    reference/moe.py numerics)."""
    view = layer.emu_view()
    w13 = weight_reference(view["w13"], variant.weight, x.dtype)
    w2 = weight_reference(view["w2"], variant.weight, x.dtype)
    topk_w, topk_ids = layer.route(x)
    T, k = topk_ids.shape
    ids = topk_ids.reshape(-1).long()
    rows = x.repeat_interleave(k, dim=0)
    a1 = act_reference(rows, variant, view.get("a1_global"))
    c1 = rows.new_zeros(rows.shape[0], w13.shape[1])
    for e in range(w13.shape[0]):
        c1 = torch.where((ids == e).unsqueeze(-1), a1 @ w13[e].t(), c1)
    c2 = apply_activation(c1, variant.activation)
    a2 = act_reference(c2, variant, view.get("a2_global"))
    c3 = rows.new_zeros(rows.shape[0], w2.shape[1])
    for e in range(w2.shape[0]):
        c3 = torch.where((ids == e).unsqueeze(-1), a2 @ w2[e].t(), c3)
    out = (c3.reshape(T, k, -1).float() * topk_w.float().unsqueeze(-1)).sum(dim=1)
    return out.to(x.dtype)


def reference(entry, layer, x):
    fn = linear_reference if entry.kind == "linear" else moe_reference
    return fn(layer, x, entry.variant)


def assert_within_accumulation(out: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    """The contract for GEMM outputs: fp32-accumulation rounding. An ulp there can flip a
    later fake-quantized element (one FP4 step), so bound the size of the difference, not
    the count of differing elements."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (what, out.shape, ref.shape, out.dtype, ref.dtype)
    d, r = (out.float() - ref.float()).abs(), ref.float().abs()
    assert torch.isfinite(d).all() or torch.equal(torch.isnan(out), torch.isnan(ref)), what
    d = torch.nan_to_num(d, nan=0.0)
    assert d.max().item() <= 0.05 * max(1.0, r.max().item()), (what, d.max().item(), r.max().item())
    assert d.mean().item() <= 0.02 * max(1e-3, r.mean().item()), (what, d.mean().item(), r.mean().item())
