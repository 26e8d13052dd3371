"""Pattern family "semantic_loop" (order 87, before "semantic"): the per-expert GEMMs of an
MoE written as a Python loop over experts, rewritten as the one grouped GEMM they are, so
that "semantic" proves and fuses it (`mxemu::grouped_mm`).

The loop form (amd-quark's and ModelOpt's MoE references, transformers' eager experts,
any `for e in range(E): y_e = F.linear(rows_e, W[e])` over a dequantized expert stack W)
reaches the post-grad graph as one `mm(rows_e, W[e].T)` per expert (or `mm(rows_e, W[e])`
for a stack stored [E, K, N]), all reading `select(W, 0, e)` of the same stack. Those E
GEMMs are one grouped GEMM: rows of every expert concatenated in expert order, group
ends from the row counts (a symbolic, even data-dependent, count per expert works: rows
selected by `nonzero` / `torch.where(mask)` with Dynamo's capture_dynamic_output_shape_ops),
each expert's result a slice of the output. Every row meets the same expert matrix as in
the loop (fp32 accumulation; the order inside a dot product is the GEMM contract's).

The rewrite is made only when the weight recogniser proves the stack's decode
(`recognize_weight` over the stack, the verdict "semantic" then reads from its cache) and
no expert's rows depend on another GEMM of the group; otherwise the loop stays as
written and explain() says why. An activation QDQ written once per expert goes into the
grouped GEMM (this family then fuses it as mxemu::grouped_mm with the QDQ itself) when
`recognize.expert_qdq` proves it the same row-local function for every expert: one QDQ over
the concatenated rows then equals the per-expert ones. Otherwise it stays per expert and the
reason is kept on the rows (`LOOP_QDQ`) for "semantic_loop_moe". The row selection,
activation and combine stay as written here; "semantic_loop_moe" (order 98) then proves the
whole loop around the two grouped GEMMs and makes it one mxemu::moe.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch._inductor import pattern_matcher as pm

from ..formats import FORMATS
from ..recognize import Rejection, recognize_weight
from ..recognize.expert_qdq import recognize_expert_activations
from ..spec import is_compatible
from .guards import register_family_pattern
from .recorder import record_candidate
from .registry import register_pattern_family
from .runtime_guards import guard_tensor_input
from .expert_groups import Builder, expert_ordered_gemm, graph_order
from .semantic import PackedWeightOperand, fused_grouped_gemm, outside_user
from .expert_groups import node_val as _val

aten = torch.ops.aten
FAMILY = "semantic_loop"

__all__ = ["FAMILY", "LOOP_QDQ", "expert_slice", "unfusable_stack", "rows_depend_on"]

#: meta key on a loop's concatenated rows: why a per-expert activation QDQ stayed in the loop
LOOP_QDQ = "mxemu_loop_qdq"

#: ancestors visited per expert's rows when checking that no row depends on the group's GEMMs
_SEARCH = 20000



def expert_slice(w) -> Optional[tuple]:
    """(stack node, expert index, layout) when the mm weight operand `w` is one expert of a
    3-d stack: "nk" for `permute(select(S, 0, e), [1, 0])` with S [E, N, K], "kn" for
    `select(S, 0, e)` with S [E, K, N]; else None."""
    layout = "kn"
    if isinstance(w, torch.fx.Node) and w.op == "call_function" and w.target in (aten.permute.default,
                                                                                   aten.t.default):
        if w.target is aten.permute.default and list(w.args[1]) not in ([1, 0], [-1, -2], [1, -2], [-1, 0]):
            return None
        w, layout = w.args[0], "nk"
    if not isinstance(w, torch.fx.Node) or w.op != "call_function" or w.target is not aten.select.int:
        return None
    stack, dim, e = w.args[0], w.args[1], w.args[2]
    sv = _val(stack)
    if not isinstance(sv, torch.Tensor) or sv.dim() != 3 or dim != 0 or not isinstance(e, int):
        return None
    if not all(isinstance(s, int) for s in sv.shape):
        return None
    E = sv.shape[0]
    if not -E <= e < E:
        return None
    return stack, e % E, layout


def unfusable_stack(w, stack, consumers) -> Optional[str]:
    """Why "semantic" would not fuse a grouped GEMM over the proven `stack` (verdict `w`),
    else None: a float scale that is neither one value nor one per expert, or a decode node
    (between the codes / scale bytes and the stack) or the stack itself used by something
    other than `consumers` (fusing would compute the decode twice; the rule of "semantic",
    which then fuses the grouped GEMM: `semantic.outside_user`). Checked before a
    rewrite so that no grouped GEMM is left unfused."""
    E = _val(stack).shape[0]
    if w.alpha is not None and _val(w.alpha).numel() not in (1, E):
        return f"float scale of shape {tuple(_val(w.alpha).shape)} is not one value or one per expert"
    # the decode from the codes used by anything but the group (semantic's rule: nodes computed
    # from the scale bytes alone may have other users)
    other = next((u for u in stack.users if u not in consumers), None) or \
        outside_user([w.codes], stack, set(consumers))
    if other is not None:
        return f"the expert decode is also used by {other.name} (fusing would compute it twice)"
    return None


def _group(anchor) -> tuple[Optional[list], Optional[tuple], Optional[str]]:
    """([(expert, mm node)] in expert order, (stack, layout), None) or (None, None, why)."""
    here = expert_slice(anchor.args[1])
    if here is None:
        return None, None, "the weight operand is not one expert of a 3-d stack"
    stack, _, layout = here
    group = []
    for n in anchor.graph.find_nodes(op="call_function", target=aten.mm.default):
        s = expert_slice(n.args[1])
        if s is not None and s[0] is stack and s[2] == layout:
            group.append((s[1], n))
    group.sort(key=lambda t: t[0])  # stable: graph order within an expert
    av, sv = [_val(n.args[0]) for _, n in group], _val(stack)
    K = sv.shape[2] if layout == "nk" else sv.shape[1]
    for v in av:
        if not isinstance(v, torch.Tensor) or v.dim() != 2 or v.dtype != sv.dtype or v.shape[1] != K:
            return None, None, f"an expert's rows are not [rows, {K}] {sv.dtype}"
    return group, (stack, layout), None


def rows_depend_on(group) -> Optional[str]:
    """A GEMM of the group that some expert's rows are computed from, else None. Walks
    forward from the GEMMs, only as far as the last expert's rows in graph order (rows of
    a later layer are computed from everything before them; looking up from them would
    visit the whole model)."""
    order = graph_order(group[0][1].graph)
    rows = {n.args[0]: e for e, n in group}
    horizon = max(order[r] for r in rows)
    for e0, g in group:
        seen, todo = {g}, [g]
        while todo:
            m = todo.pop()
            if m in rows:
                return (f"expert {rows[m]}'s rows are computed from {g.name} (expert {e0}), another GEMM over "
                        f"the same experts")
            if len(seen) > _SEARCH:
                return f"more than {_SEARCH} nodes between {g.name} and the last expert's rows"
            for u in m.users:
                if u not in seen and order[u] <= horizon:
                    seen.add(u)
                    todo.append(u)
    return None


def _check(match) -> Optional[str]:
    anchor = match.output_node()
    group, found, why = _group(anchor)
    if group is None:
        return why
    if len(group) < 2:
        # one GEMM over one slice of a stack (gpt-oss's [1, N, K] blocks picked by [0]) is a plain
        # linear: 'semantic' fuses it as mxemu::linear, a one-group grouped GEMM would only be slower
        return "a single GEMM over one expert of the stack: left to 'semantic' as a linear"
    stack, layout = found
    why = rows_depend_on(group)
    if why:
        return f"per-expert GEMMs left as written: {why}"
    graph = anchor.graph
    first = min((n for _, n in group), key=lambda n: graph_order(graph)[n])
    # the weight recogniser reads a grouped GEMM's [E, K, N] operand: a throwaway one over the stack
    with graph.inserting_before(first):
        b = graph.call_function(aten.permute.default, (stack, [0, 2, 1])) if layout == "nk" else stack
        probe = graph.call_function(aten._grouped_mm.default, (first.args[0], b))
    if b is not stack:
        b.meta["val"] = _val(stack).permute(0, 2, 1)
    try:
        w = recognize_weight(probe)
    finally:
        graph.erase_node(probe)
        if b is not stack:
            graph.erase_node(b)
    if isinstance(w, Rejection):
        return f"expert weights not proven, the per-expert GEMMs stay as written: {w.reason}"
    if not w.kernel_supported:
        return f"expert weights recognised as {w.variant.name}, which the fused kernels do not compute"
    slices = {n.args[1] for _, n in group} | {n.args[1].args[0] for _, n in group if layout == "nk"}
    why = unfusable_stack(w, stack, slices)
    if why:
        return f"per-expert GEMMs left as written: {why}"
    act, note = _expert_qdq(group, w)
    for g in (w.guards + act[0].guards) if act else ():
        guard_tensor_input(match, g.node, g.values, g.what)
    match._mxemu_loop = (group, stack, layout, w, act, note)
    return None


def _expert_qdq(group, w) -> tuple[Optional[list], Optional[str]]:
    """([ActVerdict per expert], None) when every expert's rows go through the same proven
    row-local QDQ that the fused kernels compute with `w`'s format: it becomes the grouped
    GEMM's (one QDQ over the concatenated rows equals one per expert). (None, why not) when
    the rows are quantized per expert in a way that stays as written; (None, None) when
    they are not quantized."""
    acts, why = recognize_expert_activations([n for _, n in group])
    if acts is None:
        return None, why
    if not acts:
        return None, None
    a = acts[0]
    if not a.kernel_supported:
        return None, f"the per-expert activation {a.variant.name} is not fused ({a.unsupported_reason})"
    if not is_compatible(FORMATS[w.variant.fmt], a.act_quant()):
        return None, f"the per-expert activation {a.variant.name} does not go with {w.variant.fmt} weights"
    gemms = {n for _, n in group}  # a dense loop's QDQ of all tokens may be one node read by every expert
    # size arithmetic on the rows' count (`u0 >= 0` checks) reads no tensor: not a use of the QDQ
    sizes = {u for u in group[0][1].graph.nodes if u.op == "call_function" and u.all_input_nodes and
             all(isinstance(_val(a), torch.SymInt) for a in u.all_input_nodes)}
    for (_, n), v in zip(group, acts):
        u = outside_user([v.x], v.output, set(v.post) | gemms | sizes)
        if u is not None:
            return None, f"the quantized rows of {n.name} are also used by {u.name}"
    return acts, None


def _erase_dead(graph, nodes) -> None:
    todo = list(nodes)
    while todo:
        n = todo.pop()
        if n.op == "call_function" and not n.users and not n._erased:
            ins = n.all_input_nodes
            graph.erase_node(n)
            todo.extend(ins)


def _unquantized_rows(b: Builder, act):
    """An expert's rows before its QDQ, in the layout the GEMM read them (act.post)."""
    x = act.x
    for p in act.post:
        x = b(p.target, x, *p.args[1:])
    return x


def _replace(match) -> None:
    group, stack, layout, w, acts, note = match._mxemu_loop
    graph = match.graph
    order = graph_order(graph)
    last = max((n for _, n in group), key=order.__getitem__)
    b = Builder(graph, last)
    sv = _val(stack)
    E = int(sv.shape[0])
    dev = sv.device
    weight = b(aten.permute.default, stack, [0, 2, 1]) if layout == "nk" else stack
    olds = [n for _, n in group]
    dead = [n.args[1] for n in olds]
    if acts:  # the GEMMs read the rows before the QDQ: the grouped op quantizes them (row-local)
        dead += [n.args[0] for n in olds]
        for (_, n), a in zip(group, acts):
            n.update_arg(0, _unquantized_rows(b, a))

    def gemm(rows, offs):
        g = b(aten._grouped_mm.default, rows, weight, offs)
        if not acts:
            return g  # fused next by 'semantic'
        fused = fused_grouped_gemm(graph, g, w, dataclasses.replace(acts[0], x=rows, output=rows, post=()))
        graph.erase_node(g)
        return fused

    out = expert_ordered_gemm(b, group, E, dev, gemm)
    for n in olds:
        graph.erase_node(n)
    _erase_dead(graph, dead)
    pm.stable_topological_sort(graph)  # users of earlier experts' GEMMs now follow the grouped GEMM
    experts = sorted({e for e, _ in group})
    what = (f"{len(group)} per-expert GEMMs over {stack.name}[e] (experts {experts} of {E}) as one grouped GEMM over "
            f"the expert-ordered rows; weights proven: {w.describe()}")
    if acts:
        record_candidate(FAMILY, out, True, "mxemu::grouped_mm",
                         f"{what}; the activation QDQ written per expert, proven the same row-local function for "
                         f"every expert ({acts[0].describe()}), quantizes the concatenated rows in the op",
                         family=FAMILY, pattern="loop")
        return
    if note:  # read by 'semantic_loop_moe' for its reason: the rows are the grouped GEMM's
        out.args[0].meta[LOOP_QDQ] = note
    record_candidate(FAMILY, out, True, "aten._grouped_mm (fused next by 'semantic')",
                     what + (f" (activation QDQ left per expert: {note})" if note else ""), family=FAMILY,
                     pattern="loop")


class ExpertSliceWeight(PackedWeightOperand):
    """A weight operand that is one expert's slice W[e] of a 3-d stack computed from packed
    bytes: only such GEMMs are candidates, so the plain linears of a model do not appear in
    explain() under this family."""

    def _match(self, node, ctx):
        if expert_slice(node) is None:
            return pm.FailedMatch("{} is not one expert of a 3-d stack", node)
        return super()._match(node, ctx)

    def __repr__(self):
        return "ExpertSliceWeight()"

    def pretty_print(self, pp):
        return "ExpertSliceWeight()"


@register_pattern_family(FAMILY, order=87, anchors=(aten.mm.default,),
                         description="per-expert mm over slices W[e] of one proven stack -> one grouped GEMM")
def _init(pm_pass, input_device=None):
    register_family_pattern(pm.CallFunction(aten.mm.default, pm.KeywordArg("a"), ExpertSliceWeight()), pm_pass,
                            family=FAMILY, name="loop", check=_check, replace=_replace)
