"""quantize_model on MoE blocks it recognizes by structure, not by class name.

transformers 5.x architectures without an ADAPTERS entry -- OLMoE, PhiMoE (sparsemixer
routing), GraniteMoE, Jamba (its Mamba layers run on the PyTorch path on CPU) -- from
tiny configs with random weights, and blocks written as users write them (transformers
4.x style: a plain-Linear router with the routing in forward and a ModuleList of
w1/w3/w2 MLPs; fused `x @ W` experts with gate/up interleaved and no orientation flag).

Checks: every MoE block is swapped and keeps HF's own router module; each swapped block
equals, bit for bit, a path built here by hand (HF's router or the user's own routing
code, weights stacked into vLLM's layout by hand, `moe_emulated`); calibrated logits stay
close to the bf16 model; blocks that are not recognisable raise ValueError naming what
was missing. The compile checks are in test_models_structure_compile.py; both files take the model
builders from tests/structure_models.py.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from structure_models import (  # noqa: E402  (tiny model builders shared with the compile tests)
    COMMON, ARCHS, hf_model, moe_layers, ids, GatedMLP, UserListMoE, InterleavedExperts, UserFusedMoE, Stack,
)

pytest.importorskip("transformers")

from emu_inductor.models import EmulatedMoEBlock, find_moe_blocks, quantize_model, quantized_modules  # noqa: E402
from emu_inductor.reference import get_scheme, moe_emulated, quantize_weight  # noqa: E402

SCHEMES = ["nvfp4_w4a4", "w_mxfp4_a_mxfp4", "nvfp4_w4a16"]


@pytest.fixture(scope="module")
def models():
    return {arch: hf_model(arch) for arch in ARCHS}


def _hand_experts(x2, w13, w2, w, sel, scheme, act="silu", act_scales=(None, None)):
    """The reference on weights quantized here (vLLM layout built by the caller);
    act_scales: the block's NVFP4 w4a4 (a1, a2) global scales (set on its first call)."""
    sch = get_scheme(scheme)
    q13, s13, a13 = quantize_weight(w13.detach(), sch.weight_fmt)
    q2, s2, a2 = quantize_weight(w2.detach(), sch.weight_fmt)
    return moe_emulated(x2, q13, q2, w, sel.to(torch.int32), scheme=sch, w13_scale=s13, w2_scale=s2, w13_alpha=a13,
                        w2_alpha=a2, a1_global_scale=act_scales[0], a2_global_scale=act_scales[1], activation=act)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_block_swapped_by_structure(models, arch):
    m = copy.deepcopy(models[arch])
    before = moe_layers(m, arch)
    assert len(before) == 2
    found = find_moe_blocks(m)
    assert [n for n, _, _ in found] == before
    assert all(a.matched_by == "structure" and a.routing is None for _, _, a in found)  # HF's router, as is
    router_attr = ARCHS[arch][5]
    routers = {n: getattr(m.get_submodule(n), router_attr) for n in before}
    assert quantize_model(m, "nvfp4_w4a4") is m
    assert quantized_modules(m) == {"moe": before, "linear": []}
    assert moe_layers(m, arch) == [] and find_moe_blocks(m) == []
    for n in before:
        blk = m.get_submodule(n)
        assert isinstance(blk, EmulatedMoEBlock) and blk.original_class == ARCHS[arch][3]
        assert getattr(blk, router_attr) is routers[n]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_block_equals_hand_built_path(models, arch, scheme):
    hf = models[arch]
    m = quantize_model(copy.deepcopy(hf), scheme)
    name = moe_layers(hf, arch)[1]
    blk = hf.get_submodule(name)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    x2 = x.reshape(-1, 64)
    with torch.no_grad():
        out = m.get_submodule(name)(x)
        _, w, sel = getattr(blk, ARCHS[arch][5])(x2)  # HF's router
        # transformers 5.x fused experts: gate_up_proj [E, 2I, H] (gate rows, then up), down_proj [E, H, I]
        ex = m.get_submodule(name).experts
        ref = _hand_experts(x2, blk.experts.gate_up_proj, blk.experts.down_proj, w, sel, scheme,
                            act_scales=(ex.a1_global_scale, ex.a2_global_scale)).reshape(x.shape)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert torch.equal(out, ref), f"{(out != ref).sum().item()} of {out.numel()} differ"


def test_phimoe_sparsemixer_routing_kept(models):
    """PhiMoE's eval-mode sparsemixer: the top expert, then the best of the rest, each
    weighted by a softmax over the logits within 2*jitter_eps of its max (masked)."""
    r = models["phimoe"].model.layers[0].mlp.router
    x2 = torch.randn(16, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with torch.no_grad():
        logits, w, sel = r(x2)
    top = logits.topk(2, dim=-1).indices
    assert torch.equal(sel, top)
    eps = r.router_jitter_noise
    for k in range(2):
        masked = logits.clone()
        if k:
            masked.scatter_(-1, top[:, :1], float("-inf"))
        mx = masked.max(-1, keepdim=True).values
        drop = ((mx - logits) / logits.abs().clamp(min=mx)) > 2 * eps
        p = torch.softmax(masked.masked_fill(drop, float("-inf")), dim=-1)
        assert torch.equal(w[:, k], p.gather(-1, top[:, k:k + 1])[:, 0])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_close_to_bf16(models, arch):
    hf = models[arch]
    data = ids()
    with torch.no_grad():
        ref = hf(data, use_cache=False).logits.float()
        for scheme in SCHEMES:
            m = quantize_model(copy.deepcopy(hf), scheme, calibration_data=data)
            out = m(data, use_cache=False).logits.float()
            rel = ((out - ref).norm() / ref.norm()).item()
            assert 0 < rel < 0.25, (scheme, rel)
            assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.97


@pytest.mark.parametrize("norm", [True, False])
def test_user_list_block_plain_linear_router(norm):
    """A 4.x-style block: the routing recipe reproduces the block's own routing code bit for
    bit, and the w1/w3 Linears are stacked into w13 = [gate; up]."""
    model = Stack(lambda: UserListMoE(norm_topk_prob=norm)).to(torch.bfloat16)
    orig = copy.deepcopy(model)
    (name, _, adapter), _ = find_moe_blocks(model)
    assert name == "layers.0" and adapter.layout == "expert_list" and adapter.expert_names == ("w1", "w3", "w2")
    assert adapter.routing is not None and (adapter.routing.top_k, adapter.routing.norm_topk_prob) == (2, norm)
    quantize_model(model, "nvfp4_w4a4")
    assert quantized_modules(model)["moe"] == ["layers.0", "layers.1"]
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    x2 = x.reshape(-1, 64)
    for i in range(2):
        blk, hf = model.layers[i], orig.layers[i]
        assert blk.gate is model.layers[i].gate and torch.equal(blk.gate.weight, hf.gate.weight)
        with torch.no_grad():
            _, w, sel = blk.route(x2)
            w_ref, sel_ref = hf.route(x2)
            assert torch.equal(w, w_ref) and torch.equal(sel, sel_ref)
            w13 = torch.stack([torch.cat([e.w1.weight, e.w3.weight]) for e in hf.experts])
            w2 = torch.stack([e.w2.weight for e in hf.experts])
            out = blk(x)  # first call: sets the NVFP4 activation global scales from x
            ref = _hand_experts(x2, w13, w2, w_ref, sel_ref, "nvfp4_w4a4",
                                act_scales=(blk.experts.a1_global_scale, blk.experts.a2_global_scale)).reshape(x.shape)
            assert torch.equal(out, ref)
            full = hf(x).float()  # the user's own unquantized block: close
            assert ((out.float() - full).norm() / full.norm()).item() < 0.25


def test_user_fused_interleaved_block():
    """Fused `x @ W` experts [E, H, 2I] / [E, I, H] with gate/up interleaved and no
    is_transposed flag: transposed and de-interleaved into vLLM's [gate; up] rows."""
    model = Stack(lambda: UserFusedMoE(H=64, I=64), n=1).to(torch.bfloat16)  # H == I: only gate_up tells
    orig = copy.deepcopy(model)
    quantize_model(model, "nvfp4_w4a16")
    hf = orig.layers[0]
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    with torch.no_grad():
        _, w, sel = hf.router(x)
        gu = hf.experts.gate_up_proj.transpose(1, 2)
        w13 = torch.cat([gu[:, 0::2], gu[:, 1::2]], dim=1)
        ref = _hand_experts(x, w13, hf.experts.down_proj.transpose(1, 2), w, sel, "nvfp4_w4a16")
        out = model.layers[0](x[None])[0]
        assert torch.equal(out, ref)
        full = hf(x[None])[0].float()  # NVFP4 weights: ~16% here; a lost interleave: > 100%
        assert ((out.float() - full).norm() / full.norm()).item() < 0.3


class _Block(nn.Module):
    def __init__(self, experts, with_gate=True, **extra):
        super().__init__()
        if with_gate:
            self.gate = nn.Linear(64, 4, bias=False)
        self.experts = experts
        self.top_k, self.norm_topk_prob = 2, True
        for k, v in extra.items():
            setattr(self, k, v)


class _Plain(nn.Module):
    def __init__(self, H=64, I=32):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(H, I), nn.Linear(I, H)


class _NeedsBias(nn.Module):  # AFMoE-style: the router needs the block's expert bias
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 64))

    def forward(self, x, expert_bias):
        return F.linear(x, self.weight) + expert_bias


def _raises(block, match, config=None):
    model = nn.Module()
    model.moe = block
    if config is not None:
        model.config = config
    with pytest.raises(ValueError, match=match):
        quantize_model(model, "nvfp4_w4a4")


def test_unrecognised_blocks_name_what_was_missing():
    gated = lambda: nn.ModuleList([GatedMLP(64, 32) for _ in range(4)])  # noqa: E731
    _raises(_Block(nn.ModuleList([_Plain() for _ in range(4)])),
            r"_Block\.experts\.0 \(_Plain\): not a gated MLP.*found \['fc1', 'fc2'\]")
    lone = nn.Module()
    lone.weight = nn.Parameter(torch.randn(4, 64, 64))
    _raises(_Block(lone), r"_Block\.experts \(Module\): no recognisable experts.*gate_up_proj.*found \['weight'\]")
    _raises(_Block(gated(), with_gate=False), r"_Block: no router: expected one child module .*weight \[E=4, hidden\]")
    _raises(_Block(gated(), shared_experts=GatedMLP(64, 32)), r"members \['shared_experts'\] beside router `gate`")
    blk = _Block(gated(), with_gate=False, router=_NeedsBias())
    _raises(blk, r"_Block\.router \(_NeedsBias\): calling the router on \[T, 64\] rows failed")
    blk = _Block(gated())
    del blk.norm_topk_prob
    _raises(blk, r"plain Linear.*needs \['norm_topk_prob'\]")
    from types import SimpleNamespace

    _raises(_Block(gated()), r"config\.scoring_func='sigmoid'", SimpleNamespace(scoring_func="sigmoid"))
    _raises(_Block(nn.ModuleList([GatedMLP(64, 32, act=nn.GELU(approximate="tanh")) for _ in range(4)])),
            r"_Block\.experts: activation GELU has no emulated counterpart")
    biased = nn.ModuleList([GatedMLP(64, 32) for _ in range(4)])
    biased[2].w3.bias = nn.Parameter(torch.zeros(32))
    _raises(_Block(biased), r"_Block\.experts\.2\.w3: has a bias")
    scaled = nn.ModuleList([GatedMLP(64, 32) for _ in range(4)])
    scaled[1].register_buffer("w2_scale", torch.ones(()))
    _raises(_Block(scaled), r"_Block\.experts\.1: tensors \['w2_scale'\] beside the w1/w3/w2 weights")
    fused = UserFusedMoE()
    fused.experts.down_proj_scale = nn.Parameter(torch.ones(4))
    _raises(fused, r"UserFusedMoE\.experts: tensors \['down_proj_scale'\] beside gate_up_proj / down_proj")
    # what the structure cannot show is screened by evaluating the block's own forward
    class SigmoidRouted(UserListMoE):
        def route(self, x2):
            w, sel = torch.topk(torch.sigmoid(self.gate(x2).float()), self.top_k, dim=-1)
            return (w / w.sum(-1, keepdim=True)).to(x2.dtype), sel

    class Scaled(UserListMoE):
        def forward(self, x):
            return super().forward(x) * 2.5

    class Concatenated(InterleavedExperts):  # used interleaved, flagged concatenated
        is_concatenated = True

    mislabelled = UserFusedMoE()
    mislabelled.experts = Concatenated(64, 32, 4)
    for blk in (SigmoidRouted(), Scaled(), mislabelled):
        _raises(blk.to(torch.bfloat16), rf"{type(blk).__name__}: its own forward differs from .* by [0-9.]+ \(relative")
    class RowsOnly(UserListMoE):  # takes [T, H] rows: screened on rows, matched
        def forward(self, x2):
            return super().forward(x2[None])[0]

    class Broken(UserListMoE):
        def forward(self, x):
            raise RuntimeError("needs a mask")

    assert find_moe_blocks(Stack(RowsOnly, n=1).to(torch.bfloat16))[0][2].routing is not None
    _raises(Broken().to(torch.bfloat16), r"Broken: calling the block on \[1, T, 64\] hidden states failed "
            r"\(RuntimeError: needs a mask\)")
    # a real transformers block the structure does not explain: AFMoE's shared experts and
    # routing bias (its router wraps a Linear and takes the bias as a second argument)
    import transformers

    cfg = transformers.AfmoeConfig(**dict(COMMON, num_experts=4, moe_intermediate_size=32, num_dense_layers=0))
    with pytest.raises(ValueError, match=r"AfmoeSparseMoeBlock: members \['shared_experts', 'expert_bias'\] beside"):
        quantize_model(transformers.AfmoeForCausalLM(cfg), "nvfp4_w4a4")
    # a tanh-GELU OLMoE: the activation is named
    with pytest.raises(ValueError, match=r"OlmoeSparseMoeBlock\.experts: activation GELUTanh"):
        quantize_model(hf_model("olmoe", hidden_act="gelu_pytorch_tanh"), "nvfp4_w4a4")


def test_granitemoe_shared_block_is_plain():
    """GraniteMoeShared keeps its shared MLP in the decoder layer, beside a plain
    router + experts block: the block is matched, the shared MLP stays as it is."""
    import transformers

    cfg = transformers.GraniteMoeSharedConfig(**dict(COMMON, num_local_experts=4, shared_intermediate_size=32))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = transformers.GraniteMoeSharedForCausalLM(cfg).to(torch.bfloat16).eval()
    hf = copy.deepcopy(m)
    quantize_model(m, "nvfp4_w4a16")
    assert quantized_modules(m)["moe"] == [f"model.layers.{i}.block_sparse_moe" for i in range(2)]
    assert type(m.model.layers[0].shared_mlp).__name__ == "GraniteMoeSharedMLP"
    blk = hf.model.layers[1].block_sparse_moe
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.no_grad():
        _, w, sel = blk.router(x)
        ref = _hand_experts(x, blk.experts.gate_up_proj, blk.experts.down_proj, w, sel, "nvfp4_w4a16")
        assert torch.equal(m.model.layers[1].block_sparse_moe(x[None])[0], ref)


def test_training_jitter_applied_as_hf():
    """PhiMoE's block-level input jitter (training only) is applied the way HF applies it."""
    hf = hf_model("phimoe", input_jitter_noise=0.1, num_hidden_layers=1)
    blk = hf.model.layers[0].mlp
    q = quantize_model(copy.deepcopy(hf), "w_mxfp4_a_mxfp4").model.layers[0].mlp
    assert q.input_jitter_noise == 0.1
    x = torch.randn(1, 4, 64).to(torch.bfloat16)
    q.train()
    blk.train()
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        xq = x.clone()
        q(xq)
        torch.manual_seed(0)
        xh = x.clone()
        blk(xh)
    assert torch.equal(xq, xh) and not torch.equal(xq, x)  # same in-place jitter, same draws


def test_checkpoint_loads_into_listed_experts(tmp_path):
    """A compressed-tensors NVFP4 checkpoint of a user model with w1/w3/w2 experts loads
    into the structural blocks: w13 = [w1; w3] as compressed-tensors decompresses them."""
    pytest.importorskip("compressed_tensors")
    pytest.importorskip("safetensors")
    import json

    from safetensors.torch import save_file
    from test_checkpoints_layouts import _ct_decompress, _ct_nvfp4

    from emu_inductor.checkpoints import load_checkpoint
    from emu_inductor.formats import NVFP4
    from emu_inductor.reference.moe import dequantize_experts

    src = Stack(lambda: UserListMoE()).to(torch.bfloat16)
    tensors, per = {}, {}
    for key, t in src.state_dict().items():
        owner, _, attr = key.rpartition(".")
        if ".experts." in owner:
            per[owner] = _ct_nvfp4(t.contiguous(), torch.tensor(3.0))
            tensors.update({f"{owner}.{k}": v.contiguous() for k, v in per[owner].items()})
        else:
            tensors[key] = t.clone()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized"}}))
    m = load_checkpoint(Stack(lambda: UserListMoE(), seed=1).to(torch.bfloat16), tmp_path)
    assert quantized_modules(m)["moe"] == ["layers.0", "layers.1"]
    assert torch.equal(m.layers[1].gate.weight, src.layers[1].gate.weight)
    ex = m.layers[1].experts
    W13 = dequantize_experts(ex.w13, ex.w13_scale, NVFP4, ex.w13_alpha)
    W2 = dequantize_experts(ex.w2, ex.w2_scale, NVFP4, ex.w2_alpha)
    for e in range(4):
        p = f"layers.1.experts.{e}"
        assert torch.equal(W13[e], torch.cat([_ct_decompress(per[f"{p}.w1"]), _ct_decompress(per[f"{p}.w3"])]))
        assert torch.equal(W2[e], _ct_decompress(per[f"{p}.w2"]))
