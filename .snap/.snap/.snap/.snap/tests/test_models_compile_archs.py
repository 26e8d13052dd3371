"""The other transformers MoE architectures under torch.compile(backend="mxemu"): Mixtral,
Qwen2-MoE (shared expert + gate) and DeepSeek-V3 (shared experts, sigmoid routing with
groups), tiny configs with random weights, NVFP4 w4a4 on experts and linears.

Every MoE layer must become one mxemu::moe and every quantized linear one mxemu::linear
(counters equal to the module counts), with no graph break, and the logits must equal
eager emulation. (Greedy generation is covered for Qwen3-MoE in test_models_compile.py.)
About 1.5 minutes per architecture on a 2-core CPU (one Inductor compile each).
"""

import pytest
import torch

pytest.importorskip("transformers")

from emu_inductor.models import quantize_model, quantized_modules  # noqa: E402
from emu_inductor.models.tiny import tiny_model  # noqa: E402
from helpers import model_backend as _backend  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_arch_compiled_fuses_every_layer(arch):
    from torch._dynamo.utils import counters

    calib = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    m = quantize_model(tiny_model(arch), "nvfp4_w4a4", targets=("experts", "linear"), calibration_data=calib)
    q = quantized_modules(m)
    n_moe, n_linear = len(q["moe"]), len(q["linear"])
    assert n_moe >= 1 and n_linear >= 1, (n_moe, n_linear)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(ids, use_cache=False).logits
        torch._dynamo.reset()
        counters.clear()
        try:
            with torch._inductor.utils.fresh_cache():  # an FX-graph-cache hit would skip the pass
                out = torch.compile(m, backend=_backend())(ids, use_cache=False).logits
        finally:
            torch._dynamo.reset()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["mxemu"]["moe"] == n_moe, dict(counters["mxemu"])
    assert counters["mxemu"]["linear"] == n_linear, dict(counters["mxemu"])
    # the linears' activation QDQ went inside the fused op (HF passes [B, S, H])
    weight_only = {k: v for k, v in counters["mxemu_patterns"].items() if k.startswith("linear.") and "a16" in k}
    assert not weight_only, dict(counters["mxemu_patterns"])
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)
