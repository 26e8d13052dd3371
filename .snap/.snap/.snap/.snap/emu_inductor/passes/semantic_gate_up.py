"""Pattern family "semantic_gate_up" (order 93, after "semantic", before "semantic_moe"):
two `mxemu::grouped_mm` over the SAME rows and group ends, under one OpSpec, global scale
and float scale (a pair with different float scales is left, with the reason), with
experts that differ only in their output width (gate and up projections stored as two
[E, I, H] stacks: `g = grouped_mm(rows, Wg)`, `u = grouped_mm(rows, Wu)`) are one grouped GEMM over the stacks concatenated along N: every output column is
the same row times the same expert's weight row under the same scheme (the GEMM contract
is per output element), so `cat([Pg, Pu], 1)` / `cat([Sg, Su], 1)` and slices of the one
result give what the two gave. "semantic_moe" then sees the two-GEMM layer it proves.

Only pairs whose results both reach a third grouped GEMM's rows (an MoE's first GEMM, split
in two) are merged: elsewhere the run-time `cat` of the packed bytes would be a cost with
nothing to gain. The half that reaches a non-linear function first (silu's sigmoid / exp,
gelu's erf / tanh) is put first (the gate), so a silu-gated layer reads `act(h[:, :I]) *
h[:, I:]`; the layer proof decides whether the result is an mxemu::moe at all.

Off by default (option ``semantic_gate_up.merge``): the `cat` of the two packed stacks runs on
every call, E*2I*K/2 bytes copied (Qwen3-30B-A3B: ~200 MB, ~0.1 ms on an H200), far more than
a decode step reads (the touched experts only) and more than the mxemu::moe it enables saves
over the three grouped GEMMs. With the option off the pair stays two grouped GEMMs and
explain() says why; turn it on (``emu_inductor.backend(**{"semantic_gate_up.merge": True})``)
where one op matters more than the copy, e.g. prefill-only compiles.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

import torch
from torch._inductor import pattern_matcher as pm

from .expert_groups import Builder, graph_order
from .guards import register_family_pattern
from .recorder import record_candidate
from .registry import get_option, register_pattern_family
from .expert_groups import node_val as _val

aten = torch.ops.aten
FAMILY = "semantic_gate_up"
MERGE_OPTION = "semantic_gate_up.merge"

__all__ = ["FAMILY"]

#: mxemu::grouped_mm(a, w, w_scale, w_alpha, offs, a_global_scale, spec) -- no bias
_ARGS = 7
_NONLINEAR = {aten.sigmoid.default, aten.exp.default, aten.erf.default, aten.tanh.default, aten.silu.default,
              aten.gelu.default, aten.expm1.default}
_REACH = 40  # nodes searched below a GEMM for the GEMM its result feeds



def _gemm(n) -> bool:
    return (isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target is torch.ops.mxemu.grouped_mm.default
            and len(n.args) == _ARGS and not n.kwargs)


def _key(n) -> tuple:
    a, w, s, alpha, offs, gs, spec = n.args
    return (a, offs, gs, spec, _val(w).dtype, _val(s).dtype, tuple(_val(w).shape[::2]), tuple(_val(s).shape[::2]))


def _name(n) -> str:
    return n.name if isinstance(n, torch.fx.Node) else repr(n)


def _below(n, limit: int = _REACH) -> list:
    seen, q, out = {n}, deque([n]), []
    while q and len(out) < limit:
        for u in q.popleft().users:
            if u not in seen:
                seen.add(u)
                out.append(u)
                q.append(u)
    return out


def _next_gemm(n) -> Optional[torch.fx.Node]:
    """The nearest grouped GEMM the result of `n` reaches."""
    for u in _below(n):
        if _gemm(u) or (isinstance(u, torch.fx.Node) and u.target is torch.ops.mxemu.grouped_mm.default):
            return u
    return None


def _nonlinear_depth(n) -> int:
    for i, u in enumerate(_below(n)):
        if u.op == "call_function" and u.target in _NONLINEAR:
            return i
    return _REACH


def _partner(node) -> Optional[torch.fx.Node]:
    if not _gemm(node) or not isinstance(node.args[6], str):
        return None
    key, nxt = _key(node), _next_gemm(node)
    if nxt is None:
        return None
    for m in node.args[0].users:
        if m is not node and _gemm(m) and m.args[0] is node.args[0] and _key(m) == key and _next_gemm(m) is nxt:
            return m
    return None


class SplitFirstGemm(pm.CallFunction):
    """An mxemu::grouped_mm with a partner over the same rows (see the module docstring)."""

    def __init__(self):
        super().__init__(torch.ops.mxemu.grouped_mm.default, *[pm.Ignored() for _ in range(_ARGS)])

    def _match(self, node, ctx):
        m = super()._match(node, ctx)
        if not pm.is_match(m):
            return m
        other = _partner(node)
        if other is None:
            return pm.FailedMatch("{} has no partner GEMM over the same rows", node)
        refused = node.args[3] is not other.args[3] or not get_option(MERGE_OPTION, False)
        if refused and graph_order(node.graph)[other] < graph_order(node.graph)[node]:
            return pm.FailedMatch("{}: its partner records why the pair is left", node)  # one record per pair
        return m


def _check(match) -> Optional[str]:
    node = match.output_node()
    other = _partner(node)
    if other is None or node.graph is not other.graph:
        return "no partner GEMM over the same rows"
    if not get_option(MERGE_OPTION, False):
        return (f"gate and up GEMMs over the same rows with their weights in two stacks: one mxemu::moe would "
                f"need both stacks concatenated on every call (a copy of all experts' packed weights, more than a "
                f"decode step reads), so they stay grouped GEMMs; option {MERGE_OPTION}=True merges them")
    if node.args[3] is not other.args[3]:
        # NVFP4 gate_proj / up_proj with their own global scales: mxemu::grouped_mm and
        # mxemu::moe take one float scale per expert, not one per half
        return (f"gate and up GEMMs over the same rows have different float scales ({_name(node.args[3])}, "
                f"{_name(other.args[3])}): the fused ops take one per expert, so they stay two GEMMs and the "
                f"layer is not one mxemu::moe")
    pair = sorted((node, other), key=lambda n: (_nonlinear_depth(n), graph_order(n.graph)[n]))
    match._mxemu_pair = pair
    return None


def _replace(match) -> None:
    gate, up = match._mxemu_pair
    graph = match.graph
    order = graph_order(graph)
    b = Builder(graph, max(gate, up, key=order.__getitem__))
    a, wg, sg, alpha, offs, gs, spec = gate.args
    wu, su = up.args[1], up.args[2]
    w = b(aten.cat.default, [wg, wu], 1)
    s = b(aten.cat.default, [sg, su], 1)
    out = b(torch.ops.mxemu.grouped_mm.default, a, w, s, alpha, offs, gs, spec)
    ng = _val(wg).shape[1]
    n_all = _val(w).shape[1]
    hg = b(aten.slice.Tensor, out, 1, 0, ng)
    hu = b(aten.slice.Tensor, out, 1, ng, n_all)
    gate.replace_all_uses_with(hg)
    up.replace_all_uses_with(hu)
    graph.erase_node(gate)
    graph.erase_node(up)
    pm.stable_topological_sort(graph)
    record_candidate(FAMILY, out, True, "mxemu::grouped_mm",
                     f"two grouped GEMMs over the same rows ({wg.name}, {wu.name}: gate then up) as one over the "
                     f"stacks concatenated along N", family=FAMILY, pattern="gate_up")


@register_pattern_family(FAMILY, order=93, anchors=(torch.ops.mxemu.grouped_mm,), options={MERGE_OPTION: False},
                         description="two grouped GEMMs over the same rows (gate, up) -> one over both stacks")
def _init(pm_pass, input_device=None):
    register_family_pattern(SplitFirstGemm(), pm_pass, family=FAMILY, name="gate_up", check=_check, replace=_replace)
