"""What the red-team dense linears (tests/corpus/redteam_linear.py) needed from the
recogniser, on traced post-grad graphs (no torch.compile; the corpus compile test covers
the passes):

* a LUT expanded for `torch.gather` is a 16-entry table (broadcast dims hold no new
  elements), while a constant table with distinct rows stays refused;
* a [256, 2] table input (both FP4 values of every byte) is a look-up table, its values
  guarded;
* einsum's unsqueeze + permute + reshape between the QDQ and the GEMM keeps rows, so the
  QDQ is found behind it; a chain that moves elements across rows is not looked through;
* an MX scale written without a NaN/Inf guard, `clamp(ceil(log2(amax / 6)), -127, 127)`,
  is rceil with inf_amax "max" (an Inf block scaled by 2^127), which the kernels compute;
* a plain bucketize on the E2M1 midpoints rounds ties toward zero: the variant with rounding
  "half_toward_zero", which the kernels now render as such (they rendered it half away).
Each verdict's reference is compared with the user's function on fresh inputs.
"""

import torch

from emu_inductor.formats import MXFP4, fake_quantize
from emu_inductor.recognize import (ActVerdict, Rejection, WeightVerdict, gemm_nodes, recognize_activation,
                                    recognize_weight)
from tests.corpus import redteam_linear as R
from tests.corpus.probes import same_bits
from tests.test_recognize_activation import recognise, trace
from tests.test_recognize_weight import leaves



def _mx_decode_gather(w, s):
    idx = torch.stack([w & 15, w >> 4], -1).flatten(-2).long()
    v = torch.gather(torch.tensor(R.FP4_VALUES).expand(idx.shape[0], 16), 1, idx).unflatten(-1, (-1, 32))
    return (v * torch.exp2(s.float() - 127.0).unsqueeze(-1)).flatten(-2).to(torch.bfloat16)


def _weight_verdict(deq, *args, known=()):
    """recognize_weight on `x @ deq(*args).t()`; `known`: positions in args whose values
    the caller gives (as the compile's real inputs would)."""
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    gm = trace(lambda x, *a: x @ deq(*a).t(), x, *args)
    (gemm,) = gemm_nodes(gm.graph)
    inputs = [p for p in gm.graph.nodes if p.op == "placeholder"][1:]
    values = {inputs[i]: args[i] for i in known}
    return recognize_weight(gemm, use_cache=False, values=values or None)


def _ref(v, w, s):
    r = v.reference(w, s, None)
    return r.mT if v.transpose else r


def test_gather_from_an_expanded_lut_is_a_table_lookup():
    w, s, _ = leaves(1, N=16, fmt=MXFP4)
    v = _weight_verdict(_mx_decode_gather, w, s)
    assert isinstance(v, WeightVerdict), v.reason
    assert v.variant.fmt == "mxfp4" and v.kernel_supported
    for seed in (2, 3):
        w, s, _ = leaves(seed, N=16, fmt=MXFP4)
        assert torch.equal(_mx_decode_gather(w, s).view(torch.int16), _ref(v, w, s).view(torch.int16))


def test_gather_from_a_large_table_with_distinct_rows_stays_refused():
    def deq(w, s):
        idx = torch.stack([w & 15, w >> 4], -1).flatten(-2).long()
        rows = torch.arange(idx.shape[0], dtype=torch.float32).unsqueeze(-1)
        table = torch.tensor(R.FP4_VALUES) * (1.0 + rows)  # a constant, but 48 x 16 distinct values: each row its own
        v = torch.gather(table, 1, idx).unflatten(-1, (-1, 32))
        return (v * torch.exp2(s.float() - 127.0).unsqueeze(-1)).flatten(-2).to(torch.bfloat16)

    w, s, _ = leaves(4, N=48, fmt=MXFP4)
    r = _weight_verdict(deq, w, s)
    assert isinstance(r, Rejection) and "data-dependent indices" in r.reason, r


def test_byte_pair_table_input_is_a_guarded_lookup():
    pairs = R.byte_pairs()
    assert pairs.shape == (256, 2)

    def deq(w, s, table):
        v = table[w.long()].reshape(w.shape[0], -1, 32)
        return torch.ldexp(v, (s.to(torch.int32) - 127).unsqueeze(-1)).flatten(1).to(torch.bfloat16)

    w, s, _ = leaves(5, N=16, fmt=MXFP4)
    v = _weight_verdict(deq, w, s, pairs, known=(2,))
    assert isinstance(v, WeightVerdict), v.reason
    assert v.variant.e8m0_byte255 == "ldexp" and v.kernel_supported
    assert any(len(g.values) == 512 for g in v.guards), v.guards
    for seed in (6, 7):
        w, s, _ = leaves(seed, N=16, fmt=MXFP4)
        assert torch.equal(deq(w, s, pairs).view(torch.int16), _ref(v, w, s).view(torch.int16))
    # unknown values: no table of the formats has that shape, so nothing is assumed
    r = _weight_verdict(deq, w, s, pairs)
    assert isinstance(r, Rejection), r


def _floor_qdq(x):
    return R.MagicMXFP4Linear(torch.randn(8, 64)).act_qdq(x)


def test_qdq_behind_einsum_layout_is_found():
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    w = torch.randn(8, 64, dtype=torch.bfloat16)
    gm = trace(lambda x, w: torch.einsum("bsk,nk->bsn", _floor_qdq(x), w), x, w)
    (gemm,) = gemm_nodes(gm.graph)
    assert gemm.target is torch.ops.aten.bmm.default
    v = recognize_activation(gemm, use_cache=False)
    assert isinstance(v, ActVerdict), v.reason
    assert (v.variant.kind, v.variant.scale_mode) == ("mx", "floor")
    names = [str(p.target) for p in v.post]
    assert any("permute" in n for n in names) and any("unsqueeze" in n for n in names), names
    for seed in (8, 9):
        xr = torch.randn(4, 64, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16) * 3
        assert same_bits(_floor_qdq(xr), v.reference(xr)).all()


def test_layout_that_mixes_rows_is_not_looked_through():
    # the two 32-blocks of each row interleaved: rows are not carried whole to the GEMM
    def fn(x, w):
        q = _floor_qdq(x)
        return q.reshape(6, 2, 32).transpose(1, 2).reshape(6, 64) @ w.t()

    gm = trace(fn, torch.randn(6, 64, dtype=torch.bfloat16), torch.randn(8, 64, dtype=torch.bfloat16))
    (gemm,) = gemm_nodes(gm.graph)
    v = recognize_activation(gemm, use_cache=False)
    assert isinstance(v, Rejection) or not any("transpose" in str(p.target) for p in v.post), v


def test_unguarded_ceil_log2_scale_is_rceil_with_inf_max():
    m, _ = R.make_ceil_mxfp4(1, torch.bfloat16)
    v = recognise(m.act_qdq)
    assert isinstance(v, ActVerdict), v.reason
    assert (v.variant.scale_mode, v.variant.inf_amax) == ("rceil", "max") and v.kernel_supported, v.variant
    g = torch.Generator().manual_seed(10)
    x = torch.randn(6, 64, generator=g) * torch.exp2(torch.randint(-30, 30, (6, 1), generator=g).float())
    x[0, 5], x[1, 40], x[2, :32] = float("inf"), -float("inf"), 0.0
    x = x.to(torch.bfloat16)
    assert same_bits(m.act_qdq(x), v.reference(x)).all()
    ref = fake_quantize(x, "mxfp4", scale_mode="rceil", inf_amax="max")
    assert same_bits(m.act_qdq(x), ref).all()
    assert not torch.isnan(m.act_qdq(x)[:2]).any()  # an Inf block is scaled by 2^127, not NaN


def test_plain_bucketize_is_ties_toward_zero_and_the_kernel_computes_it():
    m, _ = R.make_plain_bucketize(1, torch.bfloat16)
    v = recognise(m.act_qdq)
    assert isinstance(v, ActVerdict), v.reason
    assert (v.variant.scale_mode, v.variant.rounding, v.variant.inf_amax) == ("floor", "half_toward_zero", "max")
    assert v.kernel_supported
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5]
    row = [6.0] + (ties * 4)[:31] + [-4.0] + ([-t for t in ties] * 4)[:31]  # two 32-blocks of ties
    x = torch.tensor([row, [t / 8 for t in row], [float("inf"), 2.0 ** 125] + row[2:]]).to(torch.bfloat16)
    assert same_bits(m.act_qdq(x), v.reference(x)).all()
    assert same_bits(m.act_qdq(x), fake_quantize(x, "mxfp4", scale_mode="floor", rounding="half_toward_zero",
                                                 inf_amax="max")).all()
    # the rendered kernel with that rounding equals the reference (it rounded ties away before)
    from emu_inductor.ops.reference_impl import linear_reference
    from emu_inductor.ops.triton_impl import linear_triton
    from emu_inductor.spec import OpSpec

    op = OpSpec("mxfp4", "block", "mxfp4", "floor", act_rounding="half_toward_zero", act_inf_amax="max")
    g = torch.Generator().manual_seed(11)
    w = torch.randint(0, 256, (16, 32), generator=g, dtype=torch.uint8)
    s = torch.randint(120, 130, (16, 2), generator=g, dtype=torch.uint8)
    out = linear_triton(x[:2], w, s, None, None, None, op)
    ref = linear_reference(x[:2], w, s, None, None, None, op)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    rne = linear_reference(x[:2], w, s, None, None, None, OpSpec("mxfp4", "block", "mxfp4", "floor"))
    assert not torch.equal(ref, rne)  # the tie rows tell the roundings apart


def test_sign_times_rounded_magnitude_without_guard_is_lt0_with_inf_max():
    def qdq(x):  # torch.sign(y) * R(|y|), floor(log2(amax)) - 2 clamped, no NaN/Inf guard
        xb = x.unflatten(-1, (-1, 32)).float()
        e = (torch.floor(torch.log2(xb.abs().amax(-1, keepdim=True))) - 2).clamp(-127, 127)
        y = (xb / torch.exp2(e)).clamp(-6, 6)
        return (torch.sign(y) * R.round_e2m1_per_binade(y.abs()) * torch.exp2(e)).flatten(-2).to(x.dtype)

    v = recognise(qdq)
    assert isinstance(v, ActVerdict), v.reason
    assert (v.variant.scale_mode, v.variant.signed_zero, v.variant.inf_amax) == ("floor", "lt0", "max")
    assert v.kernel_supported
    g = torch.Generator().manual_seed(12)
    x = torch.randn(4, 64, generator=g) * torch.exp2(torch.randint(-20, 20, (4, 1), generator=g).float())
    x[0, 3], x[1, :32], x[2, 40] = float("inf"), -1e-30, -0.0
    x = x.to(torch.bfloat16)
    assert same_bits(qdq(x), v.reference(x)).all()
