"""torch.compile(dynamic=True): Dynamo turns Python float globals/attributes (the NVFP4
QDQ's `_SIXTH = 1/6`) into f64[] graph inputs. The patterns match that form too (with a
runtime assertion on the value), so stage 1 absorbs the QDQ and stage 2 builds mxemu::moe.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache, run_and_get_code

from emu_inductor.demo import DemoConfig, build_default_model
from emu_inductor.formats import nvfp4


def _eager(model, x):
    with torch.no_grad():
        return model(x)


def test_demo_moe_dynamic_true_fuses_without_recompiles():
    cfg = DemoConfig(device="cpu", num_experts=8, top_k=2, hidden=64, intermediate=32)
    m, _, x = build_default_model(cfg)
    torch._dynamo.reset()
    counters.clear()
    with fresh_cache(), torch.no_grad():
        cm = torch.compile(m, backend="mxemu", dynamic=True)
        out, code = run_and_get_code(cm, x)
        code = "\n".join(code)
        assert counters["mxemu"]["moe"] == 1, dict(counters["mxemu"])
        assert counters["mxemu_patterns"]["grouped_mm.runtime_float_const"] >= 1, dict(counters["mxemu_patterns"])
        assert "torch.ops.mxemu.moe" in code
        assert (out.float() - _eager(m, x).float()).abs().max().item() == 0.0
        runs = counters["mxemu"]["pass_runs"]
        frames = counters["stats"]["unique_graphs"]
        g = torch.Generator().manual_seed(1)
        for t in (3,):  # a second token count (the first call ran 8)
            xt = torch.randn(t, cfg.hidden, generator=g).bfloat16()
            ot = cm(xt)
            assert ot.shape == (t, cfg.hidden)
            assert (ot.float() - _eager(m, xt).float()).abs().max().item() == 0.0
        assert counters["mxemu"]["pass_runs"] == runs, "recompiled for a new token count"
        assert counters["stats"]["unique_graphs"] == frames, "recompiled for a new token count"

        # the fused op assumes the traced 1/6; the float is a graph input guarded only by type,
        # so a changed value must raise rather than silently compute with 1/6
        old = nvfp4._SIXTH
        nvfp4._SIXTH = 0.2
        try:
            with pytest.raises(RuntimeError, match="float constant"):
                cm(x)
        finally:
            nvfp4._SIXTH = old
        assert (cm(x).float() - out.float()).abs().max().item() == 0.0
