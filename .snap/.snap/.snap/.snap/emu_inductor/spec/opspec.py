"""OpSpec: the semantic configuration a fused op needs, as one hashable value.

It travels through the graph as a string argument of the `mxemu::*` ops (custom ops
take no dataclasses), and keys the generated kernels. Tile configs and dtypes are not
part of it: dtypes come from the tensors, tiles from the launcher.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

from ..formats import FORMATS
from ..formats.elements import SIGNED_ZERO_MODES
from ..formats.scales import BYTE0_INVERSE_MODES, E8M0_BYTE0, E8M0_BYTE255
from .activations import ACTIVATION_NAMES
from .compat import FUSED_MX_EXPONENT_MODES, FUSED_MX_INF_AMAX
from .schemes import ActQuant, Scheme, get_scheme

__all__ = ["OpSpec", "W_SCALE_ORDERS", "WEIGHT_READER_DEFAULTS", "ACT_QDQ_DEFAULTS"]

#: How the weight's float (global) scale enters the NVFP4 decode, fp32 throughout:
#:   "s*a"      v * (s * a), a dequantize direction (vLLM dequantize_to_dtype, ModelOpt)
#:   "s/g"      v * (s / g), g quantize direction (compressed-tensors, vLLM with
#:              weight_global_scale)
#:   "(v*s)*a"  (v * s) * a
W_SCALE_ORDERS = ("s*a", "s/g", "(v*s)*a")
#: Weight-reader fields and their defaults. They are left out of the spec string (and of
#: the kernel spec JSON) at these values, so specs and kernels that existed before the
#: fields render byte for byte as before.
WEIGHT_READER_DEFAULTS = {"w_e8m0_byte255": "nan", "w_e8m0_byte0": "pow2", "w_scale_order": "s*a"}
#: MX activation-QDQ edge-case fields (formats.QDQOptions signed_zero / inf_amax) and their
#: defaults, left out of the spec string and kernel JSON the same way.
ACT_QDQ_DEFAULTS = {"act_signed_zero": "keep", "act_inf_amax": "nan", "act_byte0_inverse": "pow2"}


@dataclasses.dataclass(frozen=True)
class OpSpec:
    weight_fmt: str
    act_kind: str = "none"  # none | block | fp8_tensor
    act_fmt: Optional[str] = None
    act_scale_mode: Optional[str] = None
    act_recipe: Optional[str] = None
    act_rounding: str = "rne"
    activation: str = "silu"
    router_weight_on_input: bool = False
    fp6_layout: str = "quark"
    # how the weights are read: E8M0 byte 255 as NaN (OCP), +inf (exponent-bit readers:
    # compressed-tensors, ModelOpt, Quark HIP) or an exact 2^128 factor ("ldexp":
    # transformers' gpt-oss, 0 stays 0); the NVFP4 float-scale product order
    w_e8m0_byte255: str = "nan"
    # E8M0 byte 0 as 2^-127 (pow2, OCP) or 0.0 ("zero": readers that build the scale as
    # `(u << 23).view(float32)`, Quark's Triton dequant), MX weights only
    w_e8m0_byte0: str = "pow2"
    w_scale_order: str = "s*a"
    # MX activation QDQ edge cases, as formats.QDQOptions names them: the sign of an element
    # that rounds to zero (keep | lt0 | le0 | positive; Quark's fake_quantize_mx gives +0,
    # microxcaling's sign(a) * floor(...) gives +0 for -0.0) and the scale of a block whose
    # amax is Inf or rounds past fp32's top binade (nan | nan_or_overflow | max). NVFP4
    # recipes carry their own zero sign: these stay at the defaults there.
    act_signed_zero: str = "keep"
    act_inf_amax: str = "nan"
    # the multiplier that scales a byte-0 (2^-127) block into element range when
    # quantizing: 2^127 (pow2), 2^126 (min_normal: torchao 0.18 FLOOR/CEIL/EVEN clamp the
    # fp32 scale to 2^-126) or 1.0 (one)
    act_byte0_inverse: str = "pow2"

    def __post_init__(self):
        if self.weight_fmt not in FORMATS:
            raise ValueError(f"weight_fmt: unknown format {self.weight_fmt!r}")
        if self.act_kind not in ("none", "block", "fp8_tensor"):
            raise ValueError(f"act_kind: expected none, block or fp8_tensor, got {self.act_kind!r}")
        if self.act_kind == "block" and self.act_fmt not in FORMATS:
            raise ValueError(f"act_fmt: unknown format {self.act_fmt!r}")
        if self.activation not in ACTIVATION_NAMES:
            raise ValueError(f"activation: unknown activation {self.activation!r}")
        if self.w_e8m0_byte255 not in E8M0_BYTE255:
            raise ValueError(f"w_e8m0_byte255: expected one of {E8M0_BYTE255}, got {self.w_e8m0_byte255!r}")
        if self.w_e8m0_byte0 not in E8M0_BYTE0:
            raise ValueError(f"w_e8m0_byte0: expected one of {E8M0_BYTE0}, got {self.w_e8m0_byte0!r}")
        if self.w_e8m0_byte0 != "pow2" and not FORMATS[self.weight_fmt].is_mx:
            raise ValueError(f"w_e8m0_byte0: {self.w_e8m0_byte0!r} applies to MX weights (E8M0 scales) only, "
                             f"got weight_fmt={self.weight_fmt!r}; expected 'pow2'")
        if self.w_scale_order not in W_SCALE_ORDERS:
            raise ValueError(f"w_scale_order: expected one of {W_SCALE_ORDERS}, got {self.w_scale_order!r}")
        if self.act_signed_zero not in SIGNED_ZERO_MODES:
            raise ValueError(f"act_signed_zero: expected one of {SIGNED_ZERO_MODES}, got {self.act_signed_zero!r}")
        if self.act_inf_amax not in FUSED_MX_INF_AMAX:
            raise ValueError(f"act_inf_amax: expected one of {FUSED_MX_INF_AMAX}, got {self.act_inf_amax!r}")
        if self.act_inf_amax == "exponent" and self.act_scale_mode not in FUSED_MX_EXPONENT_MODES:
            raise ValueError(f"act_inf_amax: 'exponent' is rendered for scale modes {FUSED_MX_EXPONENT_MODES}, "
                             f"got act_scale_mode={self.act_scale_mode!r}")
        if self.act_byte0_inverse not in BYTE0_INVERSE_MODES:
            raise ValueError(f"act_byte0_inverse: expected one of {BYTE0_INVERSE_MODES}, "
                             f"got {self.act_byte0_inverse!r}")
        mx_act = self.act_kind == "block" and FORMATS[self.act_fmt].is_mx
        for k, v in ACT_QDQ_DEFAULTS.items():
            if getattr(self, k) != v and not mx_act:
                raise ValueError(f"{k}: {getattr(self, k)!r} applies to MX block activations only "
                                 f"(act_kind={self.act_kind!r}, act_fmt={self.act_fmt!r}); expected {v!r}")

    def to_dict(self) -> dict:
        """The fields as a dict, weight-reader and activation edge-case fields left out at
        their defaults."""
        d = dataclasses.asdict(self)
        for k, v in {**WEIGHT_READER_DEFAULTS, **ACT_QDQ_DEFAULTS}.items():
            if d[k] == v:
                del d[k]
        return d

    @property
    def weight_reader_default(self) -> bool:
        """True when the weights are read as the reference's `dequantize_weight` does by default."""
        return all(getattr(self, k) == v for k, v in WEIGHT_READER_DEFAULTS.items())

    # -- conversions ---------------------------------------------------------------
    @classmethod
    def from_scheme(cls, scheme, *, activation: str = "silu", router_weight_on_input: bool = False,
                    fp6_layout: str = "quark") -> "OpSpec":
        s = get_scheme(scheme)
        a = s.act
        return cls(
            weight_fmt=s.weight_fmt.name,
            act_kind="none" if a is None else a.kind,
            act_fmt=a.fmt.name if a is not None and a.fmt is not None else None,
            act_scale_mode=a.scale_mode if a is not None else None,
            act_recipe=a.recipe if a is not None else None,
            act_rounding=a.rounding if a is not None else "rne",
            act_signed_zero=a.signed_zero if a is not None else "keep",
            act_inf_amax=a.inf_amax if a is not None else "nan",
            act_byte0_inverse=a.byte0_inverse if a is not None else "pow2",
            activation=activation,
            router_weight_on_input=router_weight_on_input,
            fp6_layout=fp6_layout,
        )

    def scheme(self) -> Scheme:
        act = None
        if self.act_kind != "none":
            act = ActQuant(self.act_kind, FORMATS[self.act_fmt] if self.act_fmt else None,
                           self.act_scale_mode, self.act_recipe, self.act_rounding,
                           self.act_signed_zero, self.act_inf_amax, self.act_byte0_inverse)
        return Scheme(f"spec:{self.weight_fmt}/{self.act_kind}:{self.act_fmt}", FORMATS[self.weight_fmt], act)

    def to_str(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_str(cls, s: str) -> "OpSpec":
        if not isinstance(s, str):
            raise TypeError(f"spec: expected an OpSpec string (OpSpec.to_str()), got {type(s).__name__}")
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise ValueError(f"spec: not a valid OpSpec string: {s!r}") from e
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or "weight_fmt" not in d or not set(d) <= fields:
            raise ValueError(f"spec: expected a JSON object with weight_fmt and only the fields {sorted(fields)}, "
                             f"got {s!r}")
        return cls(**d)

    def short_name(self) -> str:
        """Readable id for logs, explain() and kernel file names."""
        act = "a16" if self.act_kind == "none" else (
            "afp8" if self.act_kind == "fp8_tensor" else f"a{self.act_fmt}-{self.act_scale_mode or self.act_recipe}")
        act += ("" if self.act_signed_zero == "keep" else f"-z{self.act_signed_zero}") + \
            ("" if self.act_inf_amax == "nan" else f"-inf{self.act_inf_amax.replace('_', '')}") + \
            ("" if self.act_byte0_inverse == "pow2" else f"-b0{self.act_byte0_inverse.replace('_', '')}")
        reader = {"nan": "", "inf": "_e8m0inf", "ldexp": "_e8m0ldexp"}[self.w_e8m0_byte255] + \
            ("" if self.w_e8m0_byte0 == "pow2" else f"_e8m0b0{self.w_e8m0_byte0}") + {
            "s*a": "", "s/g": "_sdivg", "(v*s)*a": "_vsa"}[self.w_scale_order]
        return (f"w{self.weight_fmt}{reader}_{act}_{self.activation}"
                + ("_rwin" if self.router_weight_on_input else ""))
