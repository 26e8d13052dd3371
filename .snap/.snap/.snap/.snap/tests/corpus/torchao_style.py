"""torchao (installed 0.18): an MXFP4 linear on `to_mx` / `to_dtype`, and an NVFP4 MoE on
`nvfp4_quantize` + the emulated grouped GEMM of `torchao.prototype.moe_training`
(single-level NVFP4: torchao's emulated grouped mm does not plumb the per-tensor scale).
Routing the torchao/torchtitan way: argsort of the flat expert ids, bincount + cumsum
offsets, torch._grouped_mm; combine by index_add_ in fp32."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchao.prototype.moe_training.nvfp4_grouped_mm import (
    _emulated_nvfp4_scaled_grouped_mm_2d_3d,
    _nvfp4_dequantize,
)
from torchao.prototype.mx_formats.config import ScaleCalculationMode
from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx
from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize, per_tensor_amax_to_scale

from . import E, H, I, TOP_K, CorpusEntry, Variant, WeightVariant
from .data import gen, moe_weights, qtensor, tokens, weight

FP4 = torch.float4_e2m1fn_x2


class TorchaoMXLinear(nn.Module):
    def __init__(self, w: torch.Tensor, mode=ScaleCalculationMode.FLOOR):
        super().__init__()
        self.mode = mode
        scale, data = to_mx(w, FP4, 32, mode)
        self.register_buffer("w_qdata", data)
        self.register_buffer("w_scale", scale)  # float8_e8m0fnu

    def act_qdq(self, x):
        s, d = to_mx(x, FP4, 32, self.mode)
        return to_dtype(d, s, FP4, 32, x.dtype)

    def dequantized_weights(self, dtype=torch.bfloat16):
        return {"weight": to_dtype(self.w_qdata, self.w_scale, FP4, 32, dtype)}

    def forward(self, x):
        w = to_dtype(self.w_qdata, self.w_scale, FP4, 32, x.dtype)
        return F.linear(self.act_qdq(x), w)

    def emu_view(self):
        return {"weight": qtensor("mxfp4", self.w_qdata, self.w_scale.view(torch.uint8))}


class TorchaoNVFP4TwoLevelLinear(nn.Module):
    """Two-level NVFP4 with per-tensor scales (amax / 2688, calibrated), dequantized by the
    moe_training helper with `per_tensor_scale=`: ((q * s) * pts), the product order of
    torchao's emulated grouped GEMMs (NVFP4Tensor.dequantize forms pts * s first)."""

    def __init__(self, w, x_calib):
        super().__init__()
        self.register_buffer("w_pts", per_tensor_amax_to_scale(w.abs().amax()))
        self.register_buffer("x_pts", per_tensor_amax_to_scale(x_calib.abs().amax()))
        scale, data = nvfp4_quantize(w, 16, self.w_pts)
        self.register_buffer("w_data", data)
        self.register_buffer("w_scale", scale)

    def act_qdq(self, x):
        s, d = nvfp4_quantize(x.contiguous(), 16, self.x_pts)
        return _nvfp4_dequantize(d, s, 16, per_tensor_scale=self.x_pts, output_dtype=x.dtype)

    def dequantized_weights(self, dtype=torch.bfloat16):
        return {"weight": _nvfp4_dequantize(self.w_data, self.w_scale, 16, per_tensor_scale=self.w_pts,
                                            output_dtype=dtype)}

    def forward(self, x):
        return F.linear(self.act_qdq(x), self.dequantized_weights(x.dtype)["weight"])

    def emu_view(self):
        return {"weight": qtensor("nvfp4", self.w_data, self.w_scale, self.w_pts), "a1_global": self.x_pts}


class TorchaoNVFP4MoE(nn.Module):
    def __init__(self, router: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor):
        super().__init__()
        self.router = nn.Linear(H, E, bias=False, dtype=router.dtype)
        self.router.weight.data.copy_(router)
        s13, d13 = zip(*(nvfp4_quantize(w13[e].contiguous(), 16, None) for e in range(E)))
        s2, d2 = zip(*(nvfp4_quantize(w2[e].contiguous(), 16, None) for e in range(E)))
        self.register_buffer("w13_data", torch.stack(d13))
        self.register_buffer("w13_scale", torch.stack(s13))
        self.register_buffer("w2_data", torch.stack(d2))
        self.register_buffer("w2_scale", torch.stack(s2))

    def route(self, x):
        probs = torch.softmax(self.router(x).float(), dim=-1)
        w, ids = torch.topk(probs, TOP_K, dim=-1)
        return w / w.sum(-1, keepdim=True), ids

    def act_qdq(self, x):
        s, d = nvfp4_quantize(x.contiguous(), 16, None)
        return _nvfp4_dequantize(d, s, 16, output_dtype=x.dtype)

    def dequantized_weights(self, dtype=torch.bfloat16):
        return {"w13": _nvfp4_dequantize(self.w13_data, self.w13_scale, 16, output_dtype=dtype),
                "w2": _nvfp4_dequantize(self.w2_data, self.w2_scale, 16, output_dtype=dtype)}

    def forward(self, x):
        T = x.shape[0]
        w, ids = self.route(x)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
        tok = order // TOP_K
        xs = x[tok]
        a_s, a_d = nvfp4_quantize(xs, 16, None)
        h = _emulated_nvfp4_scaled_grouped_mm_2d_3d(a_d, a_s, self.w13_data, self.w13_scale, offs=offs)
        gate, up = h.chunk(2, dim=-1)
        h = (F.silu(gate) * up).contiguous()
        a_s, a_d = nvfp4_quantize(h, 16, None)
        y = _emulated_nvfp4_scaled_grouped_mm_2d_3d(a_d, a_s, self.w2_data, self.w2_scale, offs=offs)
        out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
        out.index_add_(0, tok, y.float() * w.reshape(-1)[order].unsqueeze(-1))
        return out.to(x.dtype)

    def emu_view(self):
        one = torch.tensor(1.0)
        return {"w13": qtensor("nvfp4", self.w13_data, self.w13_scale, one),
                "w2": qtensor("nvfp4", self.w2_data, self.w2_scale, one), "a1_global": one, "a2_global": one}


def make_linear(seed, dtype):
    g = gen(seed)
    m = TorchaoMXLinear(weight(g, 2 * I, H, dtype=dtype))
    return m, (tokens(seed, 5, H, dtype),)


def make_two_level(seed, dtype):
    g = gen(seed)
    m = TorchaoNVFP4TwoLevelLinear(weight(g, 2 * I, H, dtype=dtype), tokens(seed + 50, 8, H, dtype))
    return m, (tokens(seed, 5, H, dtype),)


def make_moe(seed, dtype):
    g = gen(seed)
    m = TorchaoNVFP4MoE(*moe_weights(g, E, H, I, dtype))
    return m, (tokens(seed, 5, H, dtype),)


ENTRIES = [
    CorpusEntry(
        "torchao_mx_linear", "linear", "torchao", "installed torchao 0.18: to_mx, to_dtype (FLOOR)",
        Variant(WeightVariant("mxfp4"),
                act={"fmt": "mxfp4", "variant": "torchao_floor"}),
        make_linear, dtypes=(torch.bfloat16, torch.float32), expect_fused=True,
        compile_note="to_mx returns float8_e8m0fnu scales (kept as a buffer) and builds one for the activation; "
                     "Inductor's CPU codegen cannot compile that dtype, so the layer compiles only because the "
                     "fused op replaces every e8m0 node (the buffer is read through view(uint8))",
        fused_today="one mxemu::linear with the activation QDQ (semantic: formats variant torchao_floor, the "
                    "kernels render its Inf-amax 'exponent' rule and 2^126 byte-0 multiplier), bf16 and fp32, ~7 s",
    ),
    CorpusEntry(
        "torchao_nvfp4_linear_two_level", "linear", "torchao",
        "installed torchao 0.18: nvfp4_quantize (two level), per_tensor_amax_to_scale, "
        "moe_training _nvfp4_dequantize(per_tensor_scale=)",
        Variant(WeightVariant("nvfp4", "(q*s)*g", recipe="torchao_moe"), act={"fmt": "nvfp4", "recipe": "torchao_moe"},
                act_global="static"),
        make_two_level, dtypes=(torch.bfloat16, torch.float32), expect_fused=True,
        fused_today="one mxemu::linear with the NVFP4 torchao_moe activation QDQ (weights recognised as (v*s)*a "
                    "through the masked-fill index_put; measured bf16 and fp32 2026-12-02)",
    ),
    CorpusEntry(
        "torchao_nvfp4_moe", "moe", "torchao",
        "installed torchao 0.18: nvfp4_quantize (single level), moe_training "
        "_emulated_nvfp4_scaled_grouped_mm_2d_3d / _nvfp4_dequantize",
        Variant(WeightVariant("nvfp4", "q*(s*g)", recipe="torchao"),
                act={"fmt": "nvfp4", "recipe": "torchao"}, act_global="static"),
        make_moe,
        compile_note="default Dynamo config: 1 graph break at torch.bincount's data-dependent output size, so the "
                     "layer is two graphs and cannot become one mxemu::moe (measured 13 s to compile); with "
                     "capture_scalar_outputs / capture_dynamic_output_shape_ops it is one graph",
        fused_today="default config: both grouped GEMMs mxemu::grouped_mm with the activation QDQ (weights nvfp4 v*s; "
                    "activation recognised as recipe torchao at the constant global scale 1.0, the single-level "
                    "function; the op gets a full([], 1.0) scale); with the data-dependent capture flags the whole "
                    "layer is one mxemu::moe (tests/test_recognize_single_level_nvfp4.py; measured bf16 2026-12-02)",
        plumbing="argsort + bincount/cumsum offs + torch._grouped_mm; chunk(2); index_add_ fp32",
    ),
]
