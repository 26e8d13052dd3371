"""Interchangeable spellings of the pieces of an MXFP4 emulation, as users write them.

Each slot (unpack, decode, weight-scale decode, activation scale exponent, scale apply,
E2M1 rounding) has several spellings that are the same function (bit for bit on the domain
stated) and, for the near misses, some that are not. `SpelledMXLinear` assembles one from
a choice per slot; tests/corpus/respellings.py and near_misses.py register them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from emu_inductor.formats import quantize

from .data import qtensor

E2M1_MAG = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
E2M1_ALL = E2M1_MAG + [-v for v in E2M1_MAG]
EMAX = 2

# --- unpack: uint8 [..., K/2] -> codes [..., K] ---------------------------------------


def unpack_stack(p):
    return torch.stack([p & 0x0F, p >> 4], dim=-1).flatten(-2)


def unpack_strided(p):
    out = torch.empty(*p.shape[:-1], p.shape[-1] * 2, dtype=torch.uint8, device=p.device)
    out[..., 0::2] = p & 0x0F
    out[..., 1::2] = (p >> 4) & 0x0F
    return out


def unpack_repeat_shift(p):
    r = p.repeat_interleave(2, dim=-1).to(torch.int32)
    shift = (torch.arange(r.shape[-1], device=p.device) % 2) * 4
    return ((r >> shift) & 0xF).to(torch.uint8)


def unpack_swapped(p):  # near miss: high nibble first
    return torch.stack([p >> 4, p & 0x0F], dim=-1).flatten(-2)


UNPACK = {"stack": unpack_stack, "strided": unpack_strided, "repeat_shift": unpack_repeat_shift,
          "swapped": unpack_swapped}

# --- decode: codes -> fp32 values -----------------------------------------------------


def decode_lut8_where(c):
    lut = torch.tensor(E2M1_MAG, device=c.device)
    return lut[(c & 7).long()] * torch.where((c & 8) != 0, -1.0, 1.0)


def decode_lut16(c):
    return torch.tensor(E2M1_ALL, device=c.device)[c.long()]


def decode_bits(c):
    c = c.to(torch.int32)
    e, m = (c >> 1) & 3, (c & 1).to(torch.float32)
    mag = torch.where(e == 0, m * 0.5, (1.0 + m * 0.5) * torch.exp2((e - 1).to(torch.float32)))
    return torch.where((c & 8) != 0, -mag, mag)


def decode_fp32_bits(c):
    c = c.to(torch.int32)
    return (((c & 7) << 22) | ((c & 8) << 28)).view(torch.float32) * 2.0 ** 126


DECODE = {"lut8_where": decode_lut8_where, "lut16": decode_lut16, "bits": decode_bits, "fp32_bits": decode_fp32_bits}

# --- E8M0 weight scale byte -> fp32 ---------------------------------------------------


def wscale_exp2(u):
    s = torch.exp2(u.float() - 127.0)
    return torch.where(u == 255, torch.full_like(s, float("nan")), s)


def wscale_ldexp(u):
    s = torch.ldexp(torch.ones_like(u, dtype=torch.float32), u.to(torch.int32) - 127)
    return torch.where(u == 255, torch.full_like(s, float("nan")), s)


def wscale_bias128(u):  # near miss: off-by-one bias
    return torch.exp2(u.float() - 128.0)


WSCALE = {"exp2": wscale_exp2, "ldexp": wscale_ldexp, "bias128": wscale_bias128}

# --- activation: floor(log2(amax)) of a block amax (fp32), zero -> -127 ----------------


def exp_bits(a):
    return ((a.view(torch.int32) >> 23) & 0xFF) - 127


def exp_frexp(a):
    e = torch.frexp(a).exponent - 1
    return torch.where(a == 0, torch.full_like(e, -127), e)


def exp_floor_log2(a):  # equal to exp_bits for bf16-valued amax (8-bit mantissa), not for fp32
    e = torch.floor(torch.log2(a)).to(torch.int32)
    return torch.where(a == 0, torch.full_like(e, -127), e)


SCALE_EXP = {"bits": exp_bits, "frexp": exp_frexp, "floor_log2": exp_floor_log2}

# --- apply the block scale 2^e to x (fp32) --------------------------------------------


def apply_div(x, e):
    return x / torch.exp2(e.to(torch.float32))


def apply_mul_recip(x, e):
    return x * (1.0 / torch.exp2(e.to(torch.float32)))


def apply_ldexp(x, e):
    return torch.ldexp(x, -e)


APPLY = {"div": apply_div, "mul_recip": apply_mul_recip, "ldexp": apply_ldexp}

# --- E2M1 rounding of y (fp32, already in the block's range), RNE, saturating ---------


def round_where_chain(y):
    a = y.abs()
    q = torch.where(a <= 0.25, 0.0, torch.where(a < 0.75, 0.5, torch.where(a <= 1.25, 1.0, torch.where(
        a < 1.75, 1.5, torch.where(a <= 2.5, 2.0, torch.where(a < 3.5, 3.0, torch.where(a <= 5.0, 4.0, 6.0)))))))
    return torch.copysign(q, y)


def round_bucketize(y):
    a = y.abs()
    bounds = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], device=y.device)
    idx = torch.bucketize(a, bounds, right=False)  # ties go to the lower bucket ...
    tie_up = (a == 0.75) | (a == 1.75) | (a == 3.5)  # ... except where the upper code is even
    idx = idx + tie_up.to(idx.dtype)
    return torch.copysign(torch.tensor(E2M1_MAG, device=y.device)[idx], y)


def round_torch_round(y):
    a = y.abs().clamp(max=6.0)
    pe = torch.floor(torch.log2(a.clamp(min=1.0)))  # exact: a is a bf16/fp32 value >= 1 here, E2M1 exps 0..2
    step = torch.exp2(pe - 1.0)
    return torch.copysign(torch.round(a / step) * step, y).clamp(-6.0, 6.0)


def round_half_up(y):  # near miss: ties toward +inf
    a = y.clamp(-6.0, 6.0)
    step = torch.exp2(torch.floor(torch.log2(a.abs().clamp(min=1.0))) - 1.0)
    return (torch.floor(a / step + 0.5) * step).clamp(-6.0, 6.0)


ROUND = {"where_chain": round_where_chain, "bucketize": round_bucketize, "torch_round": round_torch_round,
         "half_up": round_half_up}

# --- a block whose amax is NaN or +-Inf -----------------------------------------------
# "nan": the block's scale is NaN, so the whole block is NaN (OCP MX: byte 255 = NaN; the
# formats' floor variant). "unguarded": whatever the exponent spelling makes of a
# non-finite amax (exponent bits of NaN/Inf are 128, frexp's exponent of Inf/NaN is
# unspecified (0 with glibc), int32(floor(log2(inf))) is undefined): no variant computes
# that, so a layer written this way is not the floor variant on such blocks.
NONFINITE = ("unguarded", "nan")


class SpelledMXLinear(nn.Module):
    """An MXFP4 w4a4 linear (floor scale, RNE) assembled from one spelling per slot."""

    def __init__(self, w, unpack="stack", decode="lut8_where", wscale="exp2", scale_exp="bits", apply="div",
                 round="where_chain", block=32, emax=EMAX, nonfinite="unguarded"):
        super().__init__()
        q = quantize(w, "mxfp4", scale_mode="floor")
        self.register_buffer("qweight", q.qdata)
        self.register_buffer("scales", q.scale)
        self.in_features = w.shape[-1]
        self.block, self.emax = block, emax
        self._unpack, self._decode, self._wscale = UNPACK[unpack], DECODE[decode], WSCALE[wscale]
        self._exp, self._apply, self._round = SCALE_EXP[scale_exp], APPLY[apply], ROUND[round]
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite: got {nonfinite!r}, expected one of {NONFINITE}")
        self.nonfinite = nonfinite

    def act_qdq(self, x):
        shape = x.shape
        xb = x.reshape(*shape[:-1], shape[-1] // self.block, self.block)
        amax = xb.abs().amax(dim=-1, keepdim=True).float()
        e = (self._exp(amax) - self.emax).clamp(-127, 127)
        y = self._apply(xb.float(), e)
        q = self._round(y)
        s = torch.exp2(e.float())
        if self.nonfinite == "nan":
            s = torch.where(torch.isfinite(amax), s, torch.nan)
        return (q * s).reshape(shape).to(x.dtype)

    def dequantized_weights(self, dtype=torch.bfloat16):
        v = self._decode(self._unpack(self.qweight))
        v = v.reshape(*self.scales.shape, 32) * self._wscale(self.scales).unsqueeze(-1)
        return {"weight": v.reshape(self.qweight.shape[0], -1).to(dtype)}

    def forward(self, x):
        return F.linear(self.act_qdq(x), self.dequantized_weights(x.dtype)["weight"])

    def emu_view(self):
        return {"weight": qtensor("mxfp4", self.qweight, self.scales)}
