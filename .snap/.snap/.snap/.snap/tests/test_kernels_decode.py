"""The decode launch structure of the fused MoE (issue 9), under Triton's interpreter:

* split-K GEMM1 (fp32 partial sums, then act_epilogue_kernel) and GEMM2 partial sums
  finished by combine_kernel (bias, per-slot rounding, router weight, top-k sum in the
  reference's order) compute the same function as the one-pass kernels: A1 bit-identical,
  A2 = QDQ of the kernel's own C2, C2 within a bf16 ulp of the reference, output within
  fp32-accumulation tolerance of the reference; with one K split the partial path is
  bit-identical to the deterministic row path (same sums, same order);
* swap=1 (W @ A^T, the dequantized weights as the dot's left operand) is the same function;
* `auto_split` fills the SMs without splitting past the K tiles.
Fresh random inputs per case (seeded by the case name, so reruns are reproducible)."""


import pytest
import torch

from emu_inductor.kernels.tiles import TileConfig, auto_split
from emu_inductor.ops.triton_impl import moe_triton
from emu_inductor.reference import moe_emulated
from emu_inductor.reference.activations import is_gated
from emu_inductor.reference.qdq import act_fake_quantize
from emu_inductor.spec import OpSpec
from emu_inductor.spec.schemes import SCHEMES
from helpers import bf16_ulp_close, random_moe_case

E, H, I, T = 4, 128, 64, 5
BASE = TileConfig(16, 32, 32, 4, 1)


def _case(scheme, activation, seed_name, bias=False):
    return random_moe_case(scheme, activation, seed_name, E=E, H=H, I=I, T=T, bias=bias)


def _run(qe, scheme, activation, x, tw, ids, cfg, *, emap=None, rw_in=False, b13=None, b2=None, debug=True):
    spec = OpSpec.from_scheme(scheme, activation=activation, router_weight_on_input=rw_in)
    return moe_triton(x, qe.w13, qe.w13_scale, qe.w13_alpha, qe.w2, qe.w2_scale, qe.w2_alpha, tw, ids,
                      qe.a1_global_scale, qe.a2_global_scale, emap, spec, config=cfg, debug=debug,
                      reduction="deterministic", w13_bias=b13, w2_bias=b2)


# (scheme, activation, split1, split2, swap): every scheme family and activation kind meets
# the split, auto-split and swap paths at least once (a full product costs minutes)
CASES = [("nvfp4_w4a4", "silu", 2, 1, 0), ("nvfp4_w4a4", "silu", -1, -1, 1),
         ("w_mxfp4_a_mxfp4", "swigluoai", 4, 2, 0), ("w_mxfp4_a_mxfp4", "swigluoai", 2, 2, 1),
         ("w_mxfp4_a_fp8", "silu", -1, -1, 0), ("nvfp4_w4a16", "relu2_no_mul", 4, 2, 1),
         ("w_mxfp6_e3m2_a_mxfp6_e3m2", "gelu", 2, 1, 0), ("w_mxfp8_e4m3_a_mxfp8_e4m3", "silu", 1, 0, 1)]


@pytest.mark.parametrize("scheme,activation,split1,split2,swap", CASES,
                         ids=[f"{c[0]}-{c[1]}-s{c[2]}_{c[3]}-w{c[4]}" for c in CASES])
def test_split_paths_match_reference(scheme, activation, split1, split2, swap):
    """swap=1: the GEMMs as W @ A^T (weights as the left operand), same function."""
    qe, x, tw, ids, _, _ = _case(scheme, activation, f"{scheme}/{activation}/{split1}/{split2}/{swap}")
    cfg = TileConfig(16, 32, 32, 4, 1, split1=split1, split2=split2, swap=swap)
    d = _run(qe, scheme, activation, x, tw, ids, cfg)
    base = _run(qe, scheme, activation, x, tw, ids, BASE)
    ref = moe_emulated(x, qe.w13, qe.w2, tw, ids, scheme=scheme, w13_scale=qe.w13_scale, w2_scale=qe.w2_scale,
                       w13_alpha=qe.w13_alpha, w2_alpha=qe.w2_alpha, a1_global_scale=qe.a1_global_scale,
                       a2_global_scale=qe.a2_global_scale, activation=activation)
    v = d["valid"]
    assert v.all()
    sch = SCHEMES[scheme]
    # A1: the same fake-quantized rows as the one-pass kernel (and so the reference)
    assert torch.equal(d["a1"][v], base["a1"][v])
    # C2 within a bf16 ulp (two if gated) of the one-pass kernel; A2 = QDQ of its own C2
    assert bf16_ulp_close(d["c2"][v], base["c2"][v], 2 if is_gated(activation) else 1)
    if d["a2"] is not None:
        a2_ref = act_fake_quantize(d["c2"][v].to(x.dtype), sch.act, qe.a2_global_scale).float()
        assert torch.equal(d["a2"][v], a2_ref)
    err = (d["out"].float() - ref.float()).abs().max().item()
    assert err <= 0.02 * max(1.0, ref.float().abs().max().item()), err
    assert torch.isfinite(d["out"]).all()


def test_partial_path_with_one_split_is_the_row_path_bit_for_bit():
    """split2=1: the same fp32 sums as the row store, rounded per slot and summed over the
    top-k in the same order, so combine_kernel equals the deterministic reduction exactly;
    with router weight on the input, an expert map and per-expert biases."""
    scheme, act = "nvfp4_w4a4", "silu"
    qe, x, tw, ids, b13, b2 = _case(scheme, act, "partial-one-split", bias=True)
    emap = torch.tensor([0, -1, 1, 2, 3, -1], dtype=torch.int32)
    g = torch.Generator().manual_seed(7)
    ids = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(T)]).to(torch.int32)
    for rw_in, k_ids, k_tw in ((False, ids, tw), (True, ids[:, :1], torch.ones(T, 1))):
        one = _run(qe, scheme, act, x, k_tw, k_ids, TileConfig(16, 32, 32, 4, 1, split2=1), emap=emap, rw_in=rw_in,
                   b13=b13, b2=b2, debug=False)
        rows = _run(qe, scheme, act, x, k_tw, k_ids, BASE, emap=emap, rw_in=rw_in, b13=b13, b2=b2, debug=False)
        assert torch.equal(one, rows), f"rw_in={rw_in}"
        ref = moe_emulated(x, qe.w13, qe.w2, k_tw, k_ids, scheme=scheme, w13_scale=qe.w13_scale,
                           w2_scale=qe.w2_scale, w13_alpha=qe.w13_alpha, w2_alpha=qe.w2_alpha,
                           a1_global_scale=qe.a1_global_scale, a2_global_scale=qe.a2_global_scale,
                           activation=act, apply_router_weight_on_input=rw_in, expert_map=emap,
                           w13_bias=b13, w2_bias=b2)
        assert torch.equal(one, ref), f"rw_in={rw_in}"


def test_split_with_biases_matches_reference():
    scheme, act = "w_mxfp4_a_mxfp4", "swigluoai"
    qe, x, tw, ids, b13, b2 = _case(scheme, act, "split-bias", bias=True)
    out = _run(qe, scheme, act, x, tw, ids, TileConfig(16, 32, 32, 4, 1, split1=4, split2=2), b13=b13, b2=b2,
               debug=False)
    ref = moe_emulated(x, qe.w13, qe.w2, tw, ids, scheme=scheme, w13_scale=qe.w13_scale, w2_scale=qe.w2_scale,
                       a1_global_scale=qe.a1_global_scale, a2_global_scale=qe.a2_global_scale, activation=act,
                       w13_bias=b13, w2_bias=b2)
    assert (out.float() - ref.float()).abs().max().item() <= 0.02 * max(1.0, ref.float().abs().max().item())


def test_auto_split():
    assert auto_split(1000, 16, 132) == 1  # a full grid is not split
    assert auto_split(108, 16, 132) == 8  # Qwen3 T=1 GEMM1 with BN=64: ~4 programs per SM
    assert auto_split(9, 2, 132) == 2  # never more splits than K tiles
    assert auto_split(1, 1, 132) == 1
    for p in (1, 7, 50, 300):
        s = auto_split(p, 64, 132)
        assert s & (s - 1) == 0 and (p * s >= 4 * 132 or s == 64)


def test_launched_splits_are_never_empty():
    """The kernels assume k_hi > k_lo (render: tl.assume under EVEN_K, so that ptxas keeps the
    swapped product's wgmma pipelined); a split starting at or past K would break that."""
    from emu_inductor.kernels import launch

    cpu = torch.device("cpu")
    for K in (32, 64, 96, 704, 768, 2048, 2880):
        for BK in (32, 64, 128, 256):
            k_tiles = -(-K // BK)
            for requested in (-1, 1, 2, 3, 5, 7, 8, 16, 100):
                split = launch._splits(requested, 7, K, BK, cpu)
                kts = launch._k_per_split(K, BK, split)
                assert 1 <= split <= k_tiles
                assert all(s * kts * BK < K for s in range(split)), (K, BK, requested, split)
                assert split * kts >= k_tiles  # the splits cover K
    assert launch._splits(1, 7, 0, 64, cpu) == 1 and not launch._even_k(0, 64)  # K = 0: masked, no assume


@pytest.mark.parametrize("scheme,activation", [("nvfp4_w4a4", "silu"), ("w_mxfp4_a_mxfp4", "swigluoai"),
                                                ("w_mxfp4_a_fp8", "gelu_no_mul")])
def test_last_split_epilogue_is_the_epilogue_kernel(scheme, activation, monkeypatch):
    """Split-K GEMM1's epilogue run by the last split of each tile (a counter per tile, the
    partial sums re-read in split order) equals act_epilogue_kernel bit for bit, and leaves
    every counter back at zero for the next launch (they are zeroed once and cached)."""
    from emu_inductor.kernels import launch, launch_common
    monkeypatch.setenv("EMU_INDUCTOR_FUSED_EPILOGUE", "1")
    qe, x, tw, ids, b13, b2 = _case(scheme, activation, f"fused-epi/{scheme}/{activation}", bias=True)
    cfg = TileConfig(16, 32, 32, 4, 1, split1=4, split2=2)
    fused = _run(qe, scheme, activation, x, tw, ids, cfg, b13=b13, b2=b2)
    for use in ("epilogue", "combine"):
        assert int(launch_common._COUNTERS[(str(x.device), 0, use)].abs().sum()) == 0
    monkeypatch.setenv("EMU_INDUCTOR_FUSED_EPILOGUE", "0")
    sep = _run(qe, scheme, activation, x, tw, ids, cfg, b13=b13, b2=b2)
    for k in ("a1", "c2", "a2", "out"):
        if fused.get(k) is not None:
            assert torch.equal(fused[k].view(torch.uint8), sep[k].view(torch.uint8)), k
    again = _run(qe, scheme, activation, x, tw, ids, cfg, b13=b13, b2=b2)  # counters reused
    monkeypatch.setenv("EMU_INDUCTOR_FUSED_EPILOGUE", "1")
    again = _run(qe, scheme, activation, x, tw, ids, cfg, b13=b13, b2=b2)
    assert torch.equal(again["out"].view(torch.uint8), fused["out"].view(torch.uint8))


def test_fused_combine_with_expert_map_and_tokens_without_local_slots(monkeypatch):
    """The fused combine under an expert map: a token whose slots are all on other ranks is
    zeros (nobody completes it: the output starts zeroed), partly local tokens sum their
    local slots only (their count target), as combine_kernel does, bit for bit."""
    scheme, act = "w_mxfp4_a_mxfp4", "silu"
    qe, x, tw, ids, b13, b2 = _case(scheme, act, "fused-combine-emap", bias=True)
    emap = torch.tensor([0, -1, 1, 2, 3, -1], dtype=torch.int32)
    ids = torch.tensor([[1, 5], [0, 5], [2, 3], [5, 4], [1, 0]], dtype=torch.int32)
    cfg = TileConfig(16, 32, 32, 4, 1, split1=2, split2=2)
    monkeypatch.setenv("EMU_INDUCTOR_FUSED_EPILOGUE", "1")
    fused = _run(qe, scheme, act, x, tw, ids, cfg, emap=emap, b13=b13, b2=b2, debug=False)
    monkeypatch.setenv("EMU_INDUCTOR_FUSED_EPILOGUE", "0")
    sep = _run(qe, scheme, act, x, tw, ids, cfg, emap=emap, b13=b13, b2=b2, debug=False)
    assert torch.equal(fused.view(torch.int16), sep.view(torch.int16))
    assert torch.equal(fused[0], torch.zeros_like(fused[0]))
    ref = moe_emulated(x, qe.w13, qe.w2, tw, ids, scheme=scheme, w13_scale=qe.w13_scale, w2_scale=qe.w2_scale,
                       activation=act, expert_map=emap, w13_bias=b13, w2_bias=b2)
    assert (fused.float() - ref.float()).abs().max() <= 0.02 * max(1.0, ref.float().abs().max().item())


@pytest.mark.parametrize("scheme,rw_in", [("nvfp4_w4a4", False), ("w_mxfp4_a_mxfp4", True)])
def test_prep_kernel_is_routing_plus_prequant(scheme, rw_in, monkeypatch):
    """prep_kernel (routing in program 0, the GEMM1 rows' fake-quant in the others) gives the
    same routing layout, the same A1 rows and the same output as the two separate launches."""
    act = "silu"
    qe, x, tw, ids, _, _ = _case(scheme, act, f"prep/{scheme}/{rw_in}")
    emap = torch.tensor([0, -1, 1, 2, 3, -1], dtype=torch.int32) if rw_in else None
    if rw_in:
        g = torch.Generator().manual_seed(3)
        ids = torch.stack([torch.randperm(6, generator=g)[:1] for _ in range(T)]).to(torch.int32)
        tw = torch.ones(T, 1)
    cfg = TileConfig(16, 32, 32, 4, 1, split1=2, split2=1)
    merged = _run(qe, scheme, act, x, tw, ids, cfg, emap=emap, rw_in=rw_in)
    monkeypatch.setenv("EMU_INDUCTOR_PREP_MERGED", "0")
    sep = _run(qe, scheme, act, x, tw, ids, cfg, emap=emap, rw_in=rw_in)
    for k in ("valid", "a1", "out"):
        assert torch.equal(merged[k].view(torch.uint8), sep[k].view(torch.uint8)), k
