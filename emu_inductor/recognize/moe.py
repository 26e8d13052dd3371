"""Recognise a whole MoE layer around two grouped GEMMs, by evaluation.

`recognize_moe(second, site_of)` takes the second grouped GEMM of a pair (as a
`GemmSite`; `site_of(node)` says which nodes are grouped GEMMs and where their rows and
group ends are) and returns a `MoeVerdict` or a `Rejection`:

1. structure (`moe_region`): the first GEMM, the activation cone between them, the
   routing tensor, hidden states, router weights and the combine's result;
2. the activation: its cone is evaluated on GEMM1-output probes (every 16-bit pattern of
   the dtype in both halves, random data at many magnitudes, specials) and compared bit
   for bit with each activation of `emu_inductor.reference.activations` whose width
   fits; exactly the survivors may be used;
3. routing and combine: the body (hidden states, ids, weights -> result) is evaluated
   with both GEMMs replaced by probe GEMMs (`moe_probes`) on probe routings (repeated
   experts in a token, empty experts, all rows on one expert, zero weights) and compared
   bit for bit with mxemu::moe's semantics run on the same probe GEMMs, for each k-sum
   order in `COMBINE_ORDERS` (the last, "fp32", within fp32 accumulation rounding: a
   combine written as a GEMM over the slots, whose order the BLAS picks).
Anything unproven is a `Rejection` whose reason names the probe that failed. Verdicts
are cached by the structure of the cones (`cone_key`), so identical layers cost one
evaluation.
"""

from __future__ import annotations

import dataclasses
import operator
import time
from typing import Callable, Optional, Union

import torch
from torch.fx import Node

from ..reference.activations import ACTIVATIONS
from .compare import difference
from .extract import attr_value, real_mode
from .moe_probes import (COMBINE_ORDERS, Fp32Sum, ProbeGemm, activation_probes, activation_routings, activation_width,
                         extract_with_gemms, reference_moe, routing_probes)
from .moe_region import GemmSite, MoeRegion, find_moe_regions, live_nodes
from .shapes import concrete_shape, hint
from .verdict import CACHE, Rejection, cone_key

__all__ = ["recognize_moe", "recognize_moe_region", "MoeVerdict", "GemmSite", "prove_activation"]


@dataclasses.dataclass
class MoeVerdict:
    region: MoeRegion
    activation: str
    combine: str  # a key of COMBINE_ORDERS
    probes: int
    seconds: float = 0.0
    cached: bool = False
    key: str = ""

    kernel_supported = True

    def describe(self) -> str:
        r = self.region
        return (f"MoE proven: {self.activation} between the GEMMs, rows gathered from {r.hidden.name} by "
                f"{r.topk_ids.name} (top-{r.top_k}), combined with {r.topk_weights.name} summed "
                f"{COMBINE_ORDERS[self.combine]}" + (" (cached verdict)" if self.cached else
                                                     f" ({self.probes} probe routings)"))


MoeResult = Union[MoeVerdict, Rejection]


def _val(n):
    return n.meta.get("val")


def _width(n) -> int:
    """The hinted last size of a 2-d value (its rows may be data-dependent: a loop's
    nonzero-selected rows have no hint, and only the width is needed)."""
    return hint(_val(n).shape[-1])


def _fmt(t: "torch.Tensor | Fp32Sum", i: int) -> str:
    if isinstance(t, Fp32Sum):
        return f"{float(t.value.reshape(-1)[i]):.8g} +- fp32 accumulation rounding"
    v = t.reshape(-1)[i]
    return f"{float(v):.8g}"


def prove_activation(act, first: GemmSite) -> tuple[Optional[str], str]:
    """(activation name, note) or (None, reason): the act cone against every reference
    activation of the right width, bit for bit."""
    R, n1 = concrete_shape(_val(first.node))
    out = _val(act.output)
    n2 = concrete_shape(out)[-1]
    dtype = _val(first.node).dtype
    alive = [a for a in ACTIVATIONS if activation_width(a, n1) == n2]
    if not alive:
        return None, f"the activation maps width {n1} to {n2}: no gated or elementwise activation does"
    gm = extract_with_gemms(act, [first.node], {})
    gen = torch.Generator().manual_seed(1234)
    told: dict = {}
    for i, c1 in enumerate(activation_probes(R, n1, dtype, gen)):
        y = gm(c1)
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != (R, n2) or y.dtype != out.dtype:
            return None, f"the activation cone gives {getattr(y, 'dtype', type(y))} of another shape on probe data"
        for a in list(alive):
            ref = ACTIVATIONS[a](c1)
            if ref.dtype != y.dtype:
                alive.remove(a)
                told[a] = (1 << 60, f"it rounds to {y.dtype}, {a} to {ref.dtype}")
                continue
            first_i, n = difference(y, ref)
            if first_i is not None:
                alive.remove(a)
                text = (f"probe batch {i}: {n} of {y.numel()} values differ, first at {first_i}: "
                        f"graph gives {_fmt(y, first_i)}, {a} gives {_fmt(ref, first_i)}")
                told[a] = (n, text)
        if not alive:
            closest = min(told, key=lambda a: told[a][0])
            return None, f"the activation is none of {', '.join(told)}; closest {closest}: {told[closest][1]}"
    return alive[0], ("equivalent on every probe: " + ", ".join(alive) if len(alive) > 1 else "")


def _no_signed_zero(t):
    return t + 0.0 if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _prove_body(region: MoeRegion, activations: list, distinct: bool = False) -> tuple[Optional[tuple], str, int]:
    """((activation, combine order), "", probes) or (None, reason, probes): the body with
    probe GEMMs against mxemu::moe's semantics for each candidate activation and k-sum
    order. An activation not proven on its own cone (routing inside it) is proven here on
    identity probe GEMMs and hidden states holding every 16-bit pattern. `distinct`: the
    ids are a top-k's (`topk_indices`), so only routings a top-k can give are probed."""
    first, second = region.first, region.second
    T, k = concrete_shape(_val(region.topk_ids))
    H = concrete_shape(_val(region.hidden))[1]
    out = _val(region.output)
    H2 = concrete_shape(out)[1]
    n1 = _width(first.node)
    xv = _val(region.hidden)
    if H2 != H or out.dtype != xv.dtype:
        return None, f"the result {out.dtype}[{T}, {H2}] is not the hidden states' {xv.dtype}[{T}, {H}]", 0
    E = first.experts
    gen = torch.Generator().manual_seed(4321)
    dtypes = (xv.dtype, _val(region.topk_weights).dtype, _val(region.topk_ids).dtype)
    inputs = [region.hidden, region.topk_ids, region.topk_weights]
    runs = []  # (probe GEMM1, probe GEMM2, probes, k-sum orders to try)
    g1, g2 = ProbeGemm(E, n1, gen), ProbeGemm(E, H2, gen)
    runs.append((g1, g2, routing_probes(T, H, k, E, *dtypes, gen, distinct), list(COMBINE_ORDERS)))
    if not region.act_direct:
        if H2 < _width(second.rows):
            return None, "the activation is not proven on its own and GEMM2's output is narrower than its input", 0
        runs.append((ProbeGemm.identity(E, n1), ProbeGemm.identity(E, H2),
                     activation_routings(T, H, k, E, *dtypes, gen, distinct), ["sum"]))
    alive = [(a, o) for a in activations for o in COMBINE_ORDERS]
    told: dict = {}
    n_probes = 0
    for p1, p2, probes, orders in runs:
        gm = extract_with_gemms(region.body, inputs, {first.node: (first.rows, first.offs, p1.grouped),
                                                      second.node: (second.rows, second.offs, p2.grouped)})
        exact = len(orders) > 1  # identity runs: the sign of a zero sum is the k-sum order's, not compared
        for what, x, ids, w in probes:
            n_probes += 1
            try:
                y = gm(x, ids, w)
            except Exception as e:  # e.g. an index the body computes from the ids is out of range
                return None, f"probe routing '{what}': evaluating the body raised {type(e).__name__}: {e}", n_probes
            if not isinstance(y, torch.Tensor) or tuple(y.shape) != (T, H) or y.dtype != xv.dtype:
                return None, f"probe routing '{what}': the body gives {getattr(y, 'dtype', type(y))}", n_probes
            for a in sorted({a for a, _ in alive}):
                todo = [o for aa, o in alive if aa == a] if exact else ["sum"]
                for o, ref in reference_moe(x, ids, w, a, p1, p2, todo).items():
                    first_i, n = ref.difference(y) if isinstance(ref, Fp32Sum) else difference(y, ref) if exact \
                        else difference(_no_signed_zero(y), _no_signed_zero(ref))
                    if first_i is None:
                        continue
                    tok = first_i // H
                    why = (f"probe routing '{what}': {n} of {ref.numel()} values differ, first at token {tok} "
                           f"(ids {ids[tok].tolist()}): graph gives {_fmt(y, first_i)}, mxemu::moe with {a} "
                           f"gives {_fmt(ref, first_i)}")
                    for d in ([(a, o)] if exact else [(a, oo) for oo in COMBINE_ORDERS]):
                        if d in alive:
                            alive.remove(d)
                            told.setdefault(d, (n, why))
            if not alive:
                n_best, why = min(told.values(), key=lambda t: t[0])
                return None, f"routing/combine differ from mxemu::moe (every activation and k-sum order): {why}", \
                    n_probes
    return alive[0], "", n_probes


def recognize_moe(second: GemmSite, site_of: Callable[[Node], Optional[GemmSite]], *,
                  live: Optional[set] = None, use_cache: bool = True) -> MoeResult:
    """Prove that the layer around `second` (and the grouped GEMM above it) computes
    mxemu::moe: a `MoeVerdict` (activation, combine order, the nodes by role), or a
    `Rejection` (side "moe") with the reason for explain()."""
    if not isinstance(second, GemmSite):
        raise TypeError(f"second: expected a GemmSite, got {type(second).__name__}")
    with real_mode():
        return _recognize(second, site_of, live, use_cache)


def _recognize(second, site_of, live, use_cache) -> MoeResult:
    t0 = time.perf_counter()

    def rej(reason):
        return Rejection("moe", second.node, reason, seconds=time.perf_counter() - t0)

    if live is None:
        live = live_nodes(second.node.graph)
    regions, why = find_moe_regions(second, site_of, live)
    if not regions:
        return rej(why)
    region0 = regions[0]
    if region0.act_direct:  # the activation's own cone: every 16-bit pattern, bit for bit
        akey = cone_key("moe_activation", region0.act, attr_value)
        hit = CACHE.get(akey) if use_cache else None
        if hit is None:
            try:
                name, note = prove_activation(region0.act, region0.first)
            except Exception as e:
                name, note = None, f"evaluating the activation raised {type(e).__name__}: {e}"
            hit = ("ok", name) if name else ("rej", note)
            if use_cache:
                CACHE.put(akey, hit)
        if hit[0] == "rej":
            return rej(f"activation between the GEMMs not proven: {hit[1]}")
        activations = [hit[1]]
    else:  # routing inside the activation cone: candidates by width, proven in the body
        activations, why = _activations_by_width(region0)
        if why:
            return rej(why)
    reasons = []
    for region in regions:
        v = _verdict(region, activations, use_cache, t0)
        if isinstance(v, MoeVerdict):
            return v
        reasons.append(f"result {region.output.name}: {v}")
    return rej("; ".join(reasons))


def _activations_by_width(region: MoeRegion) -> tuple[list, str]:
    n1, n2 = _width(region.first.node), _width(region.second.rows)
    activations = [a for a in ACTIVATIONS if activation_width(a, n1) == n2]
    if not activations:
        return [], f"the activation maps width {n1} to {n2}: no gated or elementwise activation does"
    return activations, ""


_ID_CASTS = ("aten.convert_element_type", "aten._to_copy", "aten.clone", "prims.convert_element_type")


def topk_indices(ids: Node) -> bool:
    """`ids` are the indices of an `aten.topk` over the last dim (through dtype casts): k
    distinct experts per token, whatever the scores."""
    n = ids
    while n.op == "call_function" and str(n.target).rsplit(".", 1)[0] in _ID_CASTS:
        n = n.args[0]
    if n.op != "call_function" or n.target is not operator.getitem or n.args[1] != 1:
        return False
    src = n.args[0]
    if not isinstance(src, Node) or src.op != "call_function" or src.target is not torch.ops.aten.topk.default:
        return False
    dim = src.args[2] if len(src.args) > 2 else src.kwargs.get("dim", -1)
    x = _val(src.args[0])
    return isinstance(x, torch.Tensor) and dim in (-1, x.dim() - 1)


def _verdict(region: MoeRegion, activations: list, use_cache: bool, t0: float) -> Union[MoeVerdict, str]:
    """The body proof of one region (cached by the body's structure): a verdict or the reason."""
    distinct = topk_indices(region.topk_ids)
    key = cone_key("moe_body", region.body, attr_value, extra=",".join(activations) + f";distinct={distinct}")
    entry = CACHE.get(key) if use_cache else None
    cached = entry is not None
    if entry is None:
        try:
            found, why, n = _prove_body(region, activations, distinct)
        except Exception as e:
            found, why, n = None, f"evaluating the body raised {type(e).__name__}: {e}", 0
        entry = ("ok", found, n) if found else ("rej", why, n)
        if use_cache:
            CACHE.put(key, entry)
    if entry[0] == "ok":
        (activation, order), n = entry[1], entry[2]
        return MoeVerdict(region, activation, order, n, seconds=time.perf_counter() - t0, cached=cached, key=key)
    return entry[1]


def recognize_moe_region(region: MoeRegion, *, use_cache: bool = True) -> MoeResult:
    """Prove a region found by another structure finder (the per-expert loop's,
    `moe_loop.find_loop_moe_region`): the activation is proven inside the body (identity
    probe GEMMs, every 16-bit pattern), routing and combine on the probe routings, exactly
    as for `recognize_moe`'s regions whose activation reads routing tensors."""
    if not isinstance(region, MoeRegion):
        raise TypeError(f"region: expected a MoeRegion, got {type(region).__name__}")
    t0 = time.perf_counter()
    with real_mode():
        activations, why = _activations_by_width(region)
        v = _verdict(region, activations, use_cache, t0) if not why else why
    if isinstance(v, MoeVerdict):
        return v
    return Rejection("moe", region.second.node, v, seconds=time.perf_counter() - t0)
