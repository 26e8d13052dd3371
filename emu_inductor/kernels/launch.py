"""Launchers: routing prep, workspaces and the generated kernels for mxemu::moe, linear,
grouped_mm.

Arguments arrive validated (by `emu_inductor.ops`, at the op boundary) and grouped in
small dataclasses: `GemmWeights` (one GEMM's packed weights, scales, global scale, bias),
`Routing` (top-k weights and ids, expert map), `ActScales` (activation global / static
fp8 scales as the op got them); per launch the pipeline derives `BlockRouting` (rows
sorted and padded per expert), `KernelScales` (the fp32 scale operands the kernels read)
and `MoEWorkspaces` (intermediate and debug buffers).

No host synchronisation anywhere: every grid is sized from shapes only (at most
cdiv(T*k, BM) + min(E, T*k) row blocks); the routing prep is one Triton program
(`routing.py`, up to ROUTING_SORT_MAX_ROWS rows) or device-side torch ops (stable argsort,
index_add, cumsum, searchsorted, index_put); blocks past the last
expert read a sentinel expert id and exit. Safe under CUDA-graph capture (autotuning
never runs while capturing).
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
from .cache import load_module
from .kernel_spec import KernelSpec, alpha_mode_of
from .render import render
from .render_helpers import fast_decode_supported
from .routing import moe_align_kernel, moe_align_sort_kernel
from .tiles import TileConfig, auto_split, interpreter_config, token_bucket

__all__ = ["GemmWeights", "Routing", "ActScales", "BlockRouting", "KernelScales", "MoEWorkspaces", "moe_align",
           "launch_moe", "launch_linear", "launch_grouped_mm", "get_module", "kernel_spec_for", "interpreting"]

log = logging.getLogger("emu_inductor.kernels")


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


# One-program Triton routing prep (kernels/routing.py). The default kernel sorts (expert, row)
# keys, one lane per row (~R log^2 R work spread over the CTA), up to this many rows; past it,
# the torch path. The older one-hot kernel (cost ~R * E; EMU_INDUCTOR_ROUTING=onehot, kept
# for A/B timing) was the default while R * next_pow2(E) <= ROUTING_KERNEL_MAX_WORK.
ROUTING_SORT_MAX_ROWS = 8192
ROUTING_KERNEL_MAX_WORK = 1 << 16
ROUTING_IMPLS = ("torch", "triton", "onehot")


def _routing_impl(R: int, E: int) -> str:
    """EMU_INDUCTOR_ROUTING (one of ROUTING_IMPLS) forces a path; else the sort kernel while it
    applies (`_sort_kernel_fits`), the torch path past it."""
    forced = os.environ.get("EMU_INDUCTOR_ROUTING", "")
    if forced in ROUTING_IMPLS:
        return forced
    return "triton" if _sort_kernel_fits(R, E) else "torch"


def _sort_kernel_fits(R: int, E: int) -> bool:
    # one program of next_pow2(R) lanes; keys (expert << log2(lanes)) | row stay below 2**30
    # (the kernel's sort adds two keys)
    return 0 < R <= ROUTING_SORT_MAX_ROWS and (E + 1) * max(16, _np2(R)) <= 2**30


def _routing_warps(default: int) -> int:
    return int(os.environ.get("EMU_INDUCTOR_ROUTING_WARPS", "0") or 0) or default


def _routing_launch(topk_ids, expert_map, E: int, BM: int):
    """The routing kernels' outputs (sorted_ids, block_expert, pos_of_id, empty), their
    arguments and the sort kernel's constexprs and warp count: shared by the routing kernel
    launch and prep_kernel (routing in its program 0)."""
    dev = topk_ids.device
    R = topk_ids.numel()
    max_blocks = _cdiv(R, BM) + min(E, R)
    P = max_blocks * BM
    ids = topk_ids.reshape(-1)
    if ids.dtype not in (torch.int32, torch.int64):
        ids = ids.to(torch.int64)
    outs = (torch.empty(P, dtype=torch.int32, device=dev), torch.empty(max_blocks, dtype=torch.int32, device=dev),
            torch.empty(R, dtype=torch.int64, device=dev))
    emap = expert_map.contiguous() if expert_map is not None else ids
    NG = expert_map.shape[0] if expert_map is not None else E
    args = (ids.contiguous(), emap, *outs, R, E, NG, P, max_blocks)
    BN = max(16, _np2(R))
    sort_kw = dict(HAS_MAP=expert_map is not None, BM=BM, BN=BN, LOG_BN=BN.bit_length() - 1, BE=max(16, _np2(E)),
                   BF=1024)
    # 16 lanes a thread at most (a 4096-row sort at 8 warps ~ 16 keys a thread)
    warps = {} if interpreting() else {"num_warps": _routing_warps(min(16, max(4, BN // 512)))}
    return outs, args, sort_kw, warps


def _moe_align_triton(topk_ids, expert_map, E: int, BM: int, kernel: str = "sort"):
    outs, args, sort_kw, warps = _routing_launch(topk_ids, expert_map, E, BM)
    if kernel == "sort":
        moe_align_sort_kernel[(1,)](*args, **sort_kw, **warps)
    else:
        R, BE = topk_ids.numel(), sort_kw["BE"]
        BR = max(16, min(_np2(R), 8192 // BE))
        BF = max(16, 8192 // BE)
        moe_align_kernel[(1,)](*args, HAS_MAP=expert_map is not None, BM=BM, BR=BR, BE=BE, BF=BF,
                               **({} if interpreting() else {"num_warps": _routing_warps(4)}))
    return outs


def moe_align(topk_ids: torch.Tensor, expert_map: Optional[torch.Tensor], E: int, BM: int,
              impl: Optional[str] = None):
    """Sort (token, slot) rows by local expert and pad every expert to a multiple of BM.

    Returns (sorted_ids int32 [P], block_expert int32 [P // BM], pos_of_id int64 [R]):
    sorted_ids holds row ids r = t * top_k + k, or the sentinel R in padding; block b
    belongs to expert block_expert[b], or E past the last used block; pos_of_id[r] is the
    padded position of row r (P for rows whose expert is -1 / not local). Ids outside
    [0, E_global) and map entries outside [-1, E) are treated as not local.

    impl: "triton" (one-program sort kernel; the torch path past `_sort_kernel_fits`),
    "onehot" (the older one-program kernel, any size), "torch"; None = `_routing_impl`.
    All three build the same values.
    """
    dev = topk_ids.device
    R = topk_ids.numel()
    impl = impl or _routing_impl(R, E)
    if impl not in ROUTING_IMPLS:
        raise ValueError(f"moe_align: impl must be one of {ROUTING_IMPLS}, got {impl!r}")
    if impl == "triton" and _sort_kernel_fits(R, E):
        return _moe_align_triton(topk_ids, expert_map, E, BM, "sort")
    if impl == "onehot" and R > 0:
        return _moe_align_triton(topk_ids, expert_map, E, BM, "onehot")
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


_DUMMIES: dict = {}


def _capturing(dev) -> bool:
    return dev.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _cached_const(key, make):
    """A read-only device tensor made once per key (no launch per call for it). One first
    needed while a CUDA graph is being captured is made fresh and not cached: a tensor from
    the graph's private pool must not outlive the graph."""
    t = _DUMMIES.get(key)
    if t is None:
        t = make()
        if not _capturing(t.device):
            _DUMMIES[key] = t
    return t


def _dummy(dev, dtype=torch.float32):
    """A one-element placeholder for pointer arguments a launch does not use (never read
    or written under the flags that go with it): cached per device, so a decode call does
    not pay a memset launch for it."""
    return _cached_const((str(dev), dtype), lambda: torch.zeros(1, dtype=dtype, device=dev))


def _iota_i32(dev, n: int) -> torch.Tensor:
    """0..n-1 (int32), read-only and cached: a linear's row ids (its one expert's rows in
    order, ids >= M are padding), so a decode call does not launch an arange for them."""
    return _cached_const((str(dev), "iota", n), lambda: torch.arange(n, dtype=torch.int32, device=dev))


def _zeros_i32(dev, n: int) -> torch.Tensor:
    """n int32 zeros, read-only and cached: a linear's block -> expert map (expert 0)."""
    return _cached_const((str(dev), "zeros", n), lambda: torch.zeros(n, dtype=torch.int32, device=dev))


_COUNTERS: dict = {}


def _split_counters(dev, n: int, use: str = "epilogue") -> tuple[torch.Tensor, bool]:
    """(int32 counters, fused) for gemm_act_kernel's last-split epilogue (`use` "epilogue": one
    per (row block, N tile)) or gemm_out_kernel's fused combine ("combine": one per (token, N
    tile)), zero between launches (the program that completes a count resets it), so they are
    zeroed once and cached per device -- no memset per call. A buffer first needed while a
    CUDA graph is being captured is a fresh zeroed one per call instead (a cached tensor from
    the graph's pool must not outlive it). Opt-in (EMU_INDUCTOR_FUSED_EPILOGUE=1): exact on
    the H200 but slower there (docs/kernels.md); otherwise the separate
    act_epilogue_kernel and combine_kernel launches (for A/B timing)."""
    if os.environ.get("EMU_INDUCTOR_FUSED_EPILOGUE", "0") != "1":  # opt-in: measured slower
        return _dummy(dev, torch.int32), False
    # per stream: launches on two streams may overlap, each must count its own tiles
    key = (str(dev), torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0, use)
    t = _COUNTERS.get(key)
    if t is not None and t.numel() >= n:
        return t, True
    fresh = torch.zeros(max(n, 4096), dtype=torch.int32, device=dev)
    if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return fresh, True
    _COUNTERS[key] = fresh
    return fresh, True


def _scale_u8(scale: torch.Tensor) -> torch.Tensor:
    return scale.view(torch.uint8) if scale.dtype != torch.uint8 else scale


def _launch_kw(cfg: TileConfig) -> dict:
    if interpreting():
        return {}
    kw = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if cfg.maxnreg:
        kw["maxnreg"] = cfg.maxnreg
    return kw


@functools.lru_cache(maxsize=None)
def _pdl_device(dev: torch.device) -> bool:
    return dev.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(dev) >= (9, 0)


def _pdl_kw(dev: torch.device) -> dict:
    """Programmatic dependent launch for the MoE chain's kernels (render._PDL_ENTRY): each
    grid starts while the previous one's last programs run. CUDA sm_90+ (griddepcontrol), not
    the interpreter. Opt-in (EMU_INDUCTOR_PDL=1): exact on the H200 (gpu_check, graph
    replays) but no measurable gain (Qwen3 decode kernels 35.2 us with it, 36.3 without in
    the previous session's run; docs/kernels.md), so not worth a default."""
    if interpreting() or os.environ.get("EMU_INDUCTOR_PDL", "0") != "1" or not _pdl_device(dev):
        return {}
    return {"PDL": True, "launch_pdl": True}


@functools.lru_cache(maxsize=None)
def _num_sms(dev: torch.device) -> int:
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).multi_processor_count
    return 132


def _splits(requested: int, programs: int, K: int, BK: int, dev: torch.device) -> int:
    """K splits of one GEMM: `requested` (>= 1), or -1 for `tiles.auto_split`."""
    k_tiles = _cdiv(K, BK)
    if requested < 0:
        split = auto_split(programs, k_tiles, _num_sms(dev))
    else:
        split = max(1, min(requested, k_tiles))
    # the splits actually needed at _k_per_split tiles each: none is empty, which the kernels
    # tell the compiler (render: tl.assume(k_hi > k_lo) under EVEN_K)
    return _cdiv(k_tiles, _k_per_split(K, BK, split)) if k_tiles else 1


def _even_k(K: int, BK: int) -> bool:
    """K a multiple of BK: the kernels drop their K masks (wide weight and scale loads; see
    render_helpers.KMASK). EMU_INDUCTOR_EVEN_K=0 keeps the masks (for A/B timing)."""
    return K > 0 and K % BK == 0 and os.environ.get("EMU_INDUCTOR_EVEN_K", "1") != "0"


def _fast_decode(kspec: KernelSpec, K: int, BK: int, dev: torch.device) -> bool:
    """The inline-PTX MX weight decode (render_helpers.E2M1_FAST): CUDA (PTX; not ROCm), a
    spec it applies to, unmasked K tiles; EMU_INDUCTOR_FAST_DECODE=0 turns it off."""
    return (dev.type == "cuda" and torch.version.hip is None and fast_decode_supported(kspec)
            and _even_k(K, BK) and os.environ.get("EMU_INDUCTOR_FAST_DECODE", "1") != "0")


def _dec_kw(kspec: KernelSpec, K: int, cfg: TileConfig, dev: torch.device) -> dict:
    """The weight-decode constexprs of one GEMM launch (the inline-PTX decode where it applies)."""
    return {"FASTDEC": _fast_decode(kspec, K, cfg.BK, dev)}


def _k_per_split(K: int, BK: int, split: int) -> int:
    """K tiles (of BK) per split: the kernels start split s at s * KTS * BK, a multiple of
    BK the compiler can prove (aligned loads; a runtime K offset would cost vectorisation)."""
    return _cdiv(_cdiv(K, BK), split)


# --- launch arguments ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GemmWeights:
    """One GEMM's weights: packed codes [E, N, Kp] (or [N, Kp]), block scales, the NVFP4
    dequantize-direction global scale (None for MX) and an optional bias (activation dtype)."""

    w: torch.Tensor
    scale: torch.Tensor
    alpha: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None


@dataclasses.dataclass(frozen=True)
class Routing:
    """Which experts each token goes to: topk_weights / topk_ids [T, k] and the optional
    global -> local expert map (-1: not on this rank)."""

    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    expert_map: Optional[torch.Tensor] = None


@dataclasses.dataclass(frozen=True)
class ActScales:
    """Activation scales as the op received them: NVFP4 global scales (quantize direction)
    or static per-tensor fp8 scales, for the GEMM1 input (a1) and the GEMM2 input (a2)."""

    a1: Optional[torch.Tensor] = None
    a2: Optional[torch.Tensor] = None


@dataclasses.dataclass(frozen=True)
class BlockRouting:
    """`moe_align`'s result for one BM: sorted_ids [P], block_expert [P // BM], pos_of_id [R]."""

    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    pos_of_id: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return self.block_expert.shape[0]

    @property
    def padded_rows(self) -> int:
        return self.sorted_ids.shape[0]


@dataclasses.dataclass(frozen=True)
class KernelScales:
    """The fp32 scale operands of one MoE launch: gs1 (a1 global scale, fp8 static scale or
    dynamic amax), gs2 (a2 global scale), gs2_static (static fp8 a2 scale or None) and amax2
    (GEMM1's amax output for dynamic fp8 a2; a dummy otherwise)."""

    gs1: torch.Tensor
    gs2: torch.Tensor
    gs2_static: Optional[torch.Tensor]
    amax2: torch.Tensor


@dataclasses.dataclass(frozen=True)
class MoEWorkspaces:
    """Buffers between the two GEMMs: a2 (QDQ'd activation rows [P, I]) and, with debug,
    the kernel's fp32 a1 [P, H] and c2 [P, I] rows (dummies otherwise)."""

    a2: torch.Tensor
    dbg_a: torch.Tensor
    dbg_c: torch.Tensor


@dataclasses.dataclass(frozen=True)
class _MoEPlan:
    """Everything fixed for one mxemu::moe call (shapes, spec, rendered module); `_moe_run`
    executes it for one tile config."""

    x: torch.Tensor
    w13: GemmWeights
    w2: GemmWeights
    routing: Routing
    scales: ActScales
    spec: OpSpec
    kspec: KernelSpec
    mod: object
    T: int
    H: int
    E: int
    I: int
    N1: int
    top_k: int
    reduction: str
    prequant: bool

    @property
    def R(self) -> int:
        return self.T * self.top_k


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
    plan = _MoEPlan(x=x.contiguous(), w13=w13, w2=w2, routing=routing, scales=scales, spec=spec, kspec=kspec,
                    mod=get_module(kspec), T=T, H=H, E=E, I=I, N1=N1, top_k=top_k, reduction=reduction,
                    prequant=bool(prequant) and spec.act_kind != "none")
    run = functools.partial(_moe_run, plan)
    if config is None:
        config = _moe_config(plan, run)
    return run(config, debug)


def _moe_config(plan: _MoEPlan, run) -> TileConfig:
    rows_per_expert = plan.R / max(1, min(plan.E, plan.R))
    if plan.kspec.interpret:
        c1 = interpreter_config(plan.I, plan.H, rows_per_expert)
        c2 = interpreter_config(plan.H, plan.I, rows_per_expert)
        return TileConfig(c1.BM, max(c1.BN, 32), max(c1.BK, c2.BK), 4, 1)
    key = (f"moe|{plan.kspec.digest()}|E{plan.E}|H{plan.H}|I{plan.I}|k{plan.top_k}|T{token_bucket(plan.T)}|"
           f"{plan.reduction}|pq{int(plan.prequant)}")
    return select_config(key, plan.x.device, rows_per_expert, bench=_bencher(run), verify=_verifier(run))


def _moe_run(plan: _MoEPlan, cfg: TileConfig, dbg: bool = False):
    if cfg.dq and dq_applies(plan):
        return _moe_run_dq(plan, cfg, dbg)
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


# --- MoE prefill: dequantize once per call, library grouped GEMM ------------------------------
# At prefill every expert's weight tile is decoded again for every row block in the fused
# GEMMs (CUDA-core work the tensor cores wait on). This path decodes each weight once per call
# into a bf16 workspace -- with the GEMMs' own tile functions, so the values are the same --
# and runs both GEMMs on torch._grouped_mm (cuBLAS / CUTLASS), the activation + QDQ_a2
# epilogue and the top-k combine on the fused path's kernels (act_epilogue_kernel and
# combine_kernel read the library's bf16 outputs as their "partial sums"). The workspace holds
# a chunk of output rows of every expert at a time (`_dq_chunk_rows`), so its size is bounded.


def dq_applies(plan: _MoEPlan) -> bool:
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


def _dq_budget(plan: _MoEPlan, P: int) -> int:
    """Workspace bytes for dequantized weights: EMU_INDUCTOR_DQ_WORKSPACE_MB, else the size of
    the call's largest activation buffer (P rows of max(H, N1)), so the weights' workspace
    grows with the tokens like the activations do and never past them."""
    env = os.environ.get("EMU_INDUCTOR_DQ_WORKSPACE_MB")
    if env:
        return int(float(env) * 2 ** 20)
    return P * max(plan.H, plan.N1) * 2


def _dq_gemm(plan: _MoEPlan, a: torch.Tensor, wts: GemmWeights, w2: bool, N: int, K: int, offs, wbuf, chunk: int,
             cfg: TileConfig) -> torch.Tensor:
    """a [P, K] @ every expert's dequantized weight^T by groups `offs`, chunk by chunk of
    output rows (dequant_kernel into `wbuf`, then torch._grouped_mm): [P, N] bf16."""
    dev = a.device
    E = plan.E
    out = None if chunk >= N else torch.empty((a.shape[0], N), dtype=a.dtype, device=dev)
    # 64 x 256 tiles: each program streams 8 KiB of packed codes out as 32 KiB of bf16 rows
    BN, BK = 64, min(256, _np2(K))
    kspec = plan.kspec
    scale = _scale_u8(wts.scale)
    for r0 in range(0, N, chunk):
        n = min(chunk, N - r0)
        wd = wbuf[: E * n * K].view(E, n, K)
        plan.mod.dequant_kernel[(E * _cdiv(n, BN), _cdiv(K, BK))](
            wts.w, scale, wts.alpha if wts.alpha is not None else _dummy(dev), wd, wts.w.shape[1], K, n, r0,
            plan.I, wts.w.stride(0), wts.w.stride(1), wts.scale.stride(0), wts.scale.stride(1), W2=w2,
            EVEN_K=_even_k(K, BK), FASTDEC=_fast_decode(kspec, K, BK, dev), BN=BN, BK=BK,
            **({} if interpreting() else {"num_warps": 4}))
        c = torch._grouped_mm(a, wd.transpose(1, 2), offs=offs)
        if out is None:
            return c
        out[:, r0:r0 + n].copy_(c)
    return out


def _moe_run_dq(plan: _MoEPlan, cfg: TileConfig, dbg: bool = False):
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
    chunk1 = _dq_chunk_rows(E, plan.H, plan.N1, _dq_budget(plan, P))
    chunk2 = _dq_chunk_rows(E, plan.I, plan.H, _dq_budget(plan, P))
    wbuf = torch.empty(max(E * chunk1 * plan.H, E * chunk2 * plan.I), dtype=plan.x.dtype, device=dev)
    c1 = _dq_gemm(plan, a1, plan.w13, False, plan.N1, plan.H, offs, wbuf, chunk1, cfg)
    ws = _moe_workspaces(plan, P, dbg, dummy)
    if dbg:
        ws.dbg_a.copy_(a1.float())
    del a1
    BN = 64
    plan.mod.act_epilogue_kernel[(blocks.num_blocks, _cdiv(plan.I, BN))](
        c1, blocks.sorted_ids, blocks.block_expert, scales.gs2, ws.a2, ws.a2.stride(0), ws.dbg_c,
        scales.amax2, plan.I, R, E, plan.N1, P, plan.N1, DEBUG=dbg, AMAX_OUT=False,
        SPLIT=1, BM=cfg.BM, BN=BN, **({} if interpreting() else {"num_warps": 4}))
    del c1
    c2 = _dq_gemm(plan, ws.a2, plan.w2, True, plan.H, plan.I, offs, wbuf, chunk2, cfg)
    del wbuf
    y = torch.empty((plan.T, plan.H), dtype=plan.x.dtype, device=dev)
    BH = min(1024, _np2(plan.H))
    plan.mod.combine_kernel[(plan.T, _cdiv(plan.H, BH))](
        c2, blocks.pos_of_id, blocks.block_expert, plan.routing.topk_weights, dummy, y, plan.T, plan.H, P,
        TOPK=plan.top_k, SPLIT=1, HAS_BIAS=False, MUL_W=not plan.spec.router_weight_on_input, BM=cfg.BM, BH=BH,
        **({} if interpreting() else {"num_warps": 4}))
    if not dbg:
        return y
    return _moe_debug_rows(plan, blocks, ws, y)


def _kernel_scales(plan: _MoEPlan, dummy) -> KernelScales:
    a1, a2 = plan.scales.a1, plan.scales.a2
    dev = plan.x.device
    if plan.spec.act_kind == "fp8_tensor":
        if plan.kspec.a1_static:
            gs1 = a1.reshape(1).to(torch.float32)
        else:
            x = plan.x
            xr = x * plan.routing.topk_weights.reshape(-1, 1).to(x.dtype) if plan.spec.router_weight_on_input else x
            gs1 = xr.abs().amax().to(torch.float32).reshape(1)
        gs2_static = a2.reshape(1).to(torch.float32) if plan.kspec.a2_static else None
        amax2 = torch.zeros(1, dtype=torch.float32, device=dev)
        return KernelScales(gs1, dummy, gs2_static, amax2)
    gs1 = a1.reshape(1).to(torch.float32) if a1 is not None else dummy
    gs2 = a2.reshape(1).to(torch.float32) if a2 is not None else dummy
    return KernelScales(gs1, gs2, None, dummy)


def _moe_workspaces(plan: _MoEPlan, P: int, dbg: bool, dummy) -> MoEWorkspaces:
    dev, dtype = plan.x.device, plan.x.dtype
    return MoEWorkspaces(
        a2=torch.empty((P, plan.I), dtype=dtype, device=dev),
        dbg_a=torch.zeros((P, plan.H), dtype=torch.float32, device=dev) if dbg else dummy,
        dbg_c=torch.zeros((P, plan.I), dtype=torch.float32, device=dev) if dbg else dummy)


def _prep_merged() -> bool:
    """Routing prep and the GEMM1 rows' fake-quant in one launch (`prep_kernel`) where both
    run as Triton kernels; EMU_INDUCTOR_PREP_MERGED=0 keeps two launches (A/B timing)."""
    return os.environ.get("EMU_INDUCTOR_PREP_MERGED", "1") != "0"


def _prequant_shape(plan: _MoEPlan):
    """(rows M, fake-quant K tile, router weight on the input) of the prequantized rows."""
    rw = bool(plan.spec.router_weight_on_input)
    return (plan.R if rw else plan.T), _qdq_bk(plan.H, plan.spec), rw


def _moe_prep(plan: _MoEPlan, cfg: TileConfig, scales: KernelScales):
    """`moe_align`'s sort kernel and `_moe_prequant` as one launch of prep_kernel: program 0
    routes (routing.moe_align_sort), the others fake-quantize row tiles. Same outputs."""
    x, H = plan.x, plan.H
    M, qbk, rw = _prequant_shape(plan)
    a_src = torch.empty((M, H), dtype=x.dtype, device=x.device)
    outs, args, sort_kw, warps = _routing_launch(plan.routing.topk_ids, plan.routing.expert_map, plan.E, cfg.BM)
    nqk = _cdiv(H, qbk)
    plan.mod.prep_kernel[(1 + _cdiv(M, 16) * nqk,)](
        x, x.stride(0), plan.routing.topk_weights, scales.gs1, a_src, a_src.stride(0), M, H, nqk, *args,
        TOPK=plan.top_k if rw else 1, RW=rw, BMQ=16, BKQ=qbk, **sort_kw, **warps, **_pdl_kw(x.device))
    return BlockRouting(*outs), a_src, 1 if rw else 0


def _moe_prequant(plan: _MoEPlan, scales: KernelScales):
    """Fake-quantize the GEMM1 input rows once ([T, H], or [T*k, H] with the router weight on
    the input): returns (rows, A_INDEX of gemm_act_kernel)."""
    x, H = plan.x, plan.H
    M, qbk, rw = _prequant_shape(plan)
    a_src = torch.empty((M, H), dtype=x.dtype, device=x.device)
    plan.mod.prequant_kernel[(_cdiv(M, 16), _cdiv(H, qbk))](
        x, x.stride(0), plan.routing.topk_weights, scales.gs1, a_src, a_src.stride(0), M, H,
        TOPK=plan.top_k if rw else 1, RW=rw, BM=16, BK=qbk, **({} if interpreting() else {"num_warps": 4}))
    return a_src, 1 if rw else 0


def _moe_gemm1(plan: _MoEPlan, cfg: TileConfig, blocks: BlockRouting, scales: KernelScales, ws: MoEWorkspaces,
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


def _moe_gemm2(plan: _MoEPlan, cfg: TileConfig, blocks: BlockRouting, scales: KernelScales, ws: MoEWorkspaces,
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


def _moe_combine(plan: _MoEPlan, out: torch.Tensor) -> torch.Tensor:
    """atomic: the fp32 [T, H] sum, rounded once; deterministic: the per-slot rows summed in
    fp32 in the reference's order (router weight applied here unless it went on the input)."""
    dtype = plan.x.dtype
    if plan.reduction == "atomic":
        return out.to(dtype)
    c3 = out.view(plan.T, plan.top_k, plan.H).to(torch.float32)
    if not plan.spec.router_weight_on_input:
        c3 = c3 * plan.routing.topk_weights.to(torch.float32).unsqueeze(-1)
    return c3.sum(dim=1).to(dtype)


def _moe_debug_rows(plan: _MoEPlan, blocks: BlockRouting, ws: MoEWorkspaces, y: torch.Tensor) -> dict:
    P = blocks.padded_rows
    valid = blocks.pos_of_id < P
    p = blocks.pos_of_id.clamp(max=P - 1)
    nan = float("nan")
    fp8 = plan.spec.act_kind == "fp8_tensor"
    return {"out": y, "valid": valid,
            "a1": torch.where(valid[:, None], ws.dbg_a[p], nan),
            "c2": torch.where(valid[:, None], ws.dbg_c[p], nan),
            "a2": torch.where(valid[:, None], ws.a2[p].to(torch.float32), nan) if not fp8 else None}


def _qdq_bk(K: int, spec: OpSpec) -> int:
    """A K tile for the standalone QDQ: a multiple of the activation block size."""
    bs = FORMATS[spec.act_fmt].block_size if spec.act_kind == "block" else 1
    bk = 128
    while bk < bs:
        bk *= 2
    return bk


# the config every candidate is checked against: small tiles, no K split, no swap, no
# workspace -- the path gpu_check verifies bit for bit for every scheme
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


def _linear_dq(a, weights: GemmWeights, R, a_gs, spec: OpSpec, out, alpha_mode) -> torch.Tensor:
    """The dequantize-once path for a linear (TileConfig.dq): QDQ(a) by prequant_kernel, the
    weight decoded by dequant_kernel (the GEMM's own tile function) in chunks of output rows,
    then F.linear -- the reference's own op on the same operands (bias on cuBLAS's fp32
    accumulator, one rounding)."""
    w = weights.w
    N, K = w.shape[1], a.shape[1]
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
        mod.prequant_kernel[(_cdiv(R, 16), _cdiv(K, qbk))](
            a, a.stride(0), dummy, gs, aq, aq.stride(0), R, K, TOPK=1, RW=False, BM=16, BK=qbk,
            **({} if interpreting() else {"num_warps": 4}))
    chunk = _dq_chunk_rows(1, K, N, R * max(N, K) * 2)
    wbuf = torch.empty(chunk * K, dtype=a.dtype, device=dev)
    BN, BK = 64, min(256, _np2(K))
    scale = _scale_u8(weights.scale)
    for r0 in range(0, N, chunk):
        n = min(chunk, N - r0)
        wd = wbuf[: n * K].view(1, n, K)
        mod.dequant_kernel[(_cdiv(n, BN), _cdiv(K, BK))](
            w, scale, weights.alpha if weights.alpha is not None else dummy, wd, N, K, n, r0, N,
            w.stride(0), w.stride(1), weights.scale.stride(0), weights.scale.stride(1), W2=True,
            EVEN_K=_even_k(K, BK), FASTDEC=_fast_decode(kspec, K, BK, dev), BN=BN, BK=BK,
            **({} if interpreting() else {"num_warps": 4}))
        bias = weights.bias[r0:r0 + n] if weights.bias is not None else None
        if n == N:  # one chunk: the library's output is the result
            return torch.nn.functional.linear(aq, wd[0], bias)
        out[:, r0:r0 + n] = torch.nn.functional.linear(aq, wd[0], bias)
    return out


def linear_dq_applies(x: torch.Tensor, spec: OpSpec) -> bool:
    """Where a linear can take the dequantize-once path: bf16 / fp16 rows, block-scaled or no
    activation QDQ (per-tensor fp8 needs the rows' amax first)."""
    return x.dtype in (torch.bfloat16, torch.float16) and spec.act_kind in ("block", "none")


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
            return _linear_dq(x2, w3, M, input_global_scale, spec, out, amode)
        nb = _cdiv(M, cfg.BM)
        ids = _iota_i32(dev, nb * cfg.BM)  # ids >= M are padding; neither is written by the kernels
        bexp = _zeros_i32(dev, nb)
        return _gemm_rows(x2, w3, BlockRouting(ids, bexp, ids), M, input_global_scale, spec, out, cfg, amode)

    cfg = config or _gemm_cfg("linear", spec, x.dtype, dev, N, K, M, 1, run)
    return run(cfg).reshape(*x.shape[:-1], N)
