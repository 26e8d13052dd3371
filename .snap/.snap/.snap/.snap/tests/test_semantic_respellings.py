"""Respellings of an activation QDQ, and the vLLM torch NVFP4 QDQ, proven by evaluation.

* An MXFP4 floor QDQ spelled with exponent bits / frexp / floor(log2) is the formats'
  floor variant only when a NaN or Inf block gives NaN (the OCP rule): the same code
  without that guard gives finite garbage there and must be refused, naming the probe.
* vLLM's torch `ref_nvfp4_quant` + `cast_to_fp4` (sign(y) * R(|y|)) is NVFP4 recipe
  `vllm_torch`; under torch.compile the traced vLLM weight pattern fuses the GEMM
  weight-only first and the semantic family then takes the proven QDQ into that op.
Each verdict is checked against the user's own function on fresh random inputs.
"""

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache, run_and_get_code

from emu_inductor.formats import fake_quantize
from emu_inductor.recognize import ActVerdict, Rejection, gemm_nodes, recognize_activation
from tests.corpus import BY_NAME
from tests.corpus import vllm_style as V
from tests.corpus.oracle import assert_within_accumulation
from tests.corpus.probes import same_bits
from tests.corpus.spellings import SpelledMXLinear
from tests.test_recognize_activation import recognise, trace

K = 64


def _nonfinite_rows(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, K, generator=g) * torch.exp2(torch.randint(-20, 21, (8, 1), generator=g).float())
    x[0, 3] = float("nan")
    x[1, 40] = float("inf")
    x[2, 7] = -float("inf")
    x[3, :32] = 0.0
    return x.to(dtype)


@pytest.mark.parametrize("scale_exp", ["bits", "frexp"])
def test_guarded_respelling_is_the_floor_variant(scale_exp):
    m = SpelledMXLinear(torch.randn(8, K), scale_exp=scale_exp, round="bucketize", nonfinite="nan")
    v = recognise(m.act_qdq)
    assert isinstance(v, ActVerdict), v
    assert (v.variant.kind, v.variant.fmt, v.variant.scale_mode, v.variant.rounding) == ("mx", "mxfp4", "floor", "rne")
    for seed in (1, 2):
        x = _nonfinite_rows(torch.bfloat16, seed)
        assert same_bits(m.act_qdq(x), v.reference(x)).all()
        assert same_bits(m.act_qdq(x), fake_quantize(x, "mxfp4", scale_mode="floor")).all()


def test_unguarded_respelling_is_refused_naming_the_probe():
    m = SpelledMXLinear(torch.randn(8, K), nonfinite="unguarded")
    v = recognise(m.act_qdq)
    assert isinstance(v, Rejection), v
    # the reason names the first probe that told the closest variant apart (which probe that
    # is depends on the probe set); the NaN / Inf rows below are where the respelling is off
    assert "told apart by" in v.reason, v.reason
    x = _nonfinite_rows(torch.bfloat16, 3)
    assert not same_bits(m.act_qdq(x), fake_quantize(x, "mxfp4", scale_mode="floor")).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_vllm_torch_qdq_is_recipe_vllm_torch(dtype):
    gs = torch.tensor(2688.0 / 37.0)
    w = torch.randn(8, K, dtype=dtype)
    # functionalized, as the post-grad graph is (cast_to_fp4's masked assignments -> index_put)
    fn = torch.func.functionalize(lambda x, w, g: V.ref_nvfp4_quant_dequant(x, g) @ w.t(), remove="mutations_and_views")
    (gemm,) = gemm_nodes(trace(fn, _nonfinite_rows(dtype, 0), w, gs).graph)
    v = recognize_activation(gemm, use_cache=False)
    assert isinstance(v, ActVerdict), v
    assert (v.variant.kind, v.variant.recipe) == ("nvfp4", "vllm_torch")
    for seed in (4, 5):
        x = _nonfinite_rows(dtype, seed)[:, :K]
        x[4, :16] = -1e-39  # a block scale that underflows: y is -0.0, vLLM gives +0.0
        x[5, 16:32] = torch.tensor([-1e-3, 1e-3] * 8)
        assert same_bits(V.ref_nvfp4_quant_dequant(x, gs), v.reference(x, gs)).all()
        assert same_bits(V.ref_nvfp4_quant_dequant(x, gs), fake_quantize(x, "nvfp4", recipe="vllm_torch",
                                                                         global_scale=gs)).all()


def test_weight_only_fused_linear_takes_the_proven_qdq():
    m, (x,) = BY_NAME["vllm_nvfp4_linear"].make(7, torch.bfloat16)
    torch._dynamo.reset()
    counters.clear()
    with fresh_cache(), torch.no_grad():
        out, code = run_and_get_code(torch.compile(m, backend="mxemu"), x)
        ref = m(x)
    code = "\n".join(code)
    # the traced family fused the GEMM weight-only, the semantic family took the QDQ in
    assert counters["mxemu"]["linear"] == 1 and counters["mxemu"]["semantic"] == 1, dict(counters["mxemu"])
    assert code.count("torch.ops.mxemu.linear.default(") == 1
    assert '\\"act_recipe\\":\\"vllm_torch\\"' in code or '"act_recipe":"vllm_torch"' in code
    assert_within_accumulation(out, ref, "vllm_nvfp4_linear")


# --- ModelOpt's E2M1 table: code 0x8 decodes as +0 ------------------------------------------

_E2M1_PLUS0 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def _deq_table(w, s, a, table):
    codes = torch.stack([w & 0xF, w >> 4], -1).flatten(-2).long()
    v = torch.tensor(table)[codes].reshape(w.shape[0], -1, 16)
    return (v * (s.float() * a).unsqueeze(-1)).reshape(w.shape[0], -1).to(torch.bfloat16)


@pytest.mark.parametrize("plus0", [True, False])
def test_weight_table_with_plus0_at_code_8(plus0):
    """A value table with +0 for the -0 code (ModelOpt's e2m1_values) is its own decode,
    told apart from the -0 reading by the probes, and fused (the sign of a zero weight is
    invisible after the GEMM's +0-started accumulation)."""
    from tests.test_recognize_weight import check, leaves
    table = _E2M1_PLUS0 if plus0 else [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0,
                                       -4.0, -6.0]
    v = check(lambda w, s, a: _deq_table(w, s, a, table), leaves(1), expect_fmt="nvfp4", alpha_order="scale_alpha")
    assert v.variant.negzero_decode == ("positive" if plus0 else "keep")
    assert v.kernel_supported


# --- compressed-tensors' decompress(): a Parameter of the float block scales ---------------


def test_ct_nvfp4_linear_fuses_with_dynamo_tracing_the_parameter_ctor():
    """decompress() also returns the float block scales as a new nn.Parameter. Under
    Dynamo's default that graph-breaks (the registry entry stays expect_fused=False); with
    graph_break_on_nn_param_ctor=False the Parameter is a set_ of a graph input from the
    scale-only decode nodes, which may keep that user, and the layer is one mxemu::linear."""
    m, (x,) = BY_NAME["ct_nvfp4_linear"].make(3, torch.bfloat16)
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(graph_break_on_nn_param_ctor=False), fresh_cache(), torch.no_grad():
        out, code = run_and_get_code(torch.compile(m, backend="mxemu"), x)
        ref = m(x)
    code = "\n".join(code)
    assert sum(counters["graph_break"].values()) == 0 and counters["mxemu"]["semantic"] == 1, dict(counters["mxemu"])
    assert code.count("torch.ops.mxemu.linear.default(") == 1 and '"act_kind":"block"' in code.replace('\\"', '"')
    assert_within_accumulation(out, ref, "ct_nvfp4_linear")


class _WeightAlsoReturned(torch.nn.Module):
    """The dequantized weight has another user: fusing would compute the decode twice."""

    def __init__(self):
        super().__init__()
        self.m = SpelledMXLinear(torch.randn(32, K), nonfinite="nan")

    def forward(self, x):
        w = self.m.dequantized_weights(x.dtype)["weight"]
        return torch.nn.functional.linear(self.m.act_qdq(x), w), w.amax()


def test_weight_with_another_user_stays_as_written():
    from emu_inductor.passes import recording
    m, x = _WeightAlsoReturned(), torch.randn(5, K).bfloat16()
    torch._dynamo.reset()
    counters.clear()
    with recording() as sink, fresh_cache(), torch.no_grad():
        out, amax = torch.compile(m, backend="mxemu")(x)
        ref, ref_amax = m(x)
    assert counters["mxemu"]["semantic"] == 0, dict(counters["mxemu"])
    left = [c for c in sink.candidates if c.family == "semantic" and not c.fused]
    assert left and "also used by" in left[0].reason, [c.reason for c in sink.candidates]
    assert_within_accumulation(out, ref, "weight used elsewhere")
    assert torch.equal(amax, ref_amax)
