"""A table moved to the weight's device inside forward (vLLM's `kE2M1ToFloat.to(device=a.device)`)
is a `prims.device_put` in the graph only when the table lives on another device -- on a GPU,
never in a CPU test, where the copy vanishes. On the H200 it made vLLM's NVFP4 linear
unprovable ("weight cone contains prims.device_put ..., which is not an allowed weight op",
benchmarks/gpu_explain.py). The recogniser treats it as a value-preserving elementwise op and
evaluates it on the CPU (extract maps device arguments to the CPU)."""

import torch
from torch.fx import Graph, GraphModule

from emu_inductor.recognize import extract as extract_mod
from emu_inductor.recognize.structure import op_kind, value_preserving


def _graph():
    g = Graph()
    t = g.placeholder("table")
    t.meta["val"] = torch.zeros(8)
    moved = g.call_function(torch.ops.prims.device_put.default, (t, torch.device("cuda", 0)))
    moved.meta["val"] = torch.zeros(8)
    g.output(moved)
    return g, moved


def test_device_put_is_a_value_preserving_elementwise_op():
    _, moved = _graph()
    assert op_kind(moved) == "elementwise"
    assert value_preserving(moved)


def test_device_put_evaluates_on_the_cpu_as_the_identity():
    g, moved = _graph()
    moved.args = tuple(extract_mod._concrete(a) for a in moved.args)  # what extract() does to each argument
    table = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    out = GraphModule(torch.nn.Module(), g)(table)
    assert out.device.type == "cpu" and torch.equal(out, table)
