"""Tracing a search function the way the user's graph was produced.

A built-in pattern is traced with ``fwd_only`` on small real example tensors, then
normalised as Inductor normalised the user's graph before our post-grad pre-pass:
aten canonicalisation, remove_noop_ops, constant_fold_uniform_value (zeros_like -> full),
the early joint-graph patterns, view -> reshape. Tracing runs outside any compile's fake
mode with ``torch.compiler.is_compiling()`` patched to True, so the reference's
eager-only value checks are skipped exactly as they are when the user's code is
compiled, and the mxemu ops inside a traced structure run their eager reference
(``ops.library.pattern_tracing``), not generated kernels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any
from unittest import mock

import torch
from torch._inductor import pattern_matcher as pm
from torch._inductor.fx_passes.joint_graph import (
    canonicalize_aten_ir_passes,
    constant_fold_uniform_value,
    early_patterns,
)
from torch._inductor.fx_passes.post_grad import remove_noop_ops, view_to_reshape
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

from ..ops.library import pattern_tracing

__all__ = ["normalise", "tracing_context", "trace_search"]


def normalise(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Inductor's normalisation of the user's graph, applied to a traced pattern."""
    canonicalize_aten_ir_passes(gm)
    remove_noop_ops(gm.graph)
    constant_fold_uniform_value(gm)
    early_patterns.apply(gm.graph)
    view_to_reshape(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


@contextlib.contextmanager
def tracing_context():
    """Outside any compile's fake mode, with is_compiling() True (skips eager checks).

    The TracingContext carries one FakeTensorMode for the node metadata of the trace:
    without it, real-mode tracing makes a new FakeTensorMode (and a stack capture) for
    every traced node, about 60% of pattern-rule building time; traced patterns are
    identical either way (checked for every catalogue piece, bf16 and fp32)."""
    ctx = torch._guards.TracingContext(FakeTensorMode())
    with torch._guards.tracing(ctx), unset_fake_temporarily(), mock.patch(
        "torch.compiler.is_compiling", return_value=True
    ), pattern_tracing():
        yield


def trace_search(fn: Callable, args: Sequence[Any]) -> torch.fx.GraphModule:
    """fwd_only + the normalisation Inductor applied to the user's graph."""
    with tracing_context():
        gm = pm.fwd_only(fn, list(args))
        if any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
               and n.target._schema.is_mutable for n in gm.graph.nodes):
            # in-place user code (y[idx] = v, masked assignment): the user's graph is
            # functionalized by AOTAutograd, so functionalize the pattern as well
            gm = pm.fwd_only(torch.func.functionalize(fn, remove="mutations"), list(args))
        return normalise(gm)
