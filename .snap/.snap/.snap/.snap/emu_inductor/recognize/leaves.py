"""Leaf values the recogniser may rely on, and table hypotheses for leaves it cannot read.

A leaf whose VALUE matters (a LUT, a constant held in a buffer or turned into a graph
input by dynamic=True) is read from, in order: the caller's `values` mapping, the
graph's attribute (get_attr), Inductor's real inputs when it has them. A graph-input
leaf used as a look-up table whose values are unknown gets the hypotheses the formats
allow (the value table of each element type with that many codes, signed or magnitudes
only); whichever is used becomes a run-time guard.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.fx import Node

from ..formats import ELEMENTS, decode
from .extract import attr_value
from .shapes import concrete_shape
from .verdict import Guard

__all__ = ["known_value", "table_hypotheses", "is_graph_input", "leaf_bindings"]


def is_graph_input(node: Node) -> bool:
    return node.op == "placeholder"


def _real_input(node: Node) -> Optional[torch.Tensor]:
    try:
        from torch._inductor.virtualized import V

        real = V.real_inputs
    except Exception:
        return None
    if not isinstance(real, (list, tuple)):
        return None  # V's NullHandler outside a compile that recorded them
    phs = [n for n in node.graph.nodes if n.op == "placeholder"]
    try:
        i = phs.index(node)
    except ValueError:
        return None
    if i >= len(real):
        return None
    t = real[i]
    if not isinstance(t, torch.Tensor) or isinstance(t, torch._subclasses.FakeTensor):
        return None
    v = node.meta.get("val")
    # the i-th real input is this placeholder's only when they agree in dtype and shape (a
    # graph whose inputs AOTAutograd rearranged would not); the value read becomes a run-time
    # guard either way, so a wrong pairing could only refuse a fusion at run time
    if not isinstance(v, torch.Tensor) or v.dtype != t.dtype:
        return None
    try:
        if tuple(concrete_shape(v)) != tuple(t.shape):
            return None
    except ValueError:  # a symbolic size: no pairing by shape
        return None
    return t


def known_value(node: Node, values: Optional[dict]) -> Optional[torch.Tensor]:
    if values and node in values:
        return values[node]
    if node.op == "get_attr":
        return attr_value(node)
    if node.op == "placeholder":
        return _real_input(node)
    return None


def table_hypotheses(node: Node) -> list:
    """[(label, tensor)] candidate contents of a graph-input table leaf (by its length)."""
    v = node.meta.get("val")
    if not isinstance(v, torch.Tensor) or v.dim() != 1 or not v.is_floating_point():
        return []
    try:
        n = int(v.shape[0])
    except Exception:
        return []
    out = []
    for elem in ELEMENTS.values():
        codes = torch.arange(n, dtype=torch.int32).to(torch.uint8)
        if elem.num_codes == n:
            table = decode(codes, elem).to(v.dtype)
            out.append((f"{elem.name} value table", table))
            neg0 = n // 2  # sign-magnitude codes: the top bit is the sign, code n/2 is -0
            if table[neg0].item() == 0 and bool(torch.signbit(table[neg0])):
                plus = table.clone()
                plus[neg0] = 0.0
                # ModelOpt's e2m1_values: +0 for code 8 (a real library's table)
                out.append((f"{elem.name} value table with +0 for code {neg0}", plus))
        elif elem.num_codes // 2 == n:
            out.append((f"{elem.name} magnitude table", decode(codes, elem).to(v.dtype)))
    return out


def _flat(t: torch.Tensor) -> tuple:
    return tuple(t.detach().float().reshape(-1).tolist())


def leaf_bindings(leaves, *, skip, wanted, tables, values: Optional[dict]) -> Optional[list]:
    """The value bindings under which a cone can be evaluated, as [(consts, guards)].

    Every `wanted(leaf)` leaf not in `skip` takes its known value (a graph input's value
    becomes a guard: the proof used it); every small table leaf takes its known value or,
    when unknown, each of its hypotheses (one binding per combination). None when a wanted
    value is unknown: the cone cannot be evaluated. Shared by the weight and activation
    sides so both bind and guard leaves the same way.
    """
    consts, guards = {}, []
    for leaf in leaves:
        if leaf in skip or leaf in tables or not wanted(leaf):
            continue
        kv = known_value(leaf, values)
        if kv is None:
            return None
        consts[leaf] = kv
        if leaf.op == "placeholder":
            guards.append(Guard(leaf, _flat(kv), "constant input"))
    table_opts = [[]]
    for t in tables:
        if t not in leaves:
            continue
        kv = known_value(t, values)
        opts = [("its value", kv)] if kv is not None else table_hypotheses(t)
        table_opts = [prev + [(t, lab, val)] for prev in table_opts for lab, val in opts]
    out = []
    for tab in table_opts:
        c2, g2 = dict(consts), list(guards)
        for t, lab, val in tab:
            c2[t] = val
            g2.append(Guard(t, _flat(val), lab))
        out.append((c2, tuple(g2)))
    return out
