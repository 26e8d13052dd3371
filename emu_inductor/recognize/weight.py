"""Weight side: prove that a GEMM's weight operand is a known dequantization.

1. The cone (`candidates.weight_cone`) and its structure (`structure.check_weight_cone`).
2. Roles by dtype and shape: packed codes [.., N, K*bits/8] and block scales
   [.., N, K/block] (1-byte leaves: uint8, int8, float8 views), or 1-byte leaves holding
   the same elements in the same row-major order in another shape (gpt-oss's blocks
   [E, N, G, 16] with scales [E, N, G], or [1, N, G, 16] picked by `[0]`; experts stored
   2-d as [E*N, K*bits/8] / [E*N, K/block]): those are read through a reshape to the
   canonical shape, which the probes prove like any other role. A float32 scale (one
   value, per expert [E], [E, 1, 1] or per row [E, N]; also a node computed from it, such
   as 1/weight_global_scale), tables and other constants (values known, or hypothesised
   from the formats and then guarded).
3. Factors (leading dims) resized so that one evaluation holds the probe blocks
   (`resize`), the cone extracted (`extract`) and evaluated on `probes.weight_rounds`,
   every surviving `variants.WeightVariant` alongside; the first probe that separates a
   variant from the cone is kept for explain().
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import torch
from torch.fx import Node

from . import probes as P
from .candidates import Cone, cut, operands
from .compare import first_difference
from .extract import evaluate, extract, real_mode
from .leaves import known_value, leaf_bindings
from .resize import plan as make_plan
from .shapes import concrete_shape
from .structure import check_weight_cone, constant_nodes, is_table_leaf, value_preserving
from .variants import weight_variants
from .verdict import Rejection, WeightVerdict

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

    def __init__(self, codes, scale, alpha, bits, block, consts, guards, cone, cshape, sshape, offsets):
        self.codes, self.scale, self.alpha = codes, scale, alpha
        self.bits, self.block = bits, block
        self.consts, self.guards, self.cone = consts, guards, cone
        # canonical shapes [.., N, K*bits/8] / [.., N, K/block]; where each leaf holds the
        # canonical leading dims and N: an int j (leaf dims j.. hold them), a `_Flat` (one
        # leaf dim holds them flattened), None (reshaped as a whole, evaluated at real size)
        self.cshape, self.sshape, self.offsets = cshape, sshape, offsets

    def leaf_shape(self, leaf, canonical) -> list:
        """The leaf's shape holding the canonical tensor `canonical` (a resized one too)."""
        real = list(_shape(leaf))
        j = self.offsets[leaf]
        if j is None:
            return real
        if isinstance(j, KMajor):
            return list(canonical[:-2]) + [canonical[-1], canonical[-2]]
        if isinstance(j, _Flat):
            return real[:j.dim] + [math.prod(canonical[:-1])] + real[j.dim + 1:]
        nl = len(canonical) - 1  # lead dims + N
        return real[:j] + list(canonical[:-1]) + real[j + nl:]

    def leaf_args(self, codes, scale) -> list:
        """Probe tensors in canonical shapes -> the leaves' shapes and dtypes."""
        return [self._as_leaf(self.codes, codes), self._as_leaf(self.scale, scale)]

    def _as_leaf(self, leaf, t):
        if self.kmajor(leaf):  # the packed axis is the leaf's dim -2
            return t.mT.contiguous().view(_val(leaf).dtype)
        return t.reshape(self.leaf_shape(leaf, t.shape)).view(_val(leaf).dtype)

    def kmajor(self, leaf) -> bool:
        return isinstance(self.offsets[leaf], KMajor)


def _alpha_candidates(cone: Cone, alpha_leaves: list, lead, n_rows) -> list:
    """Float-scale candidates: each scale-shaped float32 input, then float32 nodes of a
    scale's shape computed from such inputs and constants alone (1/weight_global_scale,
    vLLM's input_scale * weight_scale_2), nearest the inputs first."""
    out = list(alpha_leaves)
    derived = set(alpha_leaves)
    for n in cone.nodes:
        ins = n.all_input_nodes
        if ins and any(a in derived for a in ins) and all(
                a in derived or a.op == "get_attr" or
                (a.op == "call_function" and not any(x.op == "placeholder" for x in a.all_input_nodes))
                for a in ins):
            derived.add(n)
            v = _val(n)
            if isinstance(v, torch.Tensor) and v.dtype == torch.float32 and _alpha_shape_ok(_shape(n), lead, n_rows) \
                    and not value_preserving(n):  # a view of a scale is that scale
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


@dataclasses.dataclass(frozen=True)
class _Flat:
    """A leaf whose dim `dim` holds the canonical leading dims and N flattened ([E*N, K/2])."""

    dim: int


@dataclasses.dataclass(frozen=True)
class KMajor:
    """A leaf holding the canonical [*lead, N, last] with its last two dims swapped
    ([*lead, last, N]: packed along K, as `x @ W[K, N]` code keeps it): the probes are
    written transposed, and the fused op is handed the leaf transposed back."""


def _kmajor_last(shp, lead, N):
    """last when a leaf of shape `shp` is exactly [*lead, last, N] (a K-major leaf)."""
    if shp is None or len(shp) != len(lead) + 2 or tuple(shp[:-2]) != tuple(lead) or shp[-1] != N:
        return None
    return shp[-2]


def _layout(shp, lead, N):
    """(last, offset) when a leaf of shape `shp` can hold [*lead, N, last] row-major: offset j
    when shp is (1,)*j + lead + (N,) + trailing (its leading dims resize with the cone's),
    _Flat(j) when shp is (1,)*j + (prod(lead)*N,) + trailing (experts stored 2-d: the
    factors are digits of that dim and resize the same way), None when only the element
    count fits (a reshape as a whole). None if neither."""
    total = math.prod(lead) * N
    n = math.prod(shp)
    if not total or n % total:
        return None
    last = n // total
    nl = len(lead) + 1
    for j in range(len(shp) - nl + 1):
        if tuple(shp[j:j + nl]) == tuple(lead) + (N,) and all(d == 1 for d in shp[:j]):
            return last, j
        if shp[j] != 1:
            break
    for j, d in enumerate(shp):
        if lead and d == total:
            return last, _Flat(j)
        if d != 1:
            break
    return last, None


def _hypotheses(gemm: Node, cone: Cone, values) -> tuple[list, Optional[str]]:
    _, w = operands(gemm)
    oshape = _shape(w)
    if oshape is None or len(oshape) < 2:
        return [], f"weight operand {w.name} has no static shape"
    lead, K, N = tuple(oshape[:-2]), oshape[-2], oshape[-1]
    # (leaf, bits or block, offset); leaves in the canonical shape first, reshaped ones after
    codes_c, scale_c, alpha_c, tables, others = [], [], [], [], []
    codes_r, scale_r = [], []
    codes_k, scale_k = [], []  # K-major leaves [.., K*bits/8, N] / [.., K/block, N]
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
        lay = _layout(shp, lead, N) if v.dtype in _ONE_BYTE and shp is not None else None
        kl = _kmajor_last(shp, lead, N) if v.dtype in _ONE_BYTE else None
        if kl and (kl * 8) % K == 0 and (kl * 8) // K in (4, 6, 8):
            codes_k.append((leaf, (kl * 8) // K, KMajor()))
        if kl and K % kl == 0 and K // kl in (16, 32):
            scale_k.append((leaf, K // kl, KMajor()))
        if lay is not None:
            last, j = lay
            exact = j == 0 and len(shp) == len(lead) + 2
            codes_l, scale_l = (codes_c, scale_c) if exact else (codes_r, scale_r)
            role = False
            if last and (last * 8) % K == 0 and (last * 8) // K in (4, 6, 8):
                codes_l.append((leaf, (last * 8) // K, j))
                role = True
            if last and K % last == 0 and K // last in (16, 32):
                scale_l.append((leaf, K // last, j))
                role = True
            if exact:
                continue
            if role:  # when another leaf plays the role, this one is a value the cone reads, as before
                others.append(leaf)
                continue
        if v.dtype == torch.float32 and _alpha_shape_ok(shp, lead, N):
            alpha_c.append(leaf)
            continue
        if is_table_leaf(leaf):
            tables.append(leaf)
            continue
        others.append(leaf)
    # K-major before a reshape as a whole: both fit a [K/2, N] leaf, only one can be right
    codes_c += codes_k + codes_r
    scale_c += scale_k + scale_r
    if not codes_c:
        return [], (f"no leaf looks like packed codes [{', '.join(map(str, lead + (N,)))}, K*bits/8] for K={K} "
                    f"(or holds as many bytes in that order; leaves: {_leaf_list(cone.leaves)})")
    if not scale_c:
        return [], f"no leaf looks like block scales [{', '.join(map(str, lead + (N,)))}, K/16 or K/32] for K={K}"
    # the scale nearest its use first (1/gs before gs): the graph multiplies by that one
    a_options = [None] + _alpha_candidates(cone, alpha_c, lead, N)[::-1]
    hyps = []
    for (c, bits, jc) in codes_c:
        for (s, block, js) in scale_c:
            if s is c:
                continue
            cshape, sshape = lead + (N, K * bits // 8), lead + (N, K // block)
            for a in a_options:
                sub = cone if a is None or a in cone.leaves else cut(cone, [a])
                bindings = leaf_bindings(sub.leaves, skip=(c, s, a), tables=tables, values=values,
                                         wanted=lambda leaf: leaf in others or leaf in alpha_c)
                for c2, g2 in bindings or ():
                    hyps.append(_Hyp(c, s, a, bits, block, c2, g2, sub, cshape, sshape, {c: jc, s: js}))
    if not hyps:
        return [], "leaf values needed for the proof are unknown at compile time"
    return hyps, None


def _factor_map(h: _Hyp, lead) -> dict:
    nl = len(lead)
    if h.offsets[h.codes] is None or h.offsets[h.scale] is None:
        return {}  # a leaf reshaped as a whole: no factor to resize (evaluated at its real size)
    fmap = {}
    for leaf in (h.codes, h.scale):
        j = h.offsets[leaf]
        if isinstance(j, KMajor):  # [*lead, last, N]
            fmap[leaf] = {i: f"lead{i}" for i in range(nl)} | {nl + 1: "rows"}
        elif isinstance(j, _Flat):  # one dim, the factors its digits, outer first
            fmap[leaf] = {j.dim: tuple((f"lead{i}", lead[i]) for i in range(nl)) + (("rows", h.cshape[-2]),)}
        else:
            fmap[leaf] = {j + i: f"lead{i}" for i in range(nl)} | {j + nl: "rows"}
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
    cshape, sshape = list(h.cshape), list(h.sshape)
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
    alive = weight_variants(h.bits, h.block, h.alpha is not None, out_dtype)
    separated = []
    try:
        rounds = P.weight_rounds(cshape2, sshape2, ashape2)
    except ValueError as e:
        return None, None, str(e)
    def prune(alive, rnd, got, shape):
        keep = []
        for var in alive:
            ref = var.reference(rnd.codes, rnd.scale, rnd.alpha, out_dtype)
            ref = ref.mT if transpose else ref
            i = first_difference(got, ref)
            if i is None:
                keep.append(var)
            else:
                separated.append((var, _describe_weight(rnd, i, got, ref, h, shape, K, transpose)))
        return keep

    with real_mode():
        for r, rnd in enumerate(rounds):
            args = h.leaf_args(rnd.codes, rnd.scale) + ([rnd.alpha] if h.alpha is not None else [])
            try:
                got = evaluate(gm, args)
            except Exception as e:  # the cone does not run on these shapes/dtypes
                return None, None, f"evaluating the cone failed: {type(e).__name__}: {e}"
            if not isinstance(got, torch.Tensor):
                return None, None, "the cone does not produce a tensor"
            # screen on a few rows first: most variants differ there, at a fraction of the cost
            rs = min(rows, 64)
            if rs < rows and len(alive) > 1:
                sub = _rows_slice(rnd, rs, transpose, got)
                alive = prune(alive, sub, sub.got, cshape2)
            if r == 0 and h.alpha is not None and len(alive) > 1:
                alive = _scale_rounds(alive, prune, h, cone, inputs, pl, new, lead, lead_n, rows, cshape, nb,
                                      ashape, out_dtype, gm)
            alive = prune(alive, rnd, got, cshape2)
            if not alive:
                break
        if h.alpha is not None and alive:
            alive = _scale_rounds(alive, prune, h, cone, inputs, pl, new, lead, lead_n, rows, cshape, nb, ashape,
                                  out_dtype, gm)
    return alive, separated, None


def _scale_rounds(alive, prune, h, cone, inputs, pl, new, lead, lead_n, rows, cshape, nb, ashape, out_dtype, gm):
    """The float scale is not enumerable: products in another order agree with each other
    on most scales once rounded to bf16. Evaluate (on a narrowed cone where possible: a
    few rows holding every code byte) the blocks and scales that separate every pair of
    plausible scale spellings."""
    small_new = {f: (1 if f != "rows" else -(-256 // cshape[-1])) for f in new}
    small = extract(cone, inputs, h.consts, pl, small_new) if small_new else gm
    c_s = [small_new.get(f"lead{i}", lead_n[i]) for i in range(len(lead))] + \
        [small_new.get("rows", rows), cshape[-1]]
    s_s = c_s[:-1] + [nb]
    a_s = None
    if ashape is not None:
        a_s = list(ashape)
        if math.prod(ashape) != 1:
            a_s[0] = c_s[0]
            if len(a_s) >= 2 and a_s[1] != 1:
                a_s[1] = c_s[-2]
    for rnd in _separating_rounds(h, c_s, s_s, a_s, out_dtype):
        got = evaluate(small, h.leaf_args(rnd.codes, rnd.scale) + [rnd.alpha])
        alive = prune(alive, rnd, got, c_s)
        if not alive:
            break
    return alive


def _rows_slice(rnd, rs: int, transpose: bool, got):
    """The first `rs` rows (dim -2 of the leaves) of a round and of the cone's output."""
    a = rnd.alpha
    if a is not None and a.dim() >= 2 and a.shape[1] == rnd.codes.shape[-2] and a.shape[1] != 1:
        a = a[:, :rs]
    out = P.WeightRound(rnd.label, rnd.codes[..., :rs, :], rnd.scale[..., :rs, :], a)
    out.got = got[..., :rs] if transpose else got[..., :rs, :]
    return out


def _scale_spellings(out_dtype):
    """Plausible ways to apply a float scale a to value v and block scale s (fp32 and in
    the output dtype): the variants' orders and spellings no variant has."""
    forms = {
        "v*(s*a)": lambda v, s, a: v * (s * a), "(v*s)*a": lambda v, s, a: (v * s) * a,
        "v*(s/a)": lambda v, s, a: v * (s / a), "v*(s*(1/a))": lambda v, s, a: v * (s * (1.0 / a)),
        "(v*s)/a": lambda v, s, a: (v * s) / a, "(v*a)*s": lambda v, s, a: (v * a) * s,
    }
    dts = (torch.float32,) if out_dtype == torch.float32 else (torch.float32, out_dtype)
    return [(f, dt) for f in forms.values() for dt in dts]


@functools.lru_cache(maxsize=16)
def _separating_entries(out_dtype, block: int) -> tuple:
    """(float scale, scale byte) pairs separating every pair of `_scale_spellings` that a
    pool of up to 2^18 random scales can separate (kept per process: ~1 s once)."""
    gen = torch.Generator().manual_seed(1)
    lo, hi = (0x20, 0x70) if block == 16 else (100, 155)  # normal, finite scale bytes
    v = torch.tensor([1.0, 1.5], dtype=torch.float32)[None, :, None]  # E2M1 mantissas
    forms = _scale_spellings(out_dtype)
    open_pairs = {(i, j) for i in range(len(forms)) for j in range(i + 1, len(forms))}
    picked: list = []
    pool = 1 << 12
    while open_pairs and pool <= 1 << 18:
        alpha = torch.exp2(torch.randint(-20, 21, (pool,), generator=gen).float()) * \
            (1 + torch.rand(pool, generator=gen))
        mant = torch.randint(0, 8, (pool,), generator=gen)
        # exponents only shift the products exactly (normal range): mantissas decide
        sv = (1 + mant.float() / 8)[:, None, None] * torch.ones(1, 1, 1)
        outs = [f(v.to(dt), sv.to(dt), alpha[:, None, None].to(dt)).to(out_dtype).float().reshape(pool, -1)
                for f, dt in forms]
        for i, j in sorted(open_pairs):
            d = torch.nonzero((outs[i] != outs[j]).any(dim=1))
            if d.numel():
                e = int(d[0, 0])
                byte = lo + ((int(mant[e]) - lo) % 8)  # a byte in range with that mantissa
                while byte < lo:
                    byte += 8
                picked.append((float(alpha[e]), byte))
                open_pairs.discard((i, j))
        pool *= 4
    return tuple(dict.fromkeys(picked))


def _separating_rounds(h, cshape, sshape, ashape, out_dtype):
    """One round per separating (scale, scale byte): every code byte, that block scale."""
    if ashape is None:
        return
    for alpha, byte in _separating_entries(out_dtype, h.block):
        c = (torch.arange(math.prod(cshape)) % 256).to(torch.uint8).reshape(cshape)
        s = torch.full(sshape, byte, dtype=torch.uint8)
        al = torch.full(ashape, alpha, dtype=torch.float32)
        yield P.WeightRound(f"scale {alpha:.9g} with scale byte 0x{byte:02x} (chosen to separate "
                            f"scale-product orders)", c, s, al)


def _describe_weight(rnd, i, got, ref, h, cshape, K, transpose: bool = True) -> str:
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return f"{rnd.label}: output {got.dtype}{tuple(got.shape)} vs {ref.dtype}{tuple(ref.shape)}"
    idx = [int(t) for t in torch.unravel_index(torch.tensor(i), got.shape)]
    n, k = (idx[-1], idx[-2]) if transpose else (idx[-2], idx[-1])  # element (.., n, k) of the decode
    lead = tuple(idx[:-2])
    byte = rnd.codes[lead + (n, k * h.bits // 8)] if h.bits != 6 else None
    sc = rnd.scale[lead + (n, k // h.block)]
    al = ""
    if rnd.alpha is not None:
        a = rnd.alpha.reshape(-1)
        al = f", float scale {float(a[lead[0]] if a.numel() > 1 and lead else a[0]):.9g}"
    b = f"code byte 0x{int(byte):02x}, " if byte is not None else ""
    return (f"{rnd.label}: element [{', '.join(map(str, lead + (n, k)))}] with {b}scale byte "
            f"0x{int(sc):02x}{al}: graph {got.reshape(-1)[i].item()!r}, variant {ref.reshape(-1)[i].item()!r}")


def _choose(alive):
    """The variant to report when `alive` all agreed on every probe: a kernel-supported
    one if the supported ones share format and layout (they differ at most in how the
    scales are read, and computed the same values on the probes: the preferred reading,
    `WeightVariant.preference`), an unsupported one if none is supported, None if
    ambiguous."""
    supported = [v for v in alive if v.kernel_supported]
    if len({(v.fmt, v.kernel_key[1]) for v in supported}) > 1:  # different formats / layouts
        return None
    if supported:  # readers that agreed on every probe: the same function there
        return min(supported, key=lambda v: v.preference)
    return sorted(alive, key=lambda v: v.name)[0]


_KNOWN = ("its value", "constant input")


def _table_dependence(h: _Hyp, hyps: list) -> Optional[str]:
    """None unless the proof rests on a hypothesised table (a graph input whose values are
    unknown at compile time) and another hypothesis for it gives the cone other weights:
    then the run-time guard would fail for a model holding the other table (ModelOpt's
    E2M1 table has +0 where the formats' has -0), so neither is fused."""
    hyp_tables = {g.node: g for g in h.guards if g.what not in _KNOWN}
    if not hyp_tables:
        return None
    mine = None
    for h2 in hyps:
        if h2 is h or (h2.codes, h2.scale, h2.alpha) != (h.codes, h.scale, h.alpha):
            continue
        other = {g.node: g for g in h2.guards if g.node in hyp_tables and g.what != hyp_tables[g.node].what}
        if not other:
            continue
        if mine is None:
            mine = _coverage_output(h)
        theirs = _coverage_output(h2)
        if mine is None or theirs is None or first_difference(mine, theirs) is not None:
            node, g = next(iter(other.items()))
            return (f"the decode depends on the values of {node.name}, a graph input whose values are not known "
                    f"at compile time: the {hyp_tables[node].what} and the {g.what} both fit and give different "
                    f"weights (a run-time guard would fail for one of them)")
    return None


def _coverage_output(h: _Hyp):
    """The cone of `h` on every code byte under one normal scale byte (None if it does not run)."""
    cshape, sshape = list(h.cshape), list(h.sshape)
    lead = tuple(cshape[:-2])
    pl = make_plan(h.cone.nodes, h.cone.output, _factor_map(h, lead))
    new = {f"lead{i}": 1 for i in range(len(lead)) if pl.resizable(f"lead{i}")}
    rows = cshape[-2]
    if pl.resizable("rows"):
        rows = new["rows"] = -(-256 // cshape[-1])
    lead_n = [new.get(f"lead{i}", lead[i]) for i in range(len(lead))]
    c = (torch.arange(math.prod(lead_n) * rows * cshape[-1]) % 256).to(torch.uint8).reshape(lead_n + [rows, cshape[-1]])
    s = torch.full(lead_n + [rows, sshape[-1]], 0x38 if h.block == 16 else 127, dtype=torch.uint8)
    args = h.leaf_args(c, s)
    if h.alpha is not None:
        ashape = list(_shape(h.alpha))
        if math.prod(ashape) != 1:
            ashape[0] = lead_n[0]
            if len(ashape) >= 2 and ashape[1] != 1:
                ashape[1] = rows
        args.append(torch.full(ashape, 1.0, dtype=torch.float32))
    inputs = [h.codes, h.scale] + ([h.alpha] if h.alpha is not None else [])
    try:
        return evaluate(extract(h.cone, inputs, h.consts, pl, new), args)
    except Exception:  # the cone does not run under this binding
        return None


def recognize_weight_uncached(gemm: Node, cone: Cone, *, values=None, budget_bytes=DEFAULT_BUDGET_BYTES):
    """(verdict or Rejection); see `api.recognize_weight`."""
    _, w = operands(gemm)
    # small float graph inputs may be tables: their values are hypothesised and guarded
    tables = {n for n in cone.leaves if is_table_leaf(n)}
    const = constant_nodes(cone.nodes, tables)
    why = check_weight_cone(cone.nodes, const, cone.output)
    if why:
        return Rejection("weight", gemm, why)
    hyps, why = _hypotheses(gemm, cone, values)
    if why:
        return Rejection("weight", gemm, why)
    out_dtype = _val(w).dtype
    transpose = True  # [.., N, K] dequantized, fed as [.., K, N]
    ambiguous = None  # survivors of the first hypothesis whose survivors need different kernels
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
                why = _table_dependence(h, hyps)
                if why:
                    return Rejection("weight", gemm, why)
                return WeightVerdict(chosen, h.codes, h.scale, h.alpha if chosen.alpha_order != "none" else None,
                                     transpose, out_dtype, h.guards,
                                     tuple(v.name for v in alive if v is not chosen),
                                     tuple((v.name, t) for v, t in separated[:8]),
                                     kmajor=(h.kmajor(h.codes), h.kmajor(h.scale)))
            ambiguous = ambiguous or alive
        elif separated:
            if closest is None:
                closest = separated[-1]
    if ambiguous is not None:
        names = ", ".join(v.name for v in ambiguous[:6])
        return Rejection("weight", gemm, f"ambiguous: variants needing different kernels agree on every probe: {names}")
    if closest is not None:
        var, text = closest
        return Rejection("weight", gemm, f"no known weight decode matches; closest: {var.name}, "
                                         f"told apart by {text}")
    return Rejection("weight", gemm, errors[0] if errors else "no hypothesis could be evaluated")
