"""Run-time assertions in a graph, and the nodes that exist only to feed them.

A user's code checks its inputs: F.one_hot asserts `codes >= 0` and `codes < n`
(`ge` / `lt` -> `any` -> `_assert_async`), a data-dependent size is asserted non-negative
(`_assert_scalar`). Such a chain reads a decode's intermediate but computes nothing the
output uses: it does not make the decode "used twice", and fusing leaves it in the graph
(it still checks what it checked, reading what it read).
"""

from __future__ import annotations

import torch
from torch.fx import Node

__all__ = ["ASSERTS", "assertion_only", "feeds_only_asserts"]

_aten = torch.ops.aten
#: Ops whose only effect is to fail on a false condition.
ASSERTS = tuple(
    getattr(getattr(_aten, name), overload)
    for name, overload in (("_assert_scalar", "default"), ("sym_constrain_range", "default"),
                           ("sym_constrain_range_for_size", "default"), ("_assert_async", "default"),
                           ("_assert_async", "msg"), ("_functional_assert_async", "msg"))
    if hasattr(_aten, name) and hasattr(getattr(_aten, name), overload))


def assertion_only(graph) -> set:
    """Nodes whose value flows only into run-time assertions (and the assertions)."""
    out = set()
    for n in reversed(list(graph.nodes)):
        if n.op != "call_function":
            continue
        if n.target in ASSERTS or (n.users and all(u in out for u in n.users)):
            out.add(n)
    return out


def feeds_only_asserts(node: Node, limit: int = 256) -> bool:
    """`node` is an assertion or every path from it ends in one (no output, no other use);
    False past `limit` nodes (a large subgraph is not a check)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if len(seen) > limit or n.op != "call_function":
            return False
        if n.target in ASSERTS:
            continue
        if not n.users:
            return False  # a value computed and dropped is not a check (DCE would remove it)
        stack.extend(n.users)
    return True
