"""Activation side: prove that the tensor feeding a GEMM is a known fake-quantization of x.

1. The cone (`candidates.activation_cone`) and its structure (`structure.check_activation_cone`).
2. Which families to test, from the cone's reductions: last-dim reductions over 16 ->
   NVFP4, over 32 -> MX, over the whole tensor -> per-tensor fp8. Scalar leaves: at most
   one is the global (or static fp8) scale -- a graph input or a float32 scalar computed
   from one (1/input_scale) --, every other must have a known value (then guarded).
3. Rows are a factor: the cone is evaluated with as many probe rows as the probe blocks
   need (`resize`); per-tensor cones keep their real (hinted) shape. Each probe set of
   `probes` is run through the cone and every variant of the family; the first probe
   block that separates a variant from the cone is kept for explain().
4. A cone with no candidate global scale at all is also tested against the NVFP4 recipes
   at the constant global scale `UNIT_GLOBAL_SCALE` (1.0): single-level NVFP4 (torchao's
   nvfp4_quantize with per_tensor_scale=None, block scale e4m3(amax/6)) is a two-level
   recipe with g = 1, since multiplying or dividing by 1.0 is exact. The verdict then
   carries `global_value`, and the pass hands the fused op a constant 1.0 tensor.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.fx import Node

from ..formats import E2M1, E4M3, FORMATS, NVFP4_RECIPES, decode
from . import probes as P
from .candidates import ActCone, cut
from .compare import difference
from .extract import extract, real_mode
from .leaves import leaf_bindings
from .resize import plan as make_plan
from .shapes import concrete_shape
from .structure import check_activation_cone, constant_nodes, packet_name, value_preserving
from .variants import act_variants
from .verdict import ActVerdict, Rejection

__all__ = ["recognize_activation_uncached"]

#: The global scale an NVFP4 cone without one is tested with (step 4 above).
UNIT_GLOBAL_SCALE = 1.0

_RED = ("aten.amax", "aten.amin", "aten.max", "aten.min", "aten.sum", "aten.argmax", "aten.argmin")


def _val(n):
    return n.meta.get("val") if isinstance(n, Node) else None


def _shape(n):
    try:
        return concrete_shape(_val(n))
    except ValueError:
        return None


def _families(cone: ActCone) -> set:
    fams = set()
    for n in cone.nodes:
        if packet_name(n.target) not in _RED:
            continue
        v = _val(n.args[0])
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        if dims is None or (isinstance(dims, (list, tuple)) and not dims) or \
                (isinstance(v, torch.Tensor) and isinstance(dims, (list, tuple)) and len(dims) == v.dim()):
            fams.add("tensor")
        elif isinstance(v, torch.Tensor) and v.dim():
            size = v.shape[-1]
            if size in (16, 32):
                fams.add(int(size))
    return fams or {16, 32, "tensor"}


def _is_scalar_float(n) -> bool:
    v = _val(n)
    if not isinstance(v, torch.Tensor) or not v.is_floating_point():
        return False
    try:
        return int(v.numel()) == 1
    except Exception:
        return False


def _scalar_candidates(cone: ActCone, leaves: list) -> list:
    """Scalar float inputs, then float32 scalars computed from them and constants alone
    (1/input_scale, a product of two scales), nearest the inputs first."""
    out = list(leaves)
    derived = set(leaves)
    for n in cone.nodes:
        ins = n.all_input_nodes
        if ins and any(a in derived for a in ins) and all(a in derived or a.op == "get_attr" or (
                a.op == "call_function" and not any(x.op == "placeholder" for x in a.all_input_nodes)) for a in ins):
            derived.add(n)
            if _is_scalar_float(n) and _val(n).dtype == torch.float32 and not value_preserving(n):
                out.append(n)
    return out


class _Hyp:
    """scalar: the global-scale node (or None); const: the constant global value NVFP4
    variants are tested with when the cone has no scalar candidate (else None)."""

    def __init__(self, scalar, consts, guards, cone, const=None):
        self.scalar, self.consts, self.guards, self.cone = scalar, consts, guards, cone
        self.const = const


def _hypotheses(cone: ActCone, values) -> tuple[list, Optional[str]]:
    scalars, others, tables = [], [], []
    for leaf in cone.leaves[1:]:
        v = _val(leaf)
        if isinstance(v, (int, torch.SymInt, float, torch.SymFloat, bool)):
            continue
        if leaf.op == "get_attr":
            others.append(leaf)
        elif _is_scalar_float(leaf):
            scalars.append(leaf)
        elif isinstance(v, torch.Tensor) and v.dim() == 1 and v.is_floating_point():
            tables.append(leaf)
        else:
            others.append(leaf)
    hyps = []
    candidates = _scalar_candidates(cone, scalars)
    # no scalar that could be a global scale: NVFP4 variants are tried at g = 1 (cheap to
    # skip when there is one: its own hypotheses below cover two-level NVFP4)
    const = UNIT_GLOBAL_SCALE if not candidates else None
    for gs in [None] + candidates[::-1]:  # nearest its use first
        sub = cone
        if gs is not None and gs not in cone.leaves:
            c = cut(cone, [gs])
            sub = ActCone(c.nodes, [cone.x] + [x for x in c.leaves if x is not cone.x], cone.output,
                          x=cone.x, post=cone.post)
        bindings = leaf_bindings(sub.leaves[1:], skip=(gs,), tables=tables, values=values,
                                 wanted=lambda leaf: leaf in others or leaf in scalars)
        for c2, g2 in bindings or ():
            hyps.append(_Hyp(gs, c2, g2, sub, const if gs is None else None))
    if not hyps:
        return [], "the values of the cone's scalar inputs are unknown at compile time"
    return hyps, None


class _Evaluator:
    """The cone extracted once per probe shape."""

    def __init__(self, h: _Hyp, x: Node):
        self.h, self.x = h, x
        xs = _shape(x)
        self.lead, self.K = list(xs[:-1]), xs[-1]
        fmap = {x: {i: f"lead{i}" for i in range(len(self.lead))}}
        self.plan = make_plan(h.cone.nodes, h.cone.output, fmap)
        self.resizable = all(self.plan.resizable(f"lead{i}") for i in range(len(self.lead)))
        self._gms: dict = {}
        self.dtype = _val(x).dtype

    def _gm(self, lead):
        key = tuple(lead)
        if key not in self._gms:
            new = {f"lead{i}": s for i, s in enumerate(lead)} if self.resizable else None
            inputs = [self.x] + ([self.h.scalar] if self.h.scalar is not None else [])
            self._gms[key] = extract(self.h.cone, inputs, self.h.consts, self.plan, new)
        return self._gms[key]

    def layouts(self, nblocks: int, bs: int) -> list:
        """Shapes to lay `nblocks` probe blocks into: [(shape, blocks per evaluation)]."""
        per_row = self.K // bs
        if self.resizable:
            rows = -(-nblocks // per_row)
            lead = [1] * (len(self.lead) - 1) + [rows]
            return [lead + [self.K]]
        return [self.lead + [self.K]]

    def run(self, X: torch.Tensor, scalar: Optional[torch.Tensor]):
        gm = self._gm(list(X.shape[:-1]))
        args = [X] + ([scalar] if self.h.scalar is not None else [])
        return gm(*args)

    def scalar_tensor(self, value: float) -> torch.Tensor:
        if self.h.scalar is None:  # the constant hypothesis: what the fused op will be given
            return torch.tensor(value, dtype=torch.float32)
        v = _val(self.h.scalar)
        return torch.full(tuple(concrete_shape(v)), value, dtype=v.dtype)


def _lay(blocks: torch.Tensor, shape: list, bs: int) -> list:
    """Split probe blocks [B, bs] into tensors of `shape` (zero blocks pad the last)."""
    per = math.prod(shape) // bs
    out = []
    for i in range(0, blocks.shape[0], per):
        chunk = blocks[i:i + per]
        if chunk.shape[0] < per:
            chunk = torch.cat([chunk, chunk.new_zeros(per - chunk.shape[0], bs)])
        out.append((i, chunk.reshape(shape)))
    return out


def _describe(label: str, X: torch.Tensor, got, ref, i: int, bs: Optional[int]) -> str:
    return _describe_at(label, X, got, ref.reshape(-1)[i].item(), i, bs)


def _describe_at(label: str, X: torch.Tensor, got, ref_value, i: int, bs: Optional[int]) -> str:
    xf = X.reshape(-1)
    if bs:
        b = i // bs
        amax = xf[b * bs:(b + 1) * bs].float().abs().max().item()
        where = f"probe '{label}', element {i % bs} of its block (block amax {amax:.9g})"
    else:
        where = f"probe '{label}', element {i}"
    return (f"{where}: x = {xf[i].item()!r}, graph gives {got.reshape(-1)[i].item()!r}, "
            f"variant gives {float(ref_value)!r}")


def _test_family(ev: _Evaluator, fam, variants: list, separated: list) -> list:
    """Prune `variants` (one family) on its probe sets; returns survivors."""
    alive = list(variants)
    dtype = ev.dtype
    if fam == "tensor":
        shape = ev.lead + [ev.K]
        scalars = P.STATIC_FP8_SCALES if ev.h.scalar is not None else (None,)
        for sv in scalars:
            st = ev.scalar_tensor(sv) if sv is not None else None
            for ti, (label, X) in enumerate(P.fp8_tensors(shape, dtype)):
                got = ev.run(X, st)
                keep = []
                for var in alive:
                    ref = var.reference(X, st)
                    i, n = difference(got, ref)
                    if i is None:
                        keep.append(var)
                    else:
                        separated.append((var, _describe(label + (f" (scale {sv})" if sv else ""), X, got, ref, i, None),
                                          (-n, ti, i)))
                alive = keep
                if not alive:
                    return alive
        return alive
    bs = fam
    if ev.K % bs:
        for var in alive:
            separated.append((var, f"row length {ev.K} is not a multiple of the block size {bs}", (-(1 << 62), -1, -1)))
        return []
    if ev.h.scalar is not None or (ev.h.const is not None and all(v.kind == "nvfp4" for v in alive)):
        glist = P.GLOBAL_SCALES if ev.h.scalar is not None else (ev.h.const,)
        gsets = [(g, P.act_blocks(bs, dtype, [E2M1], global_scale=g)) for g in glist]
    else:
        elems = []
        for v in alive:
            el = FORMATS[v.fmt].element
            if el not in elems:
                elems.append(el)
        gsets = [(None, P.act_blocks(bs, dtype, elems))]
    for gi, (g, pb) in enumerate(gsets):
        st = ev.scalar_tensor(g) if g is not None else None
        for shape in ev.layouts(pb.blocks.shape[0], bs):
            for start, X in _lay(pb.blocks, shape, bs):
                got = ev.run(X, st)
                if len(alive) > 4 and X.shape[-2] >= 16:
                    # screen on every 8th row (rows are independent in block formats): most
                    # variants differ there, at an eighth of the cost
                    Xs, gs_ = X[..., ::8, :], got[..., ::8, :]
                    keep = []
                    for var in alive:
                        i, n = difference(gs_, var.reference(Xs, st))
                        if i is None:
                            keep.append(var)
                            continue
                        row, col = divmod(i, X.shape[-1])
                        i = row * 8 * X.shape[-1] + col  # the element's index in X
                        b = start + i // bs
                        label = (pb.labels[b] if b < len(pb.labels) else "padding") + \
                            (f", global scale {g:g}" if g is not None else "")
                        ref_el = var.reference(X[..., row * 8:row * 8 + 1, :], st).reshape(-1)[col].item()
                        separated.append((var, _describe_at(label, X, got, ref_el, i, bs), (-8 * n, gi, start + i)))
                    alive = keep
                keep = []
                for var in alive:
                    ref = var.reference(X, st)
                    i, n = difference(got, ref)
                    if i is None:
                        keep.append(var)
                        continue
                    b = start + i // bs
                    label = pb.labels[b] if b < len(pb.labels) else "padding"
                    if g is not None:
                        label += f", global scale {g:g}"
                    separated.append((var, _describe(label, X, got, ref, i, bs), (-n, gi, start + i)))
                alive = keep
                if not alive:
                    return alive
    return alive


def _same_at(g: float, a, b) -> bool:
    """NVFP4 variants `a` and `b` are the same function at the constant global scale g:
    the same rounding, the same block-scale and element-scaling formulas (the recipes share
    the functions), the same zero-sign rules, and dequantization products that agree on
    every (E2M1 value, E4M3 block scale) pair at g -- a finite domain, so this is a proof
    (torchao and torchao_moe at g = 1: v*(1*s) == (v*s)*1)."""
    if a.kind != "nvfp4" or b.kind != "nvfp4" or a.rounding != b.rounding:
        return False
    ra, rb = NVFP4_RECIPES[a.recipe], NVFP4_RECIPES[b.recipe]
    if ra.block_scale is not rb.block_scale or ra.scale_elements is not rb.scale_elements or \
            (ra.signed_zero, ra.negzero_decode) != (rb.signed_zero, rb.negzero_decode):
        return False
    v = decode(torch.arange(16, dtype=torch.uint8), E2M1).reshape(-1, 1)
    s = decode(torch.arange(256, dtype=torch.int32).to(torch.uint8), E4M3).reshape(1, -1)
    gt = torch.tensor(g, dtype=torch.float32)
    return difference(ra.dequant(v, s, gt), rb.dequant(v, s, gt))[0] is None


def _choose(alive, const=None):
    supported = [v for v in alive if v.kernel_supported]
    if const is not None and supported:
        # at a constant global scale, recipes that differ only where g != 1 are one function
        first = sorted(supported, key=lambda v: v.name)[0]
        if all(_same_at(const, first, v) for v in supported):
            return first
    if len({v.kernel_key for v in supported}) > 1:
        return None
    return sorted(alive, key=lambda v: (not v.kernel_supported, v.name))[0]


def recognize_activation_uncached(gemm: Node, cone: ActCone, *, values=None):
    # small float inputs (ModelOpt's E2M1 bounds) are tables: their values, known or
    # hypothesised, are bound and guarded by leaf_bindings like the weight side's
    const = constant_nodes(cone.nodes, {n for n in cone.leaves[1:] if n.op == "placeholder" and
                                        isinstance(_val(n), torch.Tensor) and _val(n).is_floating_point() and
                                        _val(n).dim() == 1 and (_shape(n) or (999,))[0] <= 256})
    why = check_activation_cone(cone.nodes, const)
    if why:
        return Rejection("activation", gemm, why)
    hyps, why = _hypotheses(cone, values)
    if why:
        return Rejection("activation", gemm, why)
    fams = _families(cone)
    all_vars = act_variants()
    closest = None
    ambiguous = None
    errors = []
    for h in hyps:
        ev = _Evaluator(h, cone.x)
        alive_all, separated = [], []
        try:
            with real_mode():
                for fam in sorted(fams, key=str):
                    vs = [v for v in all_vars if (v.needs_scalar == (h.scalar is not None) or
                                                  (h.const is not None and v.kind == "nvfp4")) and
                          (v.block == fam if fam != "tensor" else v.kind == "fp8_tensor")]
                    if vs:
                        alive_all += _test_family(ev, fam, vs, separated)
        except Exception as e:  # the cone does not run on the probe shapes
            errors.append(f"evaluating the cone failed: {type(e).__name__}: {e}")
            continue
        if alive_all:
            const = h.const if h.scalar is None else None
            chosen = _choose(alive_all, const)
            if chosen is not None:
                return ActVerdict(chosen, cone.x, h.scalar, cone.output, cone.post, h.guards,
                                  tuple(v.name for v in alive_all if v is not chosen),
                                  tuple((v.name, t) for v, t, _ in sorted(separated, key=lambda e: e[2])[-8:]),
                                  global_value=const if chosen.needs_scalar else None)
            ambiguous = ambiguous or alive_all
        elif separated and closest is None:
            # closest: fewest differing elements where it failed, then the latest first difference
            closest = max(separated, key=lambda e: e[2])[:2]
    if ambiguous:
        names = ", ".join(v.name for v in ambiguous[:6])
        return Rejection("activation", gemm, f"ambiguous: variants needing different kernels agree on every probe: {names}")
    if closest is not None:
        var, text = closest
        return Rejection("activation", gemm, f"no known activation quantization matches; closest: {var.name}, "
                                             f"told apart by {text}")
    return Rejection("activation", gemm, errors[0] if errors else "no hypothesis could be evaluated")
