"""The dequantize-once path (TileConfig.dq) for prefill-sized calls.

At prefill the fused GEMMs decode every expert's weight tile again for every row block
(CUDA-core work the tensor cores wait on). This path decodes each weight once per call into
a bf16 workspace -- with the GEMMs' own tile functions (`dequant_kernel`), so the values are
those the fused GEMMs multiply -- and runs the GEMMs on the library: `torch._grouped_mm` for
mxemu::moe (the fused path's `act_epilogue_kernel` and `combine_kernel` read its bf16
outputs), `F.linear` for a linear. The workspace holds a chunk of output rows of every expert
at a time (`_dq_chunk_rows`), bounded by the call's largest activation buffer.
"""

from __future__ import annotations

import os

import torch

from ..spec.opspec import OpSpec
from .fastlaunch import launch_kernel
from .launch_common import (BlockRouting, GemmWeights, MoEPlan, _cdiv, _dummy, _even_k, _fast_decode,
    _kernel_scales, _moe_debug_rows, _moe_prequant, _moe_workspaces, _np2, _qdq_bk, _scale_u8, get_module,
    interpreting, kernel_spec_for, moe_align)
from .tiles import TileConfig

__all__ = ["dq_applies", "moe_run_dq", "linear_dq_applies", "linear_dq"]


# --- MoE: library grouped GEMM --------------------------------------------------------------


def dq_applies(plan: MoEPlan) -> bool:
    """The dequantize-once path covers: bf16, block-scaled or no activation QDQ (fp8
    per-tensor a2 needs GEMM1's amax first), no expert map, no biases, the router weight on
    the input only with prequantized rows (the fused GEMM1 applies it in its prologue)."""
    return (plan.x.dtype == torch.bfloat16 and plan.spec.act_kind in ("block", "none")
            and plan.routing.expert_map is None and plan.w13.bias is None and plan.w2.bias is None
            and (plan.prequant or not plan.spec.router_weight_on_input) and hasattr(torch, "_grouped_mm"))


def _dq_chunk_rows(E: int, K: int, N: int, budget: int, align: int = 64) -> int:
    """Output rows per dequantized chunk: as many as fit `budget` bytes for all E experts
    (a multiple of `align`, at least one align), at most N."""
    per_row = E * K * 2
    return min(N, max(align, (budget // per_row) // align * align))


def _dq_budget(plan: MoEPlan, P: int) -> int:
    """Workspace bytes for dequantized weights: EMU_INDUCTOR_DQ_WORKSPACE_MB, else the size of
    the call's largest activation buffer (P rows of max(H, N1)), so the weights' workspace
    grows with the tokens like the activations do and never past them."""
    env = os.environ.get("EMU_INDUCTOR_DQ_WORKSPACE_MB")
    if env:
        return int(float(env) * 2 ** 20)
    return P * max(plan.H, plan.N1) * 2


def _launch_dequant(mod, kspec, wts: GemmWeights, w2: bool, K: int, r0: int, n: int, nout: int,
                    out: torch.Tensor) -> None:
    """out [E, n, K] = output rows r0 .. r0 + n of every expert's weight, decoded by
    dequant_kernel (the GEMMs' tile functions; `nout` = the gate half's width for GEMM1's gate |
    up order). 64 x 256 tiles: each program streams 8 KiB of packed codes out as 32 KiB of bf16."""
    dev = out.device
    BN, BK = 64, min(256, _np2(K))
    w = wts.w
    launch_kernel(mod.dequant_kernel, (out.shape[0] * _cdiv(n, BN), _cdiv(K, BK)),
        w, _scale_u8(wts.scale), wts.alpha if wts.alpha is not None else _dummy(dev), out, w.shape[1], K, n, r0,
        nout, w.stride(0), w.stride(1), wts.scale.stride(0), wts.scale.stride(1), W2=w2,
        EVEN_K=_even_k(K, BK), FASTDEC=_fast_decode(kspec, K, BK, dev), BN=BN, BK=BK,
        **({} if interpreting() else {"num_warps": 4}))


def _dq_gemm(plan: MoEPlan, a: torch.Tensor, wts: GemmWeights, w2: bool, N: int, K: int, offs, wbuf,
             chunk: int) -> torch.Tensor:
    """a [P, K] @ every expert's dequantized weight^T by groups `offs`, chunk by chunk of
    output rows (dequant_kernel into `wbuf`, then torch._grouped_mm): [P, N] bf16."""
    E = plan.E
    out = None if chunk >= N else torch.empty((a.shape[0], N), dtype=a.dtype, device=a.device)
    for r0 in range(0, N, chunk):
        n = min(chunk, N - r0)
        wd = wbuf[: E * n * K].view(E, n, K)
        _launch_dequant(plan.mod, plan.kspec, wts, w2, K, r0, n, plan.I, wd)
        c = torch._grouped_mm(a, wd.transpose(1, 2), offs=offs)
        if out is None:
            return c
        out[:, r0:r0 + n].copy_(c)
    return out


def moe_run_dq(plan: MoEPlan, cfg: TileConfig, dbg: bool = False):
    dev = plan.x.device
    dummy = _dummy(dev)
    scales = _kernel_scales(plan, dummy)
    blocks = BlockRouting(*moe_align(plan.routing.topk_ids, plan.routing.expert_map, plan.E, cfg.BM))
    a_src, a_index = _moe_prequant(plan, scales) if plan.prequant else (plan.x, 0)
    P, R, E = blocks.padded_rows, plan.R, plan.E
    # groups of torch._grouped_mm: expert e owns its padded blocks (blocks are in expert
    # order; padding rows compute garbage nobody reads; blocks past the last expert: no group)
    nblk = torch.zeros(E + 1, dtype=torch.int32, device=dev).index_add_(
        0, blocks.block_expert.to(torch.int64).clamp(max=E), torch.ones_like(blocks.block_expert))
    offs = (torch.cumsum(nblk[:E], 0) * cfg.BM).to(torch.int32)
    sid = blocks.sorted_ids.to(torch.int64)
    src_row = sid // plan.top_k if a_index == 0 else sid
    a1 = a_src.index_select(0, torch.where(sid < R, src_row, 0))
    del a_src
    budget = _dq_budget(plan, P)
    chunk1 = _dq_chunk_rows(E, plan.H, plan.N1, budget)
    chunk2 = _dq_chunk_rows(E, plan.I, plan.H, budget)
    wbuf = torch.empty(max(E * chunk1 * plan.H, E * chunk2 * plan.I), dtype=plan.x.dtype, device=dev)
    c1 = _dq_gemm(plan, a1, plan.w13, False, plan.N1, plan.H, offs, wbuf, chunk1)
    ws = _moe_workspaces(plan, P, dbg, dummy)
    if dbg:
        ws.dbg_a.copy_(a1.float())
    del a1
    BN = 64
    launch_kernel(plan.mod.act_epilogue_kernel, (blocks.num_blocks, _cdiv(plan.I, BN)),
        c1, blocks.sorted_ids, blocks.block_expert, scales.gs2, ws.a2, ws.a2.stride(0), ws.dbg_c,
        scales.amax2, plan.I, R, E, plan.N1, P, plan.N1, DEBUG=dbg, AMAX_OUT=False,
        SPLIT=1, BM=cfg.BM, BN=BN, **({} if interpreting() else {"num_warps": 4}))
    del c1
    c2 = _dq_gemm(plan, ws.a2, plan.w2, True, plan.H, plan.I, offs, wbuf, chunk2)
    del wbuf
    y = torch.empty((plan.T, plan.H), dtype=plan.x.dtype, device=dev)
    BH = min(1024, _np2(plan.H))
    launch_kernel(plan.mod.combine_kernel, (plan.T, _cdiv(plan.H, BH)),
        c2, blocks.pos_of_id, blocks.block_expert, plan.routing.topk_weights, dummy, y, plan.T, plan.H, P,
        TOPK=plan.top_k, SPLIT=1, HAS_BIAS=False, MUL_W=not plan.spec.router_weight_on_input, BM=cfg.BM, BH=BH,
        **({} if interpreting() else {"num_warps": 4}))
    if not dbg:
        return y
    return _moe_debug_rows(plan, blocks, ws, y)


# --- linear: F.linear -----------------------------------------------------------------------


def linear_dq(a, weights: GemmWeights, R, a_gs, spec: OpSpec, out, alpha_mode) -> torch.Tensor:
    """The dequantize-once path for a linear (TileConfig.dq): QDQ(a) by prequant_kernel, the
    weight decoded by dequant_kernel (the GEMM's own tile function) in chunks of output rows,
    then F.linear -- the reference's own op on the same operands (bias on cuBLAS's fp32
    accumulator, one rounding)."""
    N, K = weights.w.shape[1], a.shape[1]
    dev = a.device
    kspec = kernel_spec_for(spec, a.dtype, alpha2=alpha_mode, a1_static=a_gs is not None,
                            a2_static=a_gs is not None, device=dev)
    mod = get_module(kspec)
    dummy = _dummy(dev)
    aq = a
    if spec.act_kind == "block":
        aq = torch.empty_like(a)
        qbk = _qdq_bk(K, spec)
        gs = a_gs.reshape(1).to(torch.float32) if a_gs is not None else dummy
        launch_kernel(mod.prequant_kernel, (_cdiv(R, 16), _cdiv(K, qbk)),
            a, a.stride(0), dummy, gs, aq, aq.stride(0), R, K, TOPK=1, RW=False, BM=16, BK=qbk,
            **({} if interpreting() else {"num_warps": 4}))
    chunk = _dq_chunk_rows(1, K, N, R * max(N, K) * 2)
    wbuf = torch.empty(chunk * K, dtype=a.dtype, device=dev)
    for r0 in range(0, N, chunk):
        n = min(chunk, N - r0)
        wd = wbuf[: n * K].view(1, n, K)
        _launch_dequant(mod, kspec, weights, True, K, r0, n, N, wd)
        bias = weights.bias[r0:r0 + n] if weights.bias is not None else None
        if n == N:  # one chunk: the library's output is the result
            return torch.nn.functional.linear(aq, wd[0], bias)
        out[:, r0:r0 + n] = torch.nn.functional.linear(aq, wd[0], bias)
    return out


def linear_dq_applies(x: torch.Tensor, spec: OpSpec) -> bool:
    """Where a linear can take the dequantize-once path: bf16 / fp16 rows, block-scaled or no
    activation QDQ (per-tensor fp8 needs the rows' amax first)."""
    return x.dtype in (torch.bfloat16, torch.float16) and spec.act_kind in ("block", "none")
