"""The known variants, as data: what a recognised cone may compute.

Weight dequantization: format x nibble order x FP6 layout x E8M0 reader (byte 255 NaN,
+inf or an exact 2^128 factor as torch.ldexp applies it; byte 0 2^-127 or 0) x how the
per-tensor / per-expert float scale enters (none; v*(s*a); (v*s)*a; v*(s/g) with g in the
quantize direction) x the dtype the products are formed in (fp32, or the output dtype as
torchao does) -> output dtype.
Activation fake-quantization: every MX format x scale_mode x rounding x E8M0 byte-0
reader x the sign of zeros (keep, lt0, positive; byte 0 read as 2^-127 only), plus the
libraries' named MX quantizers (formats.variants; among them microxcaling's, whose element
rounding is computed in the graph's dtype: rounding "microxcaling_nearest" / "_even", which
the probes separate from their exact twins by the dtype's largest value below half the
smallest subnormal quantum, and the kernels render with the same dtype roundings); every NVFP4 recipe of
`formats.nvfp4` x rounding, its global scale a graph scalar; per-tensor fp8 (dynamic, or a
static scale).

Each variant's `reference` is built from `emu_inductor.formats` / `reference` only, and
`kernel_supported` says whether today's fused kernels compute exactly that function.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Optional

import torch

from ..formats import E2M1, E4M3, FORMATS, NVFP4_RECIPES, decode, e8m0_decode, e8m0_multiply, fake_quantize, unpack
from ..formats.scales import E8M0_BYTE0
from ..formats.variants import MX_VARIANTS
from ..reference import fp8_tensor_fake_quantize

from ..spec import FUSED_MX_INF_AMAX, FUSED_MX_SCALE_MODES, ActQuant
from ..spec.compat import FUSED_MX_EXPONENT_MODES

__all__ = ["WeightVariant", "ActVariant", "weight_variants", "act_variants", "NO_ACT"]

ALPHA_ORDERS = ("none", "scale_alpha", "value_scale_alpha", "scale_over_global")
#: alpha_order -> OpSpec.w_scale_order (the product the kernels form; "none": no float scale)
_SCALE_ORDER = {"none": "s*a", "scale_alpha": "s*a", "value_scale_alpha": "(v*s)*a", "scale_over_global": "s/g"}
E8M0_READER_ORDER = ("nan", "inf", "ldexp")
_ALPHA_TEXT = {"none": "v*s", "scale_alpha": "v*(s*a)", "value_scale_alpha": "(v*s)*a",
               "scale_over_global": "v*(s/g)"}


@dataclasses.dataclass(frozen=True)
class WeightVariant:
    """One weight decode: `fmt` (a formats.FORMATS name) and how it is spelled."""

    fmt: str
    nibble_order: str = "low_first"  # element 2j in the low nibble (every library) | high_first
    fp6_layout: str = "quark"
    e8m0_byte255: str = "nan"
    e8m0_byte0: str = "pow2"
    alpha_order: str = "none"
    compute_dtype: str = "fp32"  # fp32 | out (products rounded in the output dtype)
    # the value of the -0 code (FP4 code 0x8): -0.0, or +0.0 where the reader's table says so
    # (ModelOpt's e2m1_values). The fused GEMMs accumulate from +0.0, where a +-0 product never
    # changes a sum, so both readings are one fused op (the sign of a zero weight is invisible
    # after the GEMM, as the kernels' +0 activation zeros are).
    negzero_decode: str = "keep"

    @property
    def name(self) -> str:
        parts = [self.fmt]
        fmt = FORMATS[self.fmt]
        if fmt.pack_bits == 4 and self.nibble_order != "low_first":
            parts.append(self.nibble_order)
        if fmt.pack_bits == 6:
            parts.append(f"fp6={self.fp6_layout}")
        if fmt.is_mx:
            parts.append(f"e8m0(255={self.e8m0_byte255},0={self.e8m0_byte0})")
        parts.append(_ALPHA_TEXT[self.alpha_order])
        if self.compute_dtype != "fp32":
            parts.append("in out dtype")
        if self.negzero_decode != "keep":
            parts.append("code 0x8 = +0")
        return " ".join(parts)

    def unsupported_reason(self) -> Optional[str]:
        """None when the fused kernels compute exactly this decode, else why not."""
        if self.nibble_order != "low_first":
            return "high-nibble-first packing (the kernels read element 2j from the low nibble)"
        if FORMATS[self.fmt].is_mx and self.alpha_order != "none":
            return f"a float scale on {self.fmt} weights ({_ALPHA_TEXT[self.alpha_order]}; the MX kernels take none)"
        if self.compute_dtype != "fp32":
            return "scale products rounded in the output dtype (the kernels form them in fp32)"
        return None

    @property
    def kernel_supported(self) -> bool:
        return self.unsupported_reason() is None

    @property
    def spec_fields(self) -> dict:
        """The OpSpec weight-reader fields (spec.OpSpec) that make the kernels read this decode
        (the byte-0 rule for MX formats only: OpSpec takes it for E8M0 scales alone)."""
        fields = {"w_e8m0_byte255": self.e8m0_byte255, "w_scale_order": _SCALE_ORDER[self.alpha_order]}
        if FORMATS[self.fmt].is_mx:
            fields["w_e8m0_byte0"] = self.e8m0_byte0
        return fields

    @property
    def kernel_key(self) -> tuple:
        """Variants with equal keys need the same fused op (one kernel spec)."""
        return (self.fmt, self.fp6_layout if FORMATS[self.fmt].pack_bits == 6 else None,
                tuple(sorted(self.spec_fields.items()))) if self.kernel_supported else ("unsupported", self.name)

    @property
    def preference(self) -> tuple:
        """Among supported variants that agreed on every probe (the float-scale orders that
        round alike, e.g. v*(s*a) and (v*s)*a in bf16), the one reported: the reference's
        own reading first."""
        return (ALPHA_ORDERS.index(self.alpha_order) if self.alpha_order != "none" else 0,
                E8M0_READER_ORDER.index(self.e8m0_byte255), E8M0_BYTE0.index(self.e8m0_byte0), self.name)

    def reference(self, codes: torch.Tensor, scale: torch.Tensor, alpha: Optional[torch.Tensor],
                  out_dtype: torch.dtype) -> torch.Tensor:
        """Dequantized [..., N, K] from packed bytes [..., N, Kp], scale bytes [..., N, K/bs]
        (any 1-byte dtype) and an optional fp32 scale (one value, [E], [E, 1.., 1] or [E, N])."""
        fmt = FORMATS[self.fmt]
        c = codes.view(torch.uint8)
        if fmt.pack_bits == 4 and self.nibble_order == "high_first":
            c = ((c & 0x0F) << 4) | (c >> 4)
        codes_u = unpack(c, fmt.pack_bits, fp6_layout=self.fp6_layout) if fmt.pack_bits != 6 or \
            self.fp6_layout != "unpacked" else c & 0x3F
        v = _table(fmt.element.name, "element")[codes_u.long()]
        if self.negzero_decode == "positive":
            v = v + 0.0  # -0.0 + 0.0 is +0.0; every other value unchanged
        vb = v.reshape(*v.shape[:-1], v.shape[-1] // fmt.block_size, fmt.block_size)
        sb = scale.view(torch.uint8).long()
        if fmt.is_mx:
            s = _table("e8m0", f"{self.e8m0_byte255}/{self.e8m0_byte0}")[sb]
        else:
            s = _table("e4m3", "scale")[sb]
        s = s.unsqueeze(-1)
        cd = torch.float32 if self.compute_dtype == "fp32" else out_dtype
        vb, s = vb.to(cd), s.to(cd)
        if self.alpha_order == "none" or alpha is None:
            # "ldexp": byte 255 is an exact 2^128 factor, not the fp32 scale +inf
            out = e8m0_multiply(vb, sb.unsqueeze(-1), byte255="ldexp", byte0=self.e8m0_byte0) \
                if self.e8m0_byte255 == "ldexp" else vb * s
        else:
            a = alpha.to(torch.float32)
            while a.dim() and a.shape[-1] == 1:
                a = a.squeeze(-1)
            a = a.reshape(()) if a.numel() == 1 else a.reshape(*a.shape, *([1] * (vb.dim() - a.dim())))
            a = a.to(cd)
            if self.alpha_order == "scale_alpha":
                out = vb * (s * a)
            elif self.alpha_order == "value_scale_alpha":
                out = (vb * s) * a
            else:
                out = vb * (s / a)
        return out.reshape(v.shape).to(out_dtype)


def weight_variants(bits: int, block: int, has_alpha: bool, out_dtype: torch.dtype) -> list[WeightVariant]:
    """Every known decode of `bits`-bit elements in blocks of `block` with/without a float scale."""
    out = []
    for fmt in FORMATS.values():
        fp6_unpacked = fmt.pack_bits == 6 and bits == 8  # one FP6 code per byte (torchao)
        if (fmt.pack_bits != bits and not fp6_unpacked) or fmt.block_size != block:
            continue
        nibbles = ("low_first", "high_first") if bits == 4 else ("low_first",)
        layouts = ("unpacked",) if fp6_unpacked else ("quark",)
        readers = list(itertools.product(("nan", "inf"), ("pow2", "zero"))) if fmt.is_mx else [("nan", "pow2")]
        if fmt.is_mx and not has_alpha:  # torch.ldexp(v, u - 127) (transformers' gpt-oss): byte 0 is 2^-127
            readers.append(("ldexp", "pow2"))
        if has_alpha:
            orders = ("scale_alpha", "value_scale_alpha", "scale_over_global")
        else:
            orders = ("none",)
        # MX products v * 2^k are single roundings of the exact value in any float dtype, so
        # forming them in the output dtype (torchao) is the same function: one variant.
        computes = ("fp32",) if out_dtype == torch.float32 or fmt.is_mx else ("fp32", "out")
        # FP4 readers by a value table may decode the -0 code as +0 (ModelOpt's e2m1_values)
        negzeros = ("keep", "positive") if fmt.element.num_codes == 16 else ("keep",)
        for nib, lay, (b255, b0), order, cd, nz in itertools.product(nibbles, layouts, readers, orders, computes,
                                                                     negzeros):
            out.append(WeightVariant(fmt.name, nib, lay, b255, b0, order, cd, nz))
    return out


@functools.lru_cache(maxsize=None)
def _table(kind: str, how: str) -> torch.Tensor:
    """fp32 value of every byte 0..255 under a decode of `formats` (a look-up is exact and
    much faster on probe-sized tensors than decoding bit fields each time)."""
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    if kind == "e8m0":
        b255, b0 = how.split("/")
        return e8m0_decode(b, byte255=b255, byte0=b0)
    if kind == "e4m3":
        return decode(b, E4M3)
    from ..formats import ELEMENTS

    return decode(b, ELEMENTS[kind])


# --- activations -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ActVariant:
    """One activation fake-quantization (per row, blocks along the last dim).

    kind "none" (not quantized), "mx", "nvfp4" (`recipe`, global scale from the graph),
    "fp8_tensor" (`static`: the scale is a graph scalar; else dynamic amax/448)."""

    kind: str
    fmt: Optional[str] = None
    scale_mode: Optional[str] = None
    recipe: Optional[str] = None
    rounding: str = "rne"
    e8m0_byte0: str = "pow2"
    static: bool = False
    named: Optional[str] = None  # a library's MX quantizer (formats.variants.MX_VARIANTS)
    # MX edge cases (formats.QDQOptions): sign of elements that round to zero, Inf blocks
    signed_zero: str = "keep"
    inf_amax: str = "nan"
    byte0_inverse: str = "pow2"  # the multiplier of a byte-0 block (formats BYTE0_INVERSE_MODES)

    @property
    def needs_scalar(self) -> bool:
        return self.kind == "nvfp4" or (self.kind == "fp8_tensor" and self.static)

    @property
    def block(self) -> Optional[int]:
        return FORMATS[self.fmt].block_size if self.fmt else None

    @property
    def name(self) -> str:
        if self.kind == "none":
            return "none"
        if self.kind == "fp8_tensor":
            return "fp8 per-tensor " + ("static" if self.static else "dynamic")
        tail = f" rounding={self.rounding}"
        if self.named:
            opts = ", ".join(f"{k}={v}" for k, v in _named_options(self.named, self.fmt).items())
            return f"{self.fmt} variant={self.named} ({opts})"
        if self.kind == "mx":
            extra = "" if self.e8m0_byte0 == "pow2" else " e8m0(0=zero)"
            extra += "" if self.signed_zero == "keep" else f" signed_zero={self.signed_zero}"
            extra += "" if self.inf_amax == "nan" else f" inf_amax={self.inf_amax}"
            return f"{self.fmt} scale_mode={self.scale_mode}{tail}{extra}"
        return f"nvfp4 recipe={self.recipe}{tail}"

    def unsupported_reason(self) -> Optional[str]:
        if self.named:
            extra = {k: v for k, v in _named_options(self.named, self.fmt).items()
                     if k not in ("scale_mode", "rounding", "e8m0_byte0", "signed_zero", "inf_amax",
                                  "byte0_inverse")
                     and _KERNEL_DEFAULTS.get(k) != v}
            if self.inf_amax not in FUSED_MX_INF_AMAX or (
                    self.inf_amax == "exponent" and self.scale_mode not in FUSED_MX_EXPONENT_MODES):
                extra["inf_amax"] = self.inf_amax
            if extra:
                return (f"{self.named}'s " + ", ".join(f"{k}={v}" for k, v in extra.items()) +
                        f" (the kernels give NaN for NaN elements, read byte 255 as NaN, and render "
                        f"inf_amax {FUSED_MX_INF_AMAX} only, 'exponent' for {FUSED_MX_EXPONENT_MODES})")
        if self.kind == "mx" and self.scale_mode not in FUSED_MX_SCALE_MODES:
            return f"MX scale_mode {self.scale_mode!r} (the kernels implement {FUSED_MX_SCALE_MODES})"
        if self.kind == "mx" and (self.inf_amax not in FUSED_MX_INF_AMAX or (
                self.inf_amax == "exponent" and self.scale_mode not in FUSED_MX_EXPONENT_MODES)):
            return (f"inf_amax={self.inf_amax} with scale_mode {self.scale_mode} (the kernels render inf_amax "
                    f"{FUSED_MX_INF_AMAX}, 'exponent' for {FUSED_MX_EXPONENT_MODES} only)")
        if self.kind == "mx" and self.e8m0_byte0 != "pow2":
            return "E8M0 byte 0 read as 0 (the kernels read 2^-127)"
        if self.kind == "fp8_tensor" and self.rounding != "rne":
            return "fp8 rounding other than RNE"
        return None

    @property
    def kernel_supported(self) -> bool:
        return self.unsupported_reason() is None

    @property
    def kernel_key(self) -> tuple:
        if not self.kernel_supported:
            return ("unsupported", self.name)
        return dataclasses.astuple(dataclasses.replace(self, named=None))  # the kernel a generic twin uses

    def reference(self, x: torch.Tensor, scalar: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.kind == "none":
            return x
        if self.kind == "fp8_tensor":
            return fp8_tensor_fake_quantize(x, scalar.to(torch.float32) if self.static else None)
        if self.named:
            return fake_quantize(x, self.fmt, variant=self.named)
        if self.kind == "mx":
            return fake_quantize(x, self.fmt, scale_mode=self.scale_mode, rounding=self.rounding,
                                 e8m0_byte0=self.e8m0_byte0, signed_zero=self.signed_zero,
                                 inf_amax=self.inf_amax, byte0_inverse=self.byte0_inverse)
        g = scalar.to(torch.float32).reshape(())
        return fake_quantize(x, "nvfp4", recipe=self.recipe, rounding=self.rounding, global_scale=g)

    def act_quant(self):
        """The matching `ActQuant` (None for "none"), for building an OpSpec."""
        if self.kind == "none":
            return None
        if self.kind == "fp8_tensor":
            return ActQuant("fp8_tensor")
        return ActQuant("block", FORMATS[self.fmt], scale_mode=self.scale_mode, recipe=self.recipe,
                        rounding=self.rounding, **self.edge_options)

    @property
    def edge_options(self) -> dict:
        """signed_zero / inf_amax / byte0_inverse for an MX ActQuant ({} otherwise: NVFP4
        recipes fix their own)."""
        return {"signed_zero": self.signed_zero, "inf_amax": self.inf_amax,
                "byte0_inverse": self.byte0_inverse} if self.kind == "mx" else {}

    @property
    def spec_fields(self) -> dict:
        """The OpSpec activation edge-case fields (spec.OpSpec) that make the kernels compute this QDQ."""
        return {"act_" + k: v for k, v in self.edge_options.items()}


NO_ACT = ActVariant("none")
#: QDQOptions values the fused MX activation QDQ computes (beyond scale_mode / rounding / byte 0 /
#: signed_zero / inf_amax, which OpSpec carries)
_KERNEL_DEFAULTS = {"signed_zero": "keep", "nan_element": "nan", "inf_amax": "nan", "byte0_inverse": "pow2",
                    "e8m0_byte255": "nan"}


def _named_options(name: str, fmt: str) -> dict:
    return dict(MX_VARIANTS[name].options_for(fmt))


def act_variants() -> list[ActVariant]:
    out = []
    for fmt in FORMATS.values():
        if fmt.is_mx:
            # floor_log2: microxcaling's floor(log2 amax) with log2 rounded in the graph's dtype
            # zeros: copysign ("keep"), "lt0" (sign(a) * round(|a|): microxcaling) or always +0
            for mode, rnd, (b0, zero) in itertools.product(
                    ("floor", "ceil", "even", "rceil", "floor_log2"), ("rne", "half_away"),
                    (("pow2", "keep"), ("zero", "keep"), ("pow2", "lt0"), ("pow2", "positive"))):
                out.append(ActVariant("mx", fmt.name, scale_mode=mode, rounding=rnd, e8m0_byte0=b0,
                                      signed_zero=zero))
            if fmt.element == E2M1:
                # hand-written FP4 QDQs (E2M1 only: each variant costs a reference per probe chunk
                # for every MX format of the cone's block size, so the set stays small):
                # an Inf block as users write the scale without a NaN/Inf guard: the exponent of
                # log2(inf) clamped to 127 (scale 2^127, "max": `clamp(ceil(log2(amax / 6)), -127,
                # 127)`) or the exponent field of Inf read as 128 ("exponent"), with OCP zeros or
                # `torch.sign(y) * R(|y|)`'s (lt0); ties toward zero (a plain bucketize on the E2M1
                # midpoints; ModelOpt's tie rule) with each Inf rule
                for mode, inf in itertools.product(("floor", "ceil", "even", "rceil", "floor_log2"),
                                                   ("max", "exponent")):
                    out.append(ActVariant("mx", fmt.name, scale_mode=mode, inf_amax=inf))
                    out.append(ActVariant("mx", fmt.name, scale_mode=mode, signed_zero="lt0", inf_amax=inf))
                    out.append(ActVariant("mx", fmt.name, scale_mode=mode, rounding="half_toward_zero",
                                          inf_amax=inf))
                for mode in ("floor", "ceil", "even", "rceil", "floor_log2"):
                    out.append(ActVariant("mx", fmt.name, scale_mode=mode, rounding="half_toward_zero"))
            # the libraries' own quantizers (formats.variants), edge cases included: Quark's
            # fake_quantize_mx gives +0 where the element rounds to zero, and so on
            for name, mv in MX_VARIANTS.items():
                if fmt.name in mv.formats:
                    o = _named_options(name, fmt.name)
                    out.append(ActVariant("mx", fmt.name, scale_mode=o.get("scale_mode"),
                                          rounding=o.get("rounding", "rne"), e8m0_byte0=o.get("e8m0_byte0", "pow2"),
                                          named=name, signed_zero=o.get("signed_zero", "keep"),
                                          inf_amax=o.get("inf_amax", "nan"),
                                          byte0_inverse=o.get("byte0_inverse", "pow2")))
        else:
            for recipe, rnd in itertools.product(NVFP4_RECIPES, ("rne", "half_away")):
                out.append(ActVariant("nvfp4", fmt.name, recipe=recipe, rounding=rnd))
    out.append(ActVariant("fp8_tensor"))
    out.append(ActVariant("fp8_tensor", static=True))
    return out
