"""compressed-tensors (installed 0.20): an NVFP4 linear and an MXFP4 MoE as a CT checkpoint
holds them (`weight_packed` uint8, `weight_scale`, `weight_global_scale`), weights through
the compressors' own `decompress()` (unpack_fp4_from_uint8 + dequantize) each forward,
activations through `forward_quantize` (dynamic local scales, static input_global_scale).
MoE routing the llm-compressor calibration way: sort the flat ids, torch.unique counts,
a Python loop over the experts that got tokens, scatter_add_ combine."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from compressed_tensors.compressors.mx_utils import compress_mx_scale
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
from compressed_tensors.quantization import QuantizationStatus, preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.forward import forward_quantize, quantize
from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

from . import E, H, I, TOP_K, CorpusEntry, Variant, WeightVariant
from .data import gen, moe_weights, qtensor, tokens, weight


def _compress(w: torch.Tensor, scheme, group: int):
    """What llm-compressor + the CT compressor store for one 2-d weight."""
    args = scheme.weights
    gs = None
    if group == 16:  # NVFP4: TENSOR_GROUP with a global scale (MinMax observer in fp32)
        lo, hi = torch.aminmax(w.float())
        gs = generate_gparam(lo, hi)
    wb = w.reshape(w.shape[0], -1, group)
    scale, zp = calculate_qparams(wb.amin(-1), wb.amax(-1), args, global_scale=gs)
    q = quantize(w, scale, zp, args, global_scale=gs)
    packed = pack_fp4_to_uint8(q)
    if group == 16:
        return {"weight_packed": packed, "weight_scale": scale.to(torch.float8_e4m3fn), "weight_global_scale": gs}
    return {"weight_packed": packed, "weight_scale": compress_mx_scale(scale, torch.uint8)}


class CTNVFP4Linear(nn.Module):
    compressor = NVFP4PackedCompressor

    def __init__(self, w: torch.Tensor, x_calib: torch.Tensor):
        super().__init__()
        self.scheme = preset_name_to_scheme("NVFP4", ["Linear"])
        self.quantization_status = QuantizationStatus.COMPRESSED
        for k, v in _compress(w, self.scheme, 16).items():
            self.register_buffer(k, v)
        lo, hi = torch.aminmax(x_calib.float())
        self.register_buffer("input_global_scale", generate_gparam(lo, hi))

    def act_qdq(self, x):
        return forward_quantize(self, x, "input", self.scheme.input_activations)

    def dequantized_weights(self, dtype=torch.bfloat16):
        sd = {"weight_packed": self.weight_packed, "weight_scale": self.weight_scale,
              "weight_global_scale": self.weight_global_scale}
        return {"weight": self.compressor.decompress(sd, self.scheme)["weight"].to(dtype)}

    def forward(self, x):
        return F.linear(self.act_qdq(x), self.dequantized_weights(x.dtype)["weight"])

    def emu_view(self):
        return {"weight": qtensor("nvfp4", self.weight_packed, self.weight_scale, self.weight_global_scale),
                "a1_global": self.input_global_scale}


class CTMXFP4MoE(nn.Module):
    def __init__(self, router, w13, w2):
        super().__init__()
        self.scheme = preset_name_to_scheme("MXFP4", ["Linear"])
        self.quantization_status = QuantizationStatus.COMPRESSED
        self.gate = nn.Linear(H, E, bias=False, dtype=router.dtype)
        self.gate.weight.data.copy_(router)
        for name, w in (("w13", w13), ("w2", w2)):
            parts = [_compress(w[e], self.scheme, 32) for e in range(E)]
            self.register_buffer(f"{name}_weight_packed", torch.stack([p["weight_packed"] for p in parts]))
            self.register_buffer(f"{name}_weight_scale", torch.stack([p["weight_scale"] for p in parts]))

    def route(self, x):
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float)
        w, ids = probs.topk(TOP_K, dim=-1)
        return w / w.sum(dim=-1, keepdim=True), ids

    def act_qdq(self, x):
        return forward_quantize(self, x, "input", self.scheme.input_activations)

    def _expert_weight(self, name, e, dtype):
        sd = {"weight_packed": getattr(self, f"{name}_weight_packed")[e],
              "weight_scale": getattr(self, f"{name}_weight_scale")[e]}
        return MXFP4PackedCompressor.decompress(sd, self.scheme)["weight"].to(dtype)

    def dequantized_weights(self, dtype=torch.bfloat16):
        return {n: torch.stack([self._expert_weight(n, e, dtype) for e in range(E)]) for n in ("w13", "w2")}

    def forward(self, x):
        w, ids = self.route(x)
        flat = ids.view(-1)
        sorted_ids, order = flat.sort()
        experts, counts = torch.unique(sorted_ids, return_counts=True)
        out = torch.zeros(x.shape[0], H, dtype=torch.float32, device=x.device)
        start = 0
        for e, n in zip(experts.tolist(), counts.tolist()):
            idx = order[start:start + n]
            start += n
            tok = idx // TOP_K
            h = F.linear(self.act_qdq(x[tok]), self._expert_weight("w13", e, x.dtype))
            h = F.silu(h[:, :I]) * h[:, I:]
            y = F.linear(self.act_qdq(h), self._expert_weight("w2", e, x.dtype))
            y = y.float() * w.view(-1)[idx, None]
            out.scatter_add_(0, tok[:, None].expand(-1, H), y)
        return out.to(x.dtype)

    def emu_view(self):
        return {n: qtensor("mxfp4", getattr(self, f"{n}_weight_packed"), getattr(self, f"{n}_weight_scale"))
                for n in ("w13", "w2")}


def make_linear(seed, dtype):
    g = gen(seed)
    m = CTNVFP4Linear(weight(g, 2 * I, H, dtype=dtype), tokens(seed + 50, 8, H, dtype))
    return m, (tokens(seed, 5, H, dtype),)


def make_moe(seed, dtype):
    g = gen(seed)
    m = CTMXFP4MoE(*moe_weights(g, E, H, I, dtype))
    return m, (tokens(seed, 5, H, dtype),)


_DECOMPRESS_NOTE = ("decompress() wraps the weight scale in a new nn.Parameter: Dynamo graph-breaks there, "
                    "so the weight dequant and the GEMM land in different graphs")
ENTRIES = [
    CorpusEntry(
        "ct_nvfp4_linear", "linear", "compressed-tensors",
        "installed compressed-tensors 0.20: NVFP4PackedCompressor.decompress, forward_quantize, "
        "calculate_qparams, generate_gparam, pack_fp4_to_uint8",
        Variant(WeightVariant("nvfp4", "q*(s/g)", recipe="compressed_tensors"),
                act={"fmt": "nvfp4", "recipe": "compressed_tensors"},
                act_global="static"),
        make_linear, compile_note=_DECOMPRESS_NOTE + " (measured: 3 graph breaks, 4 graphs)",
        fused_today="nothing under Dynamo's defaults (the Parameter ctor graph-breaks between the dequant and the "
                    "GEMM); with torch._dynamo.config.graph_break_on_nn_param_ctor=False the Parameter becomes a "
                    "set_ of a graph input from the scale-only decode nodes and the layer is one mxemu::linear with "
                    "the compressed_tensors QDQ, equal to eager (tests/test_semantic_respellings.py); expect_fused "
                    "stays False because the registry is measured under the default config",
    ),
    CorpusEntry(
        "ct_mxfp4_moe", "moe", "compressed-tensors",
        "installed compressed-tensors 0.20: MXFP4PackedCompressor.decompress, forward_quantize, compress_mx_scale",
        Variant(WeightVariant("mxfp4", "q*2^e", e8m0_byte255="inf"),
                act={"fmt": "mxfp4", "scale_mode": "even", "signed_zero": "lt0"}),
        make_moe, compile_smoke=False,
        compile_note=_DECOMPRESS_NOTE + "; torch.unique counts .tolist() graph-breaks (data-dependent loop). "
                     "Measured: 9 graph breaks, 14 graphs, 44 s, no fusion; left out of the compile test for time",
        plumbing="sort + unique/counts, per-expert Python loop over .tolist(), slicing gate/up, scatter_add_ fp32",
    ),
]
