"""pack / unpack: round trips and the bit layouts, pinned with hand-written bytes."""

from __future__ import annotations

import pytest
import torch

from emu_inductor.formats import FORMATS, FP6_LAYOUTS, pack, quantize, unpack


def u8(*v) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.int32).to(torch.uint8)


def rand_codes(shape, bits, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.int32).to(torch.uint8)


# --- 4-bit: two codes per byte, element 2j in the low nibble -----------------------------


def test_fp4_nibble_order_hand_bytes():
    assert pack(u8(1, 2), 4).tolist() == [0x21]
    assert pack(u8(0xF, 0x0, 0x3, 0xA), 4).tolist() == [0x0F, 0xA3]
    assert pack(u8(0x7, 0x8, 0x0, 0xF), 4).tolist() == [0x87, 0xF0]
    assert unpack(u8(0x21, 0xA3, 0x0F), 4).tolist() == [1, 2, 3, 0xA, 0xF, 0]
    # only the low nibble of each code is used
    assert pack(u8(0xF1, 0xE2), 4).tolist() == [0x21]


def test_fp4_matches_reference_formula():
    # byte[j] = code[2j] | code[2j+1] << 4 (vLLM break_fp4_bytes, compressed-tensors
    # pack_fp4_to_uint8, torchao pack_uint4, Quark Pack_fp4), written out independently
    c = rand_codes((3, 5, 16), 4, seed=1)
    ci = c.to(torch.int64)
    want = (ci[..., 0::2] + 16 * ci[..., 1::2]).to(torch.uint8)
    assert torch.equal(pack(c, 4), want)


@pytest.mark.parametrize("shape", [(2,), (7, 2), (3, 4, 10), (2, 1, 3, 64)])
def test_fp4_roundtrip(shape):
    c = rand_codes(shape, 4, seed=len(shape))
    p = pack(c, 4)
    assert p.dtype == torch.uint8 and p.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(unpack(p, 4), c)
    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    assert torch.equal(pack(unpack(every_byte, 4), 4), every_byte)


def test_fp4_non_contiguous_input():
    c = rand_codes((8, 6), 4, seed=2).t()  # [6, 8], non-contiguous
    assert torch.equal(unpack(pack(c, 4), 4), c)


# --- 6-bit ---------------------------------------------------------------------------------


def test_fp6_quark_hand_bytes():
    # W = c0 | c1<<6 | c2<<12 | c3<<18 ; bytes = W & 0xFF, W>>8 & 0xFF, W>>16 & 0xFF
    # [1,2,3,4]: W = 1 + 128 + 12288 + 1048576 = 0x103081
    assert pack(u8(1, 2, 3, 4), 6).tolist() == [0x81, 0x30, 0x10]
    assert pack(u8(0x3F, 0, 0, 0), 6).tolist() == [0x3F, 0x00, 0x00]
    assert pack(u8(0, 0x3F, 0, 0), 6).tolist() == [0xC0, 0x0F, 0x00]
    assert pack(u8(0, 0, 0x3F, 0), 6).tolist() == [0x00, 0xF0, 0x03]
    assert pack(u8(0, 0, 0, 0x3F), 6).tolist() == [0x00, 0x00, 0xFC]
    assert pack(u8(0x3F, 0x3F, 0x3F, 0x3F), 6).tolist() == [0xFF, 0xFF, 0xFF]
    assert unpack(u8(0x81, 0x30, 0x10, 0xC0, 0x0F, 0x00), 6).tolist() == [1, 2, 3, 4, 0, 0x3F, 0, 0]
    # explicit layout name; bits above 6 are dropped
    assert pack(u8(0x41, 0x82, 0xC3, 0x04), 6, fp6_layout="quark").tolist() == [0x81, 0x30, 0x10]


def test_fp6_quark_matches_reference_formula():
    c = rand_codes((5, 4 * 9), 6, seed=3)
    p = pack(c, 6)
    assert p.shape == (5, 27)
    b = p.to(torch.int64).reshape(5, 9, 3)
    w = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    got = torch.stack([(w >> (6 * j)) & 0x3F for j in range(4)], dim=-1).reshape(5, 36)
    assert torch.equal(got.to(torch.uint8), c)


@pytest.mark.parametrize("layout", FP6_LAYOUTS)
@pytest.mark.parametrize("shape", [(4,), (3, 8), (2, 3, 32)])
def test_fp6_roundtrip(layout, shape):
    c = rand_codes(shape, 6, seed=4)
    p = pack(c, 6, fp6_layout=layout)
    k = shape[-1]
    assert p.dtype == torch.uint8
    assert p.shape[-1] == (k * 3 // 4 if layout == "quark" else k)
    assert torch.equal(unpack(p, 6, fp6_layout=layout), c)


def test_fp6_unpacked_is_one_code_per_byte():
    assert pack(u8(1, 2, 0x3F, 0x7F), 6, fp6_layout="unpacked").tolist() == [1, 2, 0x3F, 0x3F]
    assert unpack(u8(1, 0xC2), 6, fp6_layout="unpacked").tolist() == [1, 2]
    # any last dim works unpacked
    c = rand_codes((3, 5), 6)
    assert torch.equal(unpack(pack(c, 6, fp6_layout="unpacked"), 6, fp6_layout="unpacked"), c)


def test_fp6_quark_every_24bit_word_roundtrip_sample():
    g = torch.Generator().manual_seed(5)
    b = torch.randint(0, 256, (4096, 3), generator=g, dtype=torch.int32).to(torch.uint8)
    assert torch.equal(pack(unpack(b, 6), 6), b)


# --- 8-bit ---------------------------------------------------------------------------------


def test_fp8_identity():
    c = rand_codes((4, 6), 8)
    assert torch.equal(pack(c, 8), c)
    assert torch.equal(unpack(c, 8), c)
    assert pack(u8(0x12, 0xFF), 8).tolist() == [0x12, 0xFF]


# --- through quantize: qdata layout and codes --------------------------------------------


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_quantized_tensor_qdata_shape_and_codes(fmt):
    f = FORMATS[fmt]
    x = torch.randn(3, 2, 64, generator=torch.Generator().manual_seed(6))
    q = quantize(x, fmt)
    assert q.qdata.dtype == torch.uint8
    assert q.qdata.shape == (3, 2, f.packed_size(64))
    assert f.logical_size(q.qdata.shape[-1]) == 64
    assert q.codes.shape == (3, 2, 64)
    assert torch.equal(pack(q.codes, f.pack_bits), q.qdata)
    assert int(q.codes.max()) < (1 << f.element.bits)


@pytest.mark.parametrize("fmt", ["mxfp6_e2m3", "mxfp6_e3m2"])
def test_fp6_layouts_through_quantize(fmt):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(7))
    qq = quantize(x, fmt, fp6_layout="quark")
    qu = quantize(x, fmt, fp6_layout="unpacked")
    assert qq.qdata.shape == (4, 48) and qu.qdata.shape == (4, 64)
    assert torch.equal(qq.codes, qu.codes)
    assert torch.equal(qu.qdata, qu.codes)
    assert torch.equal(pack(qu.codes, 6, fp6_layout="quark"), qq.qdata)


def test_packed_sizes():
    assert [FORMATS[n].packed_size(64) for n in ("nvfp4", "mxfp4", "mxfp6_e2m3", "mxfp8_e4m3")] == [32, 32, 48, 64]


def test_fp4_nibble_order_vs_compressed_tensors():
    """compressed-tensors (a `test` extra) packs NVFP4/MXFP4 checkpoints: its CPU
    pack_fp4_to_uint8 / unpack_fp4_from_uint8 agree with pack/unpack + encode/decode."""
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8

    from emu_inductor.formats import E2M1, decode, encode

    codes = rand_codes((6, 32), 4, seed=8)
    codes[0, :16] = torch.arange(16, dtype=torch.int32).to(torch.uint8)
    vals = decode(codes, E2M1)
    ours = pack(encode(vals, E2M1), 4)
    theirs = pack_fp4_to_uint8(vals)
    # CT derives the sign from signbit too, so -0.0 is 0x8 in both
    assert torch.equal(ours, theirs)
    back = unpack_fp4_from_uint8(ours, 6, 32, dtype=torch.float32)
    assert torch.equal(back.view(torch.int32), vals.view(torch.int32))
