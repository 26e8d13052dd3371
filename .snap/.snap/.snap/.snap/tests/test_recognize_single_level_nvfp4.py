"""Single-level NVFP4 activations (no per-tensor global scale): torchao 0.18's
`nvfp4_quantize(x, 16, per_tensor_scale=None)` + dequant, the activation QDQ of its
NVFP4 MoE training path. It is the `torchao` recipe of emu_inductor.formats at the
global scale g = 1.0 (multiplying or dividing by 1.0 is exact), so the recogniser tests
cones without a global-scale input against the NVFP4 recipes at g = 1 and the pass gives
the fused op a constant 1.0 tensor (issue 8)."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from emu_inductor.formats import E2M1, fake_quantize
from emu_inductor.recognize import ActVerdict, Rejection, gemm_nodes, recognize_activation
from emu_inductor.recognize import probes as P

torchao = pytest.importorskip("torchao")
from torchao.prototype.moe_training.nvfp4_grouped_mm import _nvfp4_dequantize  # noqa: E402
from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, nvfp4_quantize  # noqa: E402

from tests.corpus import REGISTRY  # noqa: E402
from tests.corpus.oracle import assert_within_accumulation  # noqa: E402
from tests.test_recognize_activation import K, trace  # noqa: E402
from tests.test_recognize_moe import _compile  # noqa: E402

DTYPES = [torch.bfloat16, torch.float32]
_INT = {torch.bfloat16: torch.int16, torch.float32: torch.int32}


def torchao_qdq(x):
    s, d = nvfp4_quantize(x.contiguous(), 16, None)
    return _nvfp4_dequantize(d, s, 16, output_dtype=x.dtype)


def torchao_tensor_qdq(x):
    return NVFP4Tensor.to_nvfp4(x.contiguous(), 16, None, use_triton_kernel=False).dequantize(x.dtype)


def qdq_bf16_block_scale(x):
    """torchao's spelling with amax / 6 rounded to bf16 before the E4M3 cast: a near miss."""
    xb = x.float().reshape(x.shape[0], -1, 16)
    s = torch.clamp((xb.abs().amax(-1) / 6.0).to(torch.bfloat16).float(), min=2.0 ** -6, max=448.0)
    s = s.to(torch.float8_e4m3fn).float()
    y = torch.clamp(xb * (1.0 / s).unsqueeze(-1), -6.0, 6.0)
    q = fake_quantize(y.reshape(x.shape), "mxfp4", scale_mode="floor").float().reshape(xb.shape)  # E2M1 RNE
    return (q * s.unsqueeze(-1)).reshape(x.shape).to(x.dtype)


def same_bits(a, b):
    ok = (a.view(_INT[a.dtype]) == b.view(_INT[b.dtype])) | (torch.isnan(a) & torch.isnan(b))
    return bool(ok.all())


def inputs(seed, dtype, rows=16):
    """Random rows at magnitudes 2^-140 .. 2^120 plus zero, -0, subnormal, saturating
    (block scale above 448), NaN and +-Inf blocks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=g) * torch.exp2(torch.randint(-140, 121, (rows, 1), generator=g).float())
    x[0, :16] = 0
    x[0, 16:32] = -0.0
    x[1] = torch.randn(K, generator=g) * torch.finfo(dtype).tiny
    x[2] = torch.randn(K, generator=g) * 448 * 6 * 16
    x[3, 3], x[3, 20], x[3, 40] = float("nan"), float("inf"), -float("inf")
    return x.to(dtype)


def probe_rows(dtype):
    b = P.act_blocks(16, dtype, [E2M1], global_scale=1.0).blocks
    b = torch.cat([b, b.new_zeros((-b.shape[0]) % (K // 16), 16)])
    return b.to(dtype).reshape(-1, K)


@pytest.mark.parametrize("dtype", DTYPES)
def test_torchao_single_level_equals_the_torchao_recipes_at_unit_global_scale(dtype):
    one = torch.tensor(1.0)
    for x in [probe_rows(dtype)] + [inputs(s, dtype) for s in (1, 2, 3)]:
        lib = torchao_qdq(x)
        assert same_bits(lib, torchao_tensor_qdq(x))  # NVFP4Tensor.dequantize: the same function
        for recipe in ("torchao", "torchao_moe"):
            assert same_bits(lib, fake_quantize(x, "nvfp4", recipe=recipe, global_scale=one)), recipe
        # another recipe at g = 1 is another function (modelopt floors the scale at 2^-9)
        assert not same_bits(lib, fake_quantize(x, "nvfp4", recipe="modelopt", global_scale=one))


def recognise(qdq, dtype):
    w = torch.randn(8, K, dtype=dtype)
    # functionalized as Dynamo does: torchao's E2M1 rounding writes in place
    fn = torch.func.functionalize(lambda x, w: qdq(x) @ w.t(), remove="mutations")
    gm = trace(fn, inputs(0, dtype), w)
    (gemm,) = gemm_nodes(gm.graph)
    return recognize_activation(gemm, use_cache=False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_recogniser_proves_torchao_single_level_qdq(dtype):
    v = recognise(torchao_qdq, dtype)
    assert isinstance(v, ActVerdict), v.reason
    assert (v.variant.kind, v.variant.recipe, v.variant.rounding) == ("nvfp4", "torchao", "rne")
    assert v.global_scale is None and v.global_value == 1.0 and v.kernel_supported
    assert "nvfp4 recipe=torchao_moe rounding=rne" in v.equivalent  # the same function at g = 1
    assert "constant global scale 1" in v.describe()
    for seed in (11, 12, 13):
        x = inputs(seed, dtype)
        assert same_bits(torchao_qdq(x), v.reference(x))


def test_block_scale_rounded_in_bf16_is_left_alone():
    v = recognise(qdq_bf16_block_scale, torch.float32)
    assert isinstance(v, Rejection)
    assert "told apart by probe" in v.reason, v.reason


class SingleLevelLinear(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        s, d = nvfp4_quantize(w, 16, None)
        self.register_buffer("w_data", d)
        self.register_buffer("w_scale", s)

    def forward(self, x):
        return F.linear(torchao_qdq(x), _nvfp4_dequantize(self.w_data, self.w_scale, 16, output_dtype=x.dtype))


def test_compiled_single_level_linear_fuses_with_its_activation_qdq():
    model = SingleLevelLinear(torch.randn(32, K, dtype=torch.bfloat16))
    x = torch.randn(5, K, dtype=torch.bfloat16)
    compiled, out, ops, records = _compile(model, x)
    assert counters["mxemu_patterns"]["semantic.linear.with_qdq"] == 1, dict(counters["mxemu_patterns"])
    assert ops.count("mxemu.linear.default") == 1 and "aten.mm.default" not in ops, ops
    (r,) = [r for r in records if r.family == "semantic" and r.fused]
    assert "recipe=torchao" in r.reason and "constant global scale 1" in r.reason, r.reason
    with torch.no_grad():
        assert_within_accumulation(out, model(x), "single-level linear")
        x2 = inputs(5, torch.bfloat16)[4:9]  # fresh rows, same compiled graph
        assert_within_accumulation(compiled(x2), model(x2), "single-level linear")


def test_torchao_nvfp4_moe_is_one_mxemu_moe_with_the_data_dependent_flags():
    """The corpus layer (bincount offsets): one graph with Dynamo's capture flags, and then
    one mxemu::moe whose a1/a2 global scales are the constant 1.0."""
    (entry,) = [e for e in REGISTRY if e.name == "torchao_nvfp4_moe"]
    model, (x,) = entry.make(1, torch.bfloat16)
    with torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
        compiled, out, ops, records = _compile(model, x)
    assert counters["mxemu_patterns"]["semantic.grouped_mm.with_qdq"] == 2, dict(counters["mxemu_patterns"])
    assert ops.count("mxemu.moe.default") == 1 and not any("grouped_mm" in o for o in ops), ops
    with torch.no_grad():
        assert_within_accumulation(out, model(x), entry.name)
