"""Fusion counters that read the same after an FX-graph-cache hit as after a miss.

On a hit the pass does not run; Inductor replays only the counters["inductor"] deltas
stored with the cache entry. ``recorder.cache_replay()`` (around every mxemu compile)
credits what was replayed without the pass to counters["mxemu"] / ["mxemu_ops"] /
["mxemu_patterns"]. Here the replay is simulated by adding the deltas exactly as
Inductor's FxGraphCache does (``counters["inductor"] += graph.counter_deltas``); the
real miss-then-hit pair in fresh processes is tests/test_backend.py
(test_fx_graph_cache_hit_replays_inductor_counters).
"""

from collections import Counter

import torch
from torch._dynamo.utils import counters

from emu_inductor.passes import cache_replay, fusion_counts
from emu_inductor.passes import recorder


def _as_pass_would(graph):
    """What MxemuPass records for a graph in which family 'fam' fused 2 candidates."""
    recorder.count_pass_run()
    recorder.count_fused("fam", 2)
    recorder.count("fam.variant_a", 2)
    recorder.count("fam.check_ms", 7)  # a timing, not a fusion: never replayed
    return recorder.count_ops(graph)


def _graph_with_mxemu_op():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(torch.ops.mxemu.linear.default, (x, x, x, x, x, None, ""))
    g.output(g.call_function(torch.ops.aten.relu.default, (y,)))
    return g


def test_counts_on_a_miss_and_on_a_replayed_hit_agree():
    import emu_inductor.ops  # noqa: F401  (registers torch.ops.mxemu.*)

    counters.clear()
    before = Counter(counters["inductor"])
    with cache_replay():  # a miss: the pass runs
        assert _as_pass_would(_graph_with_mxemu_op()) == {"linear": 1}
    miss = fusion_counts()
    deltas = Counter(counters["inductor"]) - before
    assert "mxemu_patterns:fam.check_ms" not in deltas

    counters.clear()
    with cache_replay():  # a hit: only the stored deltas come back
        counters["inductor"] += deltas
    hit = fusion_counts()
    assert (hit.families, hit.ops, hit.variants) == (miss.families, miss.ops, miss.variants)
    assert (hit.families, hit.ops) == ({"fam": 2}, {"linear": 1})
    assert (miss.pass_runs, miss.graphs_from_cache) == (1, 0)
    assert (hit.pass_runs, hit.graphs_from_cache) == (0, 1)
    assert "mxemu::linear x1" in str(hit) and "loaded from Inductor's cache" in str(hit)


def test_nested_replay_contexts_credit_once():
    counters.clear()
    with cache_replay():
        with cache_replay():
            counters["inductor"] += Counter({"mxemu_fam": 3, "mxemu:graphs": 1, "mxemu_ops:moe": 1})
        counters["inductor"] += Counter({"mxemu_fam": 1, "mxemu:graphs": 1})
    assert counters["mxemu"]["fam"] == 4
    assert counters["mxemu"]["graphs_from_cache"] == 2 and counters["mxemu"]["pass_runs"] == 0
    assert counters["mxemu_ops"]["moe"] == 1


def test_a_run_of_the_pass_inside_is_not_credited_twice():
    counters.clear()
    with cache_replay():
        _as_pass_would(torch.fx.Graph())
    assert counters["mxemu"]["fam"] == 2 and counters["mxemu"]["graphs_from_cache"] == 0
    assert counters["mxemu_patterns"]["fam.variant_a"] == 2


def test_enable_credits_replays_through_dynamo_compile_callbacks():
    from torch._dynamo.callback import callback_handler

    import emu_inductor

    def hooked():
        return sum(getattr(cb, "__name__", "") == "_replay_end" for cb in callback_handler.end_callbacks)

    with emu_inductor.enable():
        assert hooked() == 1
        with emu_inductor.enable():  # nested: still one hook
            assert hooked() == 1
        assert hooked() == 1
        counters.clear()
        callback_handler.run_start_callbacks(None)  # what a Dynamo compile does around itself
        counters["inductor"] += Counter({"mxemu_fam": 1, "mxemu:graphs": 1})  # a replayed entry
        callback_handler.run_end_callbacks(None)
        assert counters["mxemu"]["fam"] == 1 and counters["mxemu"]["graphs_from_cache"] == 1
    assert hooked() == 0
