"""Weight decodes written into a preallocated buffer (emu_inductor.recognize.buffers).

`out = torch.empty(...); out[:, ::2] = lo; out[:, 1::2] = hi` (transformers' gpt-oss,
ModelOpt), `out[..., 0] = ...` per-slot writes, `v[v == x] = c` masked fills (torchao)
reach the post-grad graph as empty / copy / slice_scatter / select_scatter / index_put.
Accepted: every element written before it is read, written values computed without the
buffer itself; the verdict is then checked against the variant's reference on fresh
random inputs. Refused, with the reason asserted: uninitialised elements reaching the
GEMM, a write that reads another position of the buffer it builds, data-dependent
writes that are not an elementwise masked fill.
"""

from unittest import mock

import pytest
import torch
from torch._inductor.decomposition import select_decomp_table
from torch._inductor.fx_passes.post_grad import view_to_reshape
from torch.fx.experimental.proxy_tensor import make_fx

from emu_inductor.formats import MXFP4, NVFP4
from emu_inductor.recognize import Rejection, WeightVerdict, gemm_nodes, recognize_weight

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
LUT16 = E2M1 + [-v for v in E2M1]


def trace(fn, *args):
    """The post-grad form: functionalized (in-place writes become copy / *_scatter)."""
    with mock.patch("torch.compiler.is_compiling", lambda: True):
        gm = make_fx(torch.func.functionalize(fn, remove="mutations"), decomposition_table=select_decomp_table(),
                     tracing_mode="fake")(*args)
    view_to_reshape(gm)
    gm.graph.eliminate_dead_code()
    return gm


def mx_leaves(seed, N, K):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, 256, (N, K // 2), generator=g, dtype=torch.int64).to(torch.uint8)
    s = torch.randint(0, 256, (N, K // 32), generator=g, dtype=torch.int64).to(torch.uint8)
    return w, s


def nv_leaves(seed, N, K):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, 256, (N, K // 2), generator=g, dtype=torch.int64).to(torch.uint8)
    s = torch.randint(0, 0x7F, (N, K // 16), generator=g, dtype=torch.int64).to(torch.uint8).view(torch.float8_e4m3fn)
    return w, s, torch.tensor(0.0137)


def verdict(fn, args, K):
    x = torch.randn(4, K, dtype=torch.bfloat16)
    gm = trace(lambda x, *w: x @ fn(*w).t(), x, *args)
    (gemm,) = gemm_nodes(gm.graph)
    return recognize_weight(gemm, use_cache=False)


def assert_reference(v, fn, make, N, K):
    assert isinstance(v, WeightVerdict), v.reason
    for seed in (11, 12):  # fresh inputs: the variant's reference reproduces the user's function
        leaves = make(seed, N, K)
        ref = v.reference(*leaves[:2], leaves[2] if v.alpha is not None else None)
        user = fn(*leaves[:2]) if leaves[2] is None else fn(*leaves)
        assert torch.equal(user.view(torch.int16), (ref.mT if v.transpose else ref).view(torch.int16))


# --- spellings that write into a buffer --------------------------------------------------------


def deq_empty_interleave(w, s):
    """gpt-oss's convert_moe_packed_tensors layout: empty, lo nibbles at ::2, hi at 1::2 (its
    ldexp scaling is another function at scale byte 255: 0 * 2^128 stays 0; here exp2)."""
    lut = torch.tensor(LUT16, dtype=torch.bfloat16)
    out = torch.empty(w.shape[0], w.shape[1] * 2, dtype=torch.bfloat16)
    out[:, 0::2] = lut[(w & 0x0F).int()]
    out[:, 1::2] = lut[(w >> 4).int()]
    blocks = out.reshape(w.shape[0], -1, 32).float()
    return (blocks * torch.exp2(s.float() - 127).unsqueeze(-1)).reshape(w.shape[0], -1).to(torch.bfloat16)


def deq_slot_writes_and_masked_fill(w, s, a):
    """Per-slot writes (select_scatter), the codes decoded by bits, -0 fixed by a masked fill
    (index_put with a bool mask: torchao's spelling), NVFP4 scale times global."""
    codes = torch.empty(w.shape[0], w.shape[1], 2, dtype=torch.uint8)
    codes[..., 0] = w & 0x0F
    codes[..., 1] = w >> 4
    c = codes.reshape(w.shape[0], -1).int()
    mag = torch.tensor(E2M1)[(c & 7).long()]
    v = torch.where((c & 8) != 0, -mag, mag)
    v[c == 8] = -0.0  # a no-op kept for its spelling: x[mask] = scalar
    out = v.reshape(w.shape[0], -1, 16) * (s.float() * a).unsqueeze(-1)
    return out.reshape(w.shape[0], -1).to(torch.bfloat16)


def deq_zeros_buffer(w, s):
    """vLLM's reference_mxfp4 unpack: a zeros buffer (a defined constant) overwritten."""
    codes = torch.zeros(w.shape[0], w.shape[1] * 2, dtype=torch.uint8)
    codes[..., ::2] = w & 0x0F
    codes[..., 1::2] = w >> 4
    v = torch.tensor(LUT16)[codes.long()].reshape(w.shape[0], -1, 32)
    return (v * torch.exp2(s.float() - 127).unsqueeze(-1)).reshape(w.shape[0], -1).to(torch.bfloat16)


def test_empty_buffer_interleaved_writes():
    v = verdict(deq_empty_interleave, mx_leaves(0, 48, 64), 64)
    assert isinstance(v, WeightVerdict) and v.variant.fmt == "mxfp4" and v.kernel_supported, v
    assert_reference(v, deq_empty_interleave, lambda seed, N, K: mx_leaves(seed, N, K) + (None,), 48, 64)


def test_slot_writes_and_masked_fill():
    v = verdict(deq_slot_writes_and_masked_fill, nv_leaves(0, 48, 64), 64)
    assert isinstance(v, WeightVerdict) and v.variant.fmt == "nvfp4" and v.kernel_supported, v
    assert_reference(v, deq_slot_writes_and_masked_fill, nv_leaves, 48, 64)


def test_zeros_buffer_overwritten():
    v = verdict(deq_zeros_buffer, mx_leaves(0, 48, 64), 64)
    assert_reference(v, deq_zeros_buffer, lambda seed, N, K: mx_leaves(seed, N, K) + (None,), 48, 64)


def test_large_buffer_cone_is_narrowed():
    """A 2048 x 4096 decode into an empty buffer: the buffer's size follows the narrowed rows
    (evaluated at a few rows, not 8M elements)."""
    N, K = 2048, 4096
    v = verdict(deq_empty_interleave, mx_leaves(0, N, K), K)
    assert isinstance(v, WeightVerdict), v.reason
    assert_reference(v, deq_empty_interleave, lambda seed, n, k: mx_leaves(seed, 64, 256) + (None,), 64, 256)


# --- refused ---------------------------------------------------------------------------------------


def refused(fn, args, K) -> str:
    v = verdict(fn, args, K)
    assert isinstance(v, Rejection), f"accepted {v.variant.name}"
    return v.reason


def deq_half_written(w, s):
    out = torch.empty(w.shape[0], w.shape[1] * 2, dtype=torch.bfloat16)
    out[:, 0::2] = (w & 0x0F).to(torch.bfloat16)  # odd positions never written
    return out * torch.exp2(s.float() - 127).repeat_interleave(32, -1).to(torch.bfloat16)


def deq_reads_other_position(w, s):
    out = torch.empty(w.shape[0], w.shape[1] * 2, dtype=torch.bfloat16)
    out[:, 0::2] = torch.tensor(LUT16, dtype=torch.bfloat16)[(w & 0x0F).int()]
    out[:, 1::2] = out[:, 0::2]  # every odd element copies its even neighbour
    return (out.reshape(w.shape[0], -1, 32) * torch.exp2(s.float() - 127).unsqueeze(-1).to(torch.bfloat16)).reshape(
        w.shape[0], -1)


def deq_scatter_into_itself(w, s):
    v = torch.tensor(LUT16, dtype=torch.bfloat16)[torch.stack([w & 0x0F, w >> 4], -1).reshape(w.shape[0], -1).int()]
    v[:, 32:] = v[:, :32]  # a computed tensor overwritten from another of its positions
    return (v.reshape(w.shape[0], -1, 32) * torch.exp2(s.float() - 127).unsqueeze(-1).to(torch.bfloat16)).reshape(
        w.shape[0], -1)


def deq_index_tensor_write(w, s):
    v = torch.tensor(LUT16, dtype=torch.bfloat16)[torch.stack([w & 0x0F, w >> 4], -1).reshape(w.shape[0], -1).int()]
    v[torch.tensor([0, 5])] = 1.0  # rows picked by an index tensor: not elementwise
    return (v.reshape(w.shape[0], -1, 32) * torch.exp2(s.float() - 127).unsqueeze(-1).to(torch.bfloat16)).reshape(
        w.shape[0], -1)


def test_partially_written_buffer_refused():
    why = refused(deq_half_written, mx_leaves(0, 48, 64), 64)
    assert "not fully written" in why and "uninitialised" in why, why


def test_write_reading_another_position_refused():
    why = refused(deq_reads_other_position, mx_leaves(0, 48, 64), 64)
    assert "reads another position of the buffer" in why, why


def test_computed_tensor_overwritten_from_itself_refused():
    why = refused(deq_scatter_into_itself, mx_leaves(0, 48, 64), 64)
    assert "writes values computed from buffer" in why, why


def test_index_tensor_write_refused():
    why = refused(deq_index_tensor_write, mx_leaves(0, 48, 64), 64)
    assert "aten.index_put" in why and "only a masked fill" in why, why


@pytest.mark.parametrize("fmt", [MXFP4, NVFP4])
def test_eager_spellings_are_what_they_claim(fmt):
    """The accepted spellings really compute the decode (guards the test's own premise)."""
    from emu_inductor.reference import dequantize_weight

    if fmt is MXFP4:
        w, s = mx_leaves(5, 16, 64)
        ref = dequantize_weight(w, s, MXFP4, dtype=torch.bfloat16)
        for fn in (deq_empty_interleave, deq_zeros_buffer):
            assert torch.equal(fn(w, s).view(torch.int16), ref.view(torch.int16))
    else:
        w, s, a = nv_leaves(5, 16, 64)
        ref = dequantize_weight(w, s, NVFP4, alpha=a, dtype=torch.bfloat16)
        assert torch.equal(deq_slot_writes_and_masked_fill(w, s, a).view(torch.int16), ref.view(torch.int16))
