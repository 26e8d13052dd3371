"""Weight side: prove that a GEMM's weight operand is a known dequantization.

1. The cone (`candidates.weight_cone`) and its structure (`structure.check_weight_cone`).
2. Roles by dtype and shape: packed codes [.., N, K*bits/8] and block scales
   [.., N, K/block] (1-byte leaves: uint8, int8, float8 views), a float32 scale (one
   value, per expert [E], [E, 1, 1] or per row [E, N]; also a node computed from it, such
   as 1/weight_global_scale), tables and other constants (values known, or hypothesised
   from the formats and then guarded).
3. Factors (leading dims) resized so that one evaluation holds the probe blocks
   (`resize`), the cone extracted (`extract`) and evaluated on `probes.weight_rounds`,
   every surviving `variants.WeightVariant` alongside; the first probe that separates a
   variant from the cone is kept for explain().
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.fx import Node

from . import probes as P
from .candidates import Cone, cut, operands, weight_cone
from .compare import first_difference
from .extract import evaluate, extract, real_mode
from .leaves import known_value, table_hypotheses
from .resize import plan as make_plan
from .shapes import concrete_shape
from .structure import check_weight_cone, constant_nodes, packet_name
from .variants import weight_variants
from .verdict import Guard, Rejection, WeightVerdict

__all__ = ["recognize_weight_uncached", "DEFAULT_BUDGET_BYTES"]

#: Largest intermediate an evaluation may create (int64 index tensors are the widest).
DEFAULT_BUDGET_BYTES = 64 << 20
_ONE_BYTE = (torch.uint8, torch.int8, torch.float8_e4m3fn, torch.float8_e5m2) + (
    (torch.float8_e8m0fnu,) if hasattr(torch, "float8_e8m0fnu") else ())


def _val(n):
    return n.meta.get("val") if isinstance(n, Node) else None


def _shape(n):
    try:
        return concrete_shape(_val(n))
    except ValueError:
        return None


class _Hyp:
    """One role assignment."""

    def __init__(self, codes, scale, alpha, bits, block, consts, guards, cone):
        self.codes, self.scale, self.alpha = codes, scale, alpha
        self.bits, self.block = bits, block
        self.consts, self.guards, self.cone = consts, guards, cone


def _alpha_candidates(cone: Cone, leaf: Node, lead, n_rows) -> list:
    """The float-scale leaf and the float32 nodes computed from it alone (closest to it first)."""
    out = [leaf]
    derived = {leaf}
    for n in cone.nodes:
        ins = n.all_input_nodes
        if ins and all(a in derived or a.op == "get_attr" or (a.op == "call_function" and not
                       any(x.op == "placeholder" for x in a.all_input_nodes)) for a in ins) \
                and any(a in derived for a in ins):
            derived.add(n)
            v = _val(n)
            if isinstance(v, torch.Tensor) and v.dtype == torch.float32 and _alpha_shape_ok(_shape(n), lead, n_rows):
                out.append(n)
    return out


def _alpha_shape_ok(shp, lead, n_rows) -> bool:
    if shp is None:
        return False
    if math.prod(shp) == 1:
        return True
    if not lead:
        return False
    E = lead[0]
    s = list(shp)
    while s and s[-1] == 1:
        s.pop()
    return s in ([E], [E, n_rows]) and len(shp) <= len(lead) + 2


def _leaf_list(leaves) -> str:
    return ", ".join(f"{n.name}:{getattr(_val(n), 'dtype', None)}{_shape(n)}" for n in leaves)


def _hypotheses(gemm: Node, cone: Cone, values) -> tuple[list, Optional[str]]:
    _, w = operands(gemm)
    oshape = _shape(w)
    if oshape is None or len(oshape) < 2:
        return [], f"weight operand {w.name} has no static shape"
    lead, K, N = tuple(oshape[:-2]), oshape[-2], oshape[-1]
    codes_c, scale_c, alpha_c, tables, others = [], [], [], [], []
    for leaf in cone.leaves:
        v = _val(leaf) if leaf.op != "get_attr" else known_value(leaf, values)
        shp = _shape(leaf) if leaf.op != "get_attr" else (tuple(v.shape) if isinstance(v, torch.Tensor) else None)
        if leaf.op == "get_attr":
            others.append(leaf)
            continue
        if not isinstance(v, torch.Tensor):
            if isinstance(v, (int, torch.SymInt)):
                continue
            return [], f"leaf {leaf.name} is not a tensor"
        if v.dtype in _ONE_BYTE and shp is not None and len(shp) == len(lead) + 2 and tuple(shp[:-2]) == lead \
                and shp[-2] == N:
            last = shp[-1]
            if last and (last * 8) % K == 0 and (last * 8) // K in (4, 6, 8):
                codes_c.append((leaf, (last * 8) // K))
            if last and K % last == 0 and K // last in (16, 32):
                scale_c.append((leaf, K // last))
            continue
        if v.dtype == torch.float32 and _alpha_shape_ok(shp, lead, N):
            alpha_c.append(leaf)
            continue
        if v.is_floating_point() and v.dim() == 1 and shp is not None and shp[0] <= 256:
            tables.append(leaf)
            continue
        others.append(leaf)
    if not codes_c:
        return [], (f"no leaf looks like packed codes [{', '.join(map(str, lead + (N,)))}, K*bits/8] for K={K} "
                    f"(leaves: {_leaf_list(cone.leaves)})")
    if not scale_c:
        return [], f"no leaf looks like block scales [{', '.join(map(str, lead + (N,)))}, K/16 or K/32] for K={K}"
    hyps = []
    for (c, bits) in codes_c:
        for (s, block) in scale_c:
            if s is c:
                continue
            alphas = [None] + alpha_c
            for a_leaf in alphas:
                rest_alpha = [x for x in alpha_c if x is not a_leaf]
                consts, guards, missing = {}, [], None
                for leaf in others + rest_alpha:
                    kv = known_value(leaf, values)
                    if kv is None:
                        missing = leaf
                        break
                    consts[leaf] = kv
                    if leaf.op == "placeholder":
                        guards.append(Guard(leaf, tuple(kv.detach().float().reshape(-1).tolist()), "constant input"))
                if missing is not None:
                    continue
                table_opts = [[]]
                for t in tables:
                    kv = known_value(t, values)
                    opts = [("its value", kv)] if kv is not None else table_hypotheses(t)
                    table_opts = [prev + [(t, lab, val)] for prev in table_opts for lab, val in opts]
                a_cands = [None] if a_leaf is None else _alpha_candidates(cone, a_leaf, lead, N)
                for tab in table_opts:
                    c2 = dict(consts)
                    g2 = list(guards)
                    for t, lab, val in tab:
                        c2[t] = val
                        g2.append(Guard(t, tuple(val.detach().float().reshape(-1).tolist()), lab))
                    for a in a_cands:
                        sub = cone if a is None or a is a_leaf else cut(cone, [a])
                        hyps.append(_Hyp(c, s, a, bits, block, c2, tuple(g2), sub))
    if not hyps:
        return [], "leaf values needed for the proof are unknown at compile time"
    return hyps, None


def _factor_map(h: _Hyp, lead) -> dict:
    nl = len(lead)
    fmap = {h.codes: {i: f"lead{i}" for i in range(nl)} | {nl: "rows"},
            h.scale: {i: f"lead{i}" for i in range(nl)} | {nl: "rows"}}
    if h.alpha is not None and nl:
        shp = _shape(h.alpha)
        if math.prod(shp) != 1:
            d = {0: "lead0"}
            if len(shp) >= 2 and shp[1] != 1:
                d[1] = "rows"
            fmap[h.alpha] = d
    return fmap


def _run(h: _Hyp, gemm: Node, budget_bytes: int, out_dtype, transpose: bool):
    """Evaluate one hypothesis: (survivors, separated list, error text or None)."""
    cone = h.cone
    cshape, sshape = list(_shape(h.codes)), list(_shape(h.scale))
    ashape = list(_shape(h.alpha)) if h.alpha is not None else None
    lead = tuple(cshape[:-2])
    nb = sshape[-1]
    K = nb * h.block
    pl = make_plan(cone.nodes, cone.output, _factor_map(h, lead))
    new = {}
    for i in range(len(lead)):
        f = f"lead{i}"
        if pl.resizable(f):
            new[f] = min(pl.sizes[f], 2)
    lead_n = [new.get(f"lead{i}", lead[i]) for i in range(len(lead))]
    budget = max(1, budget_bytes // 8)
    rows = cshape[-2]
    if pl.resizable("rows"):
        want = -(-P.N_PAIRS // max(1, math.prod(lead_n) * nb))
        rows = max(1, min(want, budget // max(1, math.prod(lead_n) * K)))
        new["rows"] = rows
    elems = math.prod(lead_n) * rows * K
    if elems > budget:
        lost = "; ".join(f"{f}: {why}" for f, why in pl.why_lost.items()) or "no factor"
        return None, None, (f"too large to evaluate ({elems} elements per probe evaluation > {budget}) and "
                            f"cannot be narrowed ({lost})")
    cshape2 = lead_n + [rows, cshape[-1]]
    sshape2 = lead_n + [rows, nb]
    ashape2 = None
    if ashape is not None:
        ashape2 = list(ashape)
        if math.prod(ashape) != 1:
            ashape2[0] = lead_n[0]
            if len(ashape2) >= 2 and ashape2[1] != 1:
                ashape2[1] = rows
    inputs = [h.codes, h.scale] + ([h.alpha] if h.alpha is not None else [])
    gm = extract(cone, inputs, h.consts, pl, new)
    cdt, sdt = _val(h.codes).dtype, _val(h.scale).dtype
    alive = weight_variants(h.bits, h.block, h.alpha is not None, out_dtype)
    separated = []
    try:
        rounds = P.weight_rounds(cshape2, sshape2, ashape2)
    except ValueError as e:
        return None, None, str(e)
    with real_mode():
        for rnd in rounds:
            args = [rnd.codes.view(cdt), rnd.scale.view(sdt)] + ([rnd.alpha] if h.alpha is not None else [])
            try:
                got = evaluate(gm, args)
            except Exception as e:  # the cone does not run on these shapes/dtypes
                return None, None, f"evaluating the cone failed: {type(e).__name__}: {e}"
            if not isinstance(got, torch.Tensor):
                return None, None, "the cone does not produce a tensor"
            keep = []
            for var in alive:
                ref = var.reference(rnd.codes, rnd.scale, rnd.alpha, out_dtype)
                if transpose:
                    ref = ref.mT
                i = first_difference(got, ref)
                if i is None:
                    keep.append(var)
                    continue
                separated.append((var, _describe_weight(rnd, i, got, ref, h, cshape2, K)))
            alive = keep
            if not alive:
                break
        # The float scale is not enumerable: when survivors needing different kernels remain
        # (v*(s*a) vs (v*s)*a agree on most scales once rounded to bf16), search scales that
        # separate them and evaluate the cone on exactly those blocks.
        for rnd in _separating_rounds(alive, h, cshape2, sshape2, ashape2, out_dtype):
            if len({v.kernel_key for v in alive}) <= 1:
                break
            got = evaluate(gm, [rnd.codes.view(cdt), rnd.scale.view(sdt), rnd.alpha])
            keep = []
            for var in alive:
                ref = var.reference(rnd.codes, rnd.scale, rnd.alpha, out_dtype)
                ref = ref.mT if transpose else ref
                i = first_difference(got, ref)
                if i is None:
                    keep.append(var)
                else:
                    separated.append((var, _describe_weight(rnd, i, got, ref, h, cshape2, K)))
            alive = keep
    return alive, separated, None


def _separating_rounds(alive, h, cshape, sshape, ashape, out_dtype, pool: int = 1 << 16, seed: int = 1):
    """Rounds that tell apart survivors with different kernel keys: a pool of random
    (block, scale) pairs evaluated with every survivor at once (one block per pool entry,
    the float scale per entry), then one round per separating entry, its block tiled."""
    if ashape is None or len({v.kernel_key for v in alive}) <= 1:
        return
    gen = torch.Generator().manual_seed(seed)
    per = cshape[-1] // sshape[-1]
    codes = torch.randint(0, 256, (pool, 1, per), generator=gen, dtype=torch.int64).to(torch.uint8)
    if h.block == 16:  # E4M3 block scales: normal, finite bytes
        sc = torch.randint(0x20, 0x70, (pool, 1, 1), generator=gen, dtype=torch.int64)
    else:
        sc = torch.randint(100, 155, (pool, 1, 1), generator=gen, dtype=torch.int64)
    scale = sc.to(torch.uint8)
    alpha = torch.exp2(torch.randint(-20, 21, (pool,), generator=gen).float()) * (1 + torch.rand(pool, generator=gen))
    refs = [v.reference(codes, scale, alpha, out_dtype).reshape(pool, -1) for v in alive]
    done = set()
    for i in range(len(alive)):
        for j in range(i + 1, len(alive)):
            if alive[i].kernel_key == alive[j].kernel_key:
                continue
            a, b = refs[i], refs[j]
            it = {2: torch.int16, 4: torch.int32}[a.element_size()]
            diff = ((a.view(it) != b.view(it)) & ~(torch.isnan(a) & torch.isnan(b))).any(dim=1)
            hit = torch.nonzero(diff)
            if not hit.numel():
                continue
            e = int(hit[0, 0])
            if e in done:
                continue
            done.add(e)
            n_blocks = math.prod(sshape)
            c = codes[e, 0].repeat(n_blocks).reshape(cshape)
            s = scale[e].reshape(()).expand(sshape).contiguous()
            al = alpha[e].expand(ashape).contiguous()
            yield P.WeightRound(f"scale {float(alpha[e]):.9g} chosen to separate {alive[i].name} from "
                                f"{alive[j].name}", c, s, al)


def _describe_weight(rnd, i, got, ref, h, cshape, K) -> str:
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return f"{rnd.label}: output {got.dtype}{tuple(got.shape)} vs {ref.dtype}{tuple(ref.shape)}"
    # flat index of the transposed operand -> logical (.., n, k) of the dequantized tensor
    idx = list(torch.unravel_index(torch.tensor(i), got.shape))
    idx = [int(t) for t in idx]
    n, k = (idx[-1], idx[-2]) if got.shape[-1] != K or got.shape[-2] == K and got.shape[-1] != K else (idx[-2], idx[-1])
    lead = idx[:-2]
    per_byte = 8 / h.bits
    byte = rnd.codes[tuple(lead) + (n, int(k // per_byte))] if h.bits != 6 else None
    sc = rnd.scale[tuple(lead) + (n, k // h.block)]
    al = ""
    if rnd.alpha is not None:
        a = rnd.alpha.reshape(-1)
        al = f", scale {a[lead[0]] if a.numel() > 1 and lead else a[0]:.6g}"
    b = f"code byte 0x{int(byte):02x}, " if byte is not None else ""
    return (f"{rnd.label}: element (.., {n}, {k}) with {b}scale byte 0x{int(sc):02x}{al}: "
            f"graph {got.reshape(-1)[i].item()!r}, variant {ref.reshape(-1)[i].item()!r}")


def _choose(alive):
    """The variant to report when `alive` all agreed on every probe: the kernel-supported
    one if exactly one kernel spec is among them (the others computed the same values
    on the probes), an unsupported one if none is supported, None if ambiguous."""
    supported = {v.kernel_key for v in alive if v.kernel_supported}
    if len(supported) > 1:
        return None
    return sorted(alive, key=lambda v: (not v.kernel_supported, v.name))[0]


def recognize_weight_uncached(gemm: Node, cone: Cone, *, values=None, budget_bytes=DEFAULT_BUDGET_BYTES):
    """(verdict or Rejection); see `api.recognize_weight`."""
    _, w = operands(gemm)
    const = constant_nodes(cone.nodes, set())
    why = check_weight_cone(cone.nodes, const)
    if why:
        return Rejection("weight", gemm, why)
    hyps, why = _hypotheses(gemm, cone, values)
    if why:
        return Rejection("weight", gemm, why)
    out_dtype = _val(w).dtype
    transpose = True  # [.., N, K] dequantized, fed as [.., K, N]
    best = None  # (n survivors-groups, ...)
    closest = None
    errors = []
    for h in hyps:
        alive, separated, err = _run(h, gemm, budget_bytes, out_dtype, transpose)
        if err:
            errors.append(err)
            continue
        if alive:
            chosen = _choose(alive)
            if chosen is not None:
                return WeightVerdict(chosen, h.codes, h.scale, h.alpha if chosen.alpha_order != "none" else None,
                                     transpose, out_dtype, h.guards,
                                     tuple(v.name for v in alive if v is not chosen),
                                     tuple((v.name, t) for v, t in separated[:8]))
            best = best or (h, alive)
        elif separated:
            if closest is None:
                closest = separated[-1]
    if best is not None:
        h, alive = best
        names = ", ".join(v.name for v in alive[:6])
        return Rejection("weight", gemm, f"ambiguous: variants needing different kernels agree on every probe: {names}")
    if closest is not None:
        var, text = closest
        return Rejection("weight", gemm, f"no known weight decode matches; closest: {var.name}, "
                                         f"told apart by {text}")
    return Rejection("weight", gemm, errors[0] if errors else "no hypothesis could be evaluated")
