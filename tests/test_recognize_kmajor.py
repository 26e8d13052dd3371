"""Packed weights stored K-major: codes [.., K*bits/8, N] and scales [.., K/block, N],
decoded straight into the [.., K, N] operand of `x @ W` (no transpose back), as code
written against a [in, out] weight convention keeps them. The recogniser probes such a
leaf transposed (the canonical [.., N, K/2] probe written .mT), the verdict says which
leaves are K-major, and the fused op is handed the leaf transposed (a view; the
kernels' launcher copies a packed axis without unit stride). A K-major leaf whose
nibbles are in another order is refused. Compiled layers fuse and equal eager."""

import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from emu_inductor import _compat
from emu_inductor.formats import quantize
from emu_inductor.spec.opspec import OpSpec
from emu_inductor.recognize import Rejection, WeightVerdict, gemm_nodes, recognize_weight

from tests.corpus.oracle import assert_within_accumulation
from tests.test_recognize_weight import trace

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def kmajor_mx(codes, scales):
    """[.., K/2, N] bytes (k = 2i low nibble, 2i+1 high), [.., K/32, N] E8M0 -> [.., K, N]."""
    lut = torch.tensor(E2M1, dtype=torch.float32, device=codes.device)
    c = torch.stack([codes & 15, codes >> 4], dim=-2).flatten(-3, -2)  # [.., K, N]
    s = torch.exp2(scales.float() - 127.0).repeat_interleave(32, dim=-2)
    return (lut[c.long()] * s).to(torch.bfloat16)


def halves_mx(codes, scales):
    """Near miss: the same leaves, low nibbles hold the first K/2 rows, high the rest."""
    lut = torch.tensor(E2M1, dtype=torch.float32, device=codes.device)
    c = torch.cat([codes & 15, codes >> 4], dim=-2)
    s = torch.exp2(scales.float() - 127.0).repeat_interleave(32, dim=-2)
    return (lut[c.long()] * s).to(torch.bfloat16)


def _bytes(seed, *shape, lo=0, hi=256):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, shape, generator=g).to(torch.uint8)


def _recognise(fn, c, s, K, E=None):
    x = torch.randn(4, K, dtype=torch.bfloat16)
    if E:
        gm = trace(lambda x, c, s: torch.bmm(x.expand(E, 4, K), fn(c, s)), x, c, s)
    else:
        gm = trace(lambda x, c, s: x @ fn(c, s), x, c, s)
    (gemm,) = gemm_nodes(gm.graph)
    return recognize_weight(gemm, use_cache=False)


def _check_reference(v, fn, c, s):
    """The verdict's reference on the canonical (transposed) bytes is the user's function
    on the K-major leaves, on fresh random bytes."""
    for seed in (21, 22):
        c2 = _bytes(seed, *c.shape)
        s2 = _bytes(seed + 1, *s.shape, lo=100, hi=150)
        ref = v.reference(c2.mT.contiguous(), s2.mT.contiguous(), None)
        assert torch.equal(fn(c2, s2).view(torch.int16), ref.view(torch.int16))


def test_kmajor_2d_recognised():
    N, K = 40, 128
    c, s = _bytes(1, K // 2, N), _bytes(2, K // 32, N)
    v = _recognise(kmajor_mx, c, s, K)
    assert isinstance(v, WeightVerdict), v.reason
    assert v.kmajor == (True, True) and v.variant.fmt == "mxfp4" and v.kernel_supported
    assert v.codes.meta["val"].shape == c.shape
    _check_reference(v, kmajor_mx, c, s)


def test_kmajor_expert_stack_recognised():
    E, N, K = 3, 24, 64
    c, s = _bytes(3, E, K // 2, N), _bytes(4, E, K // 32, N)
    v = _recognise(kmajor_mx, c, s, K, E=E)
    assert isinstance(v, WeightVerdict), v.reason
    assert v.kmajor == (True, True)
    _check_reference(v, kmajor_mx, c, s)


def test_kmajor_other_nibble_order_refused():
    N, K = 40, 64
    c, s = _bytes(5, K // 2, N), _bytes(6, K // 32, N)
    v = _recognise(halves_mx, c, s, K)
    assert isinstance(v, Rejection), v
    assert "no known weight decode matches" in v.reason, v.reason


class KMajorLinear(torch.nn.Module):
    """MXFP4 weight-only linear with [K/2, N] codes and [K/32, N] scales, `x @ W[K, N]`."""

    def __init__(self, N=48, K=64, seed=7):
        super().__init__()
        torch.manual_seed(seed)
        q = quantize(torch.randn(N, K), "mxfp4")
        self.register_buffer("wt", q.qdata.t().contiguous())
        self.register_buffer("st", q.scale.t().contiguous())

    def forward(self, x):
        return x @ kmajor_mx(self.wt, self.st)


def _compile(m, *args):
    counters.clear()
    torch._dynamo.reset()
    with _compat.inductor_caches_disabled(), torch.no_grad():
        out, code = run_and_get_code(torch.compile(m, backend="mxemu"), *args)
        ref = m(*args)
    return out, ref, "\n".join(code)


def test_kmajor_linear_fuses_and_matches_eager():
    m = KMajorLinear()
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    out, ref, code = _compile(m, x)
    assert counters["mxemu"]["semantic"] == 1, dict(counters["mxemu"])
    assert code.count("torch.ops.mxemu.linear.default(") == 1, code[-3000:]
    assert_within_accumulation(out, ref, "K-major linear")
    x2 = torch.randn(2, 5, 64, dtype=torch.bfloat16)  # fresh inputs through the same compiled code
    with torch.no_grad():
        assert_within_accumulation(torch.compile(m, backend="mxemu")(x2), m(x2), "K-major linear, 2nd input")


class KMajorExperts(torch.nn.Module):
    """Expert stack [E, K/2, N] / [E, K/32, N] through torch._grouped_mm (no transpose)."""

    def __init__(self, E=4, N=32, K=64):
        super().__init__()
        torch.manual_seed(11)
        q = quantize(torch.randn(E, N, K), "mxfp4")
        self.register_buffer("w", q.qdata.mT.contiguous())
        self.register_buffer("s", q.scale.mT.contiguous())

    def forward(self, x, offs):
        return torch._grouped_mm(x, kmajor_mx(self.w, self.s), offs=offs)


def test_kmajor_experts_fuse_into_grouped_mm():
    m = KMajorExperts()
    x = torch.randn(10, 64, dtype=torch.bfloat16)
    offs = torch.tensor([2, 5, 5, 10], dtype=torch.int32)
    out, ref, code = _compile(m, x, offs)
    assert counters["mxemu"]["semantic"] == 1, dict(counters["mxemu"])
    assert code.count("torch.ops.mxemu.grouped_mm.default(") == 1, code[-3000:]
    assert_within_accumulation(out, ref, "K-major experts")


def test_fused_op_reads_a_transposed_packed_view():
    """The op given a view whose packed axis has stride N (what the pass hands it for a
    K-major leaf) computes what it computes from the contiguous bytes."""
    N, K = 48, 64
    q = quantize(torch.randn(N, K), "mxfp4")
    wt, st = q.qdata.t().contiguous(), q.scale.t().contiguous()
    x = torch.randn(5, K, dtype=torch.bfloat16)
    spec = OpSpec(weight_fmt="mxfp4").to_str()
    want = torch.ops.mxemu.linear(x, q.qdata, q.scale, None, None, None, spec)
    got = torch.ops.mxemu.linear(x, wt.t(), st.t(), None, None, None, spec)
    assert torch.equal(got, want)
