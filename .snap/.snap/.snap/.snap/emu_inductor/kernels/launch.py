"""Launchers: the fused MoE pipeline (routing prep, GEMM1 with QDQ_a1 / dequant /
activation / QDQ_a2, GEMM2, combine), grouped_mm and linear, choosing a tile config per call
(autotuned, verified against REFERENCE_CONFIG) and handing prefill-sized calls to the
dequantize-once path (`dequant_once`) where their config says so. Shared pieces (argument
dataclasses, routing prep, device constants) live in `launch_common`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Optional

import torch
import triton.testing

from ..formats import FORMATS
from ..spec.activations import is_gated
from ..spec.opspec import OpSpec
from .autotune import select_config
from .dequant_once import (dq_applies, linear_dq, linear_dq_applies, moe_run_dq)
from .kernel_spec import alpha_mode_of
from .launch_common import (ActScales, BlockRouting, GemmWeights, KernelScales, MoEPlan, MoEWorkspaces,
    Routing, _cdiv, _dec_kw, _dummy, _even_k, _iota_i32, _k_per_split, _kernel_scales, _launch_kw,
    _moe_debug_rows, _moe_prep, _moe_prequant, _moe_workspaces, _np2, _pdl_kw, _prep_merged, _routing_impl,
    _scale_u8, _sort_kernel_fits, _split_counters, _splits, _zeros_i32, get_module, interpreting,
    kernel_spec_for, moe_align)
from .tiles import TileConfig, interpreter_config, token_bucket

__all__ = ["GemmWeights", "Routing", "ActScales", "BlockRouting", "KernelScales", "MoEWorkspaces", "moe_align",
           "launch_moe", "launch_linear", "launch_grouped_mm", "get_module", "kernel_spec_for", "interpreting"]


log = logging.getLogger("emu_inductor.kernels")


# --- MoE ---------------------------------------------------------------------------------------


def launch_moe(hidden_states, w13: GemmWeights, w2: GemmWeights, routing: Routing, scales: ActScales,
               spec: OpSpec, *, reduction: Optional[str] = None, config: Optional[TileConfig] = None,
               debug: bool = False, prequant: Optional[bool] = None):
    """The fused MoE on validated arguments: routing prep, GEMM1 (+QDQ_a1, dequant,
    activation, QDQ_a2), GEMM2 (dequant, router weight, reduction). See
    `emu_inductor.ops.triton_impl.moe_triton` for the options."""
    x = hidden_states
    (T, H), E = x.shape, w13.w.shape[0]
    I = FORMATS[spec.weight_fmt].logical_size(w2.w.shape[2])
    dev, dtype = x.device, x.dtype
    top_k = routing.topk_ids.shape[1]
    reduction = reduction or os.environ.get("EMU_INDUCTOR_MOE_REDUCTION") or (
        "deterministic" if interpreting() else "atomic")
    if reduction not in ("atomic", "deterministic"):
        raise ValueError(f"reduction: expected 'atomic' or 'deterministic', got {reduction!r}")
    if T * top_k == 0:
        return x.new_zeros(x.shape) if not debug else {"out": x.new_zeros(x.shape)}
    N1 = w13.w.shape[1]
    kspec = kernel_spec_for(spec, dtype, alpha_mode_of(w13.alpha, E, N1), alpha_mode_of(w2.alpha, E, H),
                            scales.a1 is not None, scales.a2 is not None, dev,
                            bias1=w13.bias is not None, bias2=w2.bias is not None)
    if w13.bias is not None:
        w13 = dataclasses.replace(w13, bias=w13.bias.contiguous())
    if w2.bias is not None:
        w2 = dataclasses.replace(w2, bias=w2.bias.contiguous())
    routing = dataclasses.replace(routing, topk_weights=routing.topk_weights.contiguous())
    if prequant is None:
        prequant = spec.act_kind != "none"
    plan = MoEPlan(x=x.contiguous(), w13=w13, w2=w2, routing=routing, scales=scales, spec=spec, kspec=kspec,
                    mod=get_module(kspec), T=T, H=H, E=E, I=I, N1=N1, top_k=top_k, reduction=reduction,
                    prequant=bool(prequant) and spec.act_kind != "none")
    run = functools.partial(_moe_run, plan)
    if config is None:
        config = _moe_config(plan, run)
    return run(config, debug)


def _moe_config(plan: MoEPlan, run) -> TileConfig:
    rows_per_expert = plan.R / max(1, min(plan.E, plan.R))
    if plan.kspec.interpret:
        c1 = interpreter_config(plan.I, plan.H, rows_per_expert)
        c2 = interpreter_config(plan.H, plan.I, rows_per_expert)
        return TileConfig(c1.BM, max(c1.BN, 32), max(c1.BK, c2.BK), 4, 1)
    key = (f"moe|{plan.kspec.digest()}|E{plan.E}|H{plan.H}|I{plan.I}|k{plan.top_k}|T{token_bucket(plan.T)}|"
           f"{plan.reduction}|pq{int(plan.prequant)}")
    return select_config(key, plan.x.device, rows_per_expert, bench=_bencher(run), verify=_verifier(run))


def _moe_run(plan: MoEPlan, cfg: TileConfig, dbg: bool = False):
    if cfg.dq and dq_applies(plan):
        return moe_run_dq(plan, cfg, dbg)
    dummy = _dummy(plan.x.device)
    scales = _kernel_scales(plan, dummy)
    if (plan.prequant and _routing_impl(plan.R, plan.E) == "triton" and _sort_kernel_fits(plan.R, plan.E)
            and _prep_merged()):
        blocks, a_src, a_index = _moe_prep(plan, cfg, scales)
    else:
        blocks = BlockRouting(*moe_align(plan.routing.topk_ids, plan.routing.expert_map, plan.E, cfg.BM))
        a_src, a_index = _moe_prequant(plan, scales) if plan.prequant else (plan.x, 0)
    ws = _moe_workspaces(plan, blocks.padded_rows, dbg, dummy)
    _moe_gemm1(plan, cfg, blocks, scales, ws, a_src, a_index, dbg, dummy)
    del a_src
    out = _moe_gemm2(plan, cfg, blocks, scales, ws, dummy)
    y = out if cfg.split2 != 0 else _moe_combine(plan, out)
    if not dbg:
        return y
    return _moe_debug_rows(plan, blocks, ws, y)




def _moe_gemm1(plan: MoEPlan, cfg: TileConfig, blocks: BlockRouting, scales: KernelScales, ws: MoEWorkspaces,
               a_src, a_index: int, dbg: bool, dummy) -> None:
    w13 = plan.w13
    w1a, s1a = w13.w, _scale_u8(w13.scale)
    w1s = (w13.w.stride(0), w13.w.stride(1))
    fp8 = plan.spec.act_kind == "fp8_tensor"
    grid1 = (blocks.num_blocks, _cdiv(plan.I, cfg.BN))
    split = _splits(cfg.split1, grid1[0] * grid1[1], plan.H, cfg.BK, plan.x.device)
    P = blocks.padded_rows
    pw = 2 * plan.I if is_gated(plan.spec.activation) else plan.I  # gate and up sums side by side
    part = torch.empty((split, P, pw), dtype=torch.float32, device=plan.x.device) if split > 1 else dummy
    cnt, fuse = _split_counters(plan.x.device, grid1[0] * grid1[1]) if split > 1 else (_dummy(plan.x.device, torch.int32), False)
    bias = (w13.bias,) if w13.bias is not None else ()  # b1_ptr exists only in bias1 kernels
    amax_out = fp8 and not plan.kspec.a2_static
    plan.mod.gemm_act_kernel[grid1 + (split,)](
        a_src, a_src.stride(0), w1a, s1a, w13.alpha if w13.alpha is not None else dummy,
        blocks.sorted_ids, blocks.block_expert, plan.routing.topk_weights, scales.gs1, scales.gs2, ws.a2,
        ws.a2.stride(0), ws.dbg_a, ws.dbg_c, scales.amax2, *bias, part, cnt,
        plan.I, plan.H, plan.R, plan.E, plan.N1, w1s[0], w1s[1], w13.scale.stride(0), w13.scale.stride(1),
        _k_per_split(plan.H, cfg.BK, split), P, pw,
        TOPK=plan.top_k, A_INDEX=a_index, DEBUG=dbg, AMAX_OUT=amax_out,
        PREQ=plan.prequant, SPLIT=split, FUSE_EPI=fuse, SWAP=cfg.swap, EVEN_K=_even_k(plan.H, cfg.BK),
        PREFETCH=bool(cfg.prefetch), **_dec_kw(plan.kspec, plan.H, cfg, plan.x.device), BM=cfg.BM,
        BN=cfg.BN, BK=cfg.BK, **_launch_kw(cfg), **_pdl_kw(plan.x.device))
    if split > 1 and not fuse:
        plan.mod.act_epilogue_kernel[grid1](
            part, blocks.sorted_ids, blocks.block_expert, scales.gs2, ws.a2, ws.a2.stride(0), ws.dbg_c,
            scales.amax2, *bias, plan.I, plan.R, plan.E, plan.N1, P, pw, DEBUG=dbg, AMAX_OUT=amax_out,
            SPLIT=split, BM=cfg.BM, BN=cfg.BN, **({} if interpreting() else {"num_warps": 4}),
            **_pdl_kw(plan.x.device))


def _moe_gemm2(plan: MoEPlan, cfg: TileConfig, blocks: BlockRouting, scales: KernelScales, ws: MoEWorkspaces,
               dummy) -> torch.Tensor:
    """GEMM2. split2 == 0: fp32 atomics into [T, H] (atomic) or per-slot rows [R, H]
    (deterministic), finished by `_moe_combine`; split2 >= 1 (or -1, auto): fp32 partial
    sums [split, P, H] and combine_kernel, which returns the finished output."""
    w2, H, I = plan.w2, plan.H, plan.I
    dev, dtype = plan.x.device, plan.x.dtype
    w2a = w2.w
    w2s = (w2.w.stride(0), w2.w.stride(1))
    grid2 = (blocks.num_blocks, _cdiv(H, cfg.BN))
    P = blocks.padded_rows
    partial = cfg.split2 != 0
    split = _splits(cfg.split2, grid2[0] * grid2[1], I, cfg.BK, dev) if partial else 1
    y = dummy
    cnt, fuse = _dummy(dev, torch.int32), False
    if partial:
        out = torch.empty((split, P, H), dtype=torch.float32, device=dev)
        store = 2
        cnt, fuse = _split_counters(dev, plan.T * grid2[1], "combine")
        # fused: every token with a local slot is written by the program completing it; with
        # an expert map a token may have none (combine_kernel writes its zeros)
        y = (torch.zeros if plan.routing.expert_map is not None and fuse else torch.empty)(
            (plan.T, H), dtype=dtype, device=dev)
    elif plan.reduction == "atomic":
        out = torch.zeros((plan.T, H), dtype=torch.float32, device=dev)
        store = 1
    else:
        out = torch.zeros((plan.R, H), dtype=dtype, device=dev)
        store = 0
    plan.mod.gemm_out_kernel[grid2 + (split,)](
        ws.a2, ws.a2.stride(0), w2a, _scale_u8(w2.scale), w2.alpha if w2.alpha is not None else dummy,
        blocks.sorted_ids, blocks.block_expert, plan.routing.topk_weights,
        scales.gs2_static if scales.gs2_static is not None else scales.amax2,
        w2.bias if w2.bias is not None else dummy,
        out, H if partial else out.stride(0), blocks.pos_of_id, cnt, y, H, I, plan.R, plan.E, H, w2s[0], w2s[1],
        w2.scale.stride(0), w2.scale.stride(1), _k_per_split(I, cfg.BK, split), P,
        TOPK=plan.top_k, A_INDEX=2, QDQ_A=plan.spec.act_kind == "fp8_tensor", STATIC_A=plan.kspec.a2_static,
        HAS_BIAS=w2.bias is not None, STORE=store, MUL_W=not plan.spec.router_weight_on_input,
        SPLIT=split, FUSE_COMB=fuse, SWAP=cfg.swap, EVEN_K=_even_k(I, cfg.BK), PREFETCH=bool(cfg.prefetch),
        **_dec_kw(plan.kspec, I, cfg, dev), BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, **_launch_kw(cfg),
        **_pdl_kw(dev))
    if not partial:
        return out
    if fuse:
        return y
    BH = min(1024, _np2(H))
    plan.mod.combine_kernel[(plan.T, _cdiv(H, BH))](
        out, blocks.pos_of_id, blocks.block_expert, plan.routing.topk_weights,
        w2.bias if w2.bias is not None else dummy, y, plan.T, H, P, TOPK=plan.top_k, SPLIT=split,
        HAS_BIAS=w2.bias is not None, MUL_W=not plan.spec.router_weight_on_input, BM=cfg.BM, BH=BH,
        **({} if interpreting() else {"num_warps": 4}), **_pdl_kw(dev))
    return y


def _moe_combine(plan: MoEPlan, out: torch.Tensor) -> torch.Tensor:
    """atomic: the fp32 [T, H] sum, rounded once; deterministic: the per-slot rows summed in
    fp32 in the reference's order (router weight applied here unless it went on the input)."""
    dtype = plan.x.dtype
    if plan.reduction == "atomic":
        return out.to(dtype)
    c3 = out.view(plan.T, plan.top_k, plan.H).to(torch.float32)
    if not plan.spec.router_weight_on_input:
        c3 = c3 * plan.routing.topk_weights.to(torch.float32).unsqueeze(-1)
    return c3.sum(dim=1).to(dtype)




REFERENCE_CONFIG = TileConfig(16, 64, 128, 4, 3)


def outputs_agree(y: torch.Tensor, ref: torch.Tensor, rel: float = 0.02) -> bool:
    """Same non-finite pattern, and finite values within `rel` * max(1, max |ref|): the
    spread of fp32 accumulation orders is far below that; a miscompiled tile is not."""
    fy, fr = torch.isfinite(y), torch.isfinite(ref)
    if not torch.equal(fy, fr) or not torch.equal(y[~fy].float().nan_to_num(0.0, 1.0, -1.0),
                                                  ref[~fr].float().nan_to_num(0.0, 1.0, -1.0)):
        return False
    if not fr.any():
        return True
    d = (y[fr].float() - ref[fr].float()).abs().max()
    return bool(d <= rel * max(1.0, float(ref[fr].float().abs().max())))


def _verifier(run):
    """verify(cfg) for the autotuner: run(cfg)'s output against REFERENCE_CONFIG's on the
    same inputs (computed once, lazily). Syncs the device: autotuning only, never captured."""
    ref = []

    def verify(cfg):
        if not ref:
            ref.append(run(REFERENCE_CONFIG).clone())
        return outputs_agree(run(cfg), ref[0])

    return verify


def _bencher(run):
    """Autotuning timer: CUDA-graph replay time (what decode with CUDA graphs pays: kernel
    time, not the per-launch host overhead that would favour fewer, slower launches), or
    plain event timing where a graph cannot be captured."""
    def bench(cfg):
        run(cfg)  # compile
        try:
            return triton.testing.do_bench_cudagraph(lambda: run(cfg), rep=20)
        except Exception as e:  # e.g. a launch path that cannot be captured
            log.debug("emu_inductor: CUDA-graph timing failed (%s); timing eagerly", e)
            torch.cuda.synchronize()
            return triton.testing.do_bench(lambda: run(cfg), warmup=5, rep=20)

    return bench


# --- grouped GEMM and linear -----------------------------------------------------------------------


def _gemm_rows(a, weights: GemmWeights, blocks: BlockRouting, R, a_gs, spec: OpSpec, out, cfg, alpha_mode,
               expert_bias: bool = False):
    """expert_bias: `weights.bias` is [E, N] (one row per expert, grouped_mm) rather than linear's [N]."""
    w, w_scale, w_alpha, bias = weights.w, weights.scale, weights.alpha, weights.bias
    E, N = w.shape[0], w.shape[1]
    K = a.shape[1]
    dev = a.device
    fp8 = spec.act_kind == "fp8_tensor"
    kspec = kernel_spec_for(spec, a.dtype, alpha2=alpha_mode, a1_static=a_gs is not None,
                            a2_static=a_gs is not None, device=dev, bias2=expert_bias and bias is not None)
    mod = get_module(kspec)
    dummy = _dummy(dev)
    if fp8:
        gs = a_gs.reshape(1).to(torch.float32) if a_gs is not None else a.abs().amax().to(torch.float32).reshape(1)
    else:
        gs = a_gs.reshape(1).to(torch.float32) if a_gs is not None else dummy
    grid = (blocks.num_blocks, _cdiv(N, cfg.BN))
    # split2 != 0 (decode configs): K split over programs as in the MoE's GEMM2 -- a linear at a
    # few rows has too few N tiles to fill the GPU, each walking all of K -- with fp32 partial
    # sums [split, P, N] that combine_kernel adds in order (bias, one rounding) into `out`
    split = _splits(cfg.split2, grid[0] * grid[1], K, cfg.BK, dev) if cfg.split2 != 0 else 1
    P = blocks.padded_rows
    part = torch.empty((split, P, N), dtype=torch.float32, device=dev) if split > 1 else out
    mod.gemm_out_kernel[grid + (split,)](
        a, a.stride(0), w, _scale_u8(w_scale), w_alpha if w_alpha is not None else dummy,
        blocks.sorted_ids, blocks.block_expert, dummy, gs, bias if bias is not None else dummy,
        part, N if split > 1 else out.stride(0), dummy, _dummy(dev, torch.int32), dummy, N, K, R, E, N,
        w.stride(0), w.stride(1), w_scale.stride(0), w_scale.stride(1), _k_per_split(K, cfg.BK, split), P,
        TOPK=1, A_INDEX=1, QDQ_A=spec.act_kind != "none", STATIC_A=kspec.a2_static, HAS_BIAS=bias is not None,
        STORE=2 if split > 1 else 0, MUL_W=False, SPLIT=split, FUSE_COMB=False, SWAP=cfg.swap,
        EVEN_K=_even_k(K, cfg.BK), PREFETCH=bool(cfg.prefetch), **_dec_kw(kspec, K, cfg, dev),
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, **_launch_kw(cfg))
    if split > 1:
        # rows r < R: the row's padded position (pos_of_id), its block's expert for the bias;
        # a row of no group (grouped_mm rows past offs[-1]) has pos P and comes out zero
        BH = min(1024, _np2(N))
        mod.combine_kernel[(R, _cdiv(N, BH))](
            part, blocks.pos_of_id, blocks.block_expert, dummy, bias if bias is not None else dummy, out, R, N, P,
            TOPK=1, SPLIT=split, HAS_BIAS=bias is not None, MUL_W=False, BM=cfg.BM, BH=BH,
            **({} if interpreting() else {"num_warps": 4}))
    return out




@functools.lru_cache(maxsize=256)
def _spec_key(spec: OpSpec) -> str:
    # OpSpec is frozen: its JSON (the autotune key's spec part) is computed once, not per call
    return spec.to_str()


def _gemm_cfg(kind, spec, dtype, dev, N, K, rows, E, run):
    if interpreting() or dev.type == "cpu":
        return interpreter_config(N, K, rows)
    key = f"{kind}|{_spec_key(spec)}|{dtype}|E{E}|N{N}|K{K}|T{token_bucket(rows)}"
    return select_config(key, dev, rows / max(1, E), bench=_bencher(run), verify=_verifier(run))


def launch_grouped_mm(a, weights: GemmWeights, offs, a_global_scale, spec: OpSpec, *,
                      config: Optional[TileConfig] = None):
    """out[r] = QDQ(a[r]) @ dequant(W[g(r)]).T (+ bias[g(r)], [E, N], on the fp32
    accumulator) over expert-sorted rows (offs: int32 group ends); rows at or past
    offs[-1] are zeros. Arguments validated by the op."""
    if weights.bias is not None:
        weights = dataclasses.replace(weights, bias=weights.bias.contiguous())
    dev = a.device
    E, N = weights.w.shape[0], weights.w.shape[1]
    Ra = a.shape[0]
    a = a.contiguous()
    out = torch.zeros((Ra, N), dtype=a.dtype, device=dev)
    if Ra == 0:
        return out
    key = torch.searchsorted(offs.to(torch.int64), torch.arange(Ra, device=dev), right=True)
    alpha_mode = alpha_mode_of(weights.alpha, E, N)

    def run(cfg):
        blocks = BlockRouting(*moe_align(key.reshape(-1, 1), None, E, cfg.BM))
        return _gemm_rows(a, weights, blocks, Ra, a_global_scale, spec, out, cfg, alpha_mode, expert_bias=True)

    cfg = config or _gemm_cfg("grouped_mm", spec, a.dtype, dev, N, a.shape[1], Ra, E, run)
    return run(cfg)


def launch_linear(x, weights: GemmWeights, input_global_scale, spec: OpSpec, *, config: Optional[TileConfig] = None):
    """y = QDQ(x) @ dequant(weight).T + bias: the one-expert case of the same kernel.
    `weights.alpha` is None, one value or [N] (validated by the op)."""
    dev = x.device
    K = x.shape[-1]
    N = weights.w.shape[0]
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=dev)
    if M == 0:
        return out.reshape(*x.shape[:-1], N)
    alpha = weights.alpha
    if alpha is None:
        amode, al = "none", None
    elif alpha.numel() == 1:
        amode, al = "scalar", alpha.reshape(1).to(torch.float32)
    else:
        amode, al = "row", alpha.to(torch.float32).contiguous()
    w3 = GemmWeights(weights.w.unsqueeze(0), weights.scale.unsqueeze(0), al, weights.bias)

    def run(cfg):
        if cfg.dq and linear_dq_applies(x2, spec):
            return linear_dq(x2, w3, M, input_global_scale, spec, out, amode)
        nb = _cdiv(M, cfg.BM)
        ids = _iota_i32(dev, nb * cfg.BM)  # ids >= M are padding; neither is written by the kernels
        bexp = _zeros_i32(dev, nb)
        return _gemm_rows(x2, w3, BlockRouting(ids, bexp, ids), M, input_global_scale, spec, out, cfg, amode)

    cfg = config or _gemm_cfg("linear", spec, x.dtype, dev, N, K, M, 1, run)
    return run(cfg).reshape(*x.shape[:-1], N)
