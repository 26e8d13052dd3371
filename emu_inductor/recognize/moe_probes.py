"""Probe data and the reference for an MoE body with its GEMMs replaced by probes.

The GEMMs' operands are proven on their own (the weight and activation recognisers);
what `recognize_moe` proves here is everything around them: which rows each expert gets,
how the outputs come back to their (token, slot) and how they are weighted and summed.
For that each grouped GEMM is replaced by a *probe GEMM*: a row-wise function of the row
and of its expert (row r of group e gives `dtype((fp32(a[r, j % K]) * s[j]) * c_e + b_e)`,
a random column scale, random per-expert scale and shift). It is exact, row-independent and expert-dependent, so a row
sent to the wrong expert, combined into the wrong token or slot, weighted with the wrong
weight or rounded at another point gives other bits. Rows past the last group end get
NaN (a body that reads them is wrong). The same probe GEMMs run inside the reference
(`reference_moe`): mxemu::moe's semantics (emu_inductor.reference.moe_emulated) with
every (token, slot) row given to its expert directly.

Combine orders: mxemu::moe sums the k weighted fp32 products of a token and rounds once.
`index_add_` / `scatter_add_` into fp32 zeros add them one by one from +0 in the order
of the sorted rows (by expert, then slot); `view(T, k, H) * w` summed adds them as
`torch.sum` does. These are the same sum up to fp32 reassociation (the accumulation
contract the GEMMs already have) and, for an all-zero sum, the sign of zero; each is a
named variant (`COMBINE_ORDERS`) and the body must equal one of them bit for bit.
A combine written as a GEMM over the k slots (`torch.bmm(w[:, None], y.view(T, k, H))`,
`einsum("tk,tkh->th")`, `matmul`) has no order of its own: the BLAS that runs it picks one
(blocked, FMA), and it differs between CPU and GPU and with the shapes. The last variant,
"fp32", accepts any fp32 sum: every value must be the output-dtype rounding of some s within
the fp32 accumulation-order bound of the exact sum (|s - S| <= (k + 1) 2^-24 sum|p_j|), the
contract the fused GEMMs have. A sum rounded per slot, or in bf16, lies far outside it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.fx import Graph, GraphModule

from ..reference.activations import ACTIVATIONS, is_gated
from .shapes import hint

__all__ = ["COMBINE_ORDERS", "Fp32Sum", "ProbeGemm", "routing_probes", "activation_probes", "activation_routings",
           "reference_moe", "extract_with_gemms", "activation_width"]

#: name -> what it sums like
COMBINE_ORDERS = {
    "sum": "torch.sum over the k slots (emu_inductor.reference.moe_emulated)",
    "experts": "one by one from +0 in (expert, slot) order (index_add_ / scatter_add_ over expert-sorted rows)",
    "slots": "one by one from +0 in slot order",
    "fp32": "in fp32 in an order of its own (a GEMM over the k slots), within fp32 accumulation rounding",
}


class Fp32Sum:
    """The "fp32" combine variant's reference: the exact sum S (fp64) of the weighted
    products and the fp32 accumulation-order bound; a value y agrees when it is the
    output-dtype rounding of some s in [S - bound, S + bound] (rounding is monotone, so:
    dtype(S - bound) <= y <= dtype(S + bound))."""

    def __init__(self, c3: torch.Tensor, w: torch.Tensor, dtype: torch.dtype):
        p = c3.double() * w.double().unsqueeze(-1)  # exact: a 16-bit by 24-bit product
        k = p.shape[1]
        self.value = p.sum(dim=1)
        bound = (k + 1) * 2.0 ** -24 * p.abs().sum(dim=1)
        self.lo = (self.value - bound).to(dtype)
        self.hi = (self.value + bound).to(dtype)
        self.dtype = dtype

    def numel(self) -> int:
        return self.value.numel()

    def difference(self, y: torch.Tensor) -> tuple:
        """(flat index of the first value outside the bound or None, how many are)."""
        if tuple(y.shape) != tuple(self.value.shape) or y.dtype != self.dtype:
            return 0, max(y.numel(), self.value.numel())
        ok = (y >= self.lo) & (y <= self.hi)  # NaN fails
        bad = torch.nonzero(~ok.reshape(-1))
        return (int(bad[0, 0]) if bad.numel() else None), int(bad.shape[0])


class ProbeGemm:
    """A grouped GEMM stand-in: row r of expert e ->
    dtype((fp32(a[r, j % K]) * s[j]) * c[e] + b[e]) (a column scale, an expert scale and
    shift: elementwise passes only, so a probe costs little even at 16k rows x 1.5k); an
    output narrower than the input adds the further columns in (0.75 a[r, j + n], ...), so
    every input column reaches the output."""

    def __init__(self, experts: int, n_out: int, gen: torch.Generator):
        self.col = torch.randn(n_out, generator=gen) * 2.0
        self.scale = torch.randn(experts, generator=gen) + 2.0 * torch.randint(0, 2, (experts,), generator=gen) - 1.0
        self.shift = torch.randn(experts, generator=gen)
        self.experts = experts
        self.fold = True

    @classmethod
    def identity(cls, experts: int, n_out: int) -> "ProbeGemm":
        """Row r -> dtype(a[r, j % K]): carries GEMM1 outputs / activations through unchanged."""
        g = cls.__new__(cls)
        g.col, g.scale, g.shift, g.experts = torch.ones(n_out), torch.ones(experts), torch.zeros(experts), experts
        g.fold = False  # a pure copy: the 16-bit patterns reach the activation as they are
        return g

    def rows(self, a: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        n, K = self.col.shape[0], a.shape[-1]
        if n > K:
            a = a.repeat(1, -(-n // K))[:, :n]  # column j reads a[:, j % K]
        y = a[:, :n].float()
        for start in range(n, K if self.fold else n, n):  # narrower output: every input column still counts
            y[:, :min(n, K - start)] += a[:, start:start + n].float() * 0.75
        e = expert.clamp(0, self.experts - 1)
        y.mul_(self.col).mul_(self.scale[e].unsqueeze(-1)).add_(self.shift[e].unsqueeze(-1))
        y[(expert < 0) | (expert >= self.experts)] = float("nan")
        return y.to(a.dtype)

    def grouped(self, a: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        r = torch.arange(a.shape[0])
        return self.rows(a, torch.searchsorted(offs.long().contiguous(), r, right=True))


def _distinct_ids(T: int, k: int, pool: int, gen: torch.Generator) -> torch.Tensor:
    """[T, k] ids, k distinct experts of range(pool) per token (what top-k gives)."""
    return torch.stack([torch.randperm(pool, generator=gen)[:k] for _ in range(T)])


def routing_probes(T: int, H: int, k: int, experts: int, x_dtype, w_dtype, ids_dtype, gen: torch.Generator,
                   distinct: bool = False):
    """[(what, hidden, topk_ids, topk_weights)]: repeated experts in a token, empty
    experts, every token on one expert, distinct experts per token, zero weights.

    `distinct`: the graph's ids are a top-k's indices, so a token never meets one expert
    twice; every probe routing is then one top-k can give (distinct experts per token, an
    empty expert, every token on the last k experts), and a body that relies on distinct
    ids (a token mask per expert, its weight summed over the slots) can be proven."""
    out = []
    if distinct and k <= experts:
        def add(what, ids, scale=1.0, zero_weights=False):
            w = torch.rand(T, k, generator=gen) + 0.05
            if zero_weights:
                w[0] = 0.0
                w[-1, 0] = 0.0
            x = torch.randn(T, H, generator=gen) * scale
            out.append((what, x.to(x_dtype), ids.to(ids_dtype), w.to(w_dtype)))

        add("distinct experts per token (top-k), zero weights", _distinct_ids(T, k, experts, gen), zero_weights=True)
        if experts > k:
            skip = experts // 2
            ids = _distinct_ids(T, k, experts - 1, gen)
            add(f"distinct experts per token, expert {skip} empty", ids + (ids >= skip).to(ids.dtype))
        add(f"every token on the last {k} experts", experts - k + _distinct_ids(T, k, k, gen), scale=8.0)
        return out

    def add(what, ids, scale=1.0, zero_weights=False):
        w = torch.rand(T, k, generator=gen) + 0.05
        if zero_weights:  # a token whose weights are all zero: the sign of a zero sum
            w[0] = 0.0
            w[-1, 0] = 0.0
        x = torch.randn(T, H, generator=gen) * scale
        out.append((what, x.to(x_dtype), ids.to(ids_dtype), w.to(w_dtype)))

    add("random ids (experts repeat within tokens), zero weights", torch.randint(0, experts, (T, k), generator=gen),
        zero_weights=True)
    if experts > 1:
        skip = experts // 2
        ids = torch.randint(0, experts - 1, (T, k), generator=gen)
        add(f"expert {skip} empty", ids + (ids >= skip).to(ids.dtype))
        if k <= experts:
            perm = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(T)])
            add("distinct experts per token (top-k)", perm, scale=0.25)
    add("every row on the last expert", torch.full((T, k), experts - 1), scale=8.0)
    return out


def activation_routings(T: int, H: int, k: int, experts: int, x_dtype, w_dtype, ids_dtype,
                        gen: torch.Generator, distinct: bool = False) -> list:
    """[(what, hidden, topk_ids, topk_weights)] for proving the activation inside the body
    (with identity probe GEMMs): hidden states holding every 16-bit pattern of the dtype,
    random data at many magnitudes and specials; slot 0 weighted 1, the others 0 (so the
    k-sum order cannot matter)."""
    w = torch.zeros(T, k)
    w[:, 0] = 1.0
    out = []
    for i, x in enumerate(_batches(_activation_values(x_dtype, gen), T, H)):
        ids = (_distinct_ids(T, k, experts, gen) if distinct and k <= experts
               else torch.randint(0, experts, (T, k), generator=gen))
        out.append((f"activation values {i}", x, ids.to(ids_dtype), w.to(w_dtype)))
    return out


_RANDOM_PER_MAGNITUDE = 8192


def _activation_values(dtype, gen: torch.Generator) -> torch.Tensor:
    vals = []
    if dtype in (torch.bfloat16, torch.float16):
        every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
        vals += [every, every[torch.randperm(every.numel(), generator=gen)]]  # each pattern beside others
    for e in range(-24, 12, 3):
        vals.append((torch.randn(_RANDOM_PER_MAGNITUDE, generator=gen) * 2.0 ** e).to(dtype))
    sp = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 7.0, -7.0, 6.9999, 1e-30, -1e-30])
    vals.append(sp.to(dtype))
    return torch.cat(vals)


def _batches(flat: torch.Tensor, rows: int, cols: int) -> list:
    """`flat` as [rows, cols] batches; the last one filled up by repeating the values."""
    n = rows * cols
    pad = (-flat.numel()) % n
    if pad:
        flat = torch.cat([flat, flat.repeat(-(-pad // flat.numel()))[:pad]])
    return list(flat.reshape(-1, rows, cols))


def activation_probes(rows: int, cols: int, dtype, gen: torch.Generator) -> list:
    """Batches [rows, cols] of GEMM1 outputs: every 16-bit pattern of the dtype (twice, the
    second time shuffled, so both halves of a gated input see each), random data at many
    magnitudes and specials."""
    return _batches(_activation_values(dtype, gen), rows, cols)


def reference_moe(x, ids, w, activation: str, g1: ProbeGemm, g2: ProbeGemm, orders=tuple(COMBINE_ORDERS)) -> dict:
    """{k-sum order: mxemu::moe's result} with probe GEMMs (orders from COMBINE_ORDERS)."""
    T, k = ids.shape
    key = ids.reshape(-1).long()
    rows = x.repeat_interleave(k, dim=0)
    c2 = ACTIVATIONS[activation](g1.rows(rows, key))
    c3 = g2.rows(c2, key)
    p = c3.reshape(T, k, -1).float() * w.float().unsqueeze(-1)
    out = {}
    for order in orders:
        if order == "fp32":
            out[order] = Fp32Sum(c3.reshape(T, k, -1), w, x.dtype)
            continue
        if order == "sum":
            out[order] = p.sum(dim=1).to(x.dtype)
            continue
        q = p
        if order == "experts":
            perm = torch.sort(ids.long(), dim=1, stable=True).indices
            q = p.gather(1, perm.unsqueeze(-1).expand_as(p))
        s = torch.zeros_like(p[:, 0])
        for j in range(k):
            s = s + q[:, j]
        out[order] = s.to(x.dtype)
    return out


def activation_width(activation: str, n1: int) -> int:
    return n1 // 2 if is_gated(activation) else n1


def extract_with_gemms(region, inputs: list, gemms: dict) -> GraphModule:
    """GraphModule computing `region.output` from placeholders for `inputs`; each node in
    `gemms` ({node: (rows node, ends node, fn)}) becomes a call of fn(rows, ends). SymInt
    arguments take their hint, `device=` the CPU; get_attr leaves are copied in."""
    from .extract import attr_value

    g = Graph()
    root = torch.nn.Module()
    env: dict = {}
    for i, leaf in enumerate(inputs):
        env[leaf] = g.placeholder(f"in{i}_{leaf.name}")
    for leaf in region.leaves:
        if leaf in env:
            continue
        if leaf.op == "get_attr":
            v = attr_value(leaf)
            if v is None:
                raise ValueError(f"attribute {leaf.target} is not readable")
            name = f"attr_{len(env)}"
            root.register_buffer(name, v.detach().to("cpu"))
            env[leaf] = g.get_attr(name)
        else:
            env[leaf] = _concrete(leaf.meta.get("val"))

    def remap(a):
        if isinstance(a, torch.fx.Node):
            if a in env:
                return env[a]
            raise ValueError(f"{a.name} is used by the region but is not part of it")
        return _concrete(a)

    fns: dict[str, Callable] = {}
    for n in region.nodes:
        if n in gemms:
            rows, ends, fn = gemms[n]
            name = f"probe_gemm_{len(fns)}"
            fns[name] = fn
            env[n] = g.call_function(fn, (env[rows], env[ends]))
            continue
        args = tuple(torch.fx.node.map_aggregate(list(n.args), remap))
        kwargs = dict(torch.fx.node.map_aggregate(dict(n.kwargs), remap))
        if "device" in kwargs:
            kwargs["device"] = torch.device("cpu")
        if "pin_memory" in kwargs:
            kwargs["pin_memory"] = False
        env[n] = g.call_function(n.target, args, kwargs)
    g.output(env[region.output])
    return GraphModule(root, g)


def _concrete(a):
    if isinstance(a, torch.SymInt):
        return hint(a)
    if isinstance(a, torch.SymFloat):
        return float(a.node.hint)
    if isinstance(a, torch.SymBool):
        return bool(a.node.hint)
    if isinstance(a, torch.device):
        return torch.device("cpu")
    return a
