"""Routing prep (`kernels.launch.moe_align`): the one-program Triton kernels of
`kernels/routing.py` -- the sort kernel (default) and the older one-hot kernel
(EMU_INDUCTOR_ROUTING=onehot) -- build exactly the torch path's layout (sorted_ids,
block_expert, pos_of_id), bit for bit, on random routings: uniform, skewed onto one expert,
with empty experts, with an expert map (-1 entries, entries past E, ids past the map),
int32 and int64 ids. On a CUDA machine the same checks run the compiled kernels.
"""

import pytest
import torch

from emu_inductor.kernels import launch, launch_common
from emu_inductor.kernels.launch import moe_align

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _routing(kind: str, R: int, E: int, g: torch.Generator, dtype=torch.int32):
    """(ids [R], expert_map or None) of one routing kind over E local experts."""
    emap = None
    if kind == "uniform":  # ids past E and negative ones are not local
        ids = torch.randint(-1, E + 2, (R,), generator=g)
    elif kind == "skewed":  # every row on one expert
        ids = torch.full((R,), int(torch.randint(0, E, (1,), generator=g)))
    elif kind == "sparse":  # most experts empty
        used = torch.randperm(E, generator=g)[: max(1, E // 8)]
        ids = used[torch.randint(0, used.numel(), (R,), generator=g)]
    elif kind == "map":  # 2E global experts, half not on this rank, some map entries out of range
        ng = 2 * E
        emap = torch.full((ng,), -1, dtype=torch.int64)
        emap[torch.randperm(ng, generator=g)[:E]] = torch.randperm(E, generator=g)
        bad = torch.randint(0, ng, (2,), generator=g)
        emap[bad[0]], emap[bad[1]] = E, -5
        emap = emap.to(torch.int32 if dtype == torch.int32 else torch.int64)
        ids = torch.randint(-2, ng + 3, (R,), generator=g)
    else:
        raise AssertionError(kind)
    return ids.to(dtype).to(DEV), None if emap is None else emap.to(DEV)


def _assert_same(ids, emap, E, BM, impl):
    ref = moe_align(ids, emap, E, BM, impl="torch")
    got = moe_align(ids, emap, E, BM, impl=impl)
    for name, a, b in zip(("sorted_ids", "block_expert", "pos_of_id"), ref, got):
        assert a.dtype == b.dtype and torch.equal(a, b), (impl, name, ids.numel(), E, BM)


@pytest.mark.parametrize("E", [1, 8, 128, 256])
@pytest.mark.parametrize("BM", [16, 64])
def test_sort_kernel_matches_torch(E, BM):
    g = torch.Generator().manual_seed(1000 * E + BM)
    kinds = ("uniform", "skewed", "sparse", "map")
    for i, R in enumerate((1, 7, 8, 256, 1000)):
        for j, kind in enumerate(kinds):
            dtype = (torch.int32, torch.int64)[(i + j) % 2]
            ids, emap = _routing(kind, R, E, g, dtype)
            assert launch_common._routing_impl(R, E) == "triton"
            _assert_same(ids, emap, E, BM, "triton")


@pytest.mark.parametrize("kind", ["uniform", "map"])
def test_sort_kernel_at_the_row_cap(kind):
    R = launch_common.ROUTING_SORT_MAX_ROWS
    g = torch.Generator().manual_seed(len(kind))
    ids, emap = _routing(kind, R, 256, g, torch.int64)
    assert launch_common._routing_impl(R, 256) == "triton"
    _assert_same(ids, emap, 256, 16, "triton")


@pytest.mark.parametrize("impl", ["triton", "onehot"])
def test_ids_and_map_entries_past_int32_are_not_local(impl):
    """Range checks happen in the ids' (map's) own dtype: 2**32 + 1 must not wrap to expert 1."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 4, (37,), generator=g)
    ids[::3] += 2**32
    _assert_same(ids.to(DEV), None, 4, 16, impl)
    emap = torch.tensor([0, 2**32 + 1, 1, -1, 3, 2], dtype=torch.int64)
    ids = torch.randint(0, 6, (37,), generator=g)
    _assert_same(ids.to(DEV), emap.to(DEV), 4, 16, impl)


@pytest.mark.parametrize("impl", ["triton", "onehot"])
@pytest.mark.parametrize("E,T,k,BM", [(8, 7, 1, 16), (128, 32, 8, 16), (5, 40, 3, 4)])
def test_kernels_match_torch_on_topk_shaped_ids(impl, E, T, k, BM):
    """[T, top_k] ids (rows r = t * top_k + slot), a non-power-of-two E, BM 4; the one-hot kernel."""
    g = torch.Generator().manual_seed(E + T)
    for kind in ("uniform", "skewed", "map"):
        ids, emap = _routing(kind, T * k, E, g)
        _assert_same(ids.reshape(T, k), emap, E, BM, impl)


@pytest.mark.parametrize("impl", ["torch", "triton", "onehot"])
def test_align_no_sync_layout(impl):
    ids = torch.tensor([[3, 0], [3, 1], [3, 0]], dtype=torch.int32, device=DEV)
    sorted_ids, bexp, pos = moe_align(ids, None, 4, 4, impl=impl)
    R = 6
    assert bexp.shape[0] == 2 + 4  # cdiv(R, BM) + min(E, R): shapes only
    # expert 0 rows 1, 5; expert 1 row 3; expert 3 rows 0, 2, 4; padding = R
    assert sorted_ids.tolist()[:12] == [1, 5, R, R, 3, R, R, R, 0, 2, 4, R]
    assert bexp.tolist() == [0, 1, 3, 4, 4, 4]
    assert pos.tolist() == [8, 0, 9, 4, 10, 1]


@pytest.mark.parametrize("impl", ["torch", "triton", "onehot"])
def test_no_rows(impl):
    sorted_ids, bexp, pos = moe_align(torch.empty(0, 8, dtype=torch.int32, device=DEV), None, 16, 16, impl=impl)
    assert sorted_ids.numel() == 0 and bexp.numel() == 0 and pos.numel() == 0


def test_impl_choice(monkeypatch):
    monkeypatch.delenv("EMU_INDUCTOR_ROUTING", raising=False)
    cap = launch_common.ROUTING_SORT_MAX_ROWS
    assert launch_common._routing_impl(8, 128) == "triton"
    assert launch_common._routing_impl(cap, 256) == "triton"
    assert launch_common._routing_impl(cap + 1, 256) == "torch"
    assert launch_common._routing_impl(64, 2**26) == "torch"  # (expert, row) keys would not fit in int32
    for forced in launch_common.ROUTING_IMPLS:
        monkeypatch.setenv("EMU_INDUCTOR_ROUTING", forced)
        assert launch_common._routing_impl(8, 128) == forced
    # forced past the sort kernel's cap: the torch path's values
    ids = torch.randint(0, 3, (cap + 1,), generator=torch.Generator().manual_seed(3)).to(DEV)
    _assert_same(ids, None, 3, 64, "triton")
    with pytest.raises(ValueError, match="impl"):
        moe_align(ids, None, 3, 64, impl="sorted")
