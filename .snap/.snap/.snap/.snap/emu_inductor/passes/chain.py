"""Installing the mxemu pass next to a post-grad pass the user already has.

torch 2.11 accepts one callable in ``post_grad_custom_pre_pass``; 2.13 a list. We always
install ONE object: the user's pass(es) first, then ours, chained (``chain_passes``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from .. import _compat
from .mxemu_pass import MxemuPass

__all__ = ["chain_passes", "strip_mxemu_passes"]


class _Chain(CustomGraphPass):
    """Runs several post-grad passes in order as ONE ``CustomGraphPass`` (torch 2.11
    accepts a single callable). ``uuid()`` combines the members' uuids and is None
    (no FX caching) if any member is not a ``CustomGraphPass`` or has no uuid."""

    def __init__(self, passes: Sequence[Any]) -> None:
        self.passes = tuple(passes)

    def __call__(self, graph: torch.fx.Graph) -> None:  # type: ignore[override]
        for p in self.passes:
            p(graph)

    def uuid(self) -> Any:
        ids = []
        for p in self.passes:
            if not isinstance(p, CustomGraphPass):
                return None
            u = p.uuid()
            if not u:
                return None
            ids.append(u)
        return ("mxemu-chain", *ids)

    def __repr__(self) -> str:
        return f"_Chain({', '.join(map(repr, self.passes))})"



if _compat.InferenceAwareGraphPass is not None:

    class _InferenceAwareChain(_Chain, _compat.InferenceAwareGraphPass):  # type: ignore[misc]
        """2.13: a chain holding a ``CustomInferenceAwareGraphPass`` must forward
        ``is_inference`` to it (post_grad only passes it to inference-aware passes)."""

        def __call__(self, graph: torch.fx.Graph, is_inference: bool = False) -> None:  # type: ignore[override]
            for p in self.passes:
                if isinstance(p, _compat.InferenceAwareGraphPass):
                    p(graph, is_inference=is_inference)
                else:
                    p(graph)
else:  # pragma: no cover - torch 2.11
    _InferenceAwareChain = None  # type: ignore[assignment,misc]


def _flatten(value: Any) -> list[Any]:
    out: list[Any] = []
    for p in _compat.flatten_custom_passes(value):
        if isinstance(p, _Chain):
            out.extend(_flatten(list(p.passes)))
        else:
            out.append(p)
    return out


def strip_mxemu_passes(value: Any) -> Any:
    """``value`` (a post_grad_custom_pre_pass setting) without any MxemuPass in it."""
    rest = [p for p in _flatten(value) if not isinstance(p, MxemuPass)]
    if not rest:
        return None
    if len(rest) == 1:
        return rest[0]
    return _make_chain(rest)


def _make_chain(passes: list[Any]) -> _Chain:
    if _InferenceAwareChain is not None and any(
            isinstance(p, _compat.InferenceAwareGraphPass) for p in passes):
        return _InferenceAwareChain(passes)
    return _Chain(passes)


def chain_passes(existing: Any, ours: MxemuPass) -> Any:
    """The value to install as ``post_grad_custom_pre_pass``: the user's existing
    pass(es) first, then ``ours``. An MxemuPass already in ``existing`` (from
    ``enable()`` or an outer backend) is dropped, so the pass never runs twice."""
    rest = [p for p in _flatten(existing) if not isinstance(p, MxemuPass)]
    if not rest:
        return ours
    return _make_chain([*rest, ours])
