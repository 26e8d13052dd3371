"""MX weights read with E8M0 byte 0 as 0.0 (OpSpec.w_e8m0_byte0 = "zero"): the exponent-bit
readers that build the scale as `(u.to(int32) << 23).view(float32)` with no byte-0 case
(Quark's Triton dequant; formats e8m0_decode(byte0="zero")).

* OpSpec: the field is left out of the spec string at its default (kernel digests and
  caches unchanged), validated, and named in short_name only when not the default;
* kernels (interpreter) equal the reference for an MXFP4 linear and a small MoE on random
  weights whose scale bytes include 0, and differ from what the 2^-127 reader gives, so a
  kernel ignoring the field fails;
* the red-team layer spelled `(u << 23).view(float32)` alone compiles with backend="mxemu"
  to one mxemu::linear and equals eager bit for bit.
"""

import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

from emu_inductor import _compat
from emu_inductor.formats import FORMATS
from emu_inductor.kernels import KernelSpec, render
from emu_inductor.kernels.render_helpers import fast_decode_kind
from emu_inductor.ops.reference_impl import linear_reference
from emu_inductor.ops.triton_impl import linear_triton, moe_triton
from emu_inductor.reference import dequantize_weight, moe_emulated
from emu_inductor.spec import OpSpec

MXFP4 = FORMATS["mxfp4"]


def _same(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


def _mx_weights(g, lead, N, K, low=2, high=9):
    """Random packed E2M1 codes and scale bytes, about a third of them byte 0. The others are
    kept >= 2 so that every weight the "zero" reader gives is an fp32/bf16 normal number
    (the CPU's bf16 GEMMs flush subnormal operands: the 2^-127 reader's weights would not
    compare exactly there)."""
    codes = torch.randint(0, 256, (*lead, N, K // 2), generator=g).to(torch.uint8)
    s = torch.randint(low, high, (*lead, N, K // 32), generator=g)
    s[torch.rand(s.shape, generator=g) < 0.35] = 0
    return codes, s.to(torch.uint8)


def test_opspec_field_defaults_validation_and_names():
    base, zero = OpSpec("mxfp4"), OpSpec("mxfp4", w_e8m0_byte0="zero")
    assert "w_e8m0_byte0" not in base.to_str() and '"w_e8m0_byte0":"zero"' in zero.to_str()
    assert OpSpec.from_str(zero.to_str()) == zero and not zero.weight_reader_default
    assert base.short_name() == "wmxfp4_a16_silu" and "e8m0b0zero" in zero.short_name()
    assert "e8m0b0zero" in OpSpec("mxfp4", w_e8m0_byte255="inf", w_e8m0_byte0="zero").short_name()
    k0, k1 = KernelSpec(base), KernelSpec(zero)
    assert "w_e8m0_byte0" not in k0.to_json() and k0.digest() != k1.digest()
    assert "tl.where(sc == 0, 0.0, _e8m0_decode(sc))" in render(k1)
    assert "tl.where(sc == 0, 0.0" not in render(k0)
    with pytest.raises(ValueError, match="w_e8m0_byte0"):
        OpSpec("mxfp4", w_e8m0_byte0="nan")
    with pytest.raises(ValueError, match="w_e8m0_byte0"):
        OpSpec("nvfp4", w_e8m0_byte0="zero")  # E4M3 block scales have no E8M0 byte 0


def test_gpu_only_decodes_refuse_the_zero_reader():
    """The inline-PTX MX decode assumes byte 0 is 2^-127: off for "zero"."""
    gpu = KernelSpec(OpSpec("mxfp4"), "bf16", interpret=False)
    assert fast_decode_kind(gpu, "none") == "mx"
    for b255 in ("nan", "inf"):
        z = dataclasses.replace(gpu, op=OpSpec("mxfp4", w_e8m0_byte255=b255, w_e8m0_byte0="zero"))
        assert fast_decode_kind(z, "none") == ""
        assert "_e2m1_i16_bf16(byt" not in render(z)


@pytest.mark.parametrize("b255", ["nan", "inf", "ldexp"])
def test_linear_kernel_equals_reference(b255):
    g = torch.Generator().manual_seed(3)
    q, s = _mx_weights(g, (), 32, 128)
    s[5, 1] = 255  # one byte 255 read by the byte-255 rule alongside the byte-0 rule
    # activations near 2^120: a 2^-127 block would add products near 2^-7, well visible
    x = (torch.randn(4, 128, generator=g) * 2.0 ** 120).to(torch.bfloat16)
    spec = OpSpec("mxfp4", w_e8m0_byte255=b255, w_e8m0_byte0="zero")
    out = linear_triton(x, q, s, None, None, None, spec)
    _same(out, linear_reference(x, q, s, None, None, None, spec))
    # what the default byte-0 reader gives (exact, in float64): far from the output
    w_pow2 = dequantize_weight(q, s, MXFP4, dtype=torch.float32, e8m0_byte255=b255)
    pow2 = x.double() @ w_pow2.double().t()
    ok = torch.isfinite(pow2) & torch.isfinite(out)
    assert (out.double() - pow2)[ok].abs().max() > 0.05


def test_moe_kernel_equals_reference():
    E, H, I, T = 4, 64, 32, 6
    g = torch.Generator().manual_seed(5)
    w13, s13 = _mx_weights(g, (E,), 2 * I, H)
    w2, s2 = _mx_weights(g, (E,), H, I, low=120, high=130)
    x = (torch.randn(T, H, generator=g) * 2.0 ** 120).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)]).to(torch.int32)
    tw = torch.softmax(torch.randn(T, 2, generator=g), -1)
    scheme = "w_mxfp4_a_mxfp4"
    spec = dataclasses.replace(OpSpec.from_scheme(scheme), w_e8m0_byte0="zero")
    args = (x, w13, s13, None, w2, s2, None, tw, ids, None, None, None)
    out = moe_triton(*args, spec, reduction="deterministic")
    ref = moe_emulated(x, w13, w2, tw, ids, scheme=scheme, w13_scale=s13, w2_scale=s2, e8m0_byte0="zero")
    _same(out, ref)
    # the 2^-127 reader's kernels on the same weights: a kernel ignoring the field gives this
    pow2 = moe_triton(*args, OpSpec.from_scheme(scheme), reduction="deterministic")
    assert not torch.equal(pow2, out)


def test_shift_only_layer_compiles_to_the_fused_op_and_equals_eager():
    """The red-team layer whose scale is `(u.to(int32) << 23).view(float32)` with only a
    byte-255 NaN case (a former near miss): its weights are proven e8m0(255=nan,0=zero) and
    the whole layer becomes one mxemu::linear with the MX floor QDQ. The input puts large
    values on the byte-0 block and zeros elsewhere, so output feature 0 is 0 under this
    reader and not under the 2^-127 one: a fused op reading byte 0 otherwise fails."""
    from torch._inductor import config as inductor_config

    from tests.corpus.redteam_linear import make_shift_only

    m, (x,) = make_shift_only(1, torch.bfloat16)
    assert m.e8m0[0, 0] == 0  # weight row 0, block 0: the block the two byte-0 readers tell apart
    x = torch.cat([x[..., :32] * 2.0 ** 100, torch.zeros_like(x[..., 32:])], -1)
    graphs = []

    def record(graph):  # runs after the post-grad passes, mxemu's included
        graphs.append({str(n.target) for n in graph.nodes if n.op == "call_function"})
        for n in graph.nodes:
            if str(n.target) == "mxemu.linear.default":
                graphs.append(OpSpec.from_str(next(a for a in n.args if isinstance(a, str))))

    counters.clear()
    torch._dynamo.reset()
    with _compat.inductor_caches_disabled(), inductor_config.patch(post_grad_custom_post_pass=record), \
            torch.no_grad():
        out = torch.compile(m, backend="mxemu")(x)
        ref = m(x)
    assert counters["mxemu"]["semantic"] >= 1, dict(counters["mxemu"])
    targets, spec = graphs[0], graphs[1]
    assert "mxemu.linear.default" in targets and not any(t.startswith("aten.bmm") or t.startswith("aten.mm")
                                                          for t in targets), targets
    assert spec.w_e8m0_byte0 == "zero" and spec.w_e8m0_byte255 == "nan" and spec.act_kind == "block"
    assert torch.equal(out, ref)
    assert (ref[..., 0] == 0).all()
    w_pow2 = dequantize_weight(m.blocks, m.e8m0, MXFP4, dtype=torch.float32)
    assert (m.act_qdq(x).double() @ w_pow2[0].double()).abs().min() > 0  # the 2^-127 reader's feature 0
