"""The recogniser's entry points for the passes layer (see the package docstring)."""

from __future__ import annotations

import time
from typing import Optional, Union

from torch.fx import Node

from .activation import recognize_activation_uncached
from .candidates import activation_cone, gemm_nodes, operands, weight_cone
from .extract import attr_value, real_mode
from .variants import NO_ACT
from .verdict import CACHE, ActVerdict, Guard, Rejection, WeightVerdict, cone_key
from . import weight as weight_side
from .weight import recognize_weight_uncached

__all__ = ["recognize_weight", "recognize_activation", "gemm_nodes", "CACHE"]

WeightResult = Union[WeightVerdict, Rejection]
ActResult = Union[ActVerdict, Rejection]


def _check_node(gemm) -> None:
    if not isinstance(gemm, Node):
        raise TypeError(f"gemm_node: expected a torch.fx.Node, got {type(gemm).__name__}")
    operands(gemm)  # ValueError naming gemm_node for other targets


def _node_index(cone, n):
    if n is None:
        return None
    if n in cone.leaves:
        return ("leaf", cone.leaves.index(n))
    return ("node", cone.nodes.index(n))


def _node_at(cone, ref):
    if ref is None:
        return None
    kind, i = ref
    return cone.leaves[i] if kind == "leaf" else cone.nodes[i]


def _abstract(v, cone):
    """verdict -> (type, fields with nodes as cone positions)."""
    if isinstance(v, Rejection):
        return ("rej", v.reason)
    if isinstance(v, WeightVerdict):
        return ("w", v.variant, _node_index(cone, v.codes), _node_index(cone, v.scale), _node_index(cone, v.alpha),
                v.transpose, v.out_dtype, tuple((_node_index(cone, g.node), g.values, g.what) for g in v.guards),
                v.equivalent, v.separated, v.kmajor)
    return ("a", v.variant, _node_index(cone, v.global_scale),
            tuple((_node_index(cone, g.node), g.values, g.what) for g in v.guards), v.equivalent, v.separated,
            v.global_value)


def _concrete(entry, cone, gemm, side, post=()):
    if entry[0] == "rej":
        return Rejection(side, gemm, entry[1], cached=True)
    if entry[0] == "w":
        _, var, c, s, a, tr, dt, guards, eq, sep, km = entry
        return WeightVerdict(var, _node_at(cone, c), _node_at(cone, s), _node_at(cone, a), tr, dt,
                             tuple(Guard(_node_at(cone, n), vals, what) for n, vals, what in guards), eq, sep,
                             cached=True, kmajor=km)
    _, var, gs, guards, eq, sep, gv = entry
    return ActVerdict(var, cone.x, _node_at(cone, gs), cone.output, post,
                      tuple(Guard(_node_at(cone, n), vals, what) for n, vals, what in guards), eq, sep, cached=True,
                      global_value=gv)


def recognize_weight(gemm_node: Node, *, values: Optional[dict] = None,
                     budget_bytes: Optional[int] = None, use_cache: bool = True) -> WeightResult:
    """Prove what the weight operand of `gemm_node` (aten.mm/addmm/bmm/_grouped_mm in a
    post-grad graph) computes: a `WeightVerdict`, or a `Rejection` with the reason.

    values: optional {leaf node: tensor} for graph inputs whose values are known (a LUT
    buffer); the verdict lists in `guards` every input whose value it relied on.
    budget_bytes: the largest intermediate one probe evaluation may create (None:
    `weight.DEFAULT_BUDGET_BYTES`, read at each call so that tests can lower it).
    """
    if budget_bytes is None:
        budget_bytes = weight_side.DEFAULT_BUDGET_BYTES
    with real_mode():  # probes are real tensors even inside a compile's fake mode
        return _recognize_weight(gemm_node, values, budget_bytes, use_cache)


def _recognize_weight(gemm_node, values, budget_bytes, use_cache) -> WeightResult:
    _check_node(gemm_node)
    t0 = time.perf_counter()
    cone, why = weight_cone(gemm_node)
    if cone is None:
        return Rejection("weight", gemm_node, why, seconds=time.perf_counter() - t0)
    # the budget decides refusals ("too large to evaluate"): part of the key
    key = cone_key("weight", cone, attr_value,
                   extra=str(sorted((k.name for k in (values or {})))) + f"|budget={budget_bytes}")
    if use_cache:
        hit = CACHE.get(key)
        if hit is not None:
            out = _concrete(hit, cone, gemm_node, "weight")
            out.seconds, out.key = time.perf_counter() - t0, key
            return out
    out = recognize_weight_uncached(gemm_node, cone, values=values, budget_bytes=budget_bytes)
    if use_cache and not values:
        CACHE.put(key, _abstract(out, cone))
    out.seconds, out.key = time.perf_counter() - t0, key
    return out


def recognize_activation(gemm_node: Node, *, values: Optional[dict] = None, use_cache: bool = True) -> ActResult:
    """Prove what the activation operand of `gemm_node` computes: an `ActVerdict` (its
    variant may be "none": the operand is not quantized), or a `Rejection`."""
    with real_mode():
        return _recognize_activation(gemm_node, values, use_cache)


def _recognize_activation(gemm_node, values, use_cache) -> ActResult:
    _check_node(gemm_node)
    t0 = time.perf_counter()
    cone, why = activation_cone(gemm_node)
    if cone is None:
        if why is not None:
            return Rejection("activation", gemm_node, why, seconds=time.perf_counter() - t0)
        a, _ = operands(gemm_node)
        return ActVerdict(NO_ACT, a, None, a, (), seconds=time.perf_counter() - t0)
    key = cone_key("activation", cone, attr_value, extra=str(sorted((k.name for k in (values or {})))))
    if use_cache:
        hit = CACHE.get(key)
        if hit is not None:
            out = _concrete(hit, cone, gemm_node, "activation", cone.post)
            out.seconds, out.key = time.perf_counter() - t0, key
            return out
    out = recognize_activation_uncached(gemm_node, cone, values=values)
    if use_cache and not values:
        CACHE.put(key, _abstract(out, cone))
    out.seconds, out.key = time.perf_counter() - t0, key
    return out
