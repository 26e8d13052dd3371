"""A whole quantized transformers model under torch.compile(backend="mxemu").

One tiny Qwen3-MoE model (2 MoE layers, 8 quantized attention projections), NVFP4 w4a4,
calibrated. Every MoE layer must become one mxemu::moe and every QuantizedLinear one
mxemu::linear with its activation QDQ inside; the logits must match eager emulation and 8 greedy tokens must be
identical to eager's (20 before the eighth session: each step runs the fused ops under the Triton
interpreter, and the test was the suite's second slowest; the steps add no new graph).

Greedy decoding here recomputes the whole sequence in a fixed 28-token buffer (causal
attention: positions past the current one do not affect it; every op of the emulation is
per token), so one graph serves all 20 steps. HF `generate` with a KV cache is not used:
its decode step multiplies a 1-row query (`bmm` with M == 1), which Inductor's CPU
lowering turns into mul + sum; with `emulate_precision_casts` (on under mxemu) each bf16
product is rounded, unlike eager `bmm`, and NVFP4 activation QDQ amplifies that into
token changes after ~8-15 steps (stock Inductor behaviour on CPU, outside the mxemu ops;
see docs/models.md). About a minute on a 2-core CPU (one Inductor compile).
"""

import pytest
import torch

pytest.importorskip("transformers")

from emu_inductor.models import quantize_model, quantized_modules  # noqa: E402
from emu_inductor.models.tiny import tiny_model  # noqa: E402

from helpers import PROMPT, greedy as _greedy, model_backend as _backend  # noqa: E402  (shared with the other model tests)

_NEW = 8  # greedy steps (one graph: a fixed [1, PROMPT + _NEW] buffer)


@pytest.mark.slow
def test_qwen3_moe_compiled_matches_eager():
    from torch._dynamo.utils import counters

    backend = _backend()
    calib = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    m = quantize_model(tiny_model("qwen3_moe"), "nvfp4_w4a4", targets=("experts", "linear"), calibration_data=calib)
    q = quantized_modules(m)
    n_moe, n_linear = len(q["moe"]), len(q["linear"])
    assert (n_moe, n_linear) == (2, 8)
    prompt = torch.randint(0, 256, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_seq, ref_logits = _greedy(m, prompt, new=_NEW)
        torch._dynamo.reset()
        counters.clear()
        try:
            with torch._inductor.utils.fresh_cache():  # an FX-graph-cache hit would skip the pass
                cm = torch.compile(m, backend=backend)
                seq, logits = _greedy(cm, prompt, new=_NEW)
        finally:
            torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["mxemu"]["moe"] == n_moe, dict(counters["mxemu"])
    assert counters["mxemu"]["linear"] == n_linear, dict(counters["mxemu"])
    assert counters["inductor"]["mxemu_moe"] == n_moe and counters["inductor"]["mxemu_linear"] == n_linear
    # the linears' NVFP4 activation QDQ is inside the fused op, not left to Inductor
    # (HF passes [B, S, H]; RowQuantizedLinear hands the pattern 2-D rows)
    weight_only = {k: v for k, v in counters["mxemu_patterns"].items() if k.startswith("linear.") and "a16" in k}
    assert not weight_only, dict(counters["mxemu_patterns"])
    for step, (a, b) in enumerate(zip(logits, ref_logits)):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=1e-2, msg=f"step {step}")
    assert torch.equal(seq, ref_seq), (seq, ref_seq)
