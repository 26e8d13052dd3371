"""Graph surgery shared by the families that turn per-expert GEMMs into one grouped GEMM
("semantic_loop", "semantic_bmm", "semantic_group"): inserting nodes with fake values, and
the expert-ordered rewrite itself (rows of every expert concatenated in expert order, group
ends from the row counts, each expert's result a slice of the one output).
"""

from __future__ import annotations

import contextlib
import operator
from typing import Callable

import torch
from torch._guards import detect_fake_mode

aten = torch.ops.aten

__all__ = ["Builder", "graph_order", "expert_ordered_gemm"]


def node_val(n):
    """The fake value of an FX node (None for a non-node or a node without one)."""
    return n.meta.get("val") if isinstance(n, torch.fx.Node) else None


_val = node_val


def graph_order(graph) -> dict:
    """Node -> position in the graph (topological)."""
    return {n: i for i, n in enumerate(graph.nodes)}


class Builder:
    """Inserts nodes before `at`, each with a fake value computed by its own op (and `at`'s
    source metadata, so explain() and stack traces point at the user's line)."""

    def __init__(self, graph, at):
        self.graph, self.at = graph, at
        self.mode = detect_fake_mode([_val(n) for n in at.all_input_nodes])

    def __call__(self, target, *args, **kwargs):
        def fake(x):
            return _val(x) if isinstance(x, torch.fx.Node) else x

        fa = torch.fx.node.map_aggregate(args, fake)
        fk = torch.fx.node.map_aggregate(kwargs, fake)
        with self.graph.inserting_before(self.at):
            n = self.graph.call_function(target, args, kwargs)
        with (self.mode or contextlib.nullcontext()):
            n.meta["val"] = target(*fa, **fk)
        for k in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if k in self.at.meta:
                n.meta[k] = self.at.meta[k]
        return n


def expert_ordered_gemm(b: Builder, group, E: int, device, gemm: Callable):
    """Replace the per-expert GEMMs `group` ([(expert, node)] in expert order, each node's
    args[0] the expert's rows) by one grouped GEMM: `gemm(rows, offs)` over the rows
    concatenated in expert order with int32 group ends `offs` (from `full(rows_e, e)` +
    `scatter_add` + `cumsum`, so symbolic and data-dependent row counts work); each old
    node's uses get its slice of the result. Returns the grouped GEMM node; the old nodes
    are left unused for the caller to erase."""
    rows, ids, sizes = [], [], []
    for e, n in group:
        a = n.args[0]
        r = _val(a).shape[0]
        size = r if isinstance(r, int) else b(aten.sym_size.int, a, 0)
        rows.append(a)
        sizes.append(size)
        ids.append(b(aten.full.default, [size], e, dtype=torch.int64, layout=torch.strided, device=device,
                     pin_memory=False))
    cat_rows = b(aten.cat.default, rows) if len(rows) > 1 else rows[0]
    eids = b(aten.cat.default, ids) if len(ids) > 1 else ids[0]
    zeros = b(aten.full.default, [E], 0, dtype=torch.int64, layout=torch.strided, device=device, pin_memory=False)
    counts = b(aten.scatter_add.default, zeros, 0, eids, b(aten.add.Tensor, b(aten.mul.Tensor, eids, 0), 1))
    offs = b(aten.cumsum.default, counts, 0, dtype=torch.int32)
    out = gemm(cat_rows, offs)
    start = 0
    for (_, n), size in zip(group, sizes):
        end = start + size if isinstance(start, int) and isinstance(size, int) else b(operator.add, start, size)
        part = b(aten.slice.Tensor, out, 0, start, end)
        part.meta.update({k: v for k, v in n.meta.items() if k != "val"})
        n.replace_all_uses_with(part)
        start = end
    return out
