"""Launchers: routing prep, workspaces and the generated kernels for mxemu::moe, linear,
grouped_mm.

No host synchronisation anywhere: every grid is sized from shapes only (at most
cdiv(T*k, BM) + min(E, T*k) row blocks); the routing prep is device-side torch ops
(stable argsort, index_add, cumsum, searchsorted, index_put); blocks past the last
expert read a sentinel expert id and exit. Safe under CUDA-graph capture (autotuning
never runs while capturing).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Optional

import torch

from ..ops.spec import OpSpec
from ..reference.activations import is_gated
from ..formats import FORMATS
from .autotune import TileConfig, interpreter_config, select_config, token_bucket, wdq_enabled
from .cache import load_module
from .kernel_spec import KernelSpec, alpha_mode_of
from .template import render

__all__ = ["moe_align", "moe_triton", "linear_triton", "grouped_mm_triton", "get_module", "kernel_spec_for",
           "interpreting"]

log = logging.getLogger("emu_inductor.codegen")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _module_for(kspec: KernelSpec):
    return load_module(kspec.short_name(), render(kspec))


def get_module(kspec: KernelSpec):
    """The imported generated module for `kspec` (rendered, cached on disk, verified)."""
    return _module_for(kspec)


def kernel_spec_for(spec: OpSpec, dtype: torch.dtype, alpha1="none", alpha2="none", a1_static=False,
                    a2_static=False, device: Optional[torch.device] = None, bias1: bool = False,
                    bias2: bool = False) -> KernelSpec:
    interp = interpreting() or (device is not None and device.type == "cpu")
    fp8 = spec.act_kind == "fp8_tensor"
    return KernelSpec(spec, KernelSpec.dtype_name(dtype), alpha1, alpha2, bool(a1_static and fp8),
                      bool(a2_static and fp8), interp, bool(bias1), bool(bias2))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _np2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# one-program Triton routing prep while R * next_pow2(E) stays under this (decode sizes)
ROUTING_KERNEL_MAX_WORK = 1 << 16


def _routing_impl(R: int, E: int) -> str:
    forced = os.environ.get("EMU_INDUCTOR_ROUTING", "")
    if forced in ("torch", "triton"):
        return forced
    return "triton" if R * _np2(E) <= ROUTING_KERNEL_MAX_WORK else "torch"


def _moe_align_triton(topk_ids, expert_map, E: int, BM: int):
    from .routing import moe_align_kernel

    dev = topk_ids.device
    R = topk_ids.numel()
    max_blocks = _cdiv(R, BM) + min(E, R)
    P = max_blocks * BM
    ids = topk_ids.reshape(-1)
    if ids.dtype not in (torch.int32, torch.int64):
        ids = ids.to(torch.int64)
    sorted_ids = torch.empty(P, dtype=torch.int32, device=dev)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    pos_of_id = torch.empty(R, dtype=torch.int64, device=dev)
    BE = max(16, _np2(E))
    BR = max(16, min(_np2(R), 8192 // BE))
    BF = max(16, 8192 // BE)
    emap = expert_map.contiguous() if expert_map is not None else ids
    moe_align_kernel[(1,)](ids.contiguous(), emap, sorted_ids, block_expert, pos_of_id, R, E,
                           expert_map.shape[0] if expert_map is not None else E, P, max_blocks,
                           HAS_MAP=expert_map is not None, BM=BM, BR=BR, BE=BE, BF=BF,
                           **({} if interpreting() else {"num_warps": 4}))
    return sorted_ids, block_expert, pos_of_id


def moe_align(topk_ids: torch.Tensor, expert_map: Optional[torch.Tensor], E: int, BM: int,
              impl: Optional[str] = None):
    """Sort (token, slot) rows by local expert and pad every expert to a multiple of BM.

    Returns (sorted_ids int32 [P], block_expert int32 [P // BM], pos_of_id int64 [R]):
    sorted_ids holds row ids r = t * top_k + k, or the sentinel R in padding; block b
    belongs to expert block_expert[b], or E past the last used block; pos_of_id[r] is the
    padded position of row r (P for rows whose expert is -1 / not local). Ids outside
    [0, E_global) and map entries outside [-1, E) are treated as not local.
    """
    dev = topk_ids.device
    R = topk_ids.numel()
    if (impl or _routing_impl(R, E)) == "triton" and R > 0:
        return _moe_align_triton(topk_ids, expert_map, E, BM)
    ids = topk_ids.reshape(-1).to(torch.int64)
    if expert_map is not None:
        ng = expert_map.shape[0]
        ok = (ids >= 0) & (ids < ng)
        local = torch.where(ok, expert_map.to(torch.int64)[ids.clamp(0, max(ng - 1, 0))], -1)
    else:
        local = ids
    key = torch.where((local >= 0) & (local < E), local, E)
    counts = torch.zeros(E + 1, dtype=torch.int64, device=dev).index_add_(0, key, torch.ones_like(key))
    nblk = (counts[:E] + BM - 1) // BM
    blk_end = torch.cumsum(nblk, 0)
    max_blocks = _cdiv(R, BM) + min(E, R)
    P = max_blocks * BM
    blk_start = torch.cat([blk_end - nblk, blk_end.new_full((1,), max_blocks)])
    cnt_start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(key, stable=True)
    skey = key[order]
    rank = torch.arange(R, device=dev) - cnt_start[skey]
    pos = torch.where(skey < E, blk_start[skey] * BM + rank, P)
    sorted_ids = torch.full((P + 1,), R, dtype=torch.int32, device=dev)
    sorted_ids[pos] = order.to(torch.int32)
    block_expert = torch.searchsorted(blk_end, torch.arange(max_blocks, device=dev), right=True).to(torch.int32)
    pos_of_id = torch.empty(R, dtype=torch.int64, device=dev)
    pos_of_id[order] = pos
    return sorted_ids[:P], block_expert, pos_of_id


def _dummy(dev, dtype=torch.float32):
    return torch.zeros(1, dtype=dtype, device=dev)


def _scale_u8(scale: torch.Tensor) -> torch.Tensor:
    return scale.view(torch.uint8) if scale.dtype != torch.uint8 else scale


def _launch_kw(cfg: TileConfig) -> dict:
    if interpreting():
        return {}
    return {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


# --- validation at the op boundary (no device sync) -------------------------------------------


def _fail(arg, got, expected):
    raise ValueError(f"{arg}: expected {expected}, got {got}")


def _check_dev(dev, **tensors):
    for name, t in tensors.items():
        if t is not None and t.device != dev:
            _fail(name, f"a tensor on {t.device}", f"a tensor on {dev} like the activations")


def _check_ids_cpu(topk_ids, n_global, expert_map, E):
    # value checks only where they cost no device sync (CPU tensors)
    if topk_ids.device.type == "cpu" and topk_ids.numel() and not torch.compiler.is_compiling():
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= n_global:
            _fail("topk_ids", f"ids in [{lo}, {hi}]", f"ids in [0, {n_global - 1}]")
        if expert_map is not None and expert_map.numel():
            if int(expert_map.max()) >= E or int(expert_map.min()) < -1:
                _fail("expert_map", f"values in [{int(expert_map.min())}, {int(expert_map.max())}]",
                      f"-1 or 0..{E - 1}")


def check_moe_inputs(x, w13, w13_scale, w13_alpha, w2, w2_scale, w2_alpha, topk_weights, topk_ids,
                     a1_gs, a2_gs, expert_map, spec: OpSpec, w13_bias=None, w2_bias=None):
    from ..reference.moe import check_moe_args

    _check_dev(x.device, w13=w13, w13_scale=w13_scale, w13_alpha=w13_alpha, w2=w2, w2_scale=w2_scale,
               w2_alpha=w2_alpha, topk_weights=topk_weights, topk_ids=topk_ids, a1_global_scale=a1_gs,
               a2_global_scale=a2_gs, expert_map=expert_map, w13_bias=w13_bias, w2_bias=w2_bias)
    # shapes and dtypes (the reference's checker; its value checks run on CPU tensors only)
    T, H, E, I = check_moe_args(
        x, w13, w2, topk_weights, topk_ids, spec.scheme(), w13_scale=w13_scale, w2_scale=w2_scale,
        w13_alpha=w13_alpha, w2_alpha=w2_alpha, activation=spec.activation,
        apply_router_weight_on_input=spec.router_weight_on_input, expert_map=expert_map,
        a1_global_scale=a1_gs, a2_global_scale=a2_gs, w13_bias=w13_bias, w2_bias=w2_bias)
    return T, H, E, I


# --- MoE ---------------------------------------------------------------------------------------


def moe_triton(hidden_states, w13, w13_scale, w13_alpha, w2, w2_scale, w2_alpha, topk_weights, topk_ids,
               a1_global_scale, a2_global_scale, expert_map, spec: OpSpec, *, reduction: Optional[str] = None,
               config: Optional[TileConfig] = None, debug: bool = False, validate: bool = True,
               prequant: Optional[bool] = None, w13_bias: Optional[torch.Tensor] = None,
               w2_bias: Optional[torch.Tensor] = None):
    """The fused MoE: routing prep, GEMM1 (+QDQ_a1, dequant, activation, QDQ_a2), GEMM2
    (dequant, router weight, reduction). reduction: "atomic" (fp32 atomics) or
    "deterministic" (per-slot rows, then a fixed-order fp32 sum, the reference's order);
    default deterministic under the interpreter, atomic on GPU, or
    EMU_INDUCTOR_MOE_REDUCTION. debug=True returns a dict with the kernel's a1, c2, a2
    rows (indexed by row id t*k+slot) besides the output.

    prequant (default: on for schemes with activation QDQ): fake-quantize the GEMM1 input
    rows once (prequant_kernel, [T, H] or [T*k, H] with the router weight on the input)
    instead of once per N tile; bit-identical. config.wdq=1: dequantize all experts'
    weights once into an activation-dtype workspace (dequant_kernel, one GEMM at a time,
    E*max(2I*H, H*I) elements) and run the GEMMs on it; bit-identical, for large token
    counts (opt-in: EMU_INDUCTOR_MOE_WDQ=1 lets autotune pick it; skipped when the
    workspace exceeds EMU_INDUCTOR_DEQUANT_WS_MAX_MB, default 4096; unverified on GPU).

    w13_bias [E, N1] / w2_bias [E, H] (activation dtype, optional): per-expert biases added
    to GEMM1's / GEMM2's fp32 accumulators before their one rounding (kernel spec flags
    bias1 / bias2; bias-less calls run the unchanged bias-less kernels)."""
    x = hidden_states
    if validate:
        T, H, E, I = check_moe_inputs(x, w13, w13_scale, w13_alpha, w2, w2_scale, w2_alpha, topk_weights,
                                      topk_ids, a1_global_scale, a2_global_scale, expert_map, spec,
                                      w13_bias=w13_bias, w2_bias=w2_bias)
    else:
        (T, H), E = x.shape, w13.shape[0]
        I = FORMATS[spec.weight_fmt].logical_size(w2.shape[2])
    if validate:
        _check_ids_cpu(topk_ids, expert_map.shape[0] if expert_map is not None else E, expert_map, E)
    dev, dtype = x.device, x.dtype
    top_k = topk_ids.shape[1]
    R = T * top_k
    reduction = reduction or os.environ.get("EMU_INDUCTOR_MOE_REDUCTION") or (
        "deterministic" if interpreting() else "atomic")
    if reduction not in ("atomic", "deterministic"):
        _fail("reduction", repr(reduction), "'atomic' or 'deterministic'")
    if R == 0:
        return x.new_zeros(x.shape) if not debug else {"out": x.new_zeros(x.shape)}
    N1 = w13.shape[1]
    fp8 = spec.act_kind == "fp8_tensor"
    kspec = kernel_spec_for(spec, dtype, alpha_mode_of(w13_alpha, E, N1), alpha_mode_of(w2_alpha, E, H),
                            a1_global_scale is not None, a2_global_scale is not None, dev,
                            bias1=w13_bias is not None, bias2=w2_bias is not None)
    b13 = w13_bias.contiguous() if w13_bias is not None else None
    b2 = w2_bias.contiguous() if w2_bias is not None else None
    mod = get_module(kspec)
    x = x.contiguous()
    topk_w = topk_weights.contiguous()
    if prequant is None:
        prequant = spec.act_kind != "none"
    prequant = bool(prequant) and spec.act_kind != "none"
    wdq_ok = _dequant_ws_ok(E, max(N1 * H, H * I), dtype)

    def run(cfg: TileConfig, dbg: bool = False):
        wdq = bool(cfg.wdq) and wdq_ok
        sorted_ids, block_expert, pos_of_id = moe_align(topk_ids, expert_map, E, cfg.BM)
        nblocks = block_expert.shape[0]
        P = sorted_ids.shape[0]
        dummy = _dummy(dev)
        # activation global scales / fp8 scales or amax
        if fp8:
            if kspec.a1_static:
                gs1 = a1_global_scale.reshape(1).to(torch.float32)
            else:
                xr = x * topk_w.reshape(-1, 1).to(dtype) if spec.router_weight_on_input else x
                gs1 = xr.abs().amax().to(torch.float32).reshape(1)
            gs2_static = a2_global_scale.reshape(1).to(torch.float32) if kspec.a2_static else None
            amax2 = torch.zeros(1, dtype=torch.float32, device=dev)
        else:
            gs1 = a1_global_scale.reshape(1).to(torch.float32) if a1_global_scale is not None else dummy
            gs2_static = None
            amax2 = dummy
        gs2 = a2_global_scale.reshape(1).to(torch.float32) if (a2_global_scale is not None and not fp8) else dummy
        a2ws = torch.empty((P, I), dtype=dtype, device=dev)
        dbg_a = torch.zeros((P, H), dtype=torch.float32, device=dev) if dbg else dummy
        dbg_c = torch.zeros((P, I), dtype=torch.float32, device=dev) if dbg else dummy
        cfg1 = cfg
        a_src, a_index = x, 0
        if prequant:
            rw = bool(spec.router_weight_on_input)
            M = R if rw else T
            a_src = torch.empty((M, H), dtype=dtype, device=dev)
            qbk = _qdq_bk(H, spec)
            mod.prequant_kernel[(_cdiv(M, 16), _cdiv(H, qbk))](
                x, x.stride(0), topk_w, gs1, a_src, a_src.stride(0), M, H, TOPK=top_k if rw else 1, RW=rw,
                BM=16, BK=qbk, **({} if interpreting() else {"num_warps": 4}))
            a_index = 1 if rw else 0
        w1a, s1a = w13, _scale_u8(w13_scale)
        w1s = (w13.stride(0), w13.stride(1))
        if wdq:
            w1a = _dequant_all(mod, w13, w13_scale, w13_alpha, N1, H, 1, dtype, dummy)
            w1s = (w1a.stride(0), w1a.stride(1))
        grid1 = (nblocks, _cdiv(I, cfg1.BN))
        mod.gemm_act_kernel[grid1](
            a_src, a_src.stride(0), w1a, s1a, w13_alpha if w13_alpha is not None else dummy,
            sorted_ids, block_expert, topk_w, gs1, gs2, a2ws, a2ws.stride(0), dbg_a, dbg_c, amax2,
            *((b13,) if b13 is not None else ()),  # b1_ptr exists only in bias1 kernels
            I, H, R, E, N1, w1s[0], w1s[1], w13_scale.stride(0), w13_scale.stride(1),
            TOPK=top_k, A_INDEX=a_index, DEBUG=dbg, AMAX_OUT=fp8 and not kspec.a2_static,
            PREQ=prequant, WDQ=wdq, BM=cfg1.BM, BN=cfg1.BN, BK=cfg1.BK, **_launch_kw(cfg1))
        del w1a, a_src
        w2a = w2
        w2s = (w2.stride(0), w2.stride(1))
        if wdq:
            w2a = _dequant_all(mod, w2, w2_scale, w2_alpha, H, I, 2, dtype, dummy)
            w2s = (w2a.stride(0), w2a.stride(1))
        atomic = reduction == "atomic"
        if atomic:
            out = torch.zeros((T, H), dtype=torch.float32, device=dev)
        else:
            out = torch.zeros((R, H), dtype=dtype, device=dev)
        grid2 = (nblocks, _cdiv(H, cfg.BN))
        mod.gemm_out_kernel[grid2](
            a2ws, a2ws.stride(0), w2a, _scale_u8(w2_scale), w2_alpha if w2_alpha is not None else dummy,
            sorted_ids, block_expert, topk_w, gs2_static if gs2_static is not None else amax2,
            b2 if b2 is not None else dummy,
            out, out.stride(0), H, I, R, E, H, w2s[0], w2s[1], w2_scale.stride(0), w2_scale.stride(1),
            TOPK=top_k, A_INDEX=2, QDQ_A=fp8, STATIC_A=kspec.a2_static, HAS_BIAS=b2 is not None,
            STORE=1 if atomic else 0, MUL_W=not spec.router_weight_on_input, WDQ=wdq,
            BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, **_launch_kw(cfg))
        del w2a
        if atomic:
            y = out.to(dtype)
        else:
            c3 = out.view(T, top_k, H).to(torch.float32)
            if not spec.router_weight_on_input:
                c3 = c3 * topk_w.to(torch.float32).unsqueeze(-1)
            y = c3.sum(dim=1).to(dtype)
        if not dbg:
            return y
        valid = pos_of_id < P
        p = pos_of_id.clamp(max=P - 1)
        nan = float("nan")
        res = {"out": y, "valid": valid,
               "a1": torch.where(valid[:, None], dbg_a[p], nan),
               "c2": torch.where(valid[:, None], dbg_c[p], nan),
               "a2": torch.where(valid[:, None], a2ws[p].to(torch.float32), nan) if not fp8 else None}
        return res

    if config is None:
        rows_per_expert = R / max(1, min(E, R))
        if kspec.interpret:
            c1 = interpreter_config(I, H, rows_per_expert)
            c2 = interpreter_config(H, I, rows_per_expert)
            config = TileConfig(c1.BM, max(c1.BN, 32), max(c1.BK, c2.BK), 4, 1)
        else:
            key = f"moe|{kspec.digest()}|E{E}|H{H}|I{I}|k{top_k}|T{token_bucket(T)}|{reduction}|pq{int(prequant)}"
            config = select_config(key, dev, rows_per_expert, bench=_bencher(run),
                                   allow_wdq=wdq_ok and wdq_enabled())
    return run(config, debug)


def _dequant_ws_ok(E: int, per_expert: int, dtype: torch.dtype) -> bool:
    cap = float(os.environ.get("EMU_INDUCTOR_DEQUANT_WS_MAX_MB", "4096"))
    return E * per_expert * torch.empty((), dtype=dtype).element_size() <= cap * 2**20


def _qdq_bk(K: int, spec: OpSpec) -> int:
    """A K tile for the standalone QDQ: a multiple of the activation block size."""
    bs = FORMATS[spec.act_fmt].block_size if spec.act_kind == "block" else 1
    bk = 128
    while bk < bs:
        bk *= 2
    return bk


def _dequant_all(mod, w, w_scale, w_alpha, N: int, K: int, which: int, dtype, dummy):
    """[E, N, K] activation-dtype copy of every expert's dequantized weights."""
    E = w.shape[0]
    ws = torch.empty((E, N, K), dtype=dtype, device=w.device)
    BN, BK = 64, 128
    mod.dequant_kernel[(E, _cdiv(N, BN), _cdiv(K, BK))](
        w, _scale_u8(w_scale), w_alpha if w_alpha is not None else dummy, ws, N, K, w.stride(0), w.stride(1),
        w_scale.stride(0), w_scale.stride(1), WHICH=which, BN=BN, BK=BK,
        **({} if interpreting() else {"num_warps": 4}))
    return ws


def _bencher(run):
    def bench(cfg):
        import triton.testing

        run(cfg)  # compile
        return triton.testing.do_bench(lambda: run(cfg), warmup=5, rep=20)

    return bench


# --- grouped GEMM and linear -----------------------------------------------------------------------


def _gemm_rows(a, w, w_scale, w_alpha, sorted_ids, block_expert, R, a_gs, spec: OpSpec, bias, out, cfg, dev,
               alpha_mode, expert_bias: bool = False):
    """expert_bias: `bias` is [E, N] (one row per expert, grouped_mm) rather than linear's [N]."""
    E, N = w.shape[0], w.shape[1]
    K = a.shape[1]
    fp8 = spec.act_kind == "fp8_tensor"
    kspec = kernel_spec_for(spec, a.dtype, alpha2=alpha_mode, a1_static=a_gs is not None,
                            a2_static=a_gs is not None, device=dev, bias2=expert_bias and bias is not None)
    mod = get_module(kspec)
    dummy = _dummy(dev)
    if fp8:
        gs = a_gs.reshape(1).to(torch.float32) if a_gs is not None else a.abs().amax().to(torch.float32).reshape(1)
    else:
        gs = a_gs.reshape(1).to(torch.float32) if a_gs is not None else dummy
    grid = (block_expert.shape[0], _cdiv(N, cfg.BN))
    mod.gemm_out_kernel[grid](
        a, a.stride(0), w, _scale_u8(w_scale), w_alpha if w_alpha is not None else dummy,
        sorted_ids, block_expert, dummy, gs, bias if bias is not None else dummy,
        out, out.stride(0), N, K, R, E, N, w.stride(0), w.stride(1), w_scale.stride(0), w_scale.stride(1),
        TOPK=1, A_INDEX=1, QDQ_A=spec.act_kind != "none", STATIC_A=kspec.a2_static, HAS_BIAS=bias is not None,
        STORE=0, MUL_W=False, WDQ=False, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, **_launch_kw(cfg))
    return out


def _gemm_cfg(kind, spec, dtype, dev, N, K, rows, E, run):
    if interpreting() or dev.type == "cpu":
        return interpreter_config(N, K, rows)
    key = f"{kind}|{spec.to_str()}|{dtype}|E{E}|N{N}|K{K}|T{token_bucket(rows)}"
    return select_config(key, dev, rows / max(1, E), bench=_bencher(run))


def _check_weight2(name, w, scale, fmt, K, lead):
    if not isinstance(w, torch.Tensor) or w.dtype != torch.uint8:
        _fail(name, getattr(w, "dtype", type(w).__name__), "packed uint8 weights")
    if w.dim() != lead + 2 or fmt.logical_size(w.shape[-1]) != K:
        _fail(name, f"shape {tuple(w.shape)}", f"{lead + 2}-d with last dim {fmt.packed_size(K)} (K={K})")
    if scale.dtype != fmt.scale.storage_dtype or tuple(scale.shape) != (*w.shape[:-1], K // fmt.block_size):
        _fail(name + "_scale", f"{scale.dtype} {tuple(scale.shape)}",
              f"{fmt.scale.storage_dtype} {(*w.shape[:-1], K // fmt.block_size)}")


def grouped_mm_triton(a, w, w_scale, w_alpha, offs, a_global_scale, spec: OpSpec, *, config=None, bias=None):
    """out[r] = QDQ(a[r]) @ dequant(W[g(r)]).T (+ bias[g(r)], [E, N], on the fp32
    accumulator) over expert-sorted rows (offs: int32 group ends); rows at or past
    offs[-1] are zeros."""
    fmt = FORMATS[spec.weight_fmt]
    if a.dim() != 2 or a.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        _fail("a", f"{a.dtype} {tuple(a.shape)}", "a 2-d bf16/fp16/fp32 tensor")
    _check_weight2("w", w, w_scale, fmt, a.shape[1], 1)
    if offs.dim() != 1 or offs.shape[0] != w.shape[0] or offs.dtype not in (torch.int32, torch.int64):
        _fail("offs", f"{offs.dtype} {tuple(offs.shape)}", f"1-d int32 [E={w.shape[0]}]")
    _check_dev(a.device, w=w, w_scale=w_scale, w_alpha=w_alpha, offs=offs, a_global_scale=a_global_scale)
    if bias is not None:
        from ..reference.moe import check_bias

        check_bias("bias", bias, a, (w.shape[0], w.shape[1]))
        bias = bias.contiguous()
    dev = a.device
    E, N = w.shape[0], w.shape[1]
    Ra = a.shape[0]
    a = a.contiguous()
    out = torch.zeros((Ra, N), dtype=a.dtype, device=dev)
    if Ra == 0:
        return out
    key = torch.searchsorted(offs.to(torch.int64), torch.arange(Ra, device=dev), right=True)
    alpha_mode = alpha_mode_of(w_alpha, E, N)

    def run(cfg):
        sorted_ids, block_expert, _ = moe_align(key.reshape(-1, 1), None, E, cfg.BM)
        return _gemm_rows(a, w, w_scale, w_alpha, sorted_ids, block_expert, Ra, a_global_scale, spec, bias,
                          out, cfg, dev, alpha_mode, expert_bias=True)

    cfg = config or _gemm_cfg("grouped_mm", spec, a.dtype, dev, N, a.shape[1], Ra, E, run)
    return run(cfg)


def linear_triton(x, weight, weight_scale, alpha, input_global_scale, bias, spec: OpSpec, *, config=None):
    """y = QDQ(x) @ dequant(weight).T + bias: the one-expert case of the same kernel."""
    fmt = FORMATS[spec.weight_fmt]
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or x.dim() < 1:
        _fail("x", f"{x.dtype} {tuple(x.shape)}", "a bf16/fp16/fp32 tensor [..., K]")
    K = x.shape[-1]
    _check_weight2("weight", weight, weight_scale, fmt, K, 0)
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        _fail("bias", f"shape {tuple(bias.shape)}", f"[{weight.shape[0]}]")
    _check_dev(x.device, weight=weight, weight_scale=weight_scale, alpha=alpha,
               input_global_scale=input_global_scale, bias=bias)
    dev = x.device
    N = weight.shape[0]
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=dev)
    if M == 0:
        return out.reshape(*x.shape[:-1], N)
    w3, s3 = weight.unsqueeze(0), weight_scale.unsqueeze(0)
    if alpha is None:
        amode, al = "none", None
    elif alpha.numel() == 1:
        amode, al = "scalar", alpha.reshape(1).to(torch.float32)
    elif tuple(alpha.shape) == (N,):
        amode, al = "row", alpha.to(torch.float32).contiguous()
    else:
        _fail("alpha", f"shape {tuple(alpha.shape)}", f"one value or [N={N}]")

    def run(cfg):
        nb = _cdiv(M, cfg.BM)
        ids = torch.arange(nb * cfg.BM, dtype=torch.int32, device=dev)  # ids >= M are padding
        bexp = torch.zeros(nb, dtype=torch.int32, device=dev)
        return _gemm_rows(x2, w3, s3, al, ids, bexp, M, input_global_scale, spec, bias, out, cfg, dev, amode)

    cfg = config or _gemm_cfg("linear", spec, x.dtype, dev, N, K, M, 1, run)
    return run(cfg).reshape(*x.shape[:-1], N)
