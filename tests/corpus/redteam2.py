"""Red-team round 2 (issue 8): NVFP4 / MXFP4 emulation written by a session helper that
never read the recogniser, in spellings no other corpus module uses:

  * packed weights stored K-major ([K/2, N] codes, [K/32 or K/16, N] scales) and used as
    `x @ W[K, N]` (never transposed back), decoded by `torch.take`, LUT indexing or a 1-d
    `gather`, scales broadcast by `repeat_interleave`, `unflatten` or `expand + reshape`;
  * decode by `one_hot(codes, 16).float() @ LUT` (which reads code 0x8 as +0);
  * activation QDQ by a sum of step indicators, integer RNE on the fp32 bits, `floor(t + 1/2)`
    with an odd-tie fix, in bf16 with `torch.round` per binade, `vector_norm(ord=inf)` amax;
  * GEMMs by `torch.tensordot`, `(a.unsqueeze(-2) * w).sum(-1)`, `torch.mm` on flattened rows;
  * MoEs counting experts by `torch.bincount`, `F.one_hot(ids).sum(0)`, `index_add_`,
    dequantizing the whole stack then gathering `W[ids]`, and per-expert `torch.where` loops
    over `x.repeat_interleave(k)`; combines by `bmm` and `scatter_reduce`.

Each entry names the emu_inductor variant it computes; tests/test_corpus_eager.py checks
that bit for bit and tests/test_corpus_compile.py what torch.compile(backend="mxemu") fuses
(most are left out of that compile for CI time; `fused_today` records what a full compile
measured, docs/pending/redteam2 has the script).
"""
import torch, torch.nn as nn, torch.nn.functional as F
from emu_inductor.formats import quantize
from . import H, I, E, TOP_K, CorpusEntry, Variant, WeightVariant
from .data import gen, qtensor, tokens, weight, moe_weights
from .redteam_moe import RedTeamMoE, MXFP4_W4A4, NVFP4_W4A16

N = 2 * I
LUT16 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
MX_FLOOR = Variant(WeightVariant("mxfp4"), act={"fmt": "mxfp4", "scale_mode": "floor"})


def batch(seed, dtype):
    return tokens(seed, 6, H, dtype).reshape(2, 3, H)

# ---------------------------------------------------------------- A
class TakeTransposedMXFP4(nn.Module):
    """MXFP4 w-only. Bytes stored K-major [K/2, N] (+ scales [K/32, N]); nibbles interleaved
    along dim 0; torch.take on a 1-d LUT; scale broadcast by repeat_interleave(32, 0);
    x @ W[K, N] (never transposed back); exp2 scale (byte 255 -> inf)."""
    variant = Variant(WeightVariant("mxfp4", e8m0_byte255="inf"))

    def __init__(self, w):
        super().__init__()
        q = quantize(w, "mxfp4", scale_mode="floor")
        self.register_buffer("wt", q.qdata.t().contiguous())   # [K/2, N]
        self.register_buffer("st", q.scale.t().contiguous())   # [K/32, N]
        self.register_buffer("lut", torch.tensor(LUT16))

    def w_kn(self, dtype):
        p = self.wt
        codes = torch.stack([p & 15, p >> 4], dim=1).reshape(-1, p.shape[1])  # [K, N]
        v = torch.take(self.lut, codes.long())
        s = torch.exp2(self.st.float() - 127.0).repeat_interleave(32, dim=0)
        return (v * s).to(dtype)

    act_qdq = None

    def dequantized_weights(self, dtype=torch.bfloat16):
        return {"weight": self.w_kn(dtype).t()}

    def forward(self, x):
        return x @ self.w_kn(x.dtype)

    def emu_view(self):
        return {"weight": qtensor("mxfp4", self.wt.t(), self.st.t())}


def make_A(seed, dtype):
    return TakeTransposedMXFP4(weight(gen(seed), N, H, dtype=dtype)), (batch(seed, dtype),)

# ---------------------------------------------------------------- B
def mx_weight_std(mod, dtype):
    p = mod.qw
    codes = torch.stack([p & 15, p >> 4], -1).flatten(-2)
    v = torch.tensor(LUT16, device=p.device)[codes.long()].unflatten(-1, (-1, 32))
    s = torch.exp2(mod.qs.float() - 127.0)
    s = torch.where(mod.qs == 255, torch.full_like(s, float("nan")), s)
    return (v * s[..., None]).flatten(-2).to(dtype)


def staircase_e2m1(a):
    """RNE to the E2M1 magnitudes as a sum of step indicators (a in [0, 6])."""
    return (0.5 * (a > 0.25) + 0.5 * (a >= 0.75) + 0.5 * (a > 1.25) + 0.5 * (a >= 1.75)
            + 1.0 * (a > 2.5) + 1.0 * (a >= 3.5) + 2.0 * (a > 5.0))


class StaircaseMXFP4(nn.Module):
    """MXFP4 w4a4 floor. Block exponent from the int32 bit field of amax (>> 23, - 127 - 2),
    clamp, NaN for non-finite; scale torch.ldexp(1, e); E2M1 by a sum of step indicators;
    copysign; x * 2^-e; F.linear on 3-d input."""
    variant = MX_FLOOR

    def __init__(self, w):
        super().__init__()
        q = quantize(w, "mxfp4", scale_mode="floor")
        self.register_buffer("qw", q.qdata)
        self.register_buffer("qs", q.scale)

    def act_qdq(self, x):
        xb = x.float().unflatten(-1, (-1, 32))
        amax = xb.abs().amax(-1, keepdim=True)
        e = ((amax.view(torch.int32) >> 23) - 129).clamp(-127, 127)
        one = torch.ones_like(amax)
        scale = torch.ldexp(one, e)
        inv = torch.ldexp(one, -e)
        scale = torch.where(torch.isfinite(amax), scale, torch.full_like(scale, float("nan")))
        y = (xb * inv).clamp(-6.0, 6.0)
        q = torch.copysign(staircase_e2m1(y.abs()), y)
        return (q * scale).flatten(-2).to(x.dtype)

    def dequantized_weights(self, dtype=torch.bfloat16):
        return {"weight": mx_weight_std(self, dtype)}

    def forward(self, x):
        return F.linear(self.act_qdq(x), mx_weight_std(self, x.dtype))

    def emu_view(self):
        return {"weight": qtensor("mxfp4", self.qw, self.qs)}


def make_B(seed, dtype):
    return StaircaseMXFP4(weight(gen(seed), N, H, dtype=dtype)), (batch(seed, dtype),)

# ---------------------------------------------------------------- C
class BF16MXFP4(StaircaseMXFP4):
    """MXFP4 w4a4 floor with the QDQ in bf16 (no fp32 upcast of the elements): amax in bf16,
    floor(log2) of its fp32 value, scale cast to bf16, x / scale, torch.round(a*2)/2 per binade
    in bf16, q * scale in bf16; weights decoded from fp4 code bits placed in an e4m3 byte."""

    def act_qdq(self, x):
        xb = x.unflatten(-1, (-1, 32))
        amax = xb.abs().amax(-1, keepdim=True)
        e = (torch.floor(torch.log2(amax.float())) - 2.0).clamp(-127.0, 127.0)
        scale = torch.where(torch.isfinite(amax.float()), torch.exp2(e), float("nan")).to(x.dtype)
        a = (xb / scale).abs().clamp(max=6.0)
        r = torch.where(a < 2, torch.round(a * 2) / 2, torch.where(a < 4, torch.round(a), torch.round(a / 2) * 2))
        return (torch.copysign(r, xb / scale) * scale).flatten(-2)

    def w(self, dtype):
        p = self.qw
        c = torch.stack([p & 15, p >> 4], -1).flatten(-2).to(torch.int32)
        s, e, m = c >> 3, (c >> 1) & 3, c & 1
        mag_bits = torch.where(e > 0, ((e + 6) << 3) | (m << 2), torch.where(m == 1, 6 << 3, 0))
        v = ((s << 7) | mag_bits).to(torch.uint8).view(torch.float8_e4m3fn).float()
        sc = torch.exp2(self.qs.float() - 127.0)
        sc = torch.where(self.qs == 255, torch.full_like(sc, float("nan")), sc)
        return (v.unflatten(-1, (-1, 32)) * sc[..., None]).flatten(-2).to(dtype)

    def dequantized_weights(self, dtype=torch.bfloat16):
        return {"weight": self.w(dtype)}

    def forward(self, x):
        return torch.einsum("...k,nk->...n", self.act_qdq(x), self.w(x.dtype))


def make_C(seed, dtype):
    return BF16MXFP4(weight(gen(seed), N, H, dtype=dtype)), (batch(seed, dtype),)

# ---------------------------------------------------------------- D
def int_rne_e2m1(a):
    """a in [0, 6]: RNE to 1 mantissa bit by integer arithmetic on fp32 bits (a >= 1), torch.round(2a)/2 below."""
    bits = a.view(torch.int32)
    lsb = (bits >> 22) & 1
    hi = ((bits + 0x1FFFFF + lsb) & -0x400000).view(torch.float32)
    return torch.where(a < 1.0, torch.round(a * 2.0) * 0.5, hi)


class OneHotNVFP4(nn.Module):
    """NVFP4 w4a4 (vLLM recipe). Weights decoded by one_hot(codes, 16) @ LUT (a matmul decode),
    e4m3 via float8 buffer .float(), q * (s / g). Activations: blocks by reshape(..., -1, 16),
    amax by torch.linalg.vector_norm(ord=inf), s = e4m3(clamp(g * (amax * (1/6)))), y = x * (g/s)
    (0 if s == 0), E2M1 by integer RNE on the fp32 bits; F.linear on 3-d input."""
    variant = Variant(WeightVariant("nvfp4", "q*(s/g)", recipe="vllm", negzero="positive"),
                      act={"fmt": "nvfp4", "recipe": "vllm"}, act_global="static")

    def __init__(self, w, xc):
        super().__init__()
        wg = 448.0 * 6.0 / w.abs().amax().float()
        q = quantize(w, "nvfp4", recipe="vllm", global_scale=wg)
        self.register_buffer("qw", q.qdata)
        self.register_buffer("sw", q.scale)  # float8_e4m3fn
        self.register_buffer("wg", wg)
        self.register_buffer("xg", 448.0 * 6.0 / xc.abs().amax().float())
        self.register_buffer("lut", torch.tensor(LUT16).unsqueeze(1))  # [16, 1]

    def w(self, dtype):
        p = self.qw
        codes = torch.stack([p & 15, p >> 4], -1).flatten(-2).long()
        v = (F.one_hot(codes, 16).float() @ self.lut).squeeze(-1)
        return (v.unflatten(-1, (-1, 16)) * (self.sw.float() / self.wg)[..., None]).flatten(-2).to(dtype)

    def act_qdq(self, x):
        g = self.xg
        xb = x.float().reshape(*x.shape[:-1], -1, 16)
        amax = torch.linalg.vector_norm(xb, ord=float("inf"), dim=-1, keepdim=True)
        s = torch.clamp(g * (amax * (1.0 / 6.0)), -448.0, 448.0).to(torch.float8_e4m3fn).float()
        y = (xb * torch.where(s == 0, torch.zeros_like(s), g / s)).clamp(-6.0, 6.0)
        q = torch.copysign(int_rne_e2m1(y.abs()), y)
        return (q * (s / g)).reshape(x.shape).to(x.dtype)

    def dequantized_weights(self, dtype=torch.bfloat16):
        return {"weight": self.w(dtype)}

    def forward(self, x):
        return F.linear(self.act_qdq(x), self.w(x.dtype))

    def emu_view(self):
        return {"weight": qtensor("nvfp4", self.qw, self.sw, self.wg), "a1_global": self.xg}


def make_D(seed, dtype):
    g = gen(seed)
    return OneHotNVFP4(weight(g, N, H, dtype=dtype), tokens(seed + 50, 8, H, dtype)), (batch(seed, dtype),)

# ---------------------------------------------------------------- E
class KMajorNVFP4Wonly(nn.Module):
    """NVFP4 w-only, dequant direction alpha (vLLM dequantize_to_dtype: v * (s * alpha)).
    Packed K-major [K/2, N], scales [K/16, N]; codes via 1-d gather on the LUT, sign-free
    index; block scale broadcast via expand + reshape; torch.mm on x.reshape(-1, K)."""
    variant = Variant(WeightVariant("nvfp4", "q*(s*a)"))

    def __init__(self, w):
        super().__init__()
        alpha = w.abs().amax().float() / 2688.0
        q = quantize(w, "nvfp4", global_scale=1.0 / alpha)
        self.register_buffer("wt", q.qdata.t().contiguous())
        self.register_buffer("st", q.scale.t().contiguous())
        self.register_buffer("alpha", alpha)

    def w_kn(self, dtype):
        p = self.wt
        K2, Nn = p.shape
        codes = torch.stack([p & 15, p >> 4], dim=1).reshape(2 * K2, Nn).long()
        v = torch.tensor(LUT16, device=p.device).gather(0, codes.flatten()).view(2 * K2, Nn)
        s = (self.st.float() * self.alpha)[:, None, :].expand(-1, 16, -1).reshape(2 * K2, Nn)
        return (v * s).to(dtype)

    act_qdq = None

    def dequantized_weights(self, dtype=torch.bfloat16):
        return {"weight": self.w_kn(dtype).t()}

    def forward(self, x):
        return torch.mm(x.reshape(-1, x.shape[-1]), self.w_kn(x.dtype)).reshape(*x.shape[:-1], -1)

    def emu_view(self):
        return {"weight": qtensor("nvfp4", self.wt.t(), self.st.t(), self.alpha)}


def make_E(seed, dtype):
    return KMajorNVFP4Wonly(weight(gen(seed), N, H, dtype=dtype)), (batch(seed, dtype),)

# ---------------------------------------------------------------- H
def round_floor_tie(a):
    """E2M1 RNE by floor(t + 0.5) with explicit tie-to-even fix; step from clamp(floor(log2 a), 0, 2)."""
    step = torch.exp2(torch.clamp(torch.floor(torch.log2(a)), 0.0, 2.0) - 1.0)
    t = a / step
    f = torch.floor(t)
    r = t - f
    q = f + (r > 0.5).float() + ((r == 0.5) & (torch.remainder(f, 2.0) == 1.0)).float()
    return q * step


class FloorTieMXFP4(StaircaseMXFP4):
    """MXFP4 w4a4 floor: floor(log2(amax)) - 2 in fp32 with an isinf|isnan guard, x / 2^e,
    torch.clamp, floor(t + 1/2) with an explicit odd-tie fix; weights nibbles by cat + reshape +
    transpose interleave, torch.float_power (fp64) scale cast to fp32 (byte 255 -> inf); matmul."""
    variant = Variant(WeightVariant("mxfp4", e8m0_byte255="inf"), act={"fmt": "mxfp4", "scale_mode": "floor"})

    def act_qdq(self, x):
        xb = x.float().unflatten(-1, (-1, 32))
        amax = xb.abs().amax(-1, keepdim=True)
        e = torch.clamp(torch.floor(torch.log2(amax)) - 2.0, -127.0, 127.0)
        scale = torch.where(amax.isinf() | amax.isnan(), torch.full_like(amax, float("nan")), torch.exp2(e))
        y = torch.clamp(xb / scale, -6.0, 6.0)
        return (torch.copysign(round_floor_tie(y.abs()), y) * scale).flatten(-2).to(x.dtype)

    def w(self, dtype):
        p = self.qw
        Nn, K2 = p.shape
        codes = torch.cat([torch.remainder(p, 16), torch.bitwise_right_shift(p, 4)], -1)
        codes = codes.reshape(Nn, 2, K2).transpose(1, 2).reshape(Nn, 2 * K2)
        v = torch.tensor(LUT16, device=p.device)[codes.long()]
        sc = torch.float_power(2.0, self.qs.double() - 127.0).float()
        return (v.view(Nn, -1, 32) * sc.unsqueeze(-1)).view(Nn, -1).to(dtype)

    def dequantized_weights(self, dtype=torch.bfloat16):
        return {"weight": self.w(dtype)}

    def forward(self, x):
        return torch.matmul(self.act_qdq(x), self.w(x.dtype).t())


def make_H(seed, dtype):
    return FloorTieMXFP4(weight(gen(seed), N, H, dtype=dtype)), (batch(seed, dtype),)

# ---------------------------------------------------------------- F (MoE)
class BincountBmmMoE(RedTeamMoE):
    """MXFP4 w4a4 MoE: argsort(stable) of flat ids, counts by torch.bincount(minlength=E) +
    cumsum -> int32 offs, x.repeat_interleave(k)[order], torch._grouped_mm, gate/up by slicing,
    un-permute by index_put into an empty buffer, combine torch.bmm(w[T,1,k], y[T,k,H]) in fp32."""
    variant = MXFP4_W4A4

    @staticmethod
    def counts(flat):
        """Rows per expert (the spelling F2 / F3 change)."""
        return torch.bincount(flat, minlength=E)

    def forward(self, x):
        T = x.shape[0]
        w, ids = self.route(x)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        offs = torch.cumsum(self.counts(flat), 0).to(torch.int32)
        rows = x.repeat_interleave(TOP_K, dim=0)[order]
        w13 = self.deq("w13", x.dtype)
        w2 = self.deq("w2", x.dtype)
        c1 = torch._grouped_mm(self.act_qdq(rows), w13.transpose(-2, -1), offs=offs)
        h = F.silu(c1[:, :I]) * c1[:, I:]
        c3 = torch._grouped_mm(self.act_qdq(h), w2.transpose(-2, -1), offs=offs)
        y = torch.empty_like(c3)
        y[order] = c3
        out = torch.bmm(w.float().unsqueeze(1), y.view(T, TOP_K, -1).float()).squeeze(1)
        return out.to(x.dtype)


# ---------------------------------------------------------------- G (MoE)
class GatherDequantEinsumMoE(RedTeamMoE):
    """NVFP4 w4a16 MoE: the whole stack dequantized, then W[ids] gathered per (token, slot)
    ([T, k, N, K]); GEMMs by einsum('th,tknh->tkn'); combine by scatter_reduce over a flat
    token index in fp32."""
    fmt = "nvfp4"
    variant = NVFP4_W4A16

    def forward(self, x):
        T = x.shape[0]
        w, ids = self.route(x)
        W13 = self.deq("w13", x.dtype)[ids]  # [T, k, 2I, H]
        W2 = self.deq("w2", x.dtype)[ids]    # [T, k, H, I]
        c1 = torch.einsum("th,tknh->tkn", x, W13)
        h = F.silu(c1[..., :I]) * c1[..., I:]
        c3 = torch.einsum("tki,tkhi->tkh", h, W2)
        contrib = (c3.float() * w.float().unsqueeze(-1)).reshape(T * TOP_K, -1)
        idx = torch.arange(T, device=x.device).repeat_interleave(TOP_K)[:, None].expand(-1, contrib.shape[-1])
        out = torch.zeros(T, contrib.shape[-1], dtype=torch.float32, device=x.device)
        out = out.scatter_reduce(0, idx, contrib, reduce="sum")
        return out.to(x.dtype)

    act_qdq = None


def make_moe(cls):
    def make(seed, dtype):
        g = gen(seed)
        return cls(*moe_weights(g, E, H, I, dtype)), (tokens(seed, 4, H, dtype),)
    return make


# ---------------------------------------------------------------- J: one-hot einsum dispatch MoE
class OneHotEinsumMoE(RedTeamMoE):
    """MXFP4 w4a4 MoE: one-hot [T*k, E] dispatch mask; per-expert python loop computes only
    the rows whose mask is set by torch.where(mask[:, e:e+1], a @ W_e.T, acc) (no nonzero);
    combine via (w.view(T,1,k) @ y.view(T,k,H)) in fp32."""
    variant = MXFP4_W4A4

    def forward(self, x):
        T = x.shape[0]
        w, ids = self.route(x)
        onehot = F.one_hot(ids.reshape(-1), E).bool()
        rows = x.repeat_interleave(TOP_K, dim=0)
        a1 = self.act_qdq(rows)
        c1 = torch.zeros(rows.shape[0], 2 * I, dtype=x.dtype, device=x.device)
        for e in range(E):
            c1 = torch.where(onehot[:, e:e + 1], a1 @ self.deq("w13", x.dtype, e).t(), c1)
        a2 = self.act_qdq(F.silu(c1[:, :I]) * c1[:, I:])
        c3 = torch.zeros(rows.shape[0], H, dtype=x.dtype, device=x.device)
        for e in range(E):
            c3 = torch.where(onehot[:, e:e + 1], a2 @ self.deq("w2", x.dtype, e).t(), c3)
        return (w.float().view(T, 1, TOP_K) @ c3.float().view(T, TOP_K, H)).view(T, H).to(x.dtype)


LAYERS = {
    "A_take_kmajor_mx_wonly": make_A,
    "B_staircase_intbits_mx": make_B,
    "C_bf16_qdq_e4m3bits_mx": make_C,
    "D_onehot_int_rne_nvfp4": make_D,
    "E_kmajor_gather1d_nvfp4_wonly": make_E,
    "H_floortie_floatpower_mx": make_H,
    "F_bincount_bmm_moe": make_moe(BincountBmmMoE),
    "G_gather_dequant_einsum_moe": make_moe(GatherDequantEinsumMoE),
    "J_onehot_where_loop_moe": make_moe(OneHotEinsumMoE),
}


# ---------------------------------------------------------------- A2/A3: isolate A's miss
class TakeNMajorRepeatMXFP4(TakeTransposedMXFP4):
    """A with standard N-major packing [N, K/2]: torch.take decode + repeat_interleave(32) scale, x @ W.t()."""

    def w_kn(self, dtype):
        p = self.wt.t()  # [N, K/2] view
        codes = torch.stack([p & 15, p >> 4], dim=-1).reshape(p.shape[0], -1)
        v = torch.take(self.lut, codes.long())
        s = torch.exp2(self.st.t().float() - 127.0).repeat_interleave(32, dim=-1)
        return (v * s).to(dtype).t()


class KMajorUnflattenMXFP4(TakeTransposedMXFP4):
    """A's K-major packing [K/2, N], but LUT indexing and an unflatten-broadcast scale."""

    def w_kn(self, dtype):
        p = self.wt
        codes = torch.stack([p & 15, p >> 4], dim=1).reshape(-1, p.shape[1])  # [K, N]
        v = self.lut[codes.long()].unflatten(0, (-1, 32))  # [K/32, 32, N]
        s = torch.exp2(self.st.float() - 127.0).unsqueeze(1)
        return (v * s).flatten(0, 1).to(dtype)


LAYERS["A2_take_repeat_nmajor_mx_wonly"] = lambda seed, dtype: (TakeNMajorRepeatMXFP4(weight(gen(seed), N, H, dtype=dtype)), (batch(seed, dtype),))
LAYERS["A3_kmajor_lut_unflatten_mx_wonly"] = lambda seed, dtype: (KMajorUnflattenMXFP4(weight(gen(seed), N, H, dtype=dtype)), (batch(seed, dtype),))


# ---------------------------------------------------------------- K/L/O: GEMM / weight-dtype respellings on B's (fused) QDQ
class TensordotMXFP4(StaircaseMXFP4):
    """B's QDQ and weights, GEMM by torch.tensordot(a, w, dims=([-1], [1]))."""

    def forward(self, x):
        return torch.tensordot(self.act_qdq(x), mx_weight_std(self, x.dtype), dims=([x.dim() - 1], [1]))


class MulSumMXFP4(StaircaseMXFP4):
    """B's QDQ and weights, GEMM as (a.unsqueeze(-2) * w).sum(-1) in fp32, cast back."""

    def forward(self, x):
        a = self.act_qdq(x).float().unsqueeze(-2)
        return (a * mx_weight_std(self, x.dtype).float()).sum(-1).to(x.dtype)


class Bf16ScaleProductMXFP4(StaircaseMXFP4):
    """B's QDQ; weights: LUT values and the E8M0 scale each cast to bf16, product in bf16
    (exact: 2 significant bits x power of two); byte 255 -> exp2(128) = inf."""
    variant = Variant(WeightVariant("mxfp4", e8m0_byte255="inf"), act={"fmt": "mxfp4", "scale_mode": "floor"})

    def w(self, dtype):
        p = self.qw
        codes = torch.stack([p & 15, p >> 4], -1).flatten(-2)
        v = torch.tensor(LUT16, device=p.device)[codes.long()].to(dtype).unflatten(-1, (-1, 32))
        s = torch.exp2(self.qs.float() - 127.0).to(dtype)
        return (v * s[..., None]).flatten(-2)

    def dequantized_weights(self, dtype=torch.bfloat16):
        return {"weight": self.w(dtype)}

    def forward(self, x):
        return F.linear(self.act_qdq(x), self.w(x.dtype))


for _n, _c in (("K_tensordot_gemm_mx", TensordotMXFP4), ("L_mulsum_gemm_mx", MulSumMXFP4),
               ("O_bf16_scale_product_mx", Bf16ScaleProductMXFP4)):
    LAYERS[_n] = (lambda c: lambda seed, dtype: (c(weight(gen(seed), N, H, dtype=dtype)), (batch(seed, dtype),)))(_c)


class OneHotNVFP4LutWeights(OneHotNVFP4):
    """D's activation QDQ (vector_norm amax, integer-bit RNE) with an ordinary LUT weight decode."""
    variant = Variant(WeightVariant("nvfp4", "q*(s/g)", recipe="vllm"), act={"fmt": "nvfp4", "recipe": "vllm"},
                      act_global="static")  # the table's entry 8 is -0.0: code 0x8 reads as -0

    def w(self, dtype):
        p = self.qw
        codes = torch.stack([p & 15, p >> 4], -1).flatten(-2).long()
        v = self.lut.squeeze(1)[codes]
        return (v.unflatten(-1, (-1, 16)) * (self.sw.float() / self.wg)[..., None]).flatten(-2).to(dtype)


LAYERS["D2_vecnorm_int_rne_nvfp4_lutw"] = lambda seed, dtype: (OneHotNVFP4LutWeights(weight(gen(seed), N, H, dtype=dtype), tokens(seed + 50, 8, H, dtype)), (batch(seed, dtype),))


class TakeUnflattenMXFP4(TakeTransposedMXFP4):
    """N-major; torch.take decode; scale by unflatten broadcast (isolates torch.take)."""

    def w_kn(self, dtype):
        p = self.wt.t()
        codes = torch.stack([p & 15, p >> 4], dim=-1).reshape(p.shape[0], -1)
        v = torch.take(self.lut, codes.long()).unflatten(-1, (-1, 32))
        s = torch.exp2(self.st.t().float() - 127.0).unsqueeze(-1)
        return (v * s).flatten(-2).to(dtype).t()


class LutRepeatMXFP4(TakeTransposedMXFP4):
    """N-major; lut[codes] decode; scale by repeat_interleave(32, -1) (isolates repeat_interleave)."""

    def w_kn(self, dtype):
        p = self.wt.t()
        codes = torch.stack([p & 15, p >> 4], dim=-1).reshape(p.shape[0], -1)
        v = self.lut[codes.long()]
        s = torch.exp2(self.st.t().float() - 127.0).repeat_interleave(32, dim=-1)
        return (v * s).to(dtype).t()


LAYERS["A4_take_unflatten_mx_wonly"] = lambda seed, dtype: (TakeUnflattenMXFP4(weight(gen(seed), N, H, dtype=dtype)), (batch(seed, dtype),))
LAYERS["A5_lut_repeat_mx_wonly"] = lambda seed, dtype: (LutRepeatMXFP4(weight(gen(seed), N, H, dtype=dtype)), (batch(seed, dtype),))


class NMajorTakeRepeatMXFP4(TakeTransposedMXFP4):
    """Contiguous N-major buffers [N, K/2] / [N, K/32]; torch.take decode; repeat_interleave scale."""

    def __init__(self, w):
        super().__init__(w)
        self.wt = self.wt.t().contiguous()  # now [N, K/2]
        self.st = self.st.t().contiguous()

    def w_kn(self, dtype):
        p = self.wt
        codes = torch.stack([p & 15, p >> 4], dim=-1).reshape(p.shape[0], -1)
        v = torch.take(self.lut, codes.long())
        s = torch.exp2(self.st.float() - 127.0).repeat_interleave(32, dim=-1)
        return (v * s).to(dtype).t()

    def emu_view(self):
        return {"weight": qtensor("mxfp4", self.wt, self.st)}


LAYERS["A6_nmajor_take_repeat_mx_wonly"] = lambda seed, dtype: (NMajorTakeRepeatMXFP4(weight(gen(seed), N, H, dtype=dtype)), (batch(seed, dtype),))


class OneHotCountBmmMoE(BincountBmmMoE):
    """F with the counts by F.one_hot(flat, E).sum(0) instead of torch.bincount (no graph break)."""

    @staticmethod
    def counts(flat):
        return F.one_hot(flat, E).sum(0)


LAYERS["F2_onehot_count_bmm_moe"] = make_moe(OneHotCountBmmMoE)


class EqMaskWhereLoopMoE(RedTeamMoE):
    """J with the mask (ids.reshape(-1) == e)[:, None] instead of one_hot(...)[:, e:e+1]; bmm combine kept."""
    variant = MXFP4_W4A4

    def forward(self, x):
        T = x.shape[0]
        w, ids = self.route(x)
        flat = ids.reshape(-1)
        rows = x.repeat_interleave(TOP_K, dim=0)
        a1 = self.act_qdq(rows)
        c1 = torch.zeros(rows.shape[0], 2 * I, dtype=x.dtype, device=x.device)
        for e in range(E):
            c1 = torch.where((flat == e).unsqueeze(-1), a1 @ self.deq("w13", x.dtype, e).t(), c1)
        a2 = self.act_qdq(F.silu(c1[:, :I]) * c1[:, I:])
        c3 = torch.zeros(rows.shape[0], H, dtype=x.dtype, device=x.device)
        for e in range(E):
            c3 = torch.where((flat == e).unsqueeze(-1), a2 @ self.deq("w2", x.dtype, e).t(), c3)
        return (w.float().view(T, 1, TOP_K) @ c3.float().view(T, TOP_K, H)).view(T, H).to(x.dtype)


LAYERS["J2_eqmask_where_loop_bmm_moe"] = make_moe(EqMaskWhereLoopMoE)


class IndexAddCountBmmMoE(BincountBmmMoE):
    """F2 with counts by zeros(E).index_add_(0, flat, ones) (isolates one_hot counting)."""

    @staticmethod
    def counts(flat):
        return torch.zeros(E, dtype=torch.int64, device=flat.device).index_add_(0, flat, torch.ones_like(flat))


LAYERS["F3_indexadd_count_bmm_moe"] = make_moe(IndexAddCountBmmMoE)


# ---------------------------------------------------------------- the registry entries
_SRC = "written here (red team round 2, issue 8): "
_NOT = ("left out of the compile test for CI time; measured 2026-12-03 with docs/pending/redteam2/compile_one.py "
        "(TRITON_INTERPRET=1)")


def _entry(name, kind, make, what, fused, smoke=False, expect=True, **kw):
    m, _ = make(1, torch.bfloat16)
    return CorpusEntry(f"rt2_{name}", kind, "red-team", _SRC + what, m.variant, make, expect_fused=expect,
                       compile_smoke=smoke, compile_note="" if smoke else _NOT, fused_today=fused, **kw)


_KM = "one mxemu::linear (weight-only); K-major leaves read transposed (tests/test_recognize_kmajor.py)"
_LIN = "one mxemu::linear with the activation QDQ"
ENTRIES = [
    _entry("A_take_kmajor_mx_wonly", "linear", make_A, TakeTransposedMXFP4.__doc__, _KM),
    _entry("A2_take_repeat_nmajor_mx_wonly", "linear", LAYERS["A2_take_repeat_nmajor_mx_wonly"],
           TakeNMajorRepeatMXFP4.__doc__, _KM),
    _entry("A3_kmajor_lut_unflatten_mx_wonly", "linear", LAYERS["A3_kmajor_lut_unflatten_mx_wonly"],
           KMajorUnflattenMXFP4.__doc__, _KM),
    _entry("A4_take_unflatten_mx_wonly", "linear", LAYERS["A4_take_unflatten_mx_wonly"],
           TakeUnflattenMXFP4.__doc__, _KM),
    _entry("A5_lut_repeat_mx_wonly", "linear", LAYERS["A5_lut_repeat_mx_wonly"], LutRepeatMXFP4.__doc__, _KM),
    _entry("A6_nmajor_take_repeat_mx_wonly", "linear", LAYERS["A6_nmajor_take_repeat_mx_wonly"],
           NMajorTakeRepeatMXFP4.__doc__, "one mxemu::linear (weight-only)"),
    _entry("E_kmajor_gather1d_nvfp4_wonly", "linear", make_E, KMajorNVFP4Wonly.__doc__, _KM, exact_gemm=False),
    _entry("B_staircase_intbits_mx", "linear", make_B, StaircaseMXFP4.__doc__, _LIN),
    _entry("C_bf16_qdq_e4m3bits_mx", "linear", make_C, BF16MXFP4.__doc__, _LIN),
    _entry("D_onehot_int_rne_nvfp4", "linear", make_D, OneHotNVFP4.__doc__,
           _LIN + "; the one-hot product is a table look-up (tests/test_recognize_onehot.py); it reads "
           "code 0x8 as +0 (-0 * 1 plus +0 terms), the variant says so"),
    _entry("D2_vecnorm_int_rne_nvfp4_lutw", "linear", LAYERS["D2_vecnorm_int_rne_nvfp4_lutw"],
           OneHotNVFP4LutWeights.__doc__, _LIN),
    _entry("H_floortie_floatpower_mx", "linear", make_H, FloorTieMXFP4.__doc__, _LIN),
    _entry("K_tensordot_gemm_mx", "linear", LAYERS["K_tensordot_gemm_mx"], TensordotMXFP4.__doc__, _LIN),
    _entry("O_bf16_scale_product_mx", "linear", LAYERS["O_bf16_scale_product_mx"], Bf16ScaleProductMXFP4.__doc__,
           _LIN),
    _entry("L_mulsum_gemm_mx", "linear", LAYERS["L_mulsum_gemm_mx"], MulSumMXFP4.__doc__,
           "nothing: no candidate subgraphs (a GEMM written as a broadcast product summed over K is not a GEMM "
           "candidate)", expect=False, exact_gemm=False),
    _entry("F_bincount_bmm_moe", "moe", LAYERS["F_bincount_bmm_moe"], BincountBmmMoE.__doc__,
           "Dynamo graph break at torch.bincount (data-dependent output shape); with "
           "torch._dynamo.config.capture_dynamic_output_shape_ops = True: one mxemu::moe", expect=False),
    _entry("F2_onehot_count_bmm_moe", "moe", LAYERS["F2_onehot_count_bmm_moe"], OneHotCountBmmMoE.__doc__,
           "one mxemu::moe (F.one_hot's bounds assertions are checks, not uses of the MoE's nodes)", smoke=True),
    _entry("F3_indexadd_count_bmm_moe", "moe", LAYERS["F3_indexadd_count_bmm_moe"], IndexAddCountBmmMoE.__doc__,
           "one mxemu::moe"),
    _entry("G_gather_dequant_einsum_moe", "moe", LAYERS["G_gather_dequant_einsum_moe"],
           GatherDequantEinsumMoE.__doc__, "nothing: the weight cone of deq(stack)[ids] holds the router "
           "(decode-then-gather is not moved to gather-then-decode)", expect=False),
    _entry("J_onehot_where_loop_moe", "moe", LAYERS["J_onehot_where_loop_moe"], OneHotEinsumMoE.__doc__,
           "the per-expert GEMMs as two mxemu::grouped_mm; not one mxemu::moe (dense torch.where loop: the "
           "routing selects rows after the GEMMs)", expect=False),
    _entry("J2_eqmask_where_loop_bmm_moe", "moe", LAYERS["J2_eqmask_where_loop_bmm_moe"],
           EqMaskWhereLoopMoE.__doc__, "two mxemu::grouped_mm; not one mxemu::moe (as J)", expect=False),
]
