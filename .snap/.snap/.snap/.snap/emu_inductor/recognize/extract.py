"""A cone as a small standalone GraphModule that runs on the CPU on probe tensors.

Leaves become placeholders (in `cone.leaves` order, minus those bound to constants);
attribute leaves (`get_attr`, e.g. a LUT built in the user's code) are copied in; SymInt
arguments from outside the cone take their hint; `device=` arguments become the CPU; shape
arguments that stem from a resized factor are rewritten (`resize.Plan`).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch.fx import Graph, GraphModule, Node

from .resize import Plan
from .shapes import hint

__all__ = ["extract", "evaluate", "real_mode", "attr_value"]


def attr_value(node: Node):
    """The tensor behind a get_attr node (None if unreadable)."""
    obj = node.graph.owning_module
    if obj is None:
        return None
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, torch.Tensor) else None


def _concrete(a):
    if isinstance(a, (torch.SymInt,)):
        return hint(a)
    if isinstance(a, torch.SymFloat):
        return float(a.node.hint)
    if isinstance(a, torch.SymBool):
        return bool(a.node.hint)
    if isinstance(a, torch.device):
        return torch.device("cpu")
    return a


def extract(cone, inputs: list, constants: Optional[dict] = None, plan: Optional[Plan] = None,
            new_sizes: Optional[dict] = None) -> GraphModule:
    """GraphModule computing `cone.output` from placeholders for `inputs` (leaf nodes).

    `constants`: leaf -> tensor, bound as module attributes instead of placeholders.
    Leaves neither in `inputs` nor `constants` must be SymInt-valued (they take their hint).
    """
    constants = constants or {}
    g = Graph()
    root = torch.nn.Module()
    env: dict = {}
    for i, leaf in enumerate(inputs):
        env[leaf] = g.placeholder(f"in{i}_{leaf.name}")
    for j, (leaf, value) in enumerate(constants.items()):
        name = f"const{j}"
        root.register_buffer(name, value.detach().to("cpu"))
        env[leaf] = g.get_attr(name)
    for leaf in cone.leaves:
        if leaf in env:
            continue
        if leaf.op == "get_attr":
            v = attr_value(leaf)
            if v is None:
                raise ValueError(f"attribute {leaf.target} is not readable")
            name = f"attr_{len(env)}"
            root.register_buffer(name, v.detach().to("cpu"))
            env[leaf] = g.get_attr(name)
            continue
        v = leaf.meta.get("val")
        if isinstance(v, (int, torch.SymInt)):
            env[leaf] = hint(v)
            continue
        raise ValueError(f"leaf {leaf.name} has no probe value")

    def remap(a):
        if isinstance(a, Node):
            if a in env:
                return env[a]
            v = a.meta.get("val")
            if isinstance(v, (int, torch.SymInt, float, torch.SymFloat, bool, torch.SymBool)):
                return _concrete(v)
            raise ValueError(f"{a.name} is used by the cone but is not part of it")
        return _concrete(a)

    for n in cone.nodes:
        args, kwargs = n.args, dict(n.kwargs)
        if plan is not None and new_sizes:
            args = plan.resized_args(n, args, new_sizes)
        args = tuple(torch.fx.node.map_aggregate(list(args), remap))
        kwargs = dict(torch.fx.node.map_aggregate(kwargs, remap))
        if "device" in kwargs:
            kwargs["device"] = torch.device("cpu")
        if "pin_memory" in kwargs:
            kwargs["pin_memory"] = False
        env[n] = g.call_function(n.target, tuple(args), kwargs)
    g.output(env[cone.output])
    return GraphModule(root, g)


@contextlib.contextmanager
def real_mode():
    """Run real tensors even inside a compile (the post-grad pass runs under fake mode)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.no_grad():
        yield


def evaluate(gm: GraphModule, args: list) -> torch.Tensor:
    with real_mode():
        return gm(*args)
