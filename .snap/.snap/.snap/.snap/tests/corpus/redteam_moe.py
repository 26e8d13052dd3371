"""Red-team MoE layers (issue 8 item 3): MXFP4 / NVFP4 MoE emulation written the way a user
who never read this repository writes it, in routing / GEMM / combine structures no other
corpus file uses. The quantization helpers are written once here from the OCP MX and NVFP4
descriptions (E2M1 grid by torch.round on the step size, `2 ** (e - 127)` E8M0 reader,
`floor(log2(amax)) - 2` block exponent with a NaN scale for non-finite blocks, an 8-entry
magnitude table + sign bit for the codes); the stored bytes come from emu_inductor's
quantizer (only the bytes matter to the layer)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from emu_inductor.formats import quantize

from . import E, H, I, TOP_K, CorpusEntry, Variant, WeightVariant
from .data import gen, moe_weights, qtensor, tokens

FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

# --- the user's quantization helpers -----------------------------------------------------


def fp4_codes_to_float(packed: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] (element 2j in the low nibble) -> fp32 [..., K]."""
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)
    mag = table[(codes & 0x7).long()]
    return torch.where((codes & 0x8) != 0, -mag, mag)


def mxfp4_dequant(packed, scales, table, dtype):
    """[.., N, K/2] codes + [.., N, K/32] E8M0 bytes -> [.., N, K] in dtype."""
    v = fp4_codes_to_float(packed, table)
    v = v.unflatten(-1, (-1, 32)) * (2.0 ** (scales.float() - 127.0)).unsqueeze(-1)
    return v.flatten(-2).to(dtype)


def nvfp4_dequant(packed, scales, alpha, table, dtype):
    """[.., N, K/2] codes + [.., N, K/16] e4m3 scales, fp32 alpha (dequant direction, one per
    expert, broadcastable) -> [.., N, K] in dtype, as (s * alpha) * v in fp32."""
    v = fp4_codes_to_float(packed, table)
    return (v.unflatten(-1, (-1, 16)) * (scales.float() * alpha).unsqueeze(-1)).flatten(-2).to(dtype)


def round_to_e2m1(y: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value, ties to even, saturating at 6 (torch.round is half-to-even)."""
    a = y.abs().clamp(max=6.0)
    step = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0))
    return torch.copysign(torch.round(a / step) * step, y)


def mxfp4_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """OCP MX: shared exponent floor(log2(amax)) - emax(E2M1 = 2), E8M0-clamped; NaN scale for a
    block holding NaN/Inf."""
    xb = x.float().unflatten(-1, (-1, 32))
    amax = xb.abs().amax(dim=-1, keepdim=True)
    e = (torch.floor(torch.log2(amax)) - 2.0).clamp(-127.0, 127.0)
    scale = torch.where(torch.isfinite(amax), 2.0 ** e, float("nan"))
    return (round_to_e2m1(xb / scale) * scale).flatten(-2).to(x.dtype)


_GATE_THEN_UP = torch.cat([torch.arange(0, 2 * I, 2), torch.arange(1, 2 * I, 2)])

MXFP4_W4A4 = Variant(WeightVariant("mxfp4", e8m0_byte255="inf"), act={"fmt": "mxfp4", "scale_mode": "floor"})
NVFP4_W4A16 = Variant(WeightVariant("nvfp4", "q*(s*a)"))


class RedTeamMoE(nn.Module):
    """Holds the packed experts and the router; subclasses write forward (and route)."""

    fmt = "mxfp4"
    split_gate_up = False  # gate and up stored as two [E, I, H] tensors
    interleaved = False  # w13 rows alternate gate j, up j (gpt-oss's layout)

    def __init__(self, router, w13, w2):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False, dtype=router.dtype)
        self.gate.weight.data.copy_(router)
        self.register_buffer("fp4_table", torch.tensor(FP4_MAGNITUDES))
        if self.interleaved:
            w13 = torch.stack([w13[:, :I], w13[:, I:]], dim=2).reshape(E, 2 * I, H)
        parts = {"w_gate": w13[:, :I], "w_up": w13[:, I:]} if self.split_gate_up else {"w13": w13}
        parts["w2"] = w2
        for name, w in parts.items():
            if self.fmt == "mxfp4":
                q = quantize(w, "mxfp4", scale_mode="floor")
                self.register_buffer(name, q.qdata)
                self.register_buffer(name + "_scale", q.scale)
            else:
                gs = 2688.0 / w.float().abs().amax(dim=(1, 2))
                qs = [quantize(w[e], "nvfp4", global_scale=gs[e]) for e in range(E)]
                self.register_buffer(name, torch.stack([q.qdata for q in qs]))
                self.register_buffer(name + "_scale", torch.stack([q.scale for q in qs]))
                self.register_buffer(name + "_alpha", 1.0 / gs)

    # routing: softmax over all experts, top-k, renormalised (subclasses vary it)
    def route(self, x):
        w, ids = torch.topk(torch.softmax(self.gate(x).float(), dim=-1), TOP_K, dim=-1)
        return w / w.sum(dim=-1, keepdim=True), ids

    def act_qdq(self, x):
        return mxfp4_fake_quant(x)

    def deq(self, name, dtype, e=None):
        """The whole stack (e None) or expert e, [.., N, K]."""
        sel = (lambda t: t) if e is None else (lambda t: t[e])
        if self.fmt == "mxfp4":
            return mxfp4_dequant(sel(getattr(self, name)), sel(getattr(self, name + "_scale")), self.fp4_table, dtype)
        alpha = getattr(self, name + "_alpha")
        alpha = alpha[:, None, None] if e is None else alpha[e]
        return nvfp4_dequant(sel(getattr(self, name)), sel(getattr(self, name + "_scale")), alpha,
                             self.fp4_table, dtype)

    def dequantized_weights(self, dtype=torch.bfloat16):
        w13 = (torch.cat([self.deq("w_gate", dtype), self.deq("w_up", dtype)], dim=1) if self.split_gate_up
               else self.deq("w13", dtype))
        if self.interleaved:
            w13 = w13[:, _GATE_THEN_UP.to(w13.device)]
        return {"w13": w13, "w2": self.deq("w2", dtype)}

    def emu_view(self):
        names = (("w_gate", "w_up"), ("w2",)) if self.split_gate_up else (("w13",), ("w2",))
        out = {}
        for key, group in zip(("w13", "w2"), names):
            q = torch.cat([getattr(self, n) for n in group], dim=1)
            s = torch.cat([getattr(self, n + "_scale") for n in group], dim=1)
            if self.interleaved and key == "w13":
                q, s = q[:, _GATE_THEN_UP.to(q.device)], s[:, _GATE_THEN_UP.to(q.device)]
            out[key] = qtensor(self.fmt, q, s, getattr(self, group[0] + "_alpha", None))
        return out


# --- 1. sort + searchsorted group ends, split(), scatter_add_ combine ----------------------


class SortSearchsortedMoE(RedTeamMoE):
    def forward(self, x):
        T = x.shape[0]
        w, ids = self.route(x)
        sorted_ids, order = torch.sort(ids.flatten(), stable=True)
        ends = torch.searchsorted(sorted_ids, torch.arange(E, device=x.device), right=True).to(torch.int32)
        tok = order // TOP_K
        h = torch._grouped_mm(self.act_qdq(x[tok]), self.deq("w13", x.dtype).mT, offs=ends)
        gate, up = h.split(I, dim=-1)
        y = torch._grouped_mm(self.act_qdq(F.silu(gate) * up), self.deq("w2", x.dtype).mT, offs=ends)
        out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
        out.scatter_add_(0, tok[:, None].expand(-1, H), y.float() * w.flatten()[order, None])
        return out.to(x.dtype)


class BucketizeScatterReduceMoE(RedTeamMoE):
    """Routing without renormalisation (softmax, top-k: Qwen2-MoE norm_topk_prob=False), ends by torch.bucketize of
    the expert ids against the sorted ids, rows x[tok], fp32 combine by scatter_reduce_(sum)."""

    def route(self, x):
        return torch.topk(torch.softmax(self.gate(x), dim=-1, dtype=torch.float32), TOP_K, dim=-1)

    def forward(self, x):
        T = x.shape[0]
        w, ids = self.route(x)
        sorted_ids, order = ids.flatten().sort(stable=True)
        ends = torch.bucketize(torch.arange(E, device=x.device), sorted_ids, right=True).to(torch.int32)
        tok = order // TOP_K
        h = torch._grouped_mm(self.act_qdq(x[tok]), self.deq("w13", x.dtype).mT, offs=ends)
        y = torch._grouped_mm(self.act_qdq(F.silu(h[:, :I]) * h[:, I:]), self.deq("w2", x.dtype).mT, offs=ends)
        out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
        out.scatter_reduce_(0, tok[:, None].expand(-1, H), y.float() * w.flatten()[order, None], reduce="sum")
        return out.to(x.dtype)


# --- 1b. index_put accumulate counts, index_select rows, interleaved gate/up, index_copy_ back,
# einsum combine


class InterleavedIndexCopyMoE(RedTeamMoE):
    interleaved = True

    def forward(self, x):
        T = x.shape[0]
        w, ids = self.route(x)
        flat = ids.flatten()
        order = flat.argsort(stable=True)
        counts = torch.zeros(E, dtype=torch.long, device=x.device).index_put_((flat,), torch.ones_like(flat),
                                                                             accumulate=True)
        ends = counts.cumsum(0).to(torch.int32)
        rows = self.act_qdq(x.index_select(0, order // TOP_K))
        h = torch._grouped_mm(rows, self.deq("w13", x.dtype).mT, offs=ends)
        gate, up = h.unflatten(-1, (I, 2)).unbind(-1)
        y = torch._grouped_mm(self.act_qdq(F.silu(gate) * up), self.deq("w2", x.dtype).mT, offs=ends)
        y = torch.empty_like(y).index_copy_(0, order, y)  # back to (token, slot) order
        return torch.einsum("tkh,tk->th", y.view(T, TOP_K, H).float(), w).to(x.dtype)


# --- 2. histc counts, separate gate / up experts (three grouped GEMMs), unpermute + view-sum


class HistcSeparateGateUpMoE(RedTeamMoE):
    split_gate_up = True

    def route(self, x):  # Mixtral: top-k of the logits, softmax over the k
        logits, ids = torch.topk(self.gate(x).float(), TOP_K, dim=-1)
        return torch.softmax(logits, dim=-1), ids

    def forward(self, x):
        T = x.shape[0]
        w, ids = self.route(x)
        flat = ids.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.histc(flat.float(), bins=E, min=0, max=E - 1)
        ends = counts.cumsum(0).to(torch.int32)
        rows = self.act_qdq(x.unsqueeze(1).expand(T, TOP_K, H).reshape(-1, H)[order])
        g = torch._grouped_mm(rows, self.deq("w_gate", x.dtype).mT, offs=ends)
        u = torch._grouped_mm(rows, self.deq("w_up", x.dtype).mT, offs=ends)
        y = torch._grouped_mm(self.act_qdq(F.silu(g) * u), self.deq("w2", x.dtype).mT, offs=ends)
        y = y[torch.argsort(order)]
        return (y.view(T, TOP_K, H).float() * w[..., None]).sum(dim=1).to(x.dtype)


# --- 3. per-expert Python loop, rows by torch.where(ids == e), weights decoded per expert ----


class PerExpertDecodeLoopMoE(RedTeamMoE):
    """NVFP4 weight-only (w4a16): each expert's packed bytes decoded inside the loop."""

    fmt = "nvfp4"
    act_qdq = None  # weight-only (the corpus contract)

    def forward(self, x):
        w, ids = self.route(x)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in range(E):
            tok, slot = torch.where(ids == e)
            h = x[tok] @ self.deq("w13", x.dtype, e).t()
            h = F.silu(h[:, :I]) * h[:, I:]
            y = h @ self.deq("w2", x.dtype, e).t()
            out.index_add_(0, tok, y.float() * w[tok, slot].unsqueeze(-1))
        return out.to(x.dtype)


# --- 4. per-expert loop over a token mask, the router weight summed over the slots ---------


class TokenMaskLoopMoE(RedTeamMoE):
    """DeepSeek-style: tokens that chose expert e (mask.any over the k slots), their weight
    (w * (ids == e)).sum(-1); stacks decoded once; output accumulated in fp32."""

    def forward(self, x):
        w, ids = self.route(x)
        w13, w2 = self.deq("w13", x.dtype), self.deq("w2", x.dtype)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in range(E):
            hit = ids == e
            tok = hit.any(dim=-1).nonzero().squeeze(-1)
            we = (w * hit).sum(dim=-1)[tok]
            h = F.linear(self.act_qdq(x[tok]), w13[e])
            y = F.linear(self.act_qdq(F.silu(h[:, :I]) * h[:, I:]), w2[e])
            out.index_add_(0, tok, y.float() * we[:, None])
        return out.to(x.dtype)


class TokenMaskDecodeLoopMoE(TokenMaskLoopMoE):
    """The token-mask loop over NVFP4 experts (weight-only), each expert's bytes decoded in the loop."""

    fmt = "nvfp4"
    act_qdq = None  # weight-only (the corpus contract)

    def forward(self, x):
        w, ids = self.route(x)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in range(E):
            hit = ids == e
            tok = hit.any(dim=-1).nonzero().squeeze(-1)
            we = (w * hit).sum(dim=-1)[tok]
            h = F.linear(x[tok], self.deq("w13", x.dtype, e))
            y = F.linear(F.silu(h[:, :I]) * h[:, I:], self.deq("w2", x.dtype, e))
            out.index_add_(0, tok, y.float() * we[:, None])
        return out.to(x.dtype)


# --- 5. codes gathered per routed row, then decoded, then bmm ------------------------------


class GatherCodesBmmMoE(RedTeamMoE):
    """Each routed row's expert bytes gathered (self.w13[ids]) and decoded after the gather;
    torch.bmm over the T*k rows; per-slot outputs scaled and summed in fp32."""

    def forward(self, x):
        T = x.shape[0]
        w, ids = self.route(x)
        flat = ids.flatten()
        rows = self.act_qdq(x.repeat_interleave(TOP_K, dim=0))
        w13 = mxfp4_dequant(self.w13[flat], self.w13_scale[flat], self.fp4_table, x.dtype)  # [T*k, 2I, H]
        h = torch.bmm(rows.unsqueeze(1), w13.transpose(1, 2)).squeeze(1)
        gate, up = h.chunk(2, dim=-1)
        w2 = mxfp4_dequant(self.w2[flat], self.w2_scale[flat], self.fp4_table, x.dtype)
        y = torch.bmm(self.act_qdq(F.silu(gate) * up).unsqueeze(1), w2.transpose(1, 2)).squeeze(1)
        return (y.float().view(T, TOP_K, H) * w.unsqueeze(-1)).sum(1).to(x.dtype)


# --- 6. dense: every token through every expert, a [T, E] gate matrix ----------------------


class DenseEinsumMoE(RedTeamMoE):
    """All experts on all tokens by einsum; weights scattered into a dense [T, E] matrix (zero
    for experts not chosen) and contracted over E in fp32. Not mxemu::moe's function: a
    non-finite output of an unchosen expert times 0 is NaN."""

    def forward(self, x):
        w, ids = self.route(x)
        dense_w = torch.zeros(x.shape[0], E, dtype=torch.float32, device=x.device).scatter(1, ids, w)
        xq = self.act_qdq(x)
        h = torch.einsum("th,enh->etn", xq, self.deq("w13", x.dtype))
        y = torch.einsum("eti,ehi->eth", self.act_qdq(F.silu(h[..., :I]) * h[..., I:]), self.deq("w2", x.dtype))
        return torch.einsum("eth,te->th", y.float(), dense_w).to(x.dtype)


# --- 7. capacity dispatch (GShard / Switch style): expert-major [E, C, H] buffer, dense bmm ----


class CapacityDispatchMoE(RedTeamMoE):
    """Routed rows written into an expert-major [E, C, H] buffer (C = T*k: nothing dropped) at
    their position within the expert (one-hot cumsum), dense bmm per expert, rows read back
    from (expert, position), view(T, k, H) weighted fp32 sum."""

    def forward(self, x):
        T = x.shape[0]
        C = T * TOP_K
        w, ids = self.route(x)
        flat = ids.flatten()
        onehot = F.one_hot(flat, E)
        pos = ((onehot.cumsum(0) - 1) * onehot).sum(-1)
        buf = x.new_zeros(E, C, H)
        buf[flat, pos] = x.repeat_interleave(TOP_K, dim=0)
        h = torch.bmm(self.act_qdq(buf), self.deq("w13", x.dtype).mT)
        y = torch.bmm(self.act_qdq(F.silu(h[..., :I]) * h[..., I:]), self.deq("w2", x.dtype).mT)
        return (y[flat, pos].view(T, TOP_K, H).float() * w[..., None]).sum(1).to(x.dtype)


def _make(cls):
    def make(seed, dtype):
        g = gen(seed)
        return cls(*moe_weights(g, E, H, I, dtype)), (tokens(seed, 5, H, dtype),)
    return make


def _moe(name, cls, variant, plumbing, **kw):
    what = cls.__doc__.split("\n")[0] if cls.__doc__ else plumbing
    return CorpusEntry(f"redteam_{name}", "moe", "redteam", f"written here (red team): {what}", variant, _make(cls),
                       plumbing=plumbing, **kw)


#: Dynamo's default config skips a forward whose loop holds nonzero() / torch.where(mask): with
#: these flags (docs/backend.md) the loop is one graph; tests/test_recognize_moe_redteam.py
#: compiles the loop entries with them
LOOP_NOTE = ("default config: frame skipped (nonzero() / torch.where(mask) in a loop over experts: data-dependent "
             "shape); with torch._dynamo.config.patch(capture_scalar_outputs=True, "
             "capture_dynamic_output_shape_ops=True): ")

ENTRIES = [
    _moe("sort_searchsorted_moe", SortSearchsortedMoE, MXFP4_W4A4,
         "sort + searchsorted(right) ends, x[order // k], _grouped_mm, split(I), scatter_add_ fp32",
         expect_fused=True, compile_smoke=False,
         compile_note="not smoke-compiled (~20 s; its routing is the titan entry's with other spellings)",
         fused_today="one mxemu::moe (semantic + semantic_moe), bit-identical to eager"),
    _moe("bucketize_scatter_reduce_moe", BucketizeScatterReduceMoE, MXFP4_W4A4,
         "softmax, top-k without renormalisation; sort + bucketize(arange(E), sorted, right) ends; x[order // k]; "
         "scatter_reduce_(sum) fp32", expect_fused=True, compile_smoke=False,
         compile_note="not smoke-compiled (~20 s)", fused_today="one mxemu::moe (no change needed), bit-identical"),
    _moe("interleaved_index_copy_moe", InterleavedIndexCopyMoE, MXFP4_W4A4,
         "argsort + index_put_(accumulate) counts/cumsum, index_select rows, interleaved gate/up by "
         "unflatten(I, 2).unbind, index_copy_ back to slot order, einsum('tkh,tk->th') fp32",
         expect_fused=True, compile_smoke=False, compile_note="not smoke-compiled (~25-45 s)",
         fused_today="one mxemu::moe (silu_interleaved; the einsum k-sum proven as torch.sum), bit-identical"),
    _moe("histc_split_gate_up_moe", HistcSeparateGateUpMoE, MXFP4_W4A4,
         "topk logits then softmax; argsort + histc counts/cumsum; gate and up as two _grouped_mm; "
         "unpermute by argsort(order); view(T,k,H) weighted fp32 sum",
         expect_fused=False,
         fused_today="default: three mxemu::grouped_mm (semantic); semantic_gate_up leaves gate and up apart "
                     "(merging copies both packed stacks on every call). With the option "
                     "semantic_gate_up.merge=True: one mxemu::moe (the stacks concatenated along N, then "
                     "semantic_moe; tests/test_recognize_moe_redteam.py); before the red team: three grouped "
                     "GEMMs, 'reads the graph input ... which is not hidden states or routing'"),
    _moe("per_expert_decode_loop_moe", PerExpertDecodeLoopMoE, NVFP4_W4A16,
         "loop over range(E): torch.where(ids == e), decode w[e] in the loop, @, index_add_ fp32",
         compile_smoke=False, compile_note=LOOP_NOTE + "one mxemu::moe",
         fused_today="default config: nothing (frame skipped). With the capture flags: one mxemu::moe (each "
                     "expert's decode proven once with select(P, 0, e) as its leaves -> 8 mxemu::linear -> "
                     "semantic_group -> semantic_loop_moe); before: 'no leaf looks like packed codes'"),
    _moe("token_mask_decode_loop_moe", TokenMaskDecodeLoopMoE, NVFP4_W4A16,
         "loop over range(E): (ids == e).any(-1).nonzero(), weight (w * (ids == e)).sum(-1), decode w[e] in the "
         "loop, F.linear, index_add_ fp32",
         compile_smoke=False, compile_note=LOOP_NOTE + "one mxemu::moe (tests/test_recognize_moe_redteam.py)",
         fused_today="default config: nothing. With the capture flags: one mxemu::moe"),
    _moe("token_mask_loop_moe", TokenMaskLoopMoE, MXFP4_W4A4,
         "loop over range(E): (ids == e).any(-1).nonzero(), weight (w * (ids == e)).sum(-1), F.linear, "
         "index_add_ fp32",
         compile_smoke=False, compile_note=LOOP_NOTE + "one mxemu::moe",
         fused_today="default config: nothing. With the capture flags: one mxemu::moe (router weights: the first "
                     "[T, k] candidate whose body is closed; ids from aten.topk probed with distinct experts per "
                     "token); before: two mxemu::grouped_mm, 'reads the graph input (router weight)', then "
                     "'probe routing ... ids [1, 1]: graph gives inf, mxemu::moe gives nan'"),
    _moe("gather_codes_bmm_moe", GatherCodesBmmMoE, MXFP4_W4A4,
         "codes and scales gathered per routed row, decoded after the gather, bmm, view(T,k,H) fp32 sum",
         expect_fused=True,
         fused_today="one mxemu::moe: the gathered bytes w13[ids] are the weight cone's leaves (semantic_bmm's "
                     "dense form over T*k one-row groups, fused by semantic), semantic_regather turns each "
                     "grouped GEMM over gathered bytes into one over the stacks with rows sorted by expert, then "
                     "semantic_moe. Before: nothing, 'weight cone contains aten.mm' (the router behind the ids)"),
    _moe("capacity_dispatch_moe", CapacityDispatchMoE, MXFP4_W4A4,
         "one-hot cumsum positions, index_put into [E, C, H], dense bmm per expert, y[ids, pos], view-sum fp32",
         compile_smoke=False, compile_note="~50 s compile",
         fused_today="two mxemu::grouped_mm with the QDQ (semantic_bmm dense: E groups of C = T*k rows, the "
                     "padding included); no mxemu::moe and no record from semantic_moe: the group ends are an "
                     "arange, not computed from the ids, so the pair is not an MoE's to it (the layer IS "
                     "mxemu::moe's function: padded rows are never read back)"),
    _moe("dense_einsum_moe", DenseEinsumMoE, MXFP4_W4A4,
         "every expert on every token by einsum; dense [T, E] weights from scatter; einsum over E in fp32",
         compile_smoke=False, compile_note="~30 s compile",
         fused_today="two mxemu::grouped_mm (semantic_bmm dense + semantic, with the activation QDQ); not one "
                     "mxemu::moe: no top-k ids behind the GEMMs, and it is not mxemu::moe's function (an "
                     "unchosen expert's non-finite output times its zero weight is NaN)"),
]
