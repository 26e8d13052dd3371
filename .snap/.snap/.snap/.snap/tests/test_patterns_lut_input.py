"""vLLM keeps the E2M1 lookup table in a module global (`kE2M1ToFloat_handle.val`, an fp32
tensor [0, 0.5, 1, 1.5, 2, 3, 4, 6]). Under torch.compile it reaches the post-grad graph as
a graph input whose values the pass cannot see: the LUT-style dequant still fuses, guarded
by a run-time assertion that the input is the E2M1 table (a changed table raises)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache, run_and_get_code
from torch.testing import FileCheck

from emu_inductor.passes import recorder
from emu_inductor.patterns.dequant import E2M1_LUT, vllm_dequantize_to_dtype
from emu_inductor.reference import QuantizedLinear


class _Handle:  # vLLM: kE2M1ToFloat_handle = _Handle(); .val set at import / device move
    val = torch.tensor(E2M1_LUT, dtype=torch.float32)


kE2M1ToFloat_handle = _Handle()


class VllmGlobalLutLinear(torch.nn.Module):
    def __init__(self, ql):
        super().__init__()
        self.ql = ql

    def forward(self, x):
        q = self.ql
        w = vllm_dequantize_to_dtype(q.weight, q.weight_scale.view(torch.uint8), q.alpha,
                                     kE2M1ToFloat_handle.val, x.dtype)
        return x @ w.t()


@pytest.mark.parametrize("dynamic", [None, True], ids=["static", "dynamic"])
def test_module_global_lut_fuses_guarded(dynamic):
    torch.manual_seed(0)
    ql = QuantizedLinear.from_float(torch.randn(32, 64).bfloat16(), scheme="nvfp4_w4a16")
    m = VllmGlobalLutLinear(ql)
    x = torch.randn(8, 64).bfloat16()
    with torch.no_grad():
        ref = m(x)
    torch._dynamo.reset()
    counters.clear()
    recorder.RECORDS.clear()
    cm = torch.compile(m, backend="mxemu", dynamic=dynamic)  # dynamic=True: the LUT's length is symbolic
    with fresh_cache(), torch.no_grad():
        out, code = run_and_get_code(cm, x)
        code = "\n".join(code)
        assert counters["mxemu"]["linear"] == 1, (dict(counters["mxemu"]), recorder.RECORDS)
        assert counters["mxemu_patterns"]["linear.runtime_tensor_guard"] == 1, dict(counters["mxemu_patterns"])
        FileCheck().check("torch.ops.mxemu.").check_not("extern_kernels.mm").run(code)
        assert "E2M1 LUT" in code  # the run-time assertion's message
        assert any(r["fused"] and "guarded: E2M1 LUT" in r["reason"] for r in recorder.RECORDS), \
            recorder.RECORDS
        assert (out.float() - ref.float()).abs().max().item() == 0.0

        lut = kE2M1ToFloat_handle.val
        saved = lut.clone()
        try:
            lut[7] = 5.0  # in place: same tensor, so no Dynamo guard fails; the assertion must
            with pytest.raises(RuntimeError, match="E2M1 LUT"):
                cm(x)
            lut.copy_(saved)
            lut[0] = -0.0  # bitwise: -0.0 is not the table's +0.0
            with pytest.raises(RuntimeError, match="E2M1 LUT"):
                cm(x)
        finally:
            lut.copy_(saved)
        assert (cm(x).float() - ref.float()).abs().max().item() == 0.0


def test_large_table_guard_is_one_constant_and_still_raises():
    """A 512-entry table buffer (the red-team [256, 2] byte -> value-pair table) is guarded
    against one constant buffer, not a cat of 512 `full`s (seconds of Inductor compile), and a
    changed table still raises."""
    from tests.corpus import redteam_linear as R

    m, (x,) = R.make_pair_mxfp4(3, torch.bfloat16)
    with torch.no_grad():
        ref = m(x)
    torch._dynamo.reset()
    counters.clear()
    cm = torch.compile(m, backend="mxemu")
    with fresh_cache(), torch.no_grad():
        out, code = run_and_get_code(cm, x)
        code = "\n".join(code)
        assert counters["mxemu_patterns"]["semantic.runtime_tensor_guard"] == 1, dict(counters["mxemu_patterns"])
        assert "_mxemu_guard_table_" in code
        assert torch.equal(out, ref)
        saved = m.pairs.clone()
        try:
            m.pairs[17, 1] = 0.75  # in place: no Dynamo guard fails; the run-time assertion must
            with pytest.raises(RuntimeError, match="mxemu"):
                cm(x)
        finally:
            m.pairs.copy_(saved)
        assert torch.equal(cm(x), ref)
