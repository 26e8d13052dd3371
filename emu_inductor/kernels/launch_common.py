"""What the launchers share: rendered modules, the routing prep (`moe_align`), cached device
constants, launch keywords, the argument dataclasses and the MoE stages both MoE paths run.

Arguments arrive validated (by `emu_inductor.ops`, at the op boundary) and grouped in
small dataclasses: `GemmWeights` (one GEMM's packed weights, scales, global scale, bias),
`Routing` (top-k weights and ids, expert map), `ActScales` (activation global / static
fp8 scales as the op got them); per launch the pipeline derives `BlockRouting` (rows
sorted and padded per expert), `KernelScales` (the fp32 scale operands the kernels read)
and `MoEWorkspaces` (intermediate and debug buffers); `MoEPlan` holds what is fixed for one
mxemu::moe call.

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
import os
from typing import Optional

import torch

from ..formats import FORMATS
from ..spec.opspec import OpSpec
from .cache import load_module
from .fastlaunch import launch_kernel
from .kernel_spec import KernelSpec
from .render import render
from .render_helpers import fast_decode_supported
from .routing import moe_align_kernel, moe_align_sort_kernel
from .tiles import TileConfig, auto_split

__all__ = ["GemmWeights", "Routing", "ActScales", "BlockRouting", "KernelScales", "MoEWorkspaces", "MoEPlan",
           "moe_align", "get_module", "kernel_spec_for", "interpreting"]


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
        launch_kernel(moe_align_sort_kernel, (1,), *args, **sort_kw, **warps)
    else:
        R, BE = topk_ids.numel(), sort_kw["BE"]
        BR = max(16, min(_np2(R), 8192 // BE))
        BF = max(16, 8192 // BE)
        launch_kernel(moe_align_kernel, (1,), *args, HAS_MAP=expert_map is not None, BM=BM, BR=BR, BE=BE, BF=BF,
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

    def __post_init__(self):
        # The kernels take the leading strides but read the packed axis (and a block's
        # scales) with unit stride: a transposed view (a K-major leaf handed over as
        # [N, K/2]; Inductor may lay a clone out like its input) is copied here.
        for f in ("w", "scale"):
            t = getattr(self, f)
            if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
                object.__setattr__(self, f, t.contiguous())


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
class MoEPlan:
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




def _kernel_scales(plan: MoEPlan, dummy) -> KernelScales:
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


def _moe_workspaces(plan: MoEPlan, P: int, dbg: bool, dummy) -> MoEWorkspaces:
    dev, dtype = plan.x.device, plan.x.dtype
    return MoEWorkspaces(
        a2=torch.empty((P, plan.I), dtype=dtype, device=dev),
        dbg_a=torch.zeros((P, plan.H), dtype=torch.float32, device=dev) if dbg else dummy,
        dbg_c=torch.zeros((P, plan.I), dtype=torch.float32, device=dev) if dbg else dummy)


def _prep_merged() -> bool:
    """Routing prep and the GEMM1 rows' fake-quant in one launch (`prep_kernel`) where both
    run as Triton kernels; EMU_INDUCTOR_PREP_MERGED=0 keeps two launches (A/B timing)."""
    return os.environ.get("EMU_INDUCTOR_PREP_MERGED", "1") != "0"


def _prequant_shape(plan: MoEPlan):
    """(rows M, fake-quant K tile, router weight on the input) of the prequantized rows."""
    rw = bool(plan.spec.router_weight_on_input)
    return (plan.R if rw else plan.T), _qdq_bk(plan.H, plan.spec), rw


def _moe_prep(plan: MoEPlan, cfg: TileConfig, scales: KernelScales):
    """`moe_align`'s sort kernel and `_moe_prequant` as one launch of prep_kernel: program 0
    routes (routing.moe_align_sort), the others fake-quantize row tiles. Same outputs."""
    x, H = plan.x, plan.H
    M, qbk, rw = _prequant_shape(plan)
    a_src = torch.empty((M, H), dtype=x.dtype, device=x.device)
    outs, args, sort_kw, warps = _routing_launch(plan.routing.topk_ids, plan.routing.expert_map, plan.E, cfg.BM)
    nqk = _cdiv(H, qbk)
    launch_kernel(plan.mod.prep_kernel, (1 + _cdiv(M, 16) * nqk,),
        x, x.stride(0), plan.routing.topk_weights, scales.gs1, a_src, a_src.stride(0), M, H, nqk, *args,
        TOPK=plan.top_k if rw else 1, RW=rw, BMQ=16, BKQ=qbk, **sort_kw, **warps, **_pdl_kw(x.device))
    return BlockRouting(*outs), a_src, 1 if rw else 0


def _moe_prequant(plan: MoEPlan, scales: KernelScales):
    """Fake-quantize the GEMM1 input rows once ([T, H], or [T*k, H] with the router weight on
    the input): returns (rows, A_INDEX of gemm_act_kernel)."""
    x, H = plan.x, plan.H
    M, qbk, rw = _prequant_shape(plan)
    a_src = torch.empty((M, H), dtype=x.dtype, device=x.device)
    launch_kernel(plan.mod.prequant_kernel, (_cdiv(M, 16), _cdiv(H, qbk)),
        x, x.stride(0), plan.routing.topk_weights, scales.gs1, a_src, a_src.stride(0), M, H,
        TOPK=plan.top_k if rw else 1, RW=rw, BM=16, BK=qbk, **({} if interpreting() else {"num_warps": 4}))
    return a_src, 1 if rw else 0




def _moe_debug_rows(plan: MoEPlan, blocks: BlockRouting, ws: MoEWorkspaces, y: torch.Tensor) -> dict:
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
