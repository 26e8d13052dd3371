"""emu_inductor.models.quantize_model on tiny random-weight transformers models
(Qwen3-MoE, Mixtral, GPT-OSS, DeepSeek-V3, Qwen2-MoE), built from configs.

Checks: every HF MoE block is swapped; the swapped block equals, bit for bit, a path
built by hand here (routing re-derived from HF's formulas, weights converted to vLLM's
layout by hand, experts through `moe_emulated`); logits of the quantized model stay
close to the bf16 model; linear targets, calibration and errors.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from emu_inductor.models import (  # noqa: E402
    EmulatedMoEBlock,
    find_moe_blocks,
    moe_emulated_with_bias,
    quantize_model,
    quantized_modules,
)
from emu_inductor.models.tiny import TINY_ARCHITECTURES, tiny_model  # noqa: E402
from emu_inductor.reference import (  # noqa: E402
    QuantizedLinear,
    act_fake_quantize,
    apply_activation,
    get_scheme,
    moe_emulated,
    quantize_weight,
)
from emu_inductor.reference.moe import dequantize_experts  # noqa: E402

SCHEMES = ["nvfp4_w4a4", "w_mxfp4_a_mxfp4", "nvfp4_w4a16"]
HF_BLOCKS = {
    "qwen3_moe": "Qwen3MoeSparseMoeBlock",
    "mixtral": "MixtralSparseMoeBlock",
    "gpt_oss": "GptOssMLP",
    "deepseek_v3": "DeepseekV3MoE",
    "qwen2_moe": "Qwen2MoeSparseMoeBlock",
}
N_MOE = {"qwen3_moe": 2, "mixtral": 2, "gpt_oss": 2, "deepseek_v3": 1, "qwen2_moe": 2}


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_model(arch, seed=1) for arch in TINY_ARCHITECTURES}


def _ids(seed=0, shape=(2, 10)):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


def _hand_route(arch, blk, x):
    """Top-k weights and ids re-derived from transformers 5.17's router formulas."""
    if arch == "gpt_oss":
        r = blk.router
        v, ids = torch.topk(F.linear(x, r.weight, r.bias), r.top_k, dim=-1)
        return torch.softmax(v, dim=1, dtype=v.dtype), ids
    g = blk.gate
    if arch == "deepseek_v3":
        s = F.linear(x.float(), g.weight.float()).sigmoid()
        sc = s + g.e_score_correction_bias
        E, ng = sc.shape[-1], g.num_group
        group = sc.view(-1, ng, E // ng).topk(2, dim=-1)[0].sum(-1)
        gi = torch.topk(group, k=g.topk_group, dim=-1, sorted=False)[1]
        keep = torch.zeros_like(group).scatter_(1, gi, 1).unsqueeze(-1).expand(-1, ng, E // ng).reshape(-1, E)
        ids = torch.topk(sc.masked_fill(~keep.bool(), float("-inf")), k=g.top_k, dim=-1, sorted=False)[1]
        w = s.gather(1, ids)
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * g.routed_scaling_factor, ids
    logits = F.linear(x, g.weight)
    w, ids = torch.topk(torch.softmax(logits.float(), dim=-1), g.top_k, dim=-1)
    if getattr(g, "norm_topk_prob", True):
        w = w / w.sum(-1, keepdim=True)
    if arch != "mixtral":  # Qwen routers hand back weights in the logits' dtype
        w = w.to(logits.dtype)
    return w, ids


def _hand_weights(arch, ex):
    if arch == "gpt_oss":  # [E, H, 2I] interleaved, x @ W -> vLLM [E, 2I, H]
        return ex.gate_up_proj.transpose(1, 2).contiguous(), ex.down_proj.transpose(1, 2).contiguous(), "swigluoai"
    return ex.gate_up_proj, ex.down_proj, "silu"


def _hand_block(arch, blk, x2, scheme, act_scales=None):
    """act_scales: the block's (a1, a2) global scales (NVFP4 w4a4; set on its first call)."""
    sch = get_scheme(scheme)
    w, ids = _hand_route(arch, blk, x2)
    w13, w2, act = _hand_weights(arch, blk.experts)
    q13, s13, a13 = quantize_weight(w13.detach(), sch.weight_fmt)
    q2, s2, a2 = quantize_weight(w2.detach(), sch.weight_fmt)
    g1, g2 = act_scales or (None, None)
    kw = dict(scheme=sch, w13_scale=s13, w2_scale=s2, w13_alpha=a13, w2_alpha=a2, a1_global_scale=g1,
              a2_global_scale=g2, activation=act)
    if arch == "gpt_oss":
        out = _loop_with_bias(x2, q13, q2, w, ids, blk.experts.gate_up_proj_bias, blk.experts.down_proj_bias, **kw)
    else:
        out = moe_emulated(x2, q13, q2, w, ids, **kw)
    if arch == "deepseek_v3":
        out = out + blk.shared_experts(x2)
    if arch == "qwen2_moe":
        out = out + F.sigmoid(blk.shared_expert_gate(x2)) * blk.shared_expert(x2)
    return out


def _loop_with_bias(x, q13, q2, w, ids, b13, b2, *, scheme, w13_scale, w2_scale, w13_alpha, w2_alpha,
                    a1_global_scale, a2_global_scale, activation):
    """Token-by-slot loop, GEMMs as fp32 matvecs, bias on the fp32 accumulator (vLLM
    fused_moe_kernel HAS_BIAS), one cast to bf16 per GEMM."""
    fmt = scheme.weight_fmt
    W13 = dequantize_experts(q13, w13_scale, fmt, w13_alpha, x.dtype).float()
    W2 = dequantize_experts(q2, w2_scale, fmt, w2_alpha, x.dtype).float()
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            a1 = act_fake_quantize(x[t : t + 1], scheme.act, a1_global_scale)
            c1 = (a1.float() @ W13[e].T + b13[e].float()).to(x.dtype)
            a2 = act_fake_quantize(apply_activation(c1, activation), scheme.act, a2_global_scale)
            c3 = (a2.float() @ W2[e].T + b2[e].float()).to(x.dtype)
            out[t] += float(w[t, k]) * c3[0].float()
    return out.to(x.dtype)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_every_moe_block_swapped(models, arch):
    m = copy.deepcopy(models[arch])
    before = [n for n, mod in m.named_modules() if type(mod).__name__ == HF_BLOCKS[arch]]
    assert len(before) == N_MOE[arch]
    routers = {n: getattr(m.get_submodule(n), "router" if arch == "gpt_oss" else "gate") for n in before}
    assert quantize_model(m, "nvfp4_w4a4") is m
    assert [n for n, mod in m.named_modules() if type(mod).__name__ == HF_BLOCKS[arch]] == []
    assert quantized_modules(m) == {"moe": before, "linear": []}
    for n in before:
        blk = m.get_submodule(n)
        assert isinstance(blk, EmulatedMoEBlock) and blk.original_class == HF_BLOCKS[arch]
        assert blk.route.__self__ is blk
        assert getattr(blk, "router" if arch == "gpt_oss" else "gate") is routers[n]  # HF's own router kept
    assert find_moe_blocks(m) == []


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_block_equals_hand_built_path(models, arch, scheme):
    hf = models[arch]
    m = quantize_model(copy.deepcopy(hf), scheme)
    li = 1  # DeepSeek-V3's layer 0 is dense
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    with torch.no_grad():
        out = m.model.layers[li].mlp(x)
        if arch == "gpt_oss":
            out, scores = out
            _, hf_scores = hf.model.layers[li].mlp(x)
            assert torch.equal(scores, hf_scores)
        ex = m.model.layers[li].mlp.experts  # NVFP4 w4a4: scales set from x on the first call
        ref = _hand_block(arch, hf.model.layers[li].mlp, x.reshape(-1, 64), scheme,
                          (ex.a1_global_scale, ex.a2_global_scale)).reshape(x.shape)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert torch.equal(out, ref), f"{(out != ref).sum().item()} of {out.numel()} differ"


def test_gpt_oss_bias_path_reduces_to_moe_emulated(models):
    """With zero biases the GPT-OSS experts path is exactly the reference moe_emulated."""
    blk = models["gpt_oss"].model.layers[0].mlp
    w13, w2, act = _hand_weights("gpt_oss", blk.experts)
    for scheme in SCHEMES:
        sch = get_scheme(scheme)
        q13, s13, a13 = quantize_weight(w13.detach(), sch.weight_fmt)
        q2, s2, a2 = quantize_weight(w2.detach(), sch.weight_fmt)
        x = torch.randn(9, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
        w, ids = _hand_route("gpt_oss", blk, x)
        gs = torch.tensor(3.0) if scheme == "nvfp4_w4a4" else None
        kw = dict(scheme=sch, w13_scale=s13, w2_scale=s2, w13_alpha=a13, w2_alpha=a2, a1_global_scale=gs,
                  a2_global_scale=gs, activation=act)
        with torch.no_grad():
            assert torch.equal(moe_emulated_with_bias(x, q13, q2, w, ids, **kw), moe_emulated(x, q13, q2, w, ids, **kw))


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_logits_close_to_bf16(models, arch):
    hf = models[arch]
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits.float()
        for scheme in SCHEMES:
            m = quantize_model(copy.deepcopy(hf), scheme, calibration_data=ids)
            out = m(ids).logits.float()
            rel = ((out - ref).norm() / ref.norm()).item()
            assert 0 < rel < 0.25, (scheme, rel)
            assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.97


def test_linear_targets_and_ignore(models):
    hf = models["qwen2_moe"]
    m = quantize_model(copy.deepcopy(hf), "nvfp4_w4a4", targets=("experts", "linear"))
    q = quantized_modules(m)
    assert len(q["moe"]) == 2
    # per layer: q, k, v, o + shared expert gate/up/down; not lm_head, not shared_expert_gate
    assert len(q["linear"]) == 2 * 7
    assert not any(n.endswith(("lm_head", "shared_expert_gate")) for n in q["linear"])
    assert isinstance(m.model.layers[0].mlp.shared_expert.down_proj, QuantizedLinear)
    assert isinstance(m.lm_head, torch.nn.Linear) and not isinstance(m.lm_head, QuantizedLinear)
    # linear layers only, by regex; experts stay bf16
    m2 = quantize_model(copy.deepcopy(hf), "w_mxfp4_a_mxfp4", targets=["re:.*self_attn\\.(q|k|v)_proj"])
    q2 = quantized_modules(m2)
    assert q2["moe"] == [] and len(q2["linear"]) == 6
    # an explicitly named layer wins over ignore
    m3 = quantize_model(copy.deepcopy(hf), "nvfp4_w4a16", targets=["lm_head"])
    assert isinstance(m3.lm_head, QuantizedLinear)


def test_quantized_linear_matches_from_float(models):
    hf = models["mixtral"]
    m = quantize_model(copy.deepcopy(hf), "nvfp4_w4a16", targets=["linear"])
    lin = hf.model.layers[0].self_attn.q_proj
    ql = m.model.layers[0].self_attn.q_proj
    x = torch.randn(4, 64).to(torch.bfloat16)
    ref = QuantizedLinear.from_float(lin.weight.detach(), scheme="nvfp4_w4a16")
    assert torch.equal(ql(x), ref(x))
    x3 = torch.randn(2, 3, 64).to(torch.bfloat16)  # HF's [B, S, H]: flattened rows, same values
    assert torch.equal(ql(x3), ref(x3)) and ql(x3).shape == (2, 3, 64)
    m4 = quantize_model(copy.deepcopy(hf), "nvfp4_w4a4", targets=["linear"])
    ql4 = m4.model.layers[0].self_attn.q_proj
    ref4 = QuantizedLinear.from_float(lin.weight.detach(), scheme="nvfp4_w4a4", input_global_scale=torch.tensor(300.0))
    ql4.input_global_scale.fill_(300.0)
    assert torch.equal(ql4(x3), ref4(x3))


def test_calibration_sets_activation_global_scales(models):
    m = quantize_model(copy.deepcopy(models["qwen3_moe"]), "nvfp4_w4a4", targets=("experts", "linear"))
    exps = [m.get_submodule(n).experts for n in quantized_modules(m)["moe"]]
    # not set yet (NaN, never used silently): the first forward would calibrate on its batch
    assert all(not e.calibrated and torch.isnan(e.a1_global_scale) for e in exps)
    ids = _ids(1)
    with torch.no_grad():
        before = m(_ids(2)).logits  # first call: scales from this other batch
    first = [(float(e.a1_global_scale), float(e.a2_global_scale)) for e in exps]
    from emu_inductor.models import calibrate

    calibrate(m, ids)
    for e, (g1, g2) in zip(exps, first):
        assert float(e.a1_global_scale) != g1 and float(e.a2_global_scale) != g2
    ql = m.model.layers[0].self_attn.q_proj
    assert ql.calibrated and torch.isfinite(ql.input_global_scale)
    assert not any(b.calibrating for b in m.modules() if isinstance(b, EmulatedMoEBlock))
    with torch.no_grad():
        assert not torch.equal(m(_ids(2)).logits, before)
    # MX schemes have no static activation scales: calibration is a no-op
    mx = quantize_model(copy.deepcopy(models["qwen3_moe"]), "w_mxfp4_a_mxfp4", calibration_data=ids)
    assert all(mx.get_submodule(n).experts.a1_global_scale is None for n in quantized_modules(mx)["moe"])


def test_errors(models):
    class NotMoE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(64, 64)

    with pytest.raises(ValueError, match="no MoE block"):
        quantize_model(NotMoE(), "nvfp4_w4a4")
    with pytest.raises(ValueError, match="scheme"):
        quantize_model(copy.deepcopy(models["mixtral"]), "int3")
    # DeepSeek-V3's kv_b_proj has in_features = kv_lora_rank = 32: fine for NVFP4 (16);
    # named explicitly with a block size that does not divide it, it is an error
    m = tiny_model("deepseek_v3", kv_lora_rank=16)
    with pytest.raises(ValueError, match="kv_b_proj: in_features=16"):
        quantize_model(m, "w_mxfp4", targets=["re:.*kv_b_proj"])
    # ... and skipped (left in bf16) when selected by "linear"
    m = quantize_model(tiny_model("deepseek_v3", kv_lora_rank=16), "w_mxfp4", targets=["linear"])
    assert not isinstance(m.model.layers[0].self_attn.kv_b_proj, QuantizedLinear)
    assert isinstance(m.model.layers[0].self_attn.o_proj, QuantizedLinear)


def test_generate_runs(models):
    m = quantize_model(copy.deepcopy(models["gpt_oss"]), "w_mxfp4_a_mxfp4")
    out = m.generate(_ids(2, (1, 4)), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_router_logits_still_recorded(models, arch):
    """HF's router module is kept, so output_router_logits / aux_loss keep working."""
    hf = models[arch]
    m = quantize_model(copy.deepcopy(hf), "w_mxfp4_a_mxfp4")
    ids = _ids(4, (1, 6))
    with torch.no_grad():
        a = hf(ids, output_router_logits=True)
        b = m(ids, output_router_logits=True)
    assert len(b.router_logits) == len(a.router_logits) == 2
    assert torch.equal(b.router_logits[0], a.router_logits[0])  # layer 0 sees the same input
    assert b.aux_loss is not None
