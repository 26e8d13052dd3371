"""Per-dtype pattern families (`register_pattern_family(..., per_dtype=True)`): rules are
built only for the dtypes of the graph's anchor nodes, again (into the same pass) when a
later graph brings a new dtype, and rules added later get the same guard wrapper (an
error while rewriting leaves the graph as it was)."""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters
from torch._inductor.pattern_matcher import CallFunction, KeywordArg, register_graph_pattern

from emu_inductor.passes import MxemuPass, get_pattern_family, recording
from helpers import call_targets, graph_of, temp_family

aten = torch.ops.aten


def _mm(dtype):
    return graph_of(lambda a, b: a @ b, torch.randn(4, 4, dtype=dtype), torch.randn(4, 4, dtype=dtype))


def test_rules_built_per_graph_dtype_once():
    calls = []

    def init(pm_pass, input_device=None, dtypes=None):
        calls.append(set(dtypes))

    with temp_family("tmp_per_dtype", init, anchors=[aten.mm], per_dtype=True):
        run = MxemuPass({"enabled_patterns": ["tmp_per_dtype"]})
        run(_mm(torch.bfloat16).graph)
        assert calls == [{torch.bfloat16}]  # a bf16 graph never pays for the fp32 rules
        run(_mm(torch.bfloat16).graph)
        assert calls == [{torch.bfloat16}]  # cached
        run(_mm(torch.float32).graph)
        assert calls == [{torch.bfloat16}, {torch.float32}]  # only the new dtype
        assert get_pattern_family("tmp_per_dtype").dtypes_seen == {torch.bfloat16, torch.float32}
        run(graph_of(lambda x: x + 1, torch.randn(2)).graph)  # no anchor: nothing built
        assert len(calls) == 2


def test_rules_added_for_a_later_dtype_are_guarded():
    """The fp32 rule (registered on the second init) fails half-way through its rewrite: the
    guard wrapper restores the graph, as it does for rules built on the first init."""

    def init(pm_pass, input_device=None, dtypes=None):
        for dt in dtypes:
            def handler(match, a, b, dt=dt):
                node = match.output_node()
                with match.graph.inserting_after(node):  # mutate the graph, then (fp32) fail
                    new = match.graph.call_function(aten.neg.default, (node,))
                new.meta.update(node.meta)
                if dt == torch.float32:
                    raise ValueError("fp32 rule fails")

            register_graph_pattern(CallFunction(aten.mm.default, KeywordArg("a"), KeywordArg("b")), pass_dict=pm_pass,
                                   extra_check=lambda m, dt=dt: m.output_node().meta["val"].dtype == dt)(handler)

    with temp_family("tmp_per_dtype_guard", init, anchors=[aten.mm], per_dtype=True):
        run = MxemuPass({"enabled_patterns": ["tmp_per_dtype_guard"]})
        gm = _mm(torch.bfloat16)
        run(gm.graph)
        assert aten.neg.default in call_targets(gm)  # the bf16 rule rewrote
        counters.clear()
        gm = _mm(torch.float32)
        before = call_targets(gm)
        with recording() as sink:
            run(gm.graph)
        gm.graph.lint()
        assert call_targets(gm) == before  # restored
        assert counters["mxemu"]["internal_errors"] >= 1
        # reported by the guard wrapper, which names the rule (numbered after the bf16 one)
        errors = [c.reason for c in sink.candidates if "internal error while rewriting" in c.reason]
        assert errors and "tmp_per_dtype_guard#2" in errors[0] and "fp32 rule fails" in errors[0], errors


def test_family_requiring_packed_bytes_skips_unquantized_graphs():
    from emu_inductor.passes.registry import PACKED_DTYPES

    calls = []
    with temp_family("tmp_packed", lambda pm: calls.append(1), anchors=[aten.mm], requires_dtypes=PACKED_DTYPES):
        run = MxemuPass({"enabled_patterns": ["tmp_packed"]})
        run(_mm(torch.bfloat16).graph)
        assert calls == []  # an unquantized graph: no rule building at all
        w = torch.randint(0, 255, (4, 2), dtype=torch.uint8)
        gm = graph_of(lambda a, w: a @ (w & 15).to(torch.float32).repeat(1, 2), torch.randn(4, 4), w)
        run(gm.graph)
        assert calls == [1]


def test_builtin_packed_weight_families_declare_it():
    from emu_inductor.passes import registry

    registry.load_builtin_families()
    for name in ("linear", "grouped_mm"):
        assert registry.get_pattern_family(name).requires_dtypes == registry.PACKED_DTYPES, name
    assert registry.get_pattern_family("linear").per_dtype
