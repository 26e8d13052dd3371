"""A graph our pass rewrote that Inductor then fails to compile does not fail the user's
compile: the backend compiles the graph again without the mxemu pass (stock Inductor),
warns, counts `compile_fallbacks` and leaves a note for explain(); `mxemu.strict=True`
re-raises. (Seen once: a replacement inserted `aten.transpose.int`, which Inductor's
post-grad lowering rejects.)"""

from unittest import mock

import pytest
import torch
from torch._dynamo.utils import counters

from emu_inductor import _compat
from emu_inductor.passes import MxemuPass, recording

aten = torch.ops.aten


def _bad_run(self, graph):
    """Rewrite the output through two aten.transpose.int nodes (same values; no lowering)."""
    out = next(n for n in graph.nodes if n.op == "output")
    val = out.args[0][0]
    with graph.inserting_before(out):
        t = graph.call_function(aten.transpose.int, (val, 0, 1))
        t2 = graph.call_function(aten.transpose.int, (t, 0, 1))
    t.meta["val"] = val.meta["val"].transpose(0, 1)
    t2.meta["val"] = val.meta["val"]
    out.args = ((t2,) + tuple(out.args[0][1:]),)


def f(x):
    return torch.relu(x) * 2 + 1


def _compile(**opts):
    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(4, 6)
    with mock.patch.object(MxemuPass, "_run", _bad_run), _compat.inductor_caches_disabled():
        c = torch.compile(f, backend="mxemu", options={f"mxemu.{k}": v for k, v in opts.items()})
        return c(x), f(x)


def test_inductor_failure_after_the_pass_falls_back_to_stock():
    with recording() as sink:
        out, ref = _compile()
    assert torch.equal(out, ref)
    assert counters["mxemu"]["compile_fallbacks"] == 1, dict(counters["mxemu"])
    assert any("fell back to stock Inductor" in n for n in sink.notes), sink.notes


def test_strict_reraises():
    with pytest.raises(Exception, match="transpose"):
        _compile(strict=True)


def test_dynamo_control_flow_exceptions_pass_through():
    """RestartAnalysis and its kin steer Dynamo / AOTAutograd (a symbolic float restarts
    tracing): they are not compile failures and must reach their handler unchanged."""
    from torch._dynamo.exc import TensorifyScalarRestartAnalysis

    from emu_inductor import backend as B

    def raise_restart(*a, **k):
        raise TensorifyScalarRestartAnalysis

    counters.clear()
    with mock.patch.object(B, "compile_fx", raise_restart), pytest.raises(TensorifyScalarRestartAnalysis):
        B.MxemuBackend()(torch.fx.symbolic_trace(f), [torch.randn(2)])
    assert counters["mxemu"]["compile_fallbacks"] == 0
