"""Experts stored 2-d ([E*N, K/2] codes, [E*N, K/32] scales, viewed as [E, N, K] for
torch._grouped_mm) are narrowed like experts stored 3-d: at real model widths the weight
cone is far over the probe budget (Qwen3-30B-A3B's w13 is 128 x 1536 x 2048), and a cone
that cannot be narrowed is refused as "too large to evaluate". The budget is lowered here
so that the corpus entry at its test widths is over it, exactly as at real widths."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache
from torch.fx import Graph

import emu_inductor
from emu_inductor.recognize import CACHE, resize, weight
from tests.corpus import BY_NAME, E, H, I
from tests.corpus.oracle import assert_within_accumulation


@pytest.fixture
def small_budget(monkeypatch):
    # w13's cone is E*2I*H elements; 1/4 of it cannot be evaluated without narrowing
    monkeypatch.setattr(weight, "DEFAULT_BUDGET_BYTES", E * 2 * I * H * 8 // 4)
    CACHE.clear()
    yield
    CACHE.clear()


def test_flat_expert_weights_fuse_over_the_probe_budget(small_budget):
    m, (x,) = BY_NAME["resp_moe_chunk"].make(3, torch.bfloat16)
    m.eval()
    x = torch.randn_like(x) * 0.5
    torch._dynamo.reset()
    counters.clear()
    with fresh_cache(), torch.no_grad():
        out = torch.compile(m, backend="mxemu")(x)
        ref = m(x)
        fused = dict(counters["mxemu"])
        text = str(emu_inductor.explain(m, x))
    assert "too large to evaluate" not in text, text
    # as at the test widths (tests/corpus: fused_today): both grouped GEMMs weight-fused
    assert fused.get("semantic", 0) == 2, (fused, text)
    assert_within_accumulation(out, ref, "resp_moe_chunk at a lowered probe budget")


def _leaf(g: Graph, name: str, shape, dtype=torch.uint8):
    n = g.placeholder(name)
    n.meta["val"] = torch.empty(shape, dtype=dtype)
    return n


def _call(g: Graph, target, args, shape, dtype=torch.uint8):
    n = g.call_function(target, args)
    n.meta["val"] = torch.empty(shape, dtype=dtype)
    return n


def test_plan_tracks_factors_flattened_in_one_leaf_dim():
    """[E*N, K] -> [E, N, K]: both digits resize; a view that reads N-major loses them."""
    Ex, N, K = 4, 6, 8
    g = Graph()
    w = _leaf(g, "w", (Ex * N, K))
    ok = _call(g, torch.ops.aten.view.default, (w, [Ex, N, K]), (Ex, N, K))
    pl = resize.plan([ok], ok, {w: {0: (("lead0", Ex), ("rows", N))}})
    assert pl.resizable("lead0") and pl.resizable("rows")
    assert pl.out_info == {"lead0": (0, 1, 1), "rows": (1, 1, 1)}
    assert pl.resized_args(ok, ok.args, {"lead0": 2, "rows": 3})[1] == [2, 3, K]
    # the same flat dim read as [N, E, K] would mix experts: not resizable
    g2 = Graph()
    w2 = _leaf(g2, "w", (Ex * N, K))
    bad = _call(g2, torch.ops.aten.view.default, (w2, [N, Ex, K]), (N, Ex, K))
    pl2 = resize.plan([bad], bad, {w2: {0: (("lead0", Ex), ("rows", N))}})
    assert not pl2.resizable("lead0")


def test_plan_rejects_digits_that_do_not_make_the_dim():
    g = Graph()
    w = _leaf(g, "w", (24, 8))
    with pytest.raises(ValueError, match="leaf_factors"):
        resize.plan([], w, {w: {0: (("lead0", 4), ("rows", 5))}})
