"""The dequantize-once prefill path (TileConfig.dq, issue 10), under Triton's interpreter:
every weight decoded once per call by the GEMMs' own tile functions into a bf16 workspace,
both GEMMs on torch._grouped_mm, the fused path's epilogue and combine kernels after them.
Against the fused kernel (and the reference) on fresh random inputs: A1 and the decoded
weights are the same values, so A1 rows are bit-identical, C2 / A2 rows and outputs agree
up to fp32 accumulation order; with the workspace forced small the output rows come in
several chunks (every gate / up layout: interleaved rows land in gate | up order)."""

import zlib

import pytest
import torch

from emu_inductor.kernels import launch
from emu_inductor.kernels.tiles import TileConfig
from emu_inductor.ops.triton_impl import moe_triton
from emu_inductor.reference import moe_emulated
from emu_inductor.reference.modules import QuantizedExperts
from emu_inductor.spec import OpSpec
from helpers import random_moe_case

E, T = 4, 9


def _case(scheme, activation, H, I, name, rw=False):
    return random_moe_case(scheme, activation, name, E=E, H=H, I=I, T=T, k=1 if rw else 2)[:4]


def _run(qe, spec, x, tw, ids, cfg):
    return moe_triton(x, qe.w13, qe.w13_scale, qe.w13_alpha, qe.w2, qe.w2_scale, qe.w2_alpha, tw, ids,
                      qe.a1_global_scale, qe.a2_global_scale, None, spec, config=cfg, debug=True,
                      reduction="deterministic")


CASES = [("nvfp4_w4a4", "silu", False, None), ("w_mxfp4_a_mxfp4", "swigluoai", False, 0.0001),
         ("nvfp4_w4a16", "relu2_no_mul", False, None), ("w_mxfp6_e3m2_a_mxfp6_e3m2", "gelu", True, 0.0001),
         ("w_mxfp8_e4m3_a_mxfp8_e4m3", "silu", False, 0.0001)]


@pytest.mark.parametrize("scheme,activation,rw,ws_mb", CASES, ids=[f"{c[0]}-{c[1]}-rw{int(c[2])}" for c in CASES])
def test_dq_path_matches_the_fused_kernel(scheme, activation, rw, ws_mb, monkeypatch):
    H, I = 128, 64
    if ws_mb is not None:  # a workspace of one 64-row chunk at a time: several grouped GEMMs per weight
        monkeypatch.setenv("EMU_INDUCTOR_DQ_WORKSPACE_MB", str(ws_mb))
    qe, x, tw, ids = _case(scheme, activation, H, I, f"{scheme}/{activation}/{rw}", rw)
    spec = OpSpec.from_scheme(scheme, activation=activation, router_weight_on_input=rw)
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    dq = _run(qe, spec, x, tw, ids, TileConfig(16, 32, 64, 4, 1, dq=1))
    assert calls, "the dequantize-once path did not run"
    if ws_mb is not None:
        assert len(calls) > 2  # chunked
    monkeypatch.setattr(torch, "_grouped_mm", real)
    base = _run(qe, spec, x, tw, ids, TileConfig(16, 32, 64, 4, 1))
    v = base["valid"]
    assert v.all()
    assert torch.equal(dq["a1"][v], base["a1"][v])
    for key in ("c2", "a2"):
        if base[key] is not None:
            d = (dq[key][v] - base[key][v]).abs()
            # different fp32 summation orders: C1 may differ in its last bit, and a QDQ step then
            assert d.max().item() <= 0.3 * max(1.0, base[key][v].abs().max().item()), key
            assert (d == 0).float().mean().item() > 0.9, key
    ref = moe_emulated(x, qe.w13, qe.w2, tw, ids, scheme=scheme, w13_scale=qe.w13_scale, w2_scale=qe.w2_scale,
                       w13_alpha=qe.w13_alpha, w2_alpha=qe.w2_alpha, a1_global_scale=qe.a1_global_scale,
                       a2_global_scale=qe.a2_global_scale, activation=activation, apply_router_weight_on_input=rw)
    assert (dq["out"].float() - ref.float()).abs().max().item() <= 0.02 * max(1.0, ref.float().abs().max().item())


def test_dequant_kernel_gives_the_gemms_weights_in_gate_up_order():
    # GEMM1's workspace rows are gate rows then up rows, whatever the checkpoint's layout
    scheme, activation = "w_mxfp4_a_mxfp4", "swigluoai"  # gpt-oss: gate / up rows interleaved
    qe, x, tw, ids = _case(scheme, activation, 64, 32, "dequant-order")
    spec = OpSpec.from_scheme(scheme, activation=activation)
    plan_kspec = launch.kernel_spec_for(spec, torch.bfloat16, "none", "none", False, False, x.device)
    mod = launch.get_module(plan_kspec)
    out = torch.empty(E, 64, 64, dtype=torch.bfloat16)
    mod.dequant_kernel[(E * 2, 1)](qe.w13, qe.w13_scale, launch._dummy(x.device), out, 64, 64, 64, 0, 32,
                                   qe.w13.stride(0), qe.w13.stride(1), qe.w13_scale.stride(0), qe.w13_scale.stride(1),
                                   W2=False, EVEN_K=True, FASTDEC=False, BN=32, BK=64)
    from emu_inductor.reference.moe import dequantize_experts
    W = dequantize_experts(qe.w13, qe.w13_scale, OpSpec.from_scheme(scheme).scheme().weight_fmt)
    assert torch.equal(out[:, :32], W[:, 0::2]) and torch.equal(out[:, 32:], W[:, 1::2])


def test_dq_applies_only_where_it_is_the_same_function():
    qe, x, tw, ids = _case("nvfp4_w4a4", "silu", 64, 32, "applies")
    spec = OpSpec.from_scheme("w_mxfp4_a_fp8", activation="silu")  # fp8 a2 needs GEMM1's amax
    calls = []
    real = torch._grouped_mm
    try:
        torch._grouped_mm = lambda *a, **k: calls.append(1) or real(*a, **k)
        qm = QuantizedExperts.from_float((torch.randn(E, 64, 64) * 0.2).bfloat16(), (torch.randn(E, 64, 32) * 0.2).bfloat16(),
                                         scheme="w_mxfp4_a_fp8", activation="silu")
        moe_triton(x, qm.w13, qm.w13_scale, qm.w13_alpha, qm.w2, qm.w2_scale, qm.w2_alpha, tw, ids,
                   qm.a1_global_scale, qm.a2_global_scale, None, spec, config=TileConfig(16, 32, 64, 4, 1, dq=1))
    finally:
        torch._grouped_mm = real
    assert not calls  # fell back to the fused kernels


@pytest.mark.parametrize("scheme,bias,ws_rows", [("nvfp4_w4a4", True, None), ("w_mxfp4_a_mxfp4", False, 64),
                                                 ("w_mxfp6_e2m3", True, 64), ("nvfp4_w4a16", False, None)])
def test_linear_dq_path_is_the_reference(scheme, bias, ws_rows, monkeypatch):
    """A linear through the dequantize-once path: QDQ rows and decoded weights are the
    reference's, and the GEMM is F.linear itself -- bit-identical to linear_reference on the
    CPU; with few rows the weight comes in chunks of 64 output rows."""
    from emu_inductor.ops.reference_impl import linear_reference
    from emu_inductor.ops.triton_impl import linear_triton
    from emu_inductor.reference.modules import quantize_weight

    g = torch.Generator().manual_seed(zlib.crc32(f"lin-{scheme}".encode()))
    spec = OpSpec.from_scheme(scheme)
    sch = spec.scheme()
    N, K, M = 192, 128, 24 if ws_rows else 300
    w, s, alpha = quantize_weight((torch.randn(N, K, generator=g) * 0.2).bfloat16(), sch.weight_fmt)
    x = torch.randn(M, K, generator=g).bfloat16()
    gs = torch.tensor(2688.0 / 4.0) if sch.weight_fmt.has_global_scale and spec.act_kind != "none" else None
    b = (torch.randn(N, generator=g) * 0.1).bfloat16() if bias else None
    calls = []
    real = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = linear_triton(x, w, s, alpha, gs, b, spec, config=TileConfig(16, 64, 64, 4, 1, dq=1))
    monkeypatch.setattr(torch.nn.functional, "linear", real)
    assert len(calls) == (3 if ws_rows else 1)  # M x max(N, K) x 2 bytes of workspace: 64-row chunks
    ref = linear_reference(x, w, s, alpha, gs, b, spec)
    assert torch.equal(out, ref)


def test_dq_is_a_prefill_candidate_unless_turned_off(monkeypatch):
    from emu_inductor.kernels.tiles import candidates

    assert any(c.dq for c in candidates(512)) and not any(c.dq for c in candidates(4))
    assert not candidates(512)[0].dq  # the heuristic without autotuning stays the fused tile
    monkeypatch.setenv("EMU_INDUCTOR_DQ", "0")
    assert not any(c.dq for c in candidates(512))


def test_turning_dq_off_also_skips_a_cached_dq_choice(monkeypatch, tmp_path):
    """A dq config autotuned earlier (in memory or on disk) is not reused once the user sets
    EMU_INDUCTOR_DQ=0: the call re-tunes over the fused candidates instead."""
    from emu_inductor.kernels import autotune

    monkeypatch.setenv("EMU_INDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "_autotune_enabled", lambda dev: True)
    monkeypatch.setattr(autotune, "_mem", {})
    dev = torch.device("cpu")
    cfg = autotune.select_config("test|dq-off", dev, 512, bench=lambda c: 0.5 if c.dq else 1.0)
    assert cfg.dq
    assert autotune.select_config("test|dq-off", dev, 512, bench=lambda c: 1 / 0).dq  # cached
    monkeypatch.setenv("EMU_INDUCTOR_DQ", "0")
    assert not autotune.select_config("test|dq-off", dev, 512, bench=lambda c: 0.5 if c.dq else 1.0).dq
    monkeypatch.setattr(autotune, "_mem", {})  # a new process: the disk cache holds the fused choice now
    assert not autotune.select_config("test|dq-off", dev, 512, bench=lambda c: 1 / 0).dq
