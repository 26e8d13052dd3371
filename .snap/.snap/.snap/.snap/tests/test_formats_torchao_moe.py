"""NVFP4 recipe "torchao_moe" equals torchao 0.18's moe_training dequantization bit for bit.

`torchao.prototype.moe_training.nvfp4_grouped_mm._nvfp4_dequantize(per_tensor_scale=)`
forms (q * s) * pts in fp32 (the emulated grouped GEMMs' order), where NVFP4Tensor's own
dequantize forms q * (pts * s) (recipe "torchao"). Compared on the formats library
probes (random data at many magnitudes, ties, zero / subnormal / saturating / NaN / Inf
blocks) in fp32 and bf16, as fake-quantization (activations) and as the dequantization of
torchao's own stored bytes (weights).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from emu_inductor.formats import FORMATS, QDQOptions, QuantizedTensor, dequantize, fake_quantize, quantize
from tests.test_formats_libraries import DT_IDS, DTYPES, _special_rows, assert_bits_equal, probes


def _torchao():
    pytest.importorskip("torchao")
    from torchao.prototype.moe_training.nvfp4_grouped_mm import _nvfp4_dequantize
    from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize, per_tensor_amax_to_scale

    return nvfp4_quantize, _nvfp4_dequantize, per_tensor_amax_to_scale


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_torchao_moe_dequantize_equals_torchao(dtype):
    nvfp4_quantize, nvfp4_dequantize, per_tensor_amax_to_scale = _torchao()
    differs_from_torchao = 0
    for seed, calib in ((0, None), (1, None), (2, 10.0), (3, 0.37)):
        x = probes("nvfp4", dtype, seed)
        # the probes' own amax (huge: most blocks then clamp to the 2^-6 floor) or a
        # calibration amax of ordinary activations (block scales off powers of two)
        amax = x.float()[~_special_rows(x)].abs().max() if calib is None else torch.tensor(calib)
        pts = per_tensor_amax_to_scale(amax)
        s, d = nvfp4_quantize(x, 16, pts)
        want = nvfp4_dequantize(d, s, 16, per_tensor_scale=pts, output_dtype=dtype)
        # activations: the whole QDQ
        got = fake_quantize(x, "nvfp4", recipe="torchao_moe", global_scale=pts)
        assert_bits_equal(got, want, f"torchao_moe fake_quantize {seed}")
        q = quantize(x, "nvfp4", recipe="torchao_moe", global_scale=pts)
        assert torch.equal(q.scale.view(torch.uint8), s.view(torch.uint8))
        assert_bits_equal(dequantize(q, dtype), want, f"torchao_moe dequantize(quantize) {seed}")
        # weights: torchao's stored bytes read with the recipe's product
        qt = QuantizedTensor(d.view(torch.uint8), s, pts, FORMATS["nvfp4"], x.shape,
                             options=QDQOptions.resolve(FORMATS["nvfp4"], recipe="torchao_moe"))
        ok = ~_special_rows(x)  # torchao's codes of NaN elements are garbage: compare finite rows
        assert_bits_equal(dequantize(qt, dtype)[ok], want[ok], f"torchao_moe stored bytes {seed}")
        other = fake_quantize(x, "nvfp4", recipe="torchao", global_scale=pts)
        differs_from_torchao += int(((other != want) & ~(torch.isnan(other) & torch.isnan(want))).sum())
    if dtype == torch.float32:  # the product order is visible in fp32 (the probes must see it)
        assert differs_from_torchao > 0


def test_torchao_moe_is_torchao_but_the_product():
    from emu_inductor.formats import NVFP4_RECIPES

    a, b = NVFP4_RECIPES["torchao"], NVFP4_RECIPES["torchao_moe"]
    assert dataclasses.replace(b, name="torchao", dequant=a.dequant) == a
