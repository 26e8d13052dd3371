"""The E8M0 weight reader "ldexp": `torch.ldexp(v, u - 127)` as transformers' gpt-oss
`convert_moe_packed_tensors` applies block scales. It equals the "inf" reader on every
byte but 255, where it multiplies by 2^128 exactly: a zero element stays +-0 (not
0 * inf = NaN), 0.5 becomes 2^127 (finite in fp32 / bf16), |v| >= 1 overflows to +-inf.

formats (reference) vs transformers' function on every (code byte, scale byte) pair, the
generated kernels (interpreter) vs the reference bit for bit on byte-255 blocks holding
zero, 0.5 and larger codes, the OpSpec field, and the recogniser choosing the reader."""

import pytest
import torch

from emu_inductor.formats import FORMATS, MXFP4, dequantize, e8m0_multiply, quantize
from emu_inductor.kernels import KernelSpec, render
from emu_inductor.ops.reference_impl import grouped_mm_reference, linear_reference
from emu_inductor.ops.triton_impl import grouped_mm_triton, linear_triton
from emu_inductor.recognize import WeightVerdict, gemm_nodes, recognize_weight
from emu_inductor.reference import dequantize_weight
from emu_inductor.spec import OpSpec

from tests.test_recognize_weight import trace

_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _bits_equal(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(_BITS[a.dtype]), b.view(_BITS[b.dtype]))


def _every_pair(N=64, K=256):
    """Packed bytes and scale bytes such that every code byte meets every scale byte."""
    c = (torch.arange(N * K // 2) % 256).to(torch.uint8).reshape(N, K // 2)
    s = (torch.arange(N * K // 32) % 256).to(torch.uint8).reshape(N, K // 32)
    return c, s


def test_edge_values():
    v = torch.tensor([0.0, -0.0, 0.5, -0.5, 1.0, -6.0, 0.5, 0.0])
    u = torch.tensor([255] * 6 + [0, 0], dtype=torch.uint8)
    out = e8m0_multiply(v, u, byte255="ldexp")
    want = torch.tensor([0.0, -0.0, 2.0 ** 127, -(2.0 ** 127), float("inf"), float("-inf"), 2.0 ** -128, 0.0])
    assert _bits_equal(out, want)
    assert torch.isnan(e8m0_multiply(v, u, byte255="inf")[:2]).all()  # what "ldexp" is not
    with pytest.raises(ValueError, match="byte255"):
        e8m0_multiply(v, u, byte255="zero")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_reference_equals_transformers_convert_moe_packed_tensors(dtype):
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    c, s = _every_pair()
    N, Kp = c.shape
    theirs = mx.convert_moe_packed_tensors(c.reshape(1, N, Kp // 16, 16), s.reshape(1, N, -1), dtype=dtype)[0].t()
    ours = dequantize_weight(c, s, MXFP4, dtype=dtype, e8m0_byte255="ldexp")
    assert _bits_equal(ours, theirs)
    assert not _bits_equal(dequantize_weight(c, s, MXFP4, dtype=dtype, e8m0_byte255="inf"), theirs)
    # formats.dequantize takes the same reader option
    q = quantize(torch.randn(N, Kp * 2), "mxfp4")
    q.qdata.copy_(c)
    q.scale.copy_(s)
    assert _bits_equal(dequantize(q, dtype, e8m0_byte255="ldexp"), theirs)


def _edge_weights(lead, N, seed):
    """MXFP4 bytes and scales where every 3rd block has scale byte 255 and holds zeros,
    +-0.5 (finite after x 2^128) and, in one such block of three, a single +-1.0 (inf)."""
    g = torch.Generator().manual_seed(seed)
    shape = ((lead,) if lead > 1 else ()) + (N,)
    q = torch.randint(0, 256, shape + (32,), generator=g).to(torch.uint8)
    s = torch.randint(110, 135, shape + (2,), generator=g).to(torch.uint8)
    s.view(-1)[::3] = 255
    s.view(-1)[1::7] = 0
    qb = q.reshape(*s.shape, 16)
    small = torch.tensor([0x00, 0x81, 0x19, 0x98, 0x08, 0x91], dtype=torch.uint8)  # 0, +-0, +-0.5
    fill = small[torch.randint(0, 6, qb.shape, generator=g)]
    hit = s == 255
    qb[hit] = fill[hit]
    blocks = qb.reshape(-1, 16)
    # one +-inf per weight row at most: one-hot rows then read it out (0 * inf elsewhere is NaN)
    for n, i in enumerate(torch.nonzero(hit.reshape(-1)).reshape(-1)[::3].tolist()):
        blocks[i, 5] = 0x02 if n % 2 else 0xA0  # low nibble 1.0 / high nibble -1.0
    return qb.reshape(q.shape), s


def test_kernels_equal_reference_linear_and_grouped():
    spec = OpSpec("mxfp4", w_e8m0_byte255="ldexp")
    inf = OpSpec("mxfp4", w_e8m0_byte255="inf")
    q, s = _edge_weights(1, 64, 0)
    eye = torch.eye(64)  # fp32 one-hot rows read the dequantized weights out exactly
    out = linear_triton(eye, q, s, None, None, None, spec)
    ref = linear_reference(eye, q, s, None, None, None, spec)
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    assert (ref.abs() == 2.0 ** 127).any() and (ref == 0).any() and torch.isinf(ref).any()
    assert not torch.equal(torch.nan_to_num(ref, nan=7.0), torch.nan_to_num(
        linear_reference(eye, q, s, None, None, None, inf), nan=7.0))
    # the bf16 path: weights rounded once to bf16 (2^127 is finite there); scale bytes 0 / 1
    # left out: the CPU reference's bf16 GEMM flushes their subnormal products (any reader)
    x, sb = eye.to(torch.bfloat16), torch.where(s < 2, 2, s)
    torch.testing.assert_close(linear_triton(x, q, sb, None, None, None, spec),
                               linear_reference(x, q, sb, None, None, None, spec), rtol=0, atol=0, equal_nan=True)
    qe, se = _edge_weights(2, 32, 1)
    offs = torch.tensor([40, 64], dtype=torch.int32)
    out = grouped_mm_triton(eye, qe, se, None, offs, None, spec)
    ref = grouped_mm_reference(eye, qe, se, None, offs, None, spec)
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


def test_spec_field():
    spec = OpSpec("mxfp4", w_e8m0_byte255="ldexp")
    assert OpSpec.from_str(spec.to_str()) == spec
    assert "w_e8m0_byte255" not in OpSpec("mxfp4").to_str()
    names = {OpSpec("mxfp4", w_e8m0_byte255=r).short_name() for r in ("nan", "inf", "ldexp")}
    assert len(names) == 3
    src = render(KernelSpec(spec))
    assert "s2 = tl.where(sc == 255, 2.0, 1.0)" in src and "0x7F000000" in src
    assert "s2 = " not in render(KernelSpec(OpSpec("mxfp4", w_e8m0_byte255="inf")))


E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def deq_ldexp(w, s):
    """gpt-oss's decode spelled plainly: LUT per nibble, then torch.ldexp by the E8M0 byte."""
    lut = torch.tensor(E2M1, dtype=torch.bfloat16)
    v = torch.stack([lut[(w & 0x0F).int()], lut[(w >> 4).int()]], -1).reshape(w.shape[0], -1, 32)
    return torch.ldexp(v, (s.to(torch.int32) - 127).unsqueeze(-1)).reshape(w.shape[0], -1)


def test_recogniser_picks_the_ldexp_reader():
    c, s = _every_pair(48, 64)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    gm = trace(lambda x, w, s: x @ deq_ldexp(w, s).t(), x, c, s)
    (gemm,) = gemm_nodes(gm.graph)
    v = recognize_weight(gemm, use_cache=False)
    assert isinstance(v, WeightVerdict), v.reason
    assert v.variant.fmt == "mxfp4" and v.variant.e8m0_byte255 == "ldexp" and v.kernel_supported
    assert v.variant.spec_fields["w_e8m0_byte255"] == "ldexp"
    g = torch.Generator().manual_seed(5)
    w2 = torch.randint(0, 256, (48, 32), generator=g).to(torch.uint8)
    s2 = torch.randint(0, 256, (48, 2), generator=g).to(torch.uint8)
    want = deq_ldexp(w2, s2)
    assert _bits_equal(v.reference(w2, s2, None), want.mT if v.transpose else want)  # the GEMM operand
