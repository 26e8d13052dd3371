"""emu_inductor.checkpoints: quantized safetensors checkpoints in the layouts real
NVFP4 / MXFP4 checkpoints use, written here by each layout's own library where it is on
PyPI, then loaded into tiny transformers models.

  compressed-tensors nvfp4-pack-quantized  written by compressed_tensors'
      NVFP4PackedCompressor (scales from its own generate_gparam / calculate_qparams);
      our reading checked against NVFP4PackedCompressor.decompress.
  ModelOpt NVFP4   written by modelopt's NVFP4QTensor.quantize; checked against
      NVFP4QTensor.dequantize (skipped if nvidia-modelopt is not installed).
  gpt-oss MXFP4    written with emu_inductor.formats (the producer, triton_kernels'
      downcast, is not installable here); checked against transformers'
      integrations.mxfp4.convert_moe_packed_tensors, which is how transformers reads it.
Each layout also loads end to end: the loaded weight-only model's logits are close to a
bf16 HF model whose weights are the library's own dequantization (a gate/up swap,
interleave or scale-direction error would be far off).
"""

import copy
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from safetensors.torch import save_file  # noqa: E402

from emu_inductor.checkpoints import detect_layout, load_checkpoint, open_checkpoint  # noqa: E402
from emu_inductor.formats import MXFP4, NVFP4, quantize  # noqa: E402
from emu_inductor.models import EmulatedMoEBlock, quantized_modules  # noqa: E402
from emu_inductor.models.tiny import tiny_model  # noqa: E402
from emu_inductor.reference import QuantizedLinear, dequantize_weight  # noqa: E402
from emu_inductor.reference.moe import dequantize_experts  # noqa: E402

PROJ = {"qwen3_moe": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w3", "w2"),
        "deepseek_v3": ("gate_proj", "up_proj", "down_proj"), "qwen2_moe": ("gate_proj", "up_proj", "down_proj")}


def _ids(seed=0, shape=(2, 10)):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


# --- writers ----------------------------------------------------------------------------------


def _ct_nvfp4(w: torch.Tensor, act_amax=None):
    """compressed-tensors' own NVFP4 export of one [N, K] bf16 weight (+ input global scale)."""
    from compressed_tensors.compressors.nvfp4 import NVFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    scheme = preset_name_to_scheme("NVFP4", ["Linear"])
    gs = generate_gparam(w.min(), w.max())
    g = w.reshape(w.shape[0], -1, 16)
    scale, _ = calculate_qparams(g.amin(-1), g.amax(-1), scheme.weights, global_scale=gs)
    sd = NVFP4PackedCompressor.compress({"weight": w, "weight_scale": scale, "weight_global_scale": gs}, scheme)
    if act_amax is not None:
        sd["input_global_scale"] = generate_gparam(-act_amax, act_amax)
    return sd


def _ct_decompress(sd):
    from compressed_tensors.compressors.nvfp4 import NVFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme("NVFP4", ["Linear"])
    keep = {k: sd[k] for k in ("weight_packed", "weight_scale", "weight_global_scale")}
    return NVFP4PackedCompressor.decompress(keep, scheme)["weight"]


def _ct_mxfp4(w: torch.Tensor, act_amax=None):
    """compressed-tensors' own MXFP4 export (mxfp4-pack-quantized) of one weight."""
    from compressed_tensors.compressors.mxfp4 import MXFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    scheme = preset_name_to_scheme("MXFP4", ["Linear"])
    g = w.reshape(w.shape[0], -1, 32)
    scale, _ = calculate_qparams(g.amin(-1), g.amax(-1), scheme.weights)
    return MXFP4PackedCompressor.compress({"weight": w, "weight_scale": scale}, scheme)


def _ct_mxfp4_decompress(sd):
    from compressed_tensors.compressors.mxfp4 import MXFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme("MXFP4", ["Linear"])
    return MXFP4PackedCompressor.decompress({k: sd[k] for k in ("weight_packed", "weight_scale")}, scheme)["weight"]


def _modelopt_nvfp4(w: torch.Tensor, act_amax=None):
    """ModelOpt's own NVFP4 export of one weight: weight, weight_scale, weight_scale_2, input_scale."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    qt, ws, ws2 = NVFP4QTensor.quantize(w, 16)
    sd = {"weight": qt._quantized_data, "weight_scale": ws, "weight_scale_2": ws2.float().reshape(())}
    if act_amax is not None:
        sd["input_scale"] = (torch.as_tensor(act_amax).float() / (6.0 * 448.0)).reshape(())
    return sd


def _modelopt_dequant(sd, shape):
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    qt = NVFP4QTensor(torch.Size(shape), torch.bfloat16, sd["weight"])
    return qt.dequantize(dtype=torch.bfloat16, scale=sd["weight_scale"], double_scale=sd["weight_scale_2"],
                         block_sizes={-1: 16})


def _export(model, arch, writer, *, act=True, linear=True, seed=0):
    """A checkpoint of `model` in per-expert projection layout, each quantized weight
    written by `writer`; returns (tensors, {checkpoint prefix: [N, K] bf16 source weight})."""
    gen = torch.Generator().manual_seed(seed)
    gname, uname, dname = PROJ[arch]
    out, sources = {}, {}

    def put(prefix, w):
        amax = torch.tensor(float(torch.rand((), generator=gen)) * 4 + 1.0) if act else None
        for k, v in writer(w.detach().contiguous(), amax).items():
            out[f"{prefix}.{k}"] = v.contiguous()
        sources[prefix] = w.detach()

    mods = dict(model.named_modules())
    for key, t in model.state_dict().items():
        owner, _, attr = key.rpartition(".")
        ck_owner = owner.replace(".mlp", ".block_sparse_moe") if arch == "mixtral" else owner
        if attr == "gate_up_proj":
            I = t.shape[1] // 2
            for e in range(t.shape[0]):
                put(f"{ck_owner}.{e}.{gname}", t[e, :I])
                put(f"{ck_owner}.{e}.{uname}", t[e, I:])
        elif attr == "down_proj":
            for e in range(t.shape[0]):
                put(f"{ck_owner}.{e}.{dname}", t[e])
        elif (linear and attr == "weight" and type(mods[owner]) is torch.nn.Linear and not owner.endswith(
                ("lm_head", ".gate", "shared_expert_gate")) and t.shape[1] % 16 == 0):
            put(ck_owner, t)
        else:
            out[f"{ck_owner}.{attr}"] = t.detach().clone()
    return out, sources


def _hf_with_weights(model, arch, dequant):
    """A copy of the HF model whose quantized weights are replaced by `dequant(prefix)`."""
    hf = copy.deepcopy(model)
    gname, uname, dname = PROJ[arch]
    with torch.no_grad():
        for name, mod in hf.named_modules():
            ck = name.replace(".mlp", ".block_sparse_moe") if arch == "mixtral" else name
            if hasattr(mod, "gate_up_proj") and not isinstance(mod, torch.nn.Linear):
                for e in range(mod.gate_up_proj.shape[0]):
                    I = mod.gate_up_proj.shape[1] // 2
                    mod.gate_up_proj[e, :I] = dequant(f"{ck}.{e}.{gname}")
                    mod.gate_up_proj[e, I:] = dequant(f"{ck}.{e}.{uname}")
                    mod.down_proj[e] = dequant(f"{ck}.{e}.{dname}")
            elif type(mod) is torch.nn.Linear:
                w = dequant(ck)
                if w is not None:
                    mod.weight.copy_(w)
    return hf


# --- compressed-tensors ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_compressed_tensors_nvfp4_roundtrip(tmp_path, arch):
    pytest.importorskip("compressed_tensors")
    src = tiny_model(arch, seed=3)
    tensors, sources = _export(src, arch, _ct_nvfp4)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized"}}))
    assert detect_layout(open_checkpoint(tmp_path)).name == "compressed-tensors-nvfp4"

    m = load_checkpoint(tiny_model(arch, seed=4), tmp_path)  # a different random init
    q = quantized_modules(m)
    assert len(q["moe"]) == (1 if arch == "deepseek_v3" else 2)
    gname, uname, dname = PROJ[arch]
    per = {p: {k[len(p) + 1:]: v for k, v in tensors.items() if k.startswith(p + ".")} for p in sources}
    for name in q["moe"]:
        ex = m.get_submodule(name).experts
        assert ex.scheme.name == "nvfp4_w4a4"
        ck = name.replace(".mlp", ".block_sparse_moe") if arch == "mixtral" else name
        W13 = dequantize_experts(ex.w13, ex.w13_scale, NVFP4, ex.w13_alpha)
        W2 = dequantize_experts(ex.w2, ex.w2_scale, NVFP4, ex.w2_alpha)
        I = W2.shape[-1]
        for e in range(ex.num_experts):
            # our reading (alpha = 1 / weight_global_scale, multiplied) == CT's own decompress (/ global)
            assert torch.equal(W13[e, :I], _ct_decompress(per[f"{ck}.experts.{e}.{gname}"]))
            assert torch.equal(W13[e, I:], _ct_decompress(per[f"{ck}.experts.{e}.{uname}"]))
            assert torch.equal(W2[e], _ct_decompress(per[f"{ck}.experts.{e}.{dname}"]))
        # vLLM's per-layer activation global scale: 1 / max over experts of 1 / input_global_scale
        igs13 = torch.stack([per[f"{ck}.experts.{e}.{p}"]["input_global_scale"] for e in range(ex.num_experts)
                             for p in (gname, uname)])
        assert float(ex.a1_global_scale) == float(1.0 / (1.0 / igs13).max())
        assert float(ex.a1_global_scale) <= float(igs13.min()) * (1 + 2**-23)
    for name in q["linear"]:
        ql = m.get_submodule(name)
        w = dequantize_weight(ql.weight, ql.weight_scale, NVFP4, alpha=ql.alpha)
        assert torch.equal(w, _ct_decompress(per[name]))
        assert torch.equal(ql.input_global_scale, per[name]["input_global_scale"].reshape(()))
    # everything unquantized is the source model's
    assert torch.equal(m.model.embed_tokens.weight, src.model.embed_tokens.weight)
    assert torch.equal(m.lm_head.weight, src.lm_head.weight)
    # end to end, weight-only: close to HF running CT's own dequantized weights
    m16 = load_checkpoint(tiny_model(arch, seed=4), tmp_path, scheme="nvfp4_w4a16")
    hf = _hf_with_weights(src, arch, lambda p: _ct_decompress(per[p]) if p in per else None)
    ids = _ids()
    with torch.no_grad():
        a, b = m16(ids).logits.float(), hf(ids).logits.float()
        full = m(ids).logits.float()
    assert ((a - b).norm() / b.norm()) < 0.02
    assert ((full - b).norm() / b.norm()) < 0.25


def test_compressed_tensors_scales_are_quantize_direction():
    """The two directions differ by orders of magnitude: reading CT's global scale as
    ModelOpt's (dequantize direction) would be wildly off."""
    pytest.importorskip("compressed_tensors")
    w = (torch.randn(32, 64, generator=torch.Generator().manual_seed(0)) * 0.05).to(torch.bfloat16)
    sd = _ct_nvfp4(w, torch.tensor(3.0))
    assert float(sd["weight_global_scale"]) > 1000  # 2688 / amax_w, amax ~ 0.2
    assert abs(float(sd["input_global_scale"]) - 2688 / 3.0) < 4
    ours = dequantize_weight(sd["weight_packed"], sd["weight_scale"], NVFP4,
                             alpha=(1.0 / sd["weight_global_scale"]).float())
    assert torch.equal(ours, _ct_decompress(sd))
    assert ((ours.float() - w.float()).norm() / w.float().norm()) < 0.15


def test_compressed_tensors_mxfp4_roundtrip(tmp_path):
    pytest.importorskip("compressed_tensors")
    arch = "qwen2_moe"
    src = tiny_model(arch, seed=9)
    tensors, sources = _export(src, arch, _ct_mxfp4, act=False)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert detect_layout(open_checkpoint(tmp_path)).name == "compressed-tensors-mxfp4"
    m = load_checkpoint(tiny_model(arch), tmp_path)
    q = quantized_modules(m)
    assert len(q["moe"]) == 2 and len(q["linear"]) == 2 * 7
    per = {p: {k[len(p) + 1:]: v for k, v in tensors.items() if k.startswith(p + ".")} for p in sources}
    deq = {p: _ct_mxfp4_decompress(per[p]) for p in sources}
    for name in q["moe"]:
        ex = m.get_submodule(name).experts
        assert ex.scheme.name == "w_mxfp4" and ex.w13_alpha is None
        W13 = dequantize_experts(ex.w13, ex.w13_scale, MXFP4)
        W2 = dequantize_experts(ex.w2, ex.w2_scale, MXFP4)
        for e in range(ex.num_experts):
            assert torch.equal(W13[e, :32], deq[f"{name}.experts.{e}.gate_proj"])
            assert torch.equal(W13[e, 32:], deq[f"{name}.experts.{e}.up_proj"])
            assert torch.equal(W2[e], deq[f"{name}.experts.{e}.down_proj"])
    for name in q["linear"]:
        ql = m.get_submodule(name)
        assert torch.equal(dequantize_weight(ql.weight, ql.weight_scale, MXFP4), deq[name])
    hf = _hf_with_weights(src, arch, lambda p: deq.get(p))
    ids = _ids(3)
    with torch.no_grad():
        a, b = m(ids).logits.float(), hf(ids).logits.float()
        assert ((a - b).norm() / b.norm()) < 0.02
        mx = load_checkpoint(tiny_model(arch), tmp_path, scheme="w_mxfp4_a_mxfp4")
        assert 0 < ((mx(ids).logits.float() - b).norm() / b.norm()) < 0.25


# --- ModelOpt ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_modelopt_nvfp4_roundtrip(tmp_path, arch):
    pytest.importorskip("modelopt.torch.quantization.qtensor")
    src = tiny_model(arch, seed=5)
    tensors, sources = _export(src, arch, _modelopt_nvfp4)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert detect_layout(open_checkpoint(tmp_path)).name == "modelopt-nvfp4"
    m = load_checkpoint(tiny_model(arch, seed=6), tmp_path / "model.safetensors")
    q = quantized_modules(m)
    gname, uname, dname = PROJ[arch]
    per = {p: {k[len(p) + 1:]: v for k, v in tensors.items() if k.startswith(p + ".")} for p in sources}
    deq = {p: _modelopt_dequant(per[p], sources[p].shape) for p in sources}
    for name in q["moe"]:
        ex = m.get_submodule(name).experts
        ck = name.replace(".mlp", ".block_sparse_moe") if arch == "mixtral" else name
        W13 = dequantize_experts(ex.w13, ex.w13_scale, NVFP4, ex.w13_alpha)
        W2 = dequantize_experts(ex.w2, ex.w2_scale, NVFP4, ex.w2_alpha)
        I = W2.shape[-1]
        for e in range(ex.num_experts):
            assert torch.equal(W13[e, :I], deq[f"{ck}.experts.{e}.{gname}"])
            assert torch.equal(W13[e, I:], deq[f"{ck}.experts.{e}.{uname}"])
            assert torch.equal(W2[e], deq[f"{ck}.experts.{e}.{dname}"])
            # weight_scale_2 is the dequantize-direction alpha, used as it is
            assert torch.equal(ex.w13_alpha[e, 0], per[f"{ck}.experts.{e}.{gname}"]["weight_scale_2"])
        ins = torch.stack([per[f"{ck}.experts.{e}.{p}"]["input_scale"] for e in range(ex.num_experts)
                           for p in (gname, uname)])
        assert float(ex.a1_global_scale) == float(1.0 / ins.max())  # vLLM: 1 / input_scale.max()
    for name in q["linear"]:
        ql = m.get_submodule(name)
        assert torch.equal(dequantize_weight(ql.weight, ql.weight_scale, NVFP4, alpha=ql.alpha), deq[name])
        assert float(ql.input_global_scale) == float(1.0 / per[name]["input_scale"])
    m16 = load_checkpoint(tiny_model(arch, seed=6), tmp_path, scheme="nvfp4_w4a16")
    hf = _hf_with_weights(src, arch, lambda p: deq.get(p))
    ids = _ids(1)
    with torch.no_grad():
        a, b = m16(ids).logits.float(), hf(ids).logits.float()
    assert ((a - b).norm() / b.norm()) < 0.02


def test_gate_global_scale_option_matches_vllm(tmp_path):
    """w13_global_scale="gate" dequantizes up with the gate's global scale (vLLM #54974)."""
    pytest.importorskip("modelopt.torch.quantization.qtensor")
    src = tiny_model("qwen3_moe", seed=5)
    tensors, _ = _export(src, "qwen3_moe", _modelopt_nvfp4, linear=False)
    save_file(tensors, str(tmp_path / "m.safetensors"))
    exact = load_checkpoint(tiny_model("qwen3_moe"), tmp_path).model.layers[0].mlp.experts
    gate = load_checkpoint(tiny_model("qwen3_moe"), tmp_path, w13_global_scale="gate").model.layers[0].mlp.experts
    assert exact.w13_alpha.shape == (8, 2) and gate.w13_alpha.shape == (8,)
    assert torch.equal(gate.w13_alpha, exact.w13_alpha[:, 0])
    assert not torch.equal(exact.w13_alpha[:, 0], exact.w13_alpha[:, 1])


# --- gpt-oss MXFP4 ------------------------------------------------------------------------------


def _gpt_oss_tensors(model):
    """gpt-oss checkpoint tensors: experts as MXFP4 blocks/scales, the rest bf16."""
    out = {}
    for key, t in model.state_dict().items():
        owner, _, attr = key.rpartition(".")
        if attr in ("gate_up_proj", "down_proj"):
            w = t.transpose(1, 2).contiguous()  # HF [E, K, N] (x @ W) -> [E, N, K]
            q = quantize(w, MXFP4, scale_mode="even")
            E, N, K = w.shape
            out[f"{owner}.{attr}_blocks"] = q.qdata.reshape(E, N, K // 32, 16).contiguous()
            out[f"{owner}.{attr}_scales"] = q.scale.contiguous()
        else:
            out[key] = t.detach().clone()
    return out


def test_gpt_oss_mxfp4_roundtrip(tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    src = tiny_model("gpt_oss", seed=7)
    tensors = _gpt_oss_tensors(src)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert detect_layout(open_checkpoint(tmp_path)).name == "gpt-oss-mxfp4"
    m = load_checkpoint(tiny_model("gpt_oss", seed=8), tmp_path)
    hf = copy.deepcopy(src)
    for li, name in enumerate(quantized_modules(m)["moe"]):
        blk = m.get_submodule(name)
        assert isinstance(blk, EmulatedMoEBlock) and blk.experts.scheme.name == "w_mxfp4"
        ex = blk.experts
        p = f"{name}.experts"
        # transformers' own reading: [E, K, N] bf16, the HF parameter layout
        ref13 = convert_moe_packed_tensors(tensors[f"{p}.gate_up_proj_blocks"], tensors[f"{p}.gate_up_proj_scales"])
        ref2 = convert_moe_packed_tensors(tensors[f"{p}.down_proj_blocks"], tensors[f"{p}.down_proj_scales"])
        assert torch.equal(dequantize_experts(ex.w13, ex.w13_scale, MXFP4), ref13.transpose(1, 2))
        assert torch.equal(dequantize_experts(ex.w2, ex.w2_scale, MXFP4), ref2.transpose(1, 2))
        assert torch.equal(ex.w13_bias, src.get_submodule(p).gate_up_proj_bias)
        with torch.no_grad():
            hf.get_submodule(p).gate_up_proj.copy_(ref13)
            hf.get_submodule(p).down_proj.copy_(ref2)
    ids = _ids(2)
    with torch.no_grad():
        a, b = m(ids).logits.float(), hf(ids).logits.float()
        assert ((a - b).norm() / b.norm()) < 0.02
        # activation-QDQ schemes with MXFP4 weights load from the same file
        mx = load_checkpoint(tiny_model("gpt_oss"), tmp_path, scheme="w_mxfp4_a_mxfp4")
        c = mx(ids).logits.float()
        assert 0 < ((c - b).norm() / b.norm()) < 0.25


def test_meta_skeleton(tmp_path):
    """A skeleton on the meta device loads too (nothing is allocated for the HF weights)."""
    import transformers

    from emu_inductor.models.tiny import tiny_config

    src = tiny_model("gpt_oss", seed=7)
    save_file(_gpt_oss_tensors(src), str(tmp_path / "model.safetensors"))
    with torch.device("meta"):
        skel = transformers.GptOssForCausalLM(tiny_config("gpt_oss")).to(torch.bfloat16)
    m = load_checkpoint(skel, tmp_path)
    assert not [n for n, t in list(m.named_parameters()) + list(m.named_buffers()) if t.is_meta]
    ref = load_checkpoint(tiny_model("gpt_oss"), tmp_path)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(m(ids).logits, ref(ids).logits)


def test_sharded_checkpoint_with_index(tmp_path):
    src = tiny_model("gpt_oss", seed=7)
    tensors = _gpt_oss_tensors(src)
    keys = sorted(tensors)
    half = len(keys) // 2
    shards = {"a.safetensors": keys[:half], "b.safetensors": keys[half:]}
    for f, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, str(tmp_path / f))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    m = load_checkpoint(tiny_model("gpt_oss"), tmp_path)
    assert len(quantized_modules(m)["moe"]) == 2
    m2 = load_checkpoint(tiny_model("gpt_oss"), tmp_path / "model.safetensors.index.json")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(m(ids).logits, m2(ids).logits)


# --- malformed files -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct_tensors():
    pytest.importorskip("compressed_tensors")
    src = tiny_model("qwen3_moe", seed=3)
    tensors, _ = _export(src, "qwen3_moe", _ct_nvfp4)
    return tensors


def _load_bad(tmp_path, tensors, **kw):
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return load_checkpoint(tiny_model("qwen3_moe"), path, **kw)


E3 = "model.layers.1.mlp.experts.3.up_proj"
Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("corrupt, name, match", [
    (lambda t: t.pop(f"{E3}.weight_scale"), f"{E3}.weight_scale", "missing block scale"),
    (lambda t: t.pop(f"{E3}.weight_packed"), f"{E3}.weight_packed", "missing packed weight"),
    (lambda t: t.pop(f"{Q}.weight_global_scale"), f"{Q}.weight_global_scale", "missing global scale"),
    (lambda t: t.pop(f"{E3}.input_global_scale"), f"{E3}.input_global_scale", "other experts of the layer have one"),
    (lambda t: t.update({f"{E3}.weight_scale": t[f"{E3}.weight_scale"].float()}), f"{E3}.weight_scale",
     "expected dtype torch.float8_e4m3fn"),
    (lambda t: t.update({f"{E3}.weight_packed": t[f"{E3}.weight_packed"].view(torch.int8)}), f"{E3}.weight_packed",
     "expected dtype torch.uint8"),
    (lambda t: t.update({f"{E3}.weight_global_scale": t[f"{E3}.weight_global_scale"].double()}),
     f"{E3}.weight_global_scale", "expected dtype torch.float32"),
    (lambda t: t.update({f"{E3}.weight_scale": t[f"{E3}.weight_scale"][:, :-1]}), f"{E3}.weight_scale",
     "expected shape \\(32, 4\\) to match"),
    (lambda t: t.update({f"{E3}.weight_packed": t[f"{E3}.weight_packed"][:16]}), f"{E3}.weight_packed",
     "expected shape \\(32, 32\\)"),
    (lambda t: t.update({f"{Q}.weight_global_scale": torch.zeros(1)}), f"{Q}.weight_global_scale",
     "finite positive"),
    (lambda t: t.update({f"{E3}.input_global_scale": torch.tensor([float("nan")])}), f"{E3}.input_global_scale",
     "finite positive"),
    (lambda t: t.update({f"{E3}.weight_global_scale": torch.ones(2)}), f"{E3}.weight_global_scale", "one value"),
])
def test_malformed_ct_file_names_the_tensor(tmp_path, ct_tensors, corrupt, name, match):
    t = dict(ct_tensors)
    corrupt(t)
    with pytest.raises(ValueError, match=f"^{name.replace('.', '[.]')}: .*{match}"):
        _load_bad(tmp_path, t)


def _set_byte(t: torch.Tensor, idx, value: int):
    b = t.view(torch.uint8).clone()
    b[idx] = value
    return b.view(t.dtype)


def test_scales_that_disagree_with_packed_data(tmp_path, ct_tensors):
    name = f"{E3}.weight_scale"
    for byte, match in ((0x7F, "E4M3 NaN block scale at index \\(2, 1\\)"), (0xB8, "negative E4M3 block scale"),
                        (0x00, "block scale is 0 at index \\(2, 1\\) but its packed codes are not all zero")):
        t = dict(ct_tensors)
        t[name] = _set_byte(t[name], (2, 1), byte)
        with pytest.raises(ValueError, match=f"^{name.replace('.', '[.]')}: {match}"):
            _load_bad(tmp_path, t)
    # a zero scale over an all-zero block is consistent
    t = dict(ct_tensors)
    packed = t[f"{E3}.weight_packed"].clone()
    packed[2, 8:16] = 0
    t[f"{E3}.weight_packed"] = packed
    t[name] = _set_byte(t[name], (2, 1), 0)
    _load_bad(tmp_path, t)
    # check_data=False skips the data checks
    t[name] = _set_byte(t[name], (2, 2), 0x7F)
    _load_bad(tmp_path, t, check_data=False)


def test_gpt_oss_malformed(tmp_path):
    src = tiny_model("gpt_oss", seed=7)
    good = _gpt_oss_tensors(src)
    p = "model.layers.1.mlp.experts"
    cases = [
        (lambda t: t.pop(f"{p}.down_proj_scales"), f"{p}.down_proj_scales", "missing MXFP4 scales"),
        (lambda t: t.update({f"{p}.down_proj_scales": t[f"{p}.down_proj_scales"][:, :, :0]}), f"{p}.down_proj_scales",
         "expected shape \\(4, 64, 1\\) to match"),
        (lambda t: t.update({f"{p}.gate_up_proj_blocks": t[f"{p}.gate_up_proj_blocks"].reshape(4, 64, 32)}),
         f"{p}.gate_up_proj_blocks", "expected shape \\(4, 64, 2, 16\\)"),
        (lambda t: t.update({f"{p}.gate_up_proj_scales": t[f"{p}.gate_up_proj_scales"].float()}),
         f"{p}.gate_up_proj_scales", "expected dtype torch.uint8"),
        (lambda t: t.update({f"{p}.gate_up_proj_scales": _set_byte(t[f"{p}.gate_up_proj_scales"], (1, 5, 0), 255)}),
         f"{p}.gate_up_proj_scales", "E8M0 byte 255 \\(NaN\\) at index \\(1, 5, 0\\)"),
        (lambda t: t.update({f"{p}.down_proj_bias": t[f"{p}.down_proj_bias"][:, :10]}), f"{p}.down_proj_bias",
         "expected shape \\(4, 64\\)"),
        (lambda t: t.pop("model.layers.1.mlp.router.bias"), "model.layers.1.mlp.router.bias", "missing tensor"),
        (lambda t: t.update({"model.norm.weight": t["model.norm.weight"][:3]}), "model.norm.weight",
         "expected shape \\(64,\\)"),
    ]
    for corrupt, name, match in cases:
        t = dict(good)
        corrupt(t)
        save_file({k: v.contiguous() for k, v in t.items()}, str(tmp_path / "g.safetensors"))
        with pytest.raises(ValueError, match=f"^{name.replace('.', '[.]')}: .*{match}"):
            load_checkpoint(tiny_model("gpt_oss"), tmp_path / "g.safetensors")


def test_strictness_layout_and_scheme_errors(tmp_path, ct_tensors):
    t = dict(ct_tensors)
    t["model.layers.0.mtp.extra"] = torch.zeros(3)
    with pytest.raises(ValueError, match="^model[.]layers[.]0[.]mtp[.]extra: tensor in the checkpoint that no module"):
        _load_bad(tmp_path, t)
    _load_bad(tmp_path, t, strict=False)
    with pytest.raises(ValueError, match="scheme: w_mxfp4 has mxfp4 weights but .* holds nvfp4"):
        _load_bad(tmp_path, ct_tensors, scheme="w_mxfp4")
    t = {k: v for k, v in ct_tensors.items() if not k.endswith("input_global_scale")}
    m = _load_bad(tmp_path, t)  # no activation scales: weight-only
    assert m.model.layers[0].mlp.experts.scheme.name == "nvfp4_w4a16"
    assert isinstance(m.model.layers[0].self_attn.q_proj, QuantizedLinear)
    with pytest.raises(ValueError, match="input_global_scale: missing activation global scale, needed by scheme"):
        _load_bad(tmp_path, t, scheme="nvfp4_w4a4")
    with pytest.raises(ValueError, match="no quantized tensors of a known layout"):
        _load_bad(tmp_path, {"model.norm.weight": torch.ones(64)})
    with pytest.raises(ValueError, match="layout: unknown layout"):
        _load_bad(tmp_path, ct_tensors, layout="gguf")


def test_never_unpickles(tmp_path, monkeypatch, ct_tensors):
    for suffix in (".bin", ".pt", ".pth", ".ckpt"):
        with pytest.raises(ValueError, match="pickle checkpoints are not read"):
            load_checkpoint(tiny_model("qwen3_moe"), tmp_path / f"pytorch_model{suffix}")
    folder = tmp_path / "only_pickle"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="no .safetensors files .*pickle files"):
        load_checkpoint(tiny_model("qwen3_moe"), folder)

    def boom(*a, **k):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", boom)
    import pickle

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    _load_bad(tmp_path, ct_tensors)
    assert os.path.exists(tmp_path / "bad.safetensors")
