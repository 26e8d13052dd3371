"""Pattern family "semantic" (order 90, after the traced families): fuse the GEMMs those
did not, when `emu_inductor.recognize` proves what their operands compute.

Anchors: every remaining `aten.mm` / `aten.addmm` (1-d bias) (-> `mxemu::linear`) and
`aten._grouped_mm` (-> `mxemu::grouped_mm`). For each, the recogniser evaluates the weight operand's cone and
the activation operand's cone on probe data and compares them bit for bit with the
variants `emu_inductor.formats` defines (docs/recognize.md). The weight side must be a
kernel-supported decode; the activation side fuses when it is a kernel-supported QDQ that
goes with the weight format (`spec.is_compatible`), and otherwise the GEMM fuses
weight-only on the operand as the graph computes it. Graph inputs whose values the proof
used (a LUT buffer) get a run-time assertion. Everything left alone is recorded with the
recogniser's reason (the probe that told the variants apart) for explain().
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from typing import Optional

import torch
from torch._guards import detect_fake_mode
from torch._inductor import pattern_matcher as pm

from .. import ops  # noqa: F401  (registers mxemu::linear, which the "linear_qdq" rule anchors on)
from ..formats import FORMATS
from ..recognize import (ActVerdict, Rejection, WeightVerdict, feeds_only_asserts, recognize_activation,
                         recognize_weight)
from ..recognize import operands as operands_of
from ..spec import OpSpec, is_compatible
from .guards import register_family_pattern
from .recorder import count, record
from .registry import register_pattern_family
from .runtime_guards import guard_tensor_input
from .expert_groups import node_val as _val

log = logging.getLogger("emu_inductor.passes.semantic")

aten = torch.ops.aten
FAMILY = "semantic"

__all__ = ["FAMILY", "PackedWeightOperand", "outside_user", "fused_grouped_gemm"]


_ONE_BYTE = (torch.uint8, torch.int8, torch.float8_e4m3fn, torch.float8_e5m2) + (
    (torch.float8_e8m0fnu,) if hasattr(torch, "float8_e8m0fnu") else ())



def _reaches(node, hit, stop=lambda n: False, limit: int = 400) -> bool:
    """Whether a call_function `node` is computed (within `limit` nodes, walking its inputs,
    not past `stop` nodes) from a node satisfying `hit`."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function"):
        return False
    seen, todo = {node}, [node]
    while todo and len(seen) < limit:
        n = todo.pop()
        if hit(n):
            return True
        if stop(n):
            continue
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return False


def _is_packed_input(n) -> bool:
    v = _val(n)
    return n.op in ("placeholder", "get_attr") and isinstance(v, torch.Tensor) and v.dtype in _ONE_BYTE


def _is_reduction(n) -> bool:
    return (n.op == "call_function" and getattr(n.target, "_overloadpacket", None) is not None
            and str(n.target._overloadpacket) in _REDUCTIONS)


class PackedWeightOperand(pm.PatternExpr):
    """Matches a GEMM operand computed (within a few hundred nodes) from a 1-byte graph
    input: packed codes or scale bytes. Plain weights and activation x activation GEMMs do
    not match, so they cost nothing and do not clutter explain()."""

    def _match(self, node, ctx):
        if _reaches(node, _is_packed_input, stop=lambda n: n.op in ("placeholder", "get_attr")):
            return pm.Match(ctx, self)
        return pm.FailedMatch("{} is not computed from packed bytes", node)

    def __repr__(self):
        return "PackedWeightOperand()"

    def pretty_print(self, pp):
        return "PackedWeightOperand()"


_REDUCTIONS = ("aten.amax", "aten.max", "aten.amin", "aten.min")


class ReducedActivationOperand(pm.PatternExpr):
    """Matches an activation operand computed (within a few hundred nodes) through a block
    reduction (amax / max): a candidate QDQ. An operand that is a graph input or a plain
    layer output does not match, so weight-only linears cost nothing and do not clutter
    explain()."""

    def _match(self, node, ctx):
        if _reaches(node, _is_reduction):
            return pm.Match(ctx, self, args=[node])
        return pm.FailedMatch("{} is not computed through a reduction", node)

    def __repr__(self):
        return "ReducedActivationOperand()"

    def pretty_print(self, pp):
        return "ReducedActivationOperand()"


def outside_user(sources, end, allowed):
    """A user outside the subgraph from `sources` to `end` (the nodes that depend on them
    and feed `end`), other than `allowed`; None when the subgraph is used only by `end`'s
    consumers through `end`. Fusing a subgraph with another user would compute it twice."""
    anc, stack = {end}, [end]
    while stack and len(anc) < 2000:
        for a in stack.pop().all_input_nodes:
            if a not in anc:
                anc.add(a)
                stack.append(a)
    inside = set(sources)
    for n in end.graph.nodes:  # topological order
        if n in anc and n not in inside and any(a in inside for a in n.all_input_nodes):
            inside.add(n)
    for n in inside - set(sources):
        if n is end:
            continue
        for u in n.users:
            # a check (F.one_hot's bounds assert) reads the decode but is not a second use
            if u not in inside and u not in allowed and not feeds_only_asserts(u):
                return u
    return None


def _verdicts(match, anchor, weight_dims: int):
    """(weight verdict, activation verdict or None, reason or None); stored on the match."""
    w = recognize_weight(anchor)
    count(f"{FAMILY}.check_ms", int(w.seconds * 1000))  # compile-time cost, reported by explain
    if isinstance(w, Rejection):
        return None, None, w.reason
    if not w.kernel_supported:
        return None, None, f"recognised {w.variant.name}, which the fused kernels do not compute: " \
                           f"{w.unsupported_reason}"
    lead_n = _lead_n(anchor)
    if len(lead_n) + 1 != weight_dims:
        return None, None, f"packed weights are {len(lead_n) + 1}-d, expected {weight_dims}-d"
    if w.alpha is not None:
        a = _val(w.alpha)
        E = lead_n[0]
        if a.numel() != 1 and (weight_dims == 2 or a.numel() != E):
            return None, None, f"float scale of shape {tuple(a.shape)} is not one value or one per expert"
    # decode nodes computed from the codes used elsewhere (a tied weight): fusing would
    # compute the weight twice. Nodes computed from the scale bytes alone may have other
    # users (compressed-tensors' decompress() also returns the float block scales as a
    # Parameter): they stay in the graph for those users, at 1/block of the weight's size.
    other = outside_user([w.codes], operands_of(anchor)[1], {anchor})
    if other is not None:
        return None, None, (f"the dequantized weight is also used by {other.name}: fusing would compute it "
                            f"twice")
    act, note = _activation(anchor, w.variant.fmt, weight_dims)
    for g in w.guards + (act.guards if act is not None else ()):
        guard_tensor_input(match, g.node, g.values, g.what)
    match._mxemu_semantic = (w, act, note)
    return w, act, None


def _activation(anchor, weight_fmt: str, weight_dims: int):
    """(activation verdict the fused op can carry, or None; why not, or None)."""
    a = recognize_activation(anchor)
    count(f"{FAMILY}.check_ms", int(a.seconds * 1000))
    if isinstance(a, Rejection):
        return None, f"activation QDQ not recognised, fused weight-only: {a.reason}"
    if a.variant.kind == "none":
        return None, None
    if not a.kernel_supported:
        return None, f"activation {a.variant.name} not fused ({a.unsupported_reason}); weight-only"
    if not is_compatible(FORMATS[weight_fmt], a.act_quant()):
        return None, f"activation {a.variant.name} does not go with {weight_fmt} weights; weight-only"
    # the post layout ops other than row gathers (reshapes, einsum's unsqueeze + permute) keep
    # rows whole and in order (recognize.candidates), so the dense op can take them
    if any(p.target is aten.index.Tensor for p in a.post) and weight_dims == 2:
        return None, "activation reaches the GEMM through a gather; weight-only"
    if outside_user([a.x], a.output, set(a.post) | {anchor}) is not None:
        return None, "the quantized activation has another user; weight-only"
    return a, None


def _act_fields(act: Optional[ActVerdict]) -> dict:
    """The OpSpec activation fields of a proven QDQ (act_kind "none" without one)."""
    v = act.variant if act is not None else None
    return dict(
        act_kind="none" if v is None else ("fp8_tensor" if v.kind == "fp8_tensor" else "block"),
        act_fmt=v.fmt if v is not None and v.kind in ("mx", "nvfp4") else None,
        act_scale_mode=v.scale_mode if v is not None else None,
        act_recipe=v.recipe if v is not None else None,
        act_rounding=v.rounding if v is not None else "rne",
        **(v.spec_fields if v is not None else {}),  # MX activation zero sign / Inf blocks
    )


def _spec(w: WeightVerdict, act: Optional[ActVerdict]) -> str:
    return OpSpec(
        weight_fmt=w.variant.fmt,
        fp6_layout=w.variant.fp6_layout,
        **w.variant.spec_fields,  # how the scales are read: E8M0 byte 255, float-scale order
        **_act_fields(act),
    ).to_str()


def _call(graph, target, args, like):
    n = graph.call_function(target, args)
    n.meta["val"] = like
    return n


def _as_dtype(graph, node, dtype):
    v = _val(node)
    if v.dtype == dtype:
        return node
    return _call(graph, aten.view.dtype, (node, dtype), v.view(dtype))


def _lead_n(anchor) -> tuple:
    """[.., N] of the dequantized weight [.., N, K] that the GEMM reads transposed."""
    shp = tuple(_val(operands_of(anchor)[1]).shape)
    return shp[:-2] + shp[-1:]


def _canonical(graph, node, lead_n, kmajor=False):
    """The leaf as [.., N, last]: the recogniser proved that its elements, in row-major
    order, are the packed codes / block scales (gpt-oss's [E, N, G, 16] blocks, experts
    stored 2-d as [E*N, K/2]); a reshape hands the kernels that layout. A K-major leaf
    [.., last, N] is handed over transposed, a view: the kernels' launcher copies a
    packed axis without unit stride (`GemmWeights`), once per call (Inductor's freezing
    would fold a copy made here just as well, but without it a copy here is made as
    well as the launcher's: Inductor lays a clone out like its input)."""
    v = _val(node)
    if kmajor:
        perm = list(range(v.dim() - 2)) + [v.dim() - 1, v.dim() - 2]
        return _call(graph, aten.permute.default, (node, perm), v.mT)
    if tuple(v.shape[:-1]) == tuple(lead_n):
        return node
    shape = list(lead_n) + [v.numel() // math.prod(lead_n)]
    return _call(graph, aten.reshape.default, (node, shape), v.reshape(shape))


def _operands(graph, w: WeightVerdict, act: Optional[ActVerdict], a_node, anchor):
    """(activation input node, codes, scale, alpha, global scale) inserted before anchor."""
    fmt = FORMATS[w.variant.fmt]
    lead_n = _lead_n(anchor)
    with graph.inserting_before(anchor):
        # bytes viewed first: a K-major leaf is copied as uint8 (float8 copies may not lower)
        codes = _canonical(graph, _as_dtype(graph, w.codes, torch.uint8), lead_n, w.kmajor[0])
        scale = _canonical(graph, _as_dtype(graph, w.scale, fmt.scale.storage_dtype), lead_n, w.kmajor[1])
        alpha = w.alpha
        if alpha is not None and _val(alpha).dim() > 1:
            av = _val(alpha)
            alpha = _call(graph, aten.reshape.default, (alpha, [av.numel()] if av.numel() > 1 else []),
                          av.reshape(-1) if av.numel() > 1 else av.reshape(()))
    x, gs = _act_operands(graph, act, a_node, anchor)
    return x, codes, scale, alpha, gs


def _act_operands(graph, act: Optional[ActVerdict], a_node, anchor):
    """(activation input node, global scale node) the fused op takes, inserted before anchor."""
    if act is None:
        return a_node, None
    with graph.inserting_before(anchor):
        x = act.x
        for p in act.post:  # the layout the graph applied to the QDQ output, now to its input
            x = _call(graph, p.target, (x,) + tuple(p.args[1:]), _val(p))
            x.meta.update({k: v for k, v in p.meta.items() if k != "val"})
        gs = act.global_scale
        if gs is None and act.global_value is not None:
            # proven at a constant global scale (single-level NVFP4: g = 1): the op takes it
            # as a tensor like any other, built in-graph so it lowers on any device
            xv = _val(act.x)
            gs = graph.call_function(aten.full.default, ([], act.global_value),
                                     dict(dtype=torch.float32, layout=torch.strided, device=xv.device,
                                          pin_memory=False))
            with (detect_fake_mode([xv]) or contextlib.nullcontext()):
                gs.meta["val"] = torch.full([], act.global_value, dtype=torch.float32, device=xv.device)
        return x, gs


def _done(new, name, w, act, note) -> None:
    count(f"{FAMILY}.{name}." + ("weight_only" if act is None else "with_qdq"))
    what = w.describe() + ("" if act is None else "; " + act.describe())
    record(FAMILY, name, new, True, what + (f" ({note})" if note else ""))


def _check_linear(match) -> Optional[str]:
    anchor = match.output_node()
    _, _, why = _verdicts(match, anchor, 2)
    return why


def _check_addmm(match) -> Optional[str]:
    anchor = match.output_node()
    bias, a = _val(anchor.args[0]), _val(anchor.args[1])
    if anchor.kwargs or bias is None or bias.dim() != 1 or bias.dtype != a.dtype:
        return "addmm bias is not a 1-d vector of the activation dtype"
    _, _, why = _verdicts(match, anchor, 2)
    return why


def _replace_linear(match) -> None:
    anchor = match.output_node()
    w, act, note = match._mxemu_semantic
    graph = match.graph
    is_addmm = anchor.target is aten.addmm.default
    bias = anchor.args[0] if is_addmm else None
    x, codes, scale, alpha, gs = _operands(graph, w, act, anchor.args[1 if is_addmm else 0], anchor)
    with graph.inserting_before(anchor):
        new = _call(graph, torch.ops.mxemu.linear.default, (x, codes, scale, alpha, gs, bias, _spec(w, act)),
                    _val(anchor))
    anchor.replace_all_uses_with(new)
    graph.erase_node(anchor)
    _done(new, "linear", w, act, note)


def _check_grouped(match) -> Optional[str]:
    anchor = match.output_node()
    extra = anchor.args[3:]  # (bias, out_dtype): torchao passes out_dtype=bf16 for bf16 operands
    same_dtype = len(extra) < 2 or extra[1] is None or extra[1] == _val(anchor.args[0]).dtype
    if anchor.kwargs or (extra and extra[0] is not None) or not same_dtype:
        return "_grouped_mm with a bias or an out_dtype other than the operands' dtype"
    _, _, why = _verdicts(match, anchor, 3)
    return why


def fused_grouped_gemm(graph, anchor, w: WeightVerdict, act: Optional[ActVerdict]):
    """The mxemu::grouped_mm computing the `aten._grouped_mm` node `anchor` from proven
    verdicts (its weight operand's, and the activation QDQ to carry or None), inserted
    before it; the caller moves anchor's uses. Also used by "semantic_loop", which proves a
    per-expert QDQ over the concatenated rows itself."""
    x, codes, scale, alpha, gs = _operands(graph, w, act, anchor.args[0], anchor)
    with graph.inserting_before(anchor):
        return _call(graph, torch.ops.mxemu.grouped_mm.default,
                     (x, codes, scale, alpha, anchor.args[2], gs, _spec(w, act)), _val(anchor))


def _replace_grouped(match) -> None:
    anchor = match.output_node()
    w, act, note = match._mxemu_semantic
    graph = match.graph
    new = fused_grouped_gemm(graph, anchor, w, act)
    anchor.replace_all_uses_with(new)
    graph.erase_node(anchor)
    _done(new, "grouped_mm", w, act, note)


def _fused_spec(anchor) -> Optional[OpSpec]:
    spec = anchor.args[6] if len(anchor.args) == 7 else None
    try:
        return OpSpec.from_str(spec) if isinstance(spec, str) else None
    except (TypeError, ValueError):
        return None


def _check_fused_linear(match) -> Optional[str]:
    """An mxemu::linear a traced family fused weight-only (its weight spelling is a traced
    pattern, its activation QDQ is not): the QDQ is proven here and taken into the op."""
    anchor = match.output_node()
    spec = _fused_spec(anchor)
    if spec is None:
        return "mxemu::linear without a readable spec"
    if spec.act_kind != "none":
        return "mxemu::linear already carries its activation QDQ"
    if _val(anchor.args[4]) is not None:
        return "mxemu::linear already has an activation global scale"
    act, note = _activation(anchor, spec.weight_fmt, 2)
    if act is None:
        return note or "the activation operand is not quantized"
    for g in act.guards:
        guard_tensor_input(match, g.node, g.values, g.what)
    match._mxemu_semantic = (spec, act)
    return None


def _replace_fused_linear(match) -> None:
    anchor = match.output_node()
    spec, act = match._mxemu_semantic
    graph = match.graph
    x, gs = _act_operands(graph, act, anchor.args[0], anchor)
    new_spec = dataclasses.replace(spec, **_act_fields(act)).to_str()
    args = (x,) + tuple(anchor.args[1:4]) + (gs, anchor.args[5], new_spec)
    with graph.inserting_before(anchor):
        new = _call(graph, torch.ops.mxemu.linear.default, args, _val(anchor))
    anchor.replace_all_uses_with(new)
    graph.erase_node(anchor)
    count(f"{FAMILY}.linear.qdq_into_fused")
    record(FAMILY, "linear_qdq", new, True, f"activation QDQ taken into a weight-only mxemu::linear: "
                                           f"{act.describe()}")


@register_pattern_family(FAMILY, order=90, anchors=(aten.mm.default, aten.addmm.default, aten._grouped_mm.default,
                                                    torch.ops.mxemu.linear.default),
                         description="GEMMs whose operands are proven by evaluation (emu_inductor.recognize)")
def _init(pm_pass, input_device=None):
    register_family_pattern(pm.CallFunction(aten.mm.default, pm.KeywordArg("a"), PackedWeightOperand()), pm_pass,
                            family=FAMILY, name="linear", check=_check_linear, replace=_replace_linear)
    register_family_pattern(pm.CallFunction(aten.addmm.default, pm.KeywordArg("bias"), pm.KeywordArg("a"),
                                            PackedWeightOperand()), pm_pass,
                            family=FAMILY, name="linear_bias", check=_check_addmm, replace=_replace_linear)
    register_family_pattern(pm.CallFunction(aten._grouped_mm.default, pm.KeywordArg("a"), PackedWeightOperand(),
                                            pm.KeywordArg("offs")), pm_pass,
                            family=FAMILY, name="grouped_mm", check=_check_grouped, replace=_replace_grouped)
    register_family_pattern(pm.CallFunction(aten._grouped_mm.default, pm.KeywordArg("a"), PackedWeightOperand(),
                                            pm.KeywordArg("offs"), pm.KeywordArg("bias"), pm.KeywordArg("out_dtype")),
                            pm_pass, family=FAMILY, name="grouped_mm_out_dtype", check=_check_grouped,
                            replace=_replace_grouped)
    register_family_pattern(pm.CallFunction(torch.ops.mxemu.linear.default, ReducedActivationOperand(),
                                            *(pm.Ignored() for _ in range(6))), pm_pass,
                            family=FAMILY, name="linear_qdq", check=_check_fused_linear,
                            replace=_replace_fused_linear)
