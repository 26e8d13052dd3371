"""Packed weights stored in other shapes than [.., N, K/2] / [.., N, K/32]: transformers'
gpt-oss blocks [E, N, G, 16] with scales [E, N, G] (and [1, N, G, 16] picked by `[0]`),
experts stored 2-d as [E*N, K/2] / [E*N, K/32] and reshaped to 3-d after the decode. The
recogniser reads such a leaf through a reshape to the canonical shape and proves it like
any other role: the verdict's reference (canonical bytes) equals the user's function (its
own layout) on fresh random bytes, and a layout whose bytes are not in that order is
refused. Compiled: a 2-d-stored expert stack feeding torch._grouped_mm becomes one
mxemu::grouped_mm, equal to eager."""

import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from emu_inductor import _compat
from emu_inductor.formats import quantize
from emu_inductor.recognize import Rejection, WeightVerdict, gemm_nodes, recognize_weight

from tests.corpus.oracle import assert_within_accumulation
from tests.test_recognize_weight import trace

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def _decode(b):
    """bytes [..., n] -> E2M1 values [..., 2n] (low nibble first), bf16 LUT."""
    lut = torch.tensor(E2M1, dtype=torch.bfloat16)
    return torch.stack([lut[(b & 0x0F).int()], lut[(b >> 4).int()]], -1).flatten(-2)


def _exp2(s):
    return torch.exp2(s.float() - 127).to(torch.bfloat16)


def gptoss_blocks(blocks, scales):
    """[.., G, 16] blocks, [.., G] scales -> [.., G*32] (gpt-oss's layout; ldexp reader)."""
    v = _decode(blocks)  # [.., G, 32]
    return torch.ldexp(v, scales.to(torch.int32).unsqueeze(-1) - 127).flatten(-2)


def flat_experts(E):
    def deq(codes, scales):  # [E*N, K/2], [E*N, K/32] -> [E, N, K]
        v = _decode(codes).reshape(codes.shape[0], -1, 32) * _exp2(scales).unsqueeze(-1)
        return v.reshape(E, codes.shape[0] // E, -1)
    return deq


def _bytes(seed, *shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g).to(torch.uint8)


def _recognise(fn, leaves, K, bmm_lead=None):
    x = torch.randn(4, K, dtype=torch.bfloat16)
    if bmm_lead:
        gm = trace(lambda x, c, s: torch.bmm(x.expand(bmm_lead, 4, K), fn(c, s).transpose(1, 2)), x, *leaves)
    else:
        gm = trace(lambda x, c, s: x @ fn(c, s).t(), x, *leaves)
    (gemm,) = gemm_nodes(gm.graph)
    return recognize_weight(gemm, use_cache=False)


def _same_as_user(v, fn, leaf_shapes, canon_shapes, seeds=(11, 12)):
    for seed in seeds:
        c, s = _bytes(seed, *canon_shapes[0]), _bytes(seed + 100, *canon_shapes[1])
        user = fn(c.reshape(leaf_shapes[0]), s.reshape(leaf_shapes[1]))
        ref = v.reference(c, s, None)
        ref = ref.mT if v.transpose else ref
        user = user if user.dim() == ref.dim() else user.reshape(ref.shape)
        assert torch.equal(user.view(torch.int16), ref.view(torch.int16))


def test_gptoss_blocks_per_expert():
    E, N, K = 3, 40, 128
    c, s = _bytes(1, E, N, K // 32, 16), _bytes(2, E, N, K // 32)
    v = _recognise(gptoss_blocks, (c, s), K, bmm_lead=E)
    assert isinstance(v, WeightVerdict), v.reason
    assert v.variant.fmt == "mxfp4" and v.variant.e8m0_byte255 == "ldexp" and v.kernel_supported
    assert v.codes.meta["val"].shape == c.shape  # the leaf itself, read through a reshape
    _same_as_user(v, gptoss_blocks, (c.shape, s.shape), ((E, N, K // 2), (E, N, K // 32)))


def test_gptoss_blocks_picked_by_index():
    N, K = 48, 64
    c, s = _bytes(3, 1, N, K // 32, 16), _bytes(4, 1, N, K // 32)
    fn = lambda c, s: gptoss_blocks(c, s)[0]  # noqa: E731
    v = _recognise(fn, (c, s), K)
    assert isinstance(v, WeightVerdict), v.reason
    assert v.variant.e8m0_byte255 == "ldexp"
    _same_as_user(v, fn, (c.shape, s.shape), ((N, K // 2), (N, K // 32)))


def test_experts_stored_2d_reshaped_after_decode():
    E, N, K = 4, 32, 64
    fn = flat_experts(E)
    c, s = _bytes(5, E * N, K // 2), _bytes(6, E * N, K // 32)
    v = _recognise(fn, (c, s), K, bmm_lead=E)
    assert isinstance(v, WeightVerdict), v.reason
    assert v.variant.fmt == "mxfp4" and v.variant.e8m0_byte255 == "inf"  # exp2 in fp32: 255 -> inf
    _same_as_user(v, fn, (c.shape, s.shape), ((E, N, K // 2), (E, N, K // 32)))


def test_blocks_in_another_order_are_refused():
    """Blocks stored [G, N, 16] and permuted back: the same bytes, not in row-major
    [N, K/2] order, so reading the leaf through a reshape would be wrong."""
    N, K = 32, 64
    c, s = _bytes(7, K // 32, N, 16), _bytes(8, N, K // 32)
    fn = lambda c, s: gptoss_blocks(c.permute(1, 0, 2), s)  # noqa: E731
    v = _recognise(fn, (c, s), K)
    assert isinstance(v, Rejection), v
    assert "no known weight decode matches" in v.reason, v.reason


def test_large_gptoss_stack_is_evaluated_resized():
    """[E, N, G, 16] leaves keep their expert and row dims: the cone is evaluated with a few
    experts and rows, not at its real size."""
    E, N, K = 32, 512, 1024
    c, s = torch.zeros(E, N, K // 32, 16, dtype=torch.uint8), torch.zeros(E, N, K // 32, dtype=torch.uint8)
    v = _recognise(gptoss_blocks, (c, s), K, bmm_lead=E)
    assert isinstance(v, WeightVerdict), v.reason
    assert v.seconds < 30


class FlatExpertsGroupedMM(torch.nn.Module):
    """MXFP4 experts held 2-d ([E*N, K/2] codes, [E*N, K/32] scales), decoded, reshaped to
    [E, N, K] and used by torch._grouped_mm (weight-only)."""

    def __init__(self, E=4, N=32, K=64):
        super().__init__()
        torch.manual_seed(3)
        q = quantize(torch.randn(E * N, K), "mxfp4")
        self.register_buffer("w", q.qdata)
        self.register_buffer("s", q.scale)
        self.E = E

    def forward(self, x, offs):
        W = flat_experts(self.E)(self.w, self.s)
        return torch._grouped_mm(x, W.transpose(-2, -1), offs=offs)


def test_flat_experts_fuse_into_grouped_mm():
    m = FlatExpertsGroupedMM()
    x = torch.randn(10, 64, dtype=torch.bfloat16)
    offs = torch.tensor([2, 5, 5, 10], dtype=torch.int32)
    counters.clear()
    torch._dynamo.reset()
    with _compat.inductor_caches_disabled(), torch.no_grad():
        out, code = run_and_get_code(torch.compile(m, backend="mxemu"), x, offs)
        ref = m(x, offs)
    code = "\n".join(code)
    assert counters["mxemu"]["semantic"] == 1, dict(counters["mxemu"])
    assert code.count("torch.ops.mxemu.grouped_mm.default(") == 1, code[-3000:]
    assert_within_accumulation(out, ref, "flat experts grouped_mm")
