"""MX quantizers named after the libraries they reproduce, as data.

Each variant is a set of `QDQOptions` values (scale rule, element rounding, the sign of
zeros, NaN elements, Inf blocks, the byte-0 multiplier and how the reader decodes the
edge scale bytes). `quantize(..., variant=name)` / `fake_quantize(..., variant=name)`
start from these values; an option passed explicitly overrides the variant's.

Every row was checked bit for bit against the installed library (tests/
test_formats_libraries.py): random bf16 and fp32 data at magnitudes 2^-140..2^120,
ties at several exponents, all-zero blocks, +-0, fp32-subnormal blocks, saturating
values, NaN, +-Inf, amax at fp32's largest binade, tiny blocks; outputs compared as bit
patterns with NaN positions equal. `checked` lists what each row was compared on and
`differs` what is deliberately not reproduced.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

__all__ = ["MXVariant", "MX_VARIANTS", "get_variant"]


@dataclasses.dataclass(frozen=True)
class MXVariant:
    name: str
    library: str  # package, version and the functions reproduced
    formats: tuple[str, ...]  # block formats the library implements this way
    options: Mapping[str, str]  # QDQOptions field -> value
    checked: str
    differs: str = ""
    # per block format: options that differ from `options` for that format
    per_format: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)

    def options_for(self, fmt_name: str) -> dict[str, str]:
        return {**self.options, **self.per_format.get(fmt_name, {})}


_EDGES = ("random bf16/fp32 at many magnitudes, E2M1/FP6/FP8 ties at several exponents, "
          "zero and +-0 blocks, fp32-subnormal blocks, saturating values, NaN, +-Inf, "
          "amax near 2^128, tiny blocks")

MX_VARIANTS: dict[str, MXVariant] = {
    v.name: v
    for v in (
        *(
            MXVariant(
                f"torchao_{mode}",
                f"torchao 0.18.0 mx_formats.mx_tensor.to_mx(scaling_mode={mode.upper()}) + to_dtype",
                ("mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8_e4m3", "mxfp8_e5m2"),
                {"scale_mode": mode, "inf_amax": "exponent", "byte0_inverse": "min_normal"},
                f"dequantized values, scale bytes; {_EDGES}",
                "codes of NaN elements (torchao's FP4/FP6 bit trick gives 1.5-like garbage; "
                "their block is NaN either way)",
            )
            for mode in ("floor", "ceil", "even")
        ),
        MXVariant(
            "torchao_rceil",
            "torchao 0.18.0 mx_formats.mx_tensor.to_mx(scaling_mode=RCEIL), eager CPU "
            "fallback (the sm100 PTX path is not reproduced) + to_dtype",
            ("mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8_e4m3", "mxfp8_e5m2"),
            {"scale_mode": "rceil_log2", "inf_amax": "max", "byte0_inverse": "one"},
            f"dequantized values, scale bytes; {_EDGES}",
            "codes of NaN elements (garbage in torchao; the block is NaN)",
        ),
        MXVariant(
            "compressed_tensors",
            "compressed-tensors 0.20.1 calculate_qparams (generate_mx_scales) + "
            "lifecycle.forward.fake_quantize, MXFP4, MXFP6A16 and MXFP8 presets",
            ("mxfp4", "mxfp6_e2m3", "mxfp8_e4m3"),
            {"scale_mode": "even", "signed_zero": "lt0", "inf_amax": "nan_or_overflow"},
            f"fake-quantized values (observer in the input's dtype); {_EDGES}",
            "blocks holding NaN (a NaN exponent cast to uint8 is undefined). "
            "Its MX scales are computed in the observer's dtype; equal here because "
            "power-of-two scales are exact in bf16.",
            # generate_mx_scales rounds the amax to FP4's 1 mantissa bit for MXFP8 too
            per_format={"mxfp8_e4m3": {"scale_mode": "even_fp4"}},
        ),
        MXVariant(
            "modelopt",
            "nvidia-modelopt 0.47.0 MXFP4QTensor.quantize / dequantize",
            ("mxfp4",),
            {"scale_mode": "rceil_log2", "rounding": "half_toward_zero", "signed_zero": "le0",
             "e8m0_byte255": "inf"},
            f"packed codes, scale bytes and dequantized values on finite data; {_EDGES}",
            "blocks holding NaN or +-Inf: ModelOpt casts a NaN/Inf exponent to uint8 "
            "(undefined; 0 on x86) and its codes are garbage: not reproduced (ours: byte 255)",
        ),
        MXVariant(
            "quark",
            "amd-quark 0.13 kernel.mx.triton downcast_to_mxfp_torch(EVEN) + "
            "upcast_from_mxfp_torch (the torch twin of Quark's Triton MXFP4 QDQ that vLLM's "
            "ROCm MX emulation calls with QUARK_MXFP4_IMPL=triton)",
            ("mxfp4",),
            {"scale_mode": "even", "rounding": "half_away", "inf_amax": "max",
             "nan_element": "max", "e8m0_byte255": "inf", "e8m0_byte0": "zero"},
            f"packed codes, scale bytes and dequantized values; {_EDGES}",
        ),
        *(
            MXVariant(
                name,
                f"microsoft/microxcaling (commit 7bc41952) mx_ops._quantize_mx(round={rnd!r}), its Python "
                "path (custom_cuda=False, the MxSpecs default): shared exponent floor(log2(amax)) and the "
                "element rounding both computed in the input dtype",
                ("mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8_e4m3", "mxfp8_e5m2"),
                {"scale_mode": "floor_log2", "rounding": f"microxcaling_{rnd}", "signed_zero": "lt0"},
                "fake-quantized values against the library's algorithm re-written in "
                "tests/corpus/microxcaling_style.py (microxcaling is not on PyPI): every bf16 value in "
                "blocks under 11 scale exponents (NaN, +-Inf, zeros, subnormals, saturating values), "
                "random fp32 at 2^-40..2^40 with the one value each rounding sends up, bf16 and fp32",
                "fp16 inputs whose shared exponent leaves fp16's range (the library's 2**shared_exp "
                "underflows to 0 there and divides by it)",
            )
            for name, rnd in (("microxcaling", "nearest"), ("microxcaling_even", "even"))
        ),
        MXVariant(
            "quark_hw",
            "amd-quark 0.13 hw_emulation_interface.fake_quantize_mx (scale_calculation_mode "
            "'even'; FP4/FP6 through the C++ fake_quantize_to_low_precision_fp (RNE, zeros "
            "lose their sign), FP8 through fake_quantize_fp8_e{4m3,5m2}_per_channel_with_scale)",
            ("mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8_e4m3", "mxfp8_e5m2"),
            {"scale_mode": "even", "signed_zero": "positive", "inf_amax": "max"},
            f"fake-quantized values; {_EDGES}",
            per_format={"mxfp8_e4m3": {"signed_zero": "keep"}, "mxfp8_e5m2": {"signed_zero": "keep"}},
        ),
    )
}


def get_variant(variant: "str | MXVariant", *, arg: str = "variant") -> MXVariant:
    if isinstance(variant, MXVariant):
        return variant
    if isinstance(variant, str) and variant in MX_VARIANTS:
        return MX_VARIANTS[variant]
    raise ValueError(f"{arg}: unknown MX variant {variant!r}; expected one of {sorted(MX_VARIANTS)}")
