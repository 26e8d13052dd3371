"""Pass infrastructure without torch.compile: registry, MxemuPass on make_fx graphs,
error containment, recorder, uuid, chaining, helpers, logging.

Also defines the dummy pattern families test_backend.py (and its subprocesses) use:
``x * 2.0 + 1.0`` -> ``torch.ops.mxemu_test.affine(x)`` and a shape-agnostic
``(x.reshape(-1, 4) * 0.5).sum(-1)`` -> ``torch.ops.mxemu_test.halfsum4(x)``.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import pytest
import torch
from torch._dynamo.utils import counters
from torch.fx.experimental.proxy_tensor import make_fx

from emu_inductor.passes import (
    ANY_SHAPE,
    MxemuPass,
    chain_passes,
    fwd_only_post_grad,
    get_option,
    get_pattern_family,
    meta_val,
    record_candidate,
    recording,
    register_pattern_family,
    register_replacement,
    register_shape_agnostic_replacement,
    registered_families,
    resolve_options,
    shape_agnostic_pattern,
    strip_mxemu_passes,
    unregister_pattern_family,
)
from emu_inductor.passes.chain import _Chain
from helpers import (AFFINE, HALFSUM, INIT_CALLS, affine_init, affine_replace, affine_search, dummy_families, f_two,
                     graph_of, halfsum_check, halfsum_init, halfsum_replace, halfsum_search, install_dummy_families,
                     call_targets, temp_family, uninstall_dummy_families)

aten = torch.ops.aten

@pytest.fixture
def dummies():
    with dummy_families() as names:
        yield names
    assert AFFINE not in registered_families()


# --------------------------------------------------------------------------------------
# registry and options
# --------------------------------------------------------------------------------------


def test_registry_register_decorator_duplicate_unregister():
    calls = []

    @register_pattern_family("tmp_deco", options={"tmp_deco.k": 3}, order=-5)
    def _init(pm_pass):
        calls.append(1)

    try:
        assert "tmp_deco" in registered_families()
        assert registered_families()[0] == "tmp_deco"  # lowest order first
        assert calls == []  # lazy: registration does not trace anything
        with pytest.raises(ValueError, match="already registered"):
            register_pattern_family("tmp_deco", _init)
        with pytest.raises(ValueError, match="already declared"):
            register_pattern_family("tmp_other", _init, options={"tmp_deco.k": 1})
        with pytest.raises(ValueError, match="clashes with a core"):
            register_pattern_family("tmp_other", _init, options={"strict": 1})
        fam = get_pattern_family("tmp_deco")
        assert os.path.realpath(__file__) in fam.files  # init_fn's source file is hashed
        assert resolve_options({"mxemu.tmp_deco.k": 7})["tmp_deco.k"] == 7
        assert resolve_options({})["tmp_deco.k"] == 3
    finally:
        assert unregister_pattern_family("tmp_deco") is not None
    assert unregister_pattern_family("tmp_deco") is None
    assert "tmp_deco" not in registered_families()


def test_resolve_options_validation():
    opts = resolve_options({"mxemu.strict": 1, "remove_noop_ops": True})
    assert opts["strict"] is True and opts["remove_noop_ops"] is True
    assert opts["emulate_precision_casts"] is True and opts["enabled_patterns"] is None
    with pytest.raises(ValueError, match="unknown mxemu option 'mxemu.nope'.*known options"):
        resolve_options({"mxemu.nope": 1})
    with pytest.raises(ValueError, match="unknown pattern family 'no_such_family'"):
        resolve_options({"enabled_patterns": ["no_such_family"]})
    with dummy_families():
        assert resolve_options({"enabled_patterns": AFFINE})["enabled_patterns"] == (AFFINE,)
        p = MxemuPass({"disabled_patterns": [HALFSUM]})
        assert AFFINE in p.enabled_families() and HALFSUM not in p.enabled_families()
        assert MxemuPass({"enabled_patterns": ()}).enabled_families() == ()


# --------------------------------------------------------------------------------------
# the pass on post-grad-like graphs
# --------------------------------------------------------------------------------------


def test_pass_rewrites_records_and_counts(dummies):
    x, y = torch.randn(8), torch.randn(8)
    gm = graph_of(f_two, x, y)
    counters.clear()
    with recording() as sink:
        MxemuPass({"enabled_patterns": [AFFINE]})(gm.graph)
    gm.recompile()
    targets = call_targets(gm)
    assert torch.ops.mxemu_test.affine.default in targets
    assert targets.count(aten.mul.Tensor) == 1  # y * 3.0 (+ 1.0) left alone
    torch.testing.assert_close(gm(x, y), f_two(x, y))
    assert counters["mxemu"][AFFINE] == 1
    assert counters["inductor"][f"mxemu_{AFFINE}"] == 1
    assert counters["mxemu"]["pass_runs"] == 1
    fused = [c for c in sink.candidates if c.fused]
    alone = [c for c in sink.candidates if not c.fused]
    assert len(fused) == 1 and fused[0].kernel == "mxemu_test::affine"
    assert fused[0].pattern == "affine_2x_plus_1" and fused[0].family == AFFINE
    assert fused[0].target == "aten.add.Tensor" and fused[0].graph == "0:inference"
    assert len(alone) == 1 and "check rejected" in alone[0].reason
    assert [g.fused for g in sink.graphs] == [1]
    assert sink.candidates[0].fused  # reported in graph order


def test_init_lazy_once_outside_fake_mode(dummies):
    seen = {}

    def init(pm_pass, input_device=None):
        seen["count"] = seen.get("count", 0) + 1
        seen["device"] = input_device
        seen["fake"] = type(torch.empty(2)).__name__
        seen["tracing"] = torch._guards.TracingContext.try_get()

    with temp_family("tmp_lazy", init):
        assert seen == {}
        gm = graph_of(lambda x: x + 1, torch.randn(4))
        MxemuPass({"enabled_patterns": ["tmp_lazy"]})(gm.graph)
        MxemuPass({"enabled_patterns": ["tmp_lazy"]})(gm.graph)
    assert seen["count"] == 1
    assert seen["fake"] == "FakeTensor" and seen["tracing"] is None
    assert seen["device"] == torch.device("cpu")


def test_anchors_skip_family_without_tracing():
    calls = []

    with temp_family("tmp_anchor", lambda pm: calls.append(1), anchors=[aten.mm]):
        MxemuPass({"enabled_patterns": ["tmp_anchor"]})(graph_of(lambda x: x + 1, torch.randn(2)).graph)
        assert calls == []  # no aten.mm.* node: the family was not even initialised
        gm = graph_of(lambda a: a @ a, torch.randn(2, 2))
        MxemuPass({"enabled_patterns": ["tmp_anchor"]})(gm.graph)
        assert calls == [1]


def test_error_in_check_leaves_candidate_alone(dummies):
    def bad_check(match):
        raise RuntimeError("boom in check")

    def init(pm_pass):
        register_replacement(affine_search, affine_replace, [torch.empty(8)], pm_pass,
                             extra_check=bad_check, pattern_name="broken")

    x, y = torch.randn(8), torch.randn(8)
    with temp_family("tmp_badcheck", init):
        gm = graph_of(f_two, x, y)
        before = str(gm.graph)
        counters.clear()
        with recording() as sink:
            MxemuPass({"enabled_patterns": ["tmp_badcheck"]})(gm.graph)
        assert str(gm.graph) == before
        assert counters["mxemu"]["internal_errors"] >= 1
        assert any("internal error" in c.reason and "boom in check" in c.reason
                   for c in sink.candidates)
        with pytest.raises(RuntimeError, match="boom in check"):
            MxemuPass({"enabled_patterns": ["tmp_badcheck"], "strict": True})(gm.graph)


def test_error_during_rewrite_restores_graph_and_keeps_other_candidates():
    from torch._inductor.pattern_matcher import CallFunction, KeywordArg, register_graph_pattern

    # x + 1.0 anchors; the handler first mutates the graph, then fails for the
    # candidate fed by a `sin` -- that one must come out untouched, the others fused.
    pattern = CallFunction(aten.add.Tensor, KeywordArg("x"), 1.0)

    def init(pm_pass):
        def handler(match, x):
            graph = match.graph
            node = match.output_node()
            new = graph.call_function(torch.ops.mxemu_test.affine.default, (x,))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            match.erase_nodes()
            if x.target is aten.sin.default:
                raise ValueError("half-way failure")
            # the keyword form pattern modules use; node/kernel are filled in by the pass
            record_candidate(family="tmp_badrewrite", pattern="handler", node=None, fused=True,
                             reason="via handler")

        register_graph_pattern(pattern, pass_dict=pm_pass)(handler)

    def f(a, b, c):
        return (a + 1.0) * (b.sin() + 1.0) * (c + 1.0)

    args = [torch.randn(4) for _ in range(3)]
    with temp_family("tmp_badrewrite", init):
        gm = graph_of(f, *args)
        n_before = len(gm.graph.nodes)
        with recording() as sink:
            MxemuPass({"enabled_patterns": ["tmp_badrewrite"]})(gm.graph)
        gm.graph.lint()
        gm.recompile()
    targets = call_targets(gm)
    assert targets.count(torch.ops.mxemu_test.affine.default) == 2
    assert targets.count(aten.add.Tensor) == 1  # the sin candidate, restored
    assert len(gm.graph.nodes) == n_before
    errors = [c for c in sink.candidates if "internal error while rewriting" in c.reason]
    assert len(errors) == 1 and "half-way failure" in errors[0].reason
    fused = [c for c in sink.candidates if c.fused]
    assert len(fused) == 2
    assert all(c.node.startswith("add") and c.kernel == "mxemu_test::affine" for c in fused)
    assert all(c.reason == "via handler" and c.pattern == "handler" for c in fused)


def test_init_failure_disables_family_without_raising():
    def init(pm_pass):
        raise RuntimeError("cannot trace")

    with temp_family("tmp_badinit", init):
        gm = graph_of(lambda x: x * 2.0 + 1.0, torch.randn(4))
        before = str(gm.graph)
        with recording() as sink:
            MxemuPass({"enabled_patterns": ["tmp_badinit"]})(gm.graph)
        assert str(gm.graph) == before
        assert get_pattern_family("tmp_badinit").state == "failed"
        assert any("tmp_badinit" in n and "cannot trace" in n for n in sink.notes)


def test_author_reason_and_get_option():
    def check(match):
        k = get_option("tmp_reason.min_numel")
        if match.kwargs["x"].meta["val"].numel() < k:
            record_candidate("tmp_reason", match.output_node(), False,
                             reason=f"numel below mxemu.tmp_reason.min_numel={k}")
            return False
        return True

    def init(pm_pass):
        register_replacement(affine_search, affine_replace, [torch.empty(8)], pm_pass,
                             extra_check=check)

    with temp_family("tmp_reason", init, options={"tmp_reason.min_numel": 16}):
        gm = graph_of(lambda x: x * 2.0 + 1.0, torch.randn(8))
        with recording() as sink:
            MxemuPass({"enabled_patterns": ["tmp_reason"]})(gm.graph)
        assert [c.reason for c in sink.candidates] == ["numel below mxemu.tmp_reason.min_numel=16"]
        with recording() as sink:
            MxemuPass({"enabled_patterns": ["tmp_reason"], "tmp_reason.min_numel": 4})(gm.graph)
        assert [c.fused for c in sink.candidates] == [True]


def test_report_unmatched_lists_anchor_nodes(dummies):
    gm = graph_of(lambda x: (x + 3.0) * 2.0, torch.randn(4))
    with recording() as sink:
        MxemuPass({"enabled_patterns": [AFFINE], "report_unmatched": True})(gm.graph)
    assert [(c.node, c.fused) for c in sink.candidates] == [("add", False)]
    assert "no mxemu_test_affine pattern matched" in sink.candidates[0].reason


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def test_fwd_only_post_grad_turns_views_into_reshapes():
    gm = fwd_only_post_grad(lambda x: x.view(2, 4).t().contiguous().view(-1), [torch.empty(8)])
    targets = call_targets(gm)
    assert aten.view.default not in targets and aten.reshape.default in targets


def test_shape_agnostic_pattern_matches_symbolic_shapes(dummies):
    pat = shape_agnostic_pattern(halfsum_search, [torch.empty(8)])
    assert "ANY_SHAPE" not in repr(pat) and ANY_SHAPE is type(ANY_SHAPE)()
    for n in (8, 12):
        x = torch.randn(n)
        gm = graph_of(lambda x: halfsum_search(x) + 1, x, mode="symbolic")
        MxemuPass({"enabled_patterns": [HALFSUM]})(gm.graph)
        gm.recompile()
        assert torch.ops.mxemu_test.halfsum4.default in call_targets(gm)
        torch.testing.assert_close(gm(x), halfsum_search(x) + 1)
    # negative control: another constant (0.25) must not match
    gm = graph_of(lambda x: (x.reshape(-1, 4) * 0.25).sum(-1), torch.randn(8), mode="symbolic")
    MxemuPass({"enabled_patterns": [HALFSUM]})(gm.graph)
    assert torch.ops.mxemu_test.halfsum4.default not in call_targets(gm)


# --------------------------------------------------------------------------------------
# uuid and chaining
# --------------------------------------------------------------------------------------


def test_uuid_stable_and_sensitive_to_config(dummies):
    base = MxemuPass({"enabled_patterns": [AFFINE]})
    u = base.uuid()
    assert isinstance(u, str) and u.startswith("mxemu-")
    assert MxemuPass({"mxemu.enabled_patterns": (AFFINE,)}).uuid() == u
    assert MxemuPass({"enabled_patterns": [AFFINE, HALFSUM]}).uuid() != u
    assert MxemuPass({"enabled_patterns": [AFFINE], "strict": True}).uuid() != u
    assert MxemuPass({"enabled_patterns": [AFFINE], "remove_noop_ops": True}).uuid() != u
    # options that do not change the rewrite keep the cache key
    assert MxemuPass({"enabled_patterns": [AFFINE], "report_unmatched": True}).uuid() == u
    assert MxemuPass({"enabled_patterns": [AFFINE], "emulate_precision_casts": False}).uuid() == u
    # the default pass (all families) changes when a family is (un)registered
    all_u = MxemuPass().uuid()
    with temp_family("tmp_uuid", lambda pm: None):
        assert MxemuPass().uuid() != all_u
    assert MxemuPass().uuid() == all_u


class _UserPass(torch._inductor.custom_graph_pass.CustomGraphPass):
    def __init__(self, uuid="user-pass"):
        self.calls = 0
        self._uuid = uuid

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return self._uuid


def test_chain_uuid_and_flattening():
    ours = MxemuPass({"enabled_patterns": ()})
    user = _UserPass()
    assert chain_passes(None, ours) is ours
    chain = chain_passes(user, ours)
    assert isinstance(chain, _Chain) and chain.passes == (user, ours)
    assert chain.uuid() == ("mxemu-chain", "user-pass", ours.uuid())
    assert _Chain([user, _UserPass(uuid=None)]).uuid() is None
    assert chain_passes(lambda g: None, ours).uuid() is None  # plain callable: no caching
    # our pass is never chained twice, nested chains flatten, lists (2.13) are accepted
    ours2 = MxemuPass({"enabled_patterns": (), "strict": True})
    again = chain_passes(chain, ours2)
    assert again.passes == (user, ours2)
    assert chain_passes([user, ours], ours2).passes == (user, ours2)
    assert strip_mxemu_passes(again) is user
    assert strip_mxemu_passes(ours) is None
    gm = graph_of(lambda x: x + 1, torch.randn(2))
    again(gm.graph)
    assert user.calls == 1


@pytest.mark.skipif(
    not hasattr(torch._inductor.custom_graph_pass, "CustomInferenceAwareGraphPass"),
    reason="CustomInferenceAwareGraphPass is torch>=2.13 only",
)
def test_chain_forwards_is_inference():
    from torch._inductor.custom_graph_pass import CustomInferenceAwareGraphPass

    class Aware(CustomInferenceAwareGraphPass):
        seen = None

        def __call__(self, graph, is_inference):
            Aware.seen = is_inference

        def uuid(self):
            return "aware"

    chain = chain_passes(Aware(), MxemuPass({"enabled_patterns": ()}))
    assert isinstance(chain, CustomInferenceAwareGraphPass)
    chain(graph_of(lambda x: x + 1, torch.randn(2)).graph, is_inference=True)
    assert Aware.seen is True


# --------------------------------------------------------------------------------------
# logging
# --------------------------------------------------------------------------------------


def test_debug_logging(dummies, caplog):
    gm = graph_of(f_two, torch.randn(8), torch.randn(8))
    with caplog.at_level(logging.DEBUG, logger="emu_inductor"):
        MxemuPass({"enabled_patterns": [AFFINE]})(gm.graph)
    text = caplog.text
    assert "mxemu pass on graph" in text and "uuid mxemu-" in text
    assert "candidate FUSED" in text and "candidate left alone" in text


def test_pattern_tracing_runs_no_generated_kernels(monkeypatch):
    """Search patterns are traced on example tensors; the mxemu ops inside the stage-2
    structure must run the reference there, not generate/interpret Triton kernels."""
    from emu_inductor.kernels import cache
    from emu_inductor.ops import library
    from emu_inductor.passes.moe import moe_structure_pattern
    from emu_inductor.passes.tracing import tracing_context

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with tracing_context():
        assert library.select_backend(torch.device("cpu")) == "reference"
    before = set(cache.generated_files())
    moe_structure_pattern.cache_clear()
    moe_structure_pattern("silu", False, False, True)
    assert set(cache.generated_files()) == before
