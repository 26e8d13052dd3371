"""A corpus of other people's microscaling emulation code, as data.

Each entry is a small Linear or MoE layer written the way one library (or one user) writes
its emulation: calling the installed library's real functions where it installs on this
CPU next to torch 2.13 (torchao 0.18, compressed-tensors 0.20, ModelOpt 0.47, transformers
5.24), otherwise the library's published algorithm re-written in its own style (amd-quark
0.13 does not import without onnx; vLLM and microxcaling are not installable here). None of
it was written from emu_inductor's patterns or passes.

What an entry promises, checked by tests/test_corpus_eager.py and test_corpus_compile.py:
  * `variant`: the emu_inductor function the layer computes (weight format + dequant
    product + E8M0 reader; activation QDQ options for `emu_inductor.fake_quantize`).
    The layer's activation QDQ is bit-identical to `fake_quantize(x, **variant.act)`, its
    dequantized weights to `emu_inductor.formats.dequantize` with the named product, its
    output to the oracle (tests/corpus/oracle.py) within fp32-accumulation rounding.
  * `near_miss`: why the layer is NOT that variant (the variant named is the nearest one);
    the eager test proves some probe separates them, and a matcher must leave it alone.
  * `expect_fused`: whether torch.compile(backend="mxemu") fuses the WHOLE layer as its
    variant (linear: one mxemu::linear that also carries the activation QDQ when the
    variant has one; MoE: one mxemu::moe). False for every entry today (measured; partial
    fusions are in `fused_today`); flip it to True when the semantic matcher (issue 8)
    lands and tests/test_corpus_compile.py follows.
  * `compile_smoke`: compiled by test_corpus_compile.py (kept few: 3-30 s per compile on
    2 shared cores; entries left out say why in `compile_note`).
  * `xfail`: {aspect: measured disagreement} between the library and emu_inductor.formats
    (aspects: "layer", "act" (values), "act_sign" (sign of zero), "weights", "weights_sign";
    "aspect@float32" limits one to a dtype);
    that aspect's eager test is xfail(strict=True), so it flips when the variant is fixed.
  * `compile_note`: what stops Dynamo/Inductor before any match could happen.

Module contract (what the oracle reads, never what the layer computes with):
  layer(x) -> y                    the user's forward
  layer.act_qdq(x)                 the layer's own activation QDQ (None if weight-only)
  layer.dequantized_weights(dtype) {name: tensor} as the layer's forward builds them, in
                                   emu_view's layout ([N, K], gate rows then up rows)
  layer.emu_view()                 {name: QuantizedTensor} the stored bytes in emu layout
                                   (+ "a1_global"/"a2_global" static activation scales,
                                   "bias" a linear's bias, added by the oracle's F.linear)
  moe.route(x) -> (w fp32 [T,k], ids [T,k])   the layer's own routing
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

import os as _os

# Tiny by default (tests). benchmarks/bench_corpus.py builds the same layers at a real
# model's shape by setting EMU_CORPUS_DIMS="H,I,E,TOP_K" before importing the corpus.
H, I, E, TOP_K = (int(v) for v in _os.environ.get("EMU_CORPUS_DIMS", "64,32,4,2").split(","))
TOKENS = (1, 5)


@dataclasses.dataclass(frozen=True)
class WeightVariant:
    """How emu_inductor dequantizes the stored weight bytes.

    NVFP4: `recipe` names the emu_inductor.formats recipe whose dequant this is (its product
    and its decoding of code 0x8); without one, product "q*(s*a)" is
    emu_inductor.reference.dequantize_weight (vLLM's dequantize_to_dtype, a = dequantize-
    direction global). `product` documents the fp32 order: "q*(s/g)" (g quantize direction),
    "q*(s*g)" / "q*(s*a)" (dequantize direction), "q*(s*(1/g))" (te).
    MX: "q*2^e" (exact). e8m0_byte255: the reader of byte 255 ("nan", "inf", or "ldexp":
    an exact 2^128 factor as torch.ldexp applies it, formats.E8M0_BYTE255); e8m0_byte0:
    the reader of byte 0 ("pow2" 2^-127, or "zero" as a bare exponent field gives it).
    negzero: the reader's value of the FP4 -0 code 0x8: "keep" (-0, as the recipe decodes it) or
    "positive" (+0: a one-hot or table product whose terms add a +0, ModelOpt's e2m1_values).
    """

    fmt: str
    product: str = "q*2^e"
    recipe: Optional[str] = None
    e8m0_byte255: str = "nan"
    e8m0_byte0: str = "pow2"
    negzero: str = "keep"


@dataclasses.dataclass(frozen=True)
class Variant:
    weight: WeightVariant
    act: Optional[dict] = None  # kwargs of emu_inductor.fake_quantize; None = weight-only
    act_global: Optional[str] = None  # NVFP4 activations: "static" buffer (a1/a2_global)
    activation: str = "silu"

    def describe(self) -> str:
        w = f"{self.weight.fmt} {self.weight.product}" + (f" recipe={self.weight.recipe}" if self.weight.recipe else "")
        if self.weight.e8m0_byte255 != "nan":
            w += f" byte255={self.weight.e8m0_byte255}"
        if self.weight.e8m0_byte0 != "pow2":
            w += f" byte0={self.weight.e8m0_byte0}"
        if self.weight.negzero != "keep":
            w += " code0x8=+0"
        a = "w-only" if self.act is None else " ".join(f"{k}={v}" for k, v in self.act.items())
        return f"W[{w}] A[{a}]"


@dataclasses.dataclass(frozen=True)
class CorpusEntry:
    name: str
    kind: str  # "linear" | "moe"
    library: str
    source: str  # "installed <pkg> <version>: <functions>" or "rewritten: <where from>"
    variant: Variant
    make: Callable[[int, torch.dtype], tuple]  # (seed, dtype) -> (module, (x,))
    near_miss: Optional[str] = None
    expect_fused: bool = False
    xfail: dict = dataclasses.field(default_factory=dict)
    compile_note: str = ""
    dtypes: tuple = (torch.bfloat16,)
    compile_smoke: bool = True  # compiled in test_corpus_compile (kept few: ~10 s each)
    plumbing: str = ""  # MoE routing / GEMM / combine spelling, for the report
    exact_gemm: bool = True  # linear: the same F.linear as the oracle (else: accumulation contract)
    near_part: str = ""  # near misses: the part that is off ("act" or "weights"), which must never fuse
    fused_today: str = "nothing"  # measured with backend="mxemu" (2026-12-02), for the report


MODULES = ("torchao_style", "compressed_tensors_style", "modelopt_style", "gptoss_style", "quark_style",
           "vllm_style", "microxcaling_style", "respellings", "near_misses", "redteam_moe",
           "redteam_linear", "redteam2")
#: module -> ImportError text, for a library missing from this environment (all are in the
#: `test` extras; test_corpus_eager.test_registry_metadata fails naming them)
UNAVAILABLE: dict = {}


def _collect():
    import importlib

    entries = []
    for name in MODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ImportError as e:
            UNAVAILABLE[name] = f"{type(e).__name__}: {e}"
            continue
        entries.extend(mod.ENTRIES)
    names = [e.name for e in entries]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise AssertionError(f"duplicate corpus entry names: {sorted(dup)}")
    return entries


REGISTRY: list[CorpusEntry] = _collect()
BY_NAME = {e.name: e for e in REGISTRY}
