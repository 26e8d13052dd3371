"""The tiny GPT-OSS model (experts with per-expert GEMM biases) under
torch.compile(backend="mxemu"): NVFP4 w4a4, experts and linears quantized, calibrated.

Every MoE layer must become one `mxemu::moe` carrying the biases (the K-extended biased
grouped GEMMs of `moe_emulated(w13_bias=, w2_bias=)` fused by the `grouped_mm` family,
then the whole layer by the `moe` family), every QuantizedLinear one `mxemu::linear`
with its activation QDQ inside, no graph breaks; logits within 1e-2 of eager emulation at
every step and 5 greedy tokens identical (fixed 13-token buffer, full recomputation:
one graph; see tests/test_models_compile.py for why HF `generate` with a KV cache is not
used). On a 2-core CPU the compile alone takes ~2 minutes and every compiled step ~3 s
(two mxemu::moe and eight mxemu::linear under Triton's interpreter), so the Qwen3 test's
20 tokens (+1 minute) are cut to 5 here; EMU_INDUCTOR_TEST_GREEDY=20 runs them all.
"""

import os

import pytest
import torch

pytest.importorskip("transformers")

from emu_inductor.models import quantize_model, quantized_modules  # noqa: E402
from emu_inductor.models.tiny import tiny_model  # noqa: E402
from helpers import PROMPT, greedy as _greedy, model_backend as _backend  # noqa: E402  (the Qwen3 test's decoding)

NEW = int(os.environ.get("EMU_INDUCTOR_TEST_GREEDY", "5"))


@pytest.mark.slow
def test_gpt_oss_compiled_matches_eager():
    from torch._dynamo.utils import counters

    calib = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    m = quantize_model(tiny_model("gpt_oss"), "nvfp4_w4a4", targets=("experts", "linear"), calibration_data=calib)
    q = quantized_modules(m)
    n_moe, n_linear = len(q["moe"]), len(q["linear"])
    assert (n_moe, n_linear) == (2, 8)
    blocks = [m.get_submodule(name) for name in q["moe"]]
    assert all(b.experts.w13_bias is not None and b.experts.w2_bias is not None for b in blocks)
    prompt = torch.randint(0, 256, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_seq, ref_logits = _greedy(m, prompt, NEW)
        torch._dynamo.reset()
        counters.clear()
        try:
            with torch._inductor.utils.fresh_cache():  # an FX-graph-cache hit would skip the pass
                cm = torch.compile(m, backend=_backend())
                seq, logits = _greedy(cm, prompt, NEW)
        finally:
            torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["mxemu"]["moe"] == n_moe, dict(counters["mxemu"])
    assert counters["mxemu"]["linear"] == n_linear, dict(counters["mxemu"])
    assert counters["inductor"]["mxemu_moe"] == n_moe and counters["inductor"]["mxemu_linear"] == n_linear
    # the MoE layers fused through the biased patterns, with the activation QDQ inside
    biased = {k: v for k, v in counters["mxemu_patterns"].items() if k.startswith("moe.") and k.endswith("_bias")}
    assert sum(biased.values()) == n_moe, dict(counters["mxemu_patterns"])
    weight_only = {k: v for k, v in counters["mxemu_patterns"].items()
                   if k.startswith(("linear.", "grouped_mm.")) and "a16" in k}
    assert not weight_only, dict(counters["mxemu_patterns"])
    for step, (a, b) in enumerate(zip(logits, ref_logits)):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=1e-2, msg=f"step {step}")
    assert torch.equal(seq, ref_seq), (seq, ref_seq)
