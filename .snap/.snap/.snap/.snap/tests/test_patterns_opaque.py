"""emu_inductor.register_dequant_op / register_qdq_op: a user's own custom ops, declared
with a known format's semantics, fuse like the traced styles; mismatches stay as written
with a reason in explain(). Count asserts run under fresh_cache()."""

from __future__ import annotations

import re

import pytest
import torch
from torch import Tensor
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache, run_and_get_code
from torch.testing import FileCheck

import emu_inductor
from emu_inductor.formats import FORMATS
from emu_inductor.passes import opaque_ops, recorder
from emu_inductor.patterns import moe as moe_structure
from emu_inductor.patterns import opaque
from emu_inductor.reference import QuantizedExperts, QuantizedLinear
from emu_inductor.reference.qdq import act_fake_quantize, dequantize_weight
from emu_inductor.spec.schemes import ActQuant


# vLLM-style wrappers (e.g. of AMD Quark's dq_mxfp4 / qdq_mxfp4): opaque to Dynamo
@torch.library.custom_op("emu_test::dq_mxfp4", mutates_args=())
def dq_mxfp4(w: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return dequantize_weight(w.view(torch.uint8), scale, FORMATS["mxfp4"], dtype=dtype)


@dq_mxfp4.register_fake
def _(w, scale, dtype):
    return w.new_empty(*w.shape[:-1], w.shape[-1] * 2, dtype=dtype)


@torch.library.custom_op("emu_test::qdq_mxfp4", mutates_args=())
def qdq_mxfp4(x: Tensor, mode: str = "even") -> Tensor:
    return act_fake_quantize(x, ActQuant("block", FORMATS["mxfp4"], scale_mode=mode))


@qdq_mxfp4.register_fake
def _(x, mode="even"):
    return torch.empty_like(x)


DQ = torch.ops.emu_test.dq_mxfp4.default
QDQ = torch.ops.emu_test.qdq_mxfp4.default


@pytest.fixture(scope="module")
def declared():  # module scope: every declaration change re-initialises the families
    opaque.clear()
    emu_inductor.register_dequant_op(DQ, "mxfp4")
    emu_inductor.register_qdq_op(QDQ, "mxfp4", scale_mode_arg=1)
    yield
    opaque.clear()


class OpaqueLinear(torch.nn.Module):
    """A QuantizedLinear whose forward calls the user's opaque ops."""

    def __init__(self, ql, mode="even", int8_weight=False):
        super().__init__()
        self.register_buffer("weight", ql.weight.view(torch.int8) if int8_weight else ql.weight)
        self.register_buffer("weight_scale", ql.weight_scale)
        self.mode = mode

    def forward(self, x):
        W = torch.ops.emu_test.dq_mxfp4(self.weight, self.weight_scale, x.dtype)
        if self.mode is not None:
            x = torch.ops.emu_test.qdq_mxfp4(x, self.mode) if self.mode != "default" else \
                torch.ops.emu_test.qdq_mxfp4(x)
        return torch.nn.functional.linear(x, W)


def _compile_run(model, *args):
    torch._dynamo.reset()
    counters.clear()
    recorder.RECORDS.clear()
    cm = torch.compile(model, backend="mxemu")
    with fresh_cache(), torch.no_grad():
        out, code = run_and_get_code(cm, *args)
    return cm, out, "\n".join(code)


def _exact(out, ref):
    assert (out.float() - ref.float()).abs().max().item() == 0.0


def _ql():
    torch.manual_seed(0)
    return QuantizedLinear.from_float(torch.randn(48, 128).bfloat16(), scheme="w_mxfp4_a_mxfp4")


@pytest.mark.parametrize("mode", ["floor", "default"])
def test_opaque_linear_fuses(declared, mode):
    m = OpaqueLinear(_ql(), mode)
    x = torch.randn(8, 128).bfloat16()
    cm, out, code = _compile_run(m, x)
    assert counters["inductor"]["mxemu_linear"] == 1, dict(counters["mxemu"])
    FileCheck().check("torch.ops.mxemu.linear").check_not("extern_kernels.mm").check_not("emu_test").run(code)
    want = "even" if mode == "default" else mode  # the scale mode is read from each call (defaults too)
    assert f'"act_scale_mode":"{want}"' in code
    with torch.no_grad():
        _exact(out, m(x))
        x2 = torch.randn(5, 128).bfloat16()
        _exact(cm(x2), m(x2))


def test_opaque_mismatches_stay_with_reason(declared):
    x = torch.randn(8, 128).bfloat16()
    # int8-stored packed weights: the declaration (packed uint8) does not cover them
    m = OpaqueLinear(_ql(), "even", int8_weight=True)
    _, out, code = _compile_run(m, x)
    assert counters["mxemu"]["linear"] == 0
    FileCheck().check_not("torch.ops.mxemu").run(code)
    with torch.no_grad():
        _exact(out, m(x))
    report = emu_inductor.explain(m, x)
    assert "weight is torch.int8, expected packed torch.uint8 (mxfp4)" in str(report), str(report)
    assert not report.fused
    # a scale mode the fused ops do not have: only the weight side fuses (w4a16 over the QDQ'd x)
    m = OpaqueLinear(_ql(), "rceil_log2")
    _, out, code = _compile_run(m, x)
    assert counters["mxemu"]["linear"] == 1 and '"act_kind":"none"' in code
    assert any("scale mode 'rceil_log2'" in r["reason"] for r in recorder.RECORDS if not r["fused"])
    with torch.no_grad():
        _exact(out, m(x))


def test_opaque_moe_fuses_whole_layer(declared):
    """Expert GEMMs on the opaque ops inside the canonical MoE structure -> mxemu::moe."""
    torch.manual_seed(0)
    E, H, I, T, k = 4, 64, 32, 8, 2
    ex = QuantizedExperts.from_float((torch.randn(E, 2 * I, H) / 8).bfloat16(), (torch.randn(E, H, I) / 6).bfloat16(),
                                     scheme="w_mxfp4_a_mxfp4")

    class OpaqueMoE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ex = ex

        def forward(self, x, tw, ids):
            W13 = torch.ops.emu_test.dq_mxfp4(ex.w13, ex.w13_scale, x.dtype)
            W2 = torch.ops.emu_test.dq_mxfp4(ex.w2, ex.w2_scale, x.dtype)

            def g1(a, offs):
                return torch._grouped_mm(torch.ops.emu_test.qdq_mxfp4(a, "even"), W13.transpose(-2, -1), offs=offs)

            def g2(a, offs):
                return torch._grouped_mm(torch.ops.emu_test.qdq_mxfp4(a, "even"), W2.transpose(-2, -1), offs=offs)

            return moe_structure.moe_grouped_structure(x, tw, ids, None, g1, g2, E=E, activation="silu",
                                                       apply_router_weight_on_input=False)

    m = OpaqueMoE()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
    tw = torch.rand(T, k, generator=g)
    _, out, code = _compile_run(m, x, tw, ids)
    c = counters["mxemu"]
    assert c["grouped_mm"] == 2 and c["moe"] == 1, dict(c)
    assert code.count("torch.ops.mxemu.moe.default(") == 1
    FileCheck().check_not("emu_test").check_not("_grouped_mm(").run(code)
    with torch.no_grad():
        _exact(out, ex(x, tw, ids))  # the reference layer with the same weights


def test_declarations_change_uuid_and_validate():
    from emu_inductor.passes import MxemuPass

    opaque.clear()
    try:
        u0 = MxemuPass().uuid()
        emu_inductor.register_dequant_op(DQ, "mxfp4")
        u1 = MxemuPass().uuid()
        emu_inductor.register_dequant_op(DQ, "mxfp4", e8m0="exp2")
        u2 = MxemuPass().uuid()
        assert len({u0, u1, u2}) == 3
        with pytest.raises(ValueError, match="takes 3 arguments"):
            emu_inductor.register_dequant_op(DQ, "mxfp4", scale_arg=5)
        with pytest.raises(ValueError, match="global_scale_arg"):
            emu_inductor.register_qdq_op(QDQ, "nvfp4")
        with pytest.raises(ValueError, match="no global scale"):
            emu_inductor.register_dequant_op(DQ, "mxfp4", alpha_arg=2)
    finally:
        opaque.clear()
    assert MxemuPass().uuid() == u0


def test_opaque_call_binds_keywords_and_defaults():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    n1 = g.call_function(QDQ, (x,))
    n2 = g.call_function(QDQ, (x,), {"mode": "floor"})
    assert opaque_ops.bind_schema_args(n1) == [x, "even"]
    assert opaque_ops.bind_schema_args(n2) == [x, "floor"]
    assert opaque_ops.requires_reason(n2, ((1, "floor"),)) is None
    assert "holds for 'even' only" in opaque_ops.requires_reason(n2, ((1, "even"),))
