"""The one catalogue of styles (patterns/catalogue.py) and the one weight x activation
table (emu_inductor/spec/compat.py): registration by GEMM form, the pairs they yield."""

from __future__ import annotations

import pytest

from emu_inductor.formats import FORMATS
from emu_inductor.patterns import catalogue
from emu_inductor.patterns.act_qdq import QDQStyle
from emu_inductor.spec import SCHEMES, ActQuant
from emu_inductor.spec.compat import ACT_FOR_WEIGHT, FUSED_MX_SCALE_MODES, is_compatible


def test_every_named_scheme_is_a_pair_of_the_table():
    for s in SCHEMES.values():
        assert is_compatible(s.weight_fmt, s.act), s.name


def test_table_rules():
    nv, mx4 = FORMATS["nvfp4"], FORMATS["mxfp4"]
    assert is_compatible(nv, ActQuant("block", nv, recipe="vllm"))
    assert not is_compatible(mx4, ActQuant("block", nv, recipe="vllm"))  # NVFP4 act only with NVFP4 weights
    assert not is_compatible(nv, ActQuant("block", mx4, scale_mode="even"))  # MX act only with MX weights
    assert is_compatible(mx4, ActQuant("fp8_tensor")) and not is_compatible(FORMATS["mxfp8_e4m3"],
                                                                           ActQuant("fp8_tensor"))
    for mode in ("even", "floor", "rceil", "ceil"):
        assert is_compatible(mx4, ActQuant("block", mx4, scale_mode=mode)) == (mode in FUSED_MX_SCALE_MODES)
    assert set(ACT_FOR_WEIGHT) <= set(FORMATS)


def test_forms_of_the_builtin_styles():
    names = {f: [s.name for s in catalogue.dequant_styles_for(f)] for f in catalogue.GEMM_FORMS}
    assert names["grouped_mm"][0] == "reference_gate_up" and "reference_gate_up" not in names["loop"]
    assert "vllm_lut" in names["linear"] and "vllm_lut" not in names["grouped_mm"]
    assert all(not s.batched for s in catalogue.dequant_styles_for("linear"))
    assert all(s.batched for f in ("loop", "grouped_mm") for s in catalogue.dequant_styles_for(f))
    q = {f: {s.name for s in catalogue.qdq_styles_for(f)} for f in catalogue.GEMM_FORMS}
    assert q["linear"] == {"reference", "reference_static", "vllm_torch"}
    assert q["grouped_mm"] == {"reference", "reference_static"} and q["loop"] == {"reference"}


def test_a_new_style_is_one_decorated_factory(monkeypatch):
    monkeypatch.setattr(catalogue, "_QDQ", list(catalogue._QDQ))
    act = ActQuant("block", FORMATS["mxfp4"], scale_mode="floor")

    @catalogue.qdq_style("grouped_mm")
    def my_styles():
        return [QDQStyle("mine", act, lambda x, gs: x, False)]

    assert [s.name for s in catalogue.qdq_styles_for("grouped_mm")][-1] == "mine"
    assert "mine" not in {s.name for s in catalogue.qdq_styles_for("linear")}


def test_unknown_form_is_a_value_error():
    with pytest.raises(ValueError, match="forms"):
        catalogue.qdq_style("conv")
    with pytest.raises(ValueError, match="form"):
        catalogue.dequant_styles_for("conv")
