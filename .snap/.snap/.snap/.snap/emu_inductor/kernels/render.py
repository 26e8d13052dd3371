"""The kernel template family: renders Triton source for any scheme from a KernelSpec.

One template for every format. Format facts (exponent/mantissa widths, bias, emin/emax,
largest normal, block size, packing width, NaN/Inf codes) are read from the
`emu_inductor.formats` spec objects and baked into the rendered helper functions, so a
new format needs no new kernel text (the helper renderers are in `render_helpers`; this
module holds the kernel bodies and `render`). The rendered module holds:

  helpers   _rnd (round fp32 to the activation dtype), _pow2, _round_<elem> (RNE or
            half-away onto an element grid, saturating), _decode_w (weight codes),
            e8m0 / e4m3 scale helpers, _qdq_a (the activation fake-QDQ of the scheme,
            op for op the reference's fp32 order), _act (the MoE activation with the
            eager dtype roundings), _w_tile (load packed weights + scales and dequantize
            a [BN, BK] tile in registers)
  kernels   gemm_act_kernel  (MoE GEMM1: gather rows, QDQ_a1, dequant w13, dot,
                               activation epilogue, QDQ_a2 epilogue or amax collection)
            gemm_out_kernel  (MoE GEMM2 / grouped GEMM / linear: optional prologue QDQ,
                               dequant, dot, optional bias, router weight, store/atomic)
            qdq_kernel       (standalone activation QDQ, used for debugging/prequant)

Interpreter variant (spec.interpret): dot operands stay fp32 with input_precision="ieee",
and every cast to bf16 is an exact integer RNE (the interpreter truncates float casts and
computes bf16 arithmetic wrongly). GPU variant: dot operands in the activation dtype,
hardware RNE casts. Divisions use tl.math.div_rn (IEEE, like torch); no libdevice, no
fp8 casts, RNE by the 1.5*2^23 magic-number trick on small non-negative values.
"""

from __future__ import annotations

from ..formats import FORMATS, E4M3
from ..formats.nvfp4 import E2M1_MAX as _E2M1_MAX
from ..formats.spec import BlockFormat
from ..spec.activations import is_gated
from .kernel_spec import KernelSpec
from .render_helpers import (
    _f, _ind, _rnd_helper, _dot_helper, _round_elem, _decode, _E8M0, _e8m0_scale, _qdq_helper, _act_helper,
    _gate_up_rows, _w_tile_helper, _load_a_block, _row_index, _a_scale_prologue, _E8M0_W_INF, _E8M0_W_LDEXP, KMASK, E2M1_FAST, E2M1_NV_FAST, scale_by_bits, WORDS_IN_K_ORDER, fast_decode_kind,
)

__all__ = ["render", "TEMPLATE_VERSION"]

TEMPLATE_VERSION = 3


def _act_epilogue(spec: KernelSpec) -> str:
    """acc_g / acc_u (fp32 [BM, BN], bias not yet added) -> C1 rounded once, the activation,
    QDQ_a2 (or the a2 amax) and the store of the A2 rows: shared by gemm_act_kernel and the
    split-K epilogue kernel, so both paths run the same ops."""
    op = spec.op
    gated = is_gated(op.activation)
    epi_q = "c2 = _qdq_a(c2, g2, BM, BN)" if op.act_kind == "block" else ""
    amax = ("if AMAX_OUT:\n    tl.atomic_max(amax_ptr, tl.max(tl.max(tl.where(omask, tl.abs(c2), 0.0), axis=1), axis=0))"
            if op.act_kind == "fp8_tensor" else "")
    bias_add = ""
    if spec.bias1:
        # per-expert GEMM1 bias (w13_bias [E, NW], indexed by weight row) added to the fp32
        # accumulators before C1's one rounding (vLLM's HAS_BIAS)
        bias_add = ("brow = b1_ptr + e.to(tl.int64) * NW\n"
                    "acc_g = acc_g + tl.load(brow + grow, mask=cmask, other=0.0).to(tl.float32)[None, :]")
        if gated:
            bias_add += "\nacc_u = acc_u + tl.load(brow + urow, mask=cmask, other=0.0).to(tl.float32)[None, :]"
    body = f"""{bias_add}
cg = _rnd(acc_g)
{"cu = _rnd(acc_u)" if gated else "cu = cg"}
c2 = _act(cg, cu)
omask = rmask[:, None] & cmask[None, :]
if DEBUG:
    tl.store(dbg_c_ptr + offs[:, None] * NOUT + cols[None, :], c2, mask=omask)
{amax}
{epi_q}
tl.store(out_ptr + offs[:, None] * stride_o + cols[None, :], c2, mask=omask)"""
    return "\n".join(l for l in body.split("\n") if l.strip())


_W_ARGS = "stride_we, stride_wn, stride_se, stride_sn, BN, BK, EVEN_K, FASTDEC"

# PDL (programmatic dependent launch, CUDA sm_90+; launch.pdl_kw): the MoE chain's kernels are
# launched so that the next one's grid starts while this one's last programs still run. Every
# program waits for the previous grid (its outputs complete and visible) before it reads or
# writes anything or returns, then lets the next grid launch: a grid that has started thus
# implies that the one two back has finished, and no kernel outlives the chain.
_PDL_ENTRY = """if PDL:
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()"""


def _w_first(tile: str, rows: str, buf: str) -> str:
    """Before the K loop (PREFETCH): the first K step's raw weight bytes `b{buf}` / `s{buf}`."""
    return (f"if PREFETCH:\n    # the first K step's weight bytes; each step then loads the next step's ({tile}_ld)\n"
            f"    b{buf}, s{buf} = {tile}_ld(w_ptr, s_ptr, e, {rows}, cmask, k_lo, K, k_lo < k_hi, {_W_ARGS})")


def _w_step(tile: str, rows: str, buf: str, var: str) -> str:
    """In the K loop: the dequantized [BN, BK] tile `var` of this step; with PREFETCH from
    the bytes loaded one step earlier, issuing the next step's loads first."""
    return (f"if PREFETCH:\n    b{buf}c = b{buf}\n    s{buf}c = s{buf}\n"
            f"    b{buf}, s{buf} = {tile}_ld(w_ptr, s_ptr, e, {rows}, cmask, k0 + BK, K, k0 + BK < k_hi, {_W_ARGS})\n"
            f"    {var} = {tile}_dec(b{buf}c, s{buf}c, alpha_ptr, e, {rows}, cmask, NW, BN, BK, FASTDEC)\n"
            f"else:\n    {var} = {tile}(w_ptr, s_ptr, alpha_ptr, e, {rows}, cmask, k0, K, NW, {_W_ARGS})")


def _w_mma(spec: KernelSpec, tile: str, rows: str, buf: str, var: str, acc: str) -> str:
    """One K step of a weight operand: the [BN, BK] weight tile dequantized in registers
    (_w_step), then `acc` += the activation tile times it (_mma)."""
    return f"{_w_step(tile, rows, buf, var)}\n{acc} = _mma(ao, {var}, {acc}, SWAP)"


def _split_sum(spec: KernelSpec, cache: str = "") -> str:
    """acc_g / acc_u = the SPLIT fp32 partial sums added in order from +0 (both epilogue paths)."""
    gated = is_gated(spec.op.activation)
    mod = f", cache_modifier=\"{cache}\"" if cache else ""
    sum_u = f"\n    acc_u += tl.load(prow + NOUT + cols[None, :], mask=pmask, other=0.0{mod})" if gated else ""
    return (f"acc_g = tl.zeros((BM, BN), dtype=tl.float32)\n"
            f"{'acc_u = tl.zeros((BM, BN), dtype=tl.float32)' if gated else ''}\n"
            f"for s in tl.static_range(SPLIT):\n"
            f"    prow = part_ptr + (s * PROWS + offs).to(tl.int64)[:, None] * PW\n"
            f"    acc_g += tl.load(prow + cols[None, :], mask=pmask, other=0.0{mod}){sum_u}")


def _last_split_epilogue(spec: KernelSpec) -> str:
    """In gemm_act_kernel after a split's partial store: a release/acquire counter per
    (row block, N tile); the program that brings it to SPLIT re-reads all partial sums (L2,
    not a stale L1: .cg) in split order -- the same sums act_epilogue_kernel adds -- runs the
    epilogue and resets the counter for the next launch (the counters start at zero once)."""
    return f"""tl.debug_barrier()  # every thread's partial stores before the release
cnt_ptr = cnt_base + pid_m * tl.num_programs(1) + pid_n
done = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
if done == SPLIT - 1:
{_ind(_split_sum(spec, ".cg"))}
    tl.atomic_xchg(cnt_ptr, 0, sem="relaxed", scope="gpu")
{_ind(_act_epilogue(spec))}"""


def _gemm_act_kernel(spec: KernelSpec) -> str:
    op = spec.op
    gated = is_gated(op.activation)
    grow, urow = _gate_up_rows(op.activation)
    s1 = _a_scale_prologue(op.act_kind, spec.a1_static, "gs1_ptr", "g1")
    s2 = _a_scale_prologue(op.act_kind if op.act_kind == "block" else "none", False, "gs2_ptr", "g2")
    router = ("tw = _rnd(tl.load(tw_ptr + tl.where(rmask, ids, 0), mask=rmask, other=0.0).to(tl.float32))"
              if op.router_weight_on_input else "")
    router_mul = "a = _rnd(a * tw[:, None])" if op.router_weight_on_input else ""
    qdq1 = "a = _qdq_a(a, g1, BM, BK)" if op.act_kind != "none" else ""
    up_dot = ""
    up_pre = ""
    up_init = ""
    part_u = ""
    if gated:
        up_init = "acc_u = _acc0(BM, BN, SWAP)"
        up_dot = _w_mma(spec, "_w_tile1", "urow", "u", "wu", "acc_u")
        up_pre = _w_first("_w_tile1", "urow", "u")
        part_u = "\n    tl.store(prow + NOUT + cols[None, :], acc_u, mask=pmask)"
    pro = "\n".join(l for l in (router_mul, qdq1) if l)
    # PREQ: the rows come already router-weighted and fake-quantized (prequant_kernel)
    prologue = ("if not PREQ:\n" + _ind(pro)) if pro else ""
    # prequantized rows enter the dot as loaded (see _load_a_block)
    operand = ("if PREQ:\n    ao = _opnd_raw(araw)\nelse:\n    ao = _opnd(a)") if pro else "ao = _opnd_raw(araw)"
    body = f"""{_PDL_ENTRY}
pid_m = tl.program_id(0)
pid_n = tl.program_id(1)
pid_k = tl.program_id(2)
e = tl.load(bexp_ptr + pid_m)
if e >= NE:
    return
{_row_index()}
cols = pid_n * BN + tl.arange(0, BN)
cmask = cols < NOUT
grow = {grow}
urow = {urow}
{s1}
{s2}
{router}
acc_g = _acc0(BM, BN, SWAP)
{up_init}
k_lo = pid_k * KTS * BK  # a multiple of BK the compiler can see: aligned, vectorised loads
k_hi = tl.minimum(K, k_lo + KTS * BK)
if EVEN_K:
    # K > 0 and no split is empty (launch._splits): without this fact LLVM keeps a
    # zero-trip path around the loop whose zeroed accumulators make ptxas serialize the
    # loop's register-operand wgmma (warning C7515: the swap path lost all MMA overlap)
    tl.assume(k_hi > k_lo)
{_w_first("_w_tile1", "grow", "g")}
{up_pre}
for k0 in range(k_lo, k_hi, BK):
{_ind(_load_a_block())}
{_ind(prologue)}
    if DEBUG:
        if pid_n == 0:
            tl.store(dbg_a_ptr + offs[:, None] * K + kk[None, :], a, mask=rmask[:, None] & (kk < K)[None, :])
{_ind(operand)}
{_ind(_w_mma(spec, "_w_tile1", "grow", "g", "wg", "acc_g"))}
{_ind(up_dot)}
acc_g = _acc_rows(acc_g, SWAP)
{"acc_u = _acc_rows(acc_u, SWAP)" if gated else ""}
if SPLIT > 1:
    # split-K: this program's fp32 sums go to part [SPLIT, PROWS, PW]; act_epilogue_kernel
    # adds the splits in order and runs the epilogue below -- or, FUSE_EPI, the last of the
    # tile's SPLIT programs to finish does (a counter per tile: one launch fewer at decode)
    pmask = rmask[:, None] & cmask[None, :]
    prow = part_ptr + (pid_k * PROWS + offs).to(tl.int64)[:, None] * PW
    tl.store(prow + cols[None, :], acc_g, mask=pmask){part_u}
    if FUSE_EPI:
{_ind(_last_split_epilogue(spec), 8)}
else:
{_ind(_act_epilogue(spec))}"""
    body = "\n".join(l for l in body.split("\n") if l.strip())
    return f"""@triton.jit(do_not_specialize=["R", "KTS"])
def gemm_act_kernel(a_ptr, stride_a, w_ptr, s_ptr, alpha_ptr, ids_ptr, bexp_ptr, tw_ptr, gs1_ptr, gs2_ptr,
                    out_ptr, stride_o, dbg_a_ptr, dbg_c_ptr, amax_ptr,{" b1_ptr," if spec.bias1 else ""} part_ptr,
                    cnt_base, NOUT, K, R, NE, NW, stride_we, stride_wn, stride_se, stride_sn, KTS, PROWS, PW,
                    TOPK: tl.constexpr, A_INDEX: tl.constexpr, DEBUG: tl.constexpr, AMAX_OUT: tl.constexpr,
                    PREQ: tl.constexpr, SPLIT: tl.constexpr, FUSE_EPI: tl.constexpr, SWAP: tl.constexpr, EVEN_K: tl.constexpr,
                    PREFETCH: tl.constexpr, FASTDEC: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr = False):
    # MoE GEMM1: rows of expert-sorted blocks, QDQ_a1 in registers, w13 dequant in registers,
    # {op.activation} epilogue, then {"QDQ_a2 of the activation (blocks along I inside this N tile)" if op.act_kind == "block" else ("the a2 amax (per-tensor fp8 QDQ runs in GEMM2)" if op.act_kind == "fp8_tensor" else "no QDQ (weight-only)")};
    # grid axis 2 splits K (SPLIT > 1: fp32 partial sums, epilogue by the tile's last split
    # (FUSE_EPI) or in act_epilogue_kernel)
{_ind(body)}
"""


def _act_epilogue_kernel(spec: KernelSpec) -> str:
    op = spec.op
    gated = is_gated(op.activation)
    grow, urow = _gate_up_rows(op.activation)
    s2 = _a_scale_prologue(op.act_kind if op.act_kind == "block" else "none", False, "gs2_ptr", "g2")
    body = f"""{_PDL_ENTRY}
pid_m = tl.program_id(0)
pid_n = tl.program_id(1)
e = tl.load(bexp_ptr + pid_m)
if e >= NE:
    return
offs = pid_m * BM + tl.arange(0, BM)
ids = tl.load(ids_ptr + offs)
rmask = ids < R
cols = pid_n * BN + tl.arange(0, BN)
cmask = cols < NOUT
grow = {grow}
urow = {urow}
{s2}
pmask = rmask[:, None] & cmask[None, :]
{_split_sum(spec)}
{_act_epilogue(spec)}"""
    body = "\n".join(l for l in body.split("\n") if l.strip())
    return f"""@triton.jit(do_not_specialize=["R"])
def act_epilogue_kernel(part_ptr, ids_ptr, bexp_ptr, gs2_ptr, out_ptr, stride_o, dbg_c_ptr, amax_ptr,{" b1_ptr," if spec.bias1 else ""}
                        NOUT, R, NE, NW, PROWS, PW, DEBUG: tl.constexpr, AMAX_OUT: tl.constexpr,
                        SPLIT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PDL: tl.constexpr = False):
    # split-K GEMM1's epilogue: the SPLIT fp32 partial sums added in order, then the same
    # epilogue as gemm_act_kernel ({op.activation}, C1 rounded once, QDQ_a2 / a2 amax)
{_ind(body)}
"""


def _dequant_kernel(spec: KernelSpec) -> str:
    """dequant_kernel: a block of weight rows of every expert dequantized by the same tile
    functions the GEMMs decode with (so the values are those the fused GEMMs multiply),
    stored in the activation dtype for a library grouped GEMM (launch's dequantize-once
    prefill path). Output column o of GEMM1 is gate row grow(o) for o < NOUT and up row
    urow(o - NOUT) after it: the gate | up order the epilogue reads, whatever the layout."""
    grow, urow = _gate_up_rows(spec.op.activation)
    gated = is_gated(spec.op.activation)
    rows = (f"cols = tl.where(o < NOUT, o, o - NOUT)\n        rows = tl.where(o < NOUT, {grow}, {urow})" if gated
            else "rows = o")
    return f"""@triton.jit
def dequant_kernel(w_ptr, s_ptr, alpha_ptr, out_ptr, NW, K, NROWS, ROW0, NOUT, stride_we, stride_wn, stride_se,
                   stride_sn, W2: tl.constexpr, EVEN_K: tl.constexpr, FASTDEC: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr):
    # out [E, NROWS, K] = output columns ROW0 .. ROW0 + NROWS of every expert's weight, dequantized
    nb = tl.cdiv(NROWS, BN)
    e = tl.program_id(0) // nb
    j = (tl.program_id(0) % nb) * BN + tl.arange(0, BN)
    jmask = j < NROWS
    o = ROW0 + j
    if W2:
        rows = o
    else:
        {rows}
    rows = tl.where(jmask, rows, 0)
    k0 = tl.program_id(1) * BK
    if W2:
        w = _w_tile2(w_ptr, s_ptr, alpha_ptr, e, rows, jmask, k0, K, NW, stride_we, stride_wn, stride_se, stride_sn,
                     BN, BK, EVEN_K, FASTDEC)
    else:
        w = _w_tile1(w_ptr, s_ptr, alpha_ptr, e, rows, jmask, k0, K, NW, stride_we, stride_wn, stride_se, stride_sn,
                     BN, BK, EVEN_K, FASTDEC)
    kk = k0 + tl.arange(0, BK)
    dst = out_ptr + (e.to(tl.int64) * NROWS + j[:, None]) * K + kk[None, :]
    tl.store(dst, w.to(out_ptr.dtype.element_ty), mask=jmask[:, None] & (kk < K)[None, :])
"""


def _combine_rows() -> str:
    """y[t, cols] for the tokens `tok` of mask `ctm` ([R] rows): combine_kernel's sum over the
    top-k slots (in order, fp32) of rnd(sum of the SPLIT partial sums (+ bias)) (* router
    weight), with the same ops in the same order, vectorised over rows; `cache` reads L2."""
    return """y = tl.zeros((BM, BN), dtype=tl.float32)
for j in tl.static_range(TOPK):
    r = tok * TOPK + j
    pos = tl.load(pos_ptr + r, mask=ctm, other=PROWS)
    ok = ctm & (pos < PROWS)
    p = tl.where(ok, pos, 0)
    cm2 = ok[:, None] & cmask[None, :]
    sacc = tl.zeros((BM, BN), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        sacc += tl.load(out_ptr + (s * PROWS + p).to(tl.int64)[:, None] * stride_o + cols[None, :], mask=cm2,
                        other=0.0, cache_modifier=".cg")
    if HAS_BIAS:
        eb = tl.load(bexp_ptr + p // BM, mask=ok, other=0)
        sacc = sacc + tl.load(bias_ptr + eb.to(tl.int64)[:, None] * NOUT + cols[None, :], mask=cm2, other=0.0).to(tl.float32)
    c = tl.where(ok[:, None], _rnd(sacc), 0.0)  # a slot of no local expert adds zeros
    if MUL_W:
        c = c * tl.load(tw_ptr + r, mask=ok, other=0.0).to(tl.float32)[:, None]
    y += c"""


def _last_slot_combine() -> str:
    """In gemm_out_kernel after a split's partial store: a release/acquire counter per (token,
    N tile); a token is complete when all its local slots' SPLIT partial sums are stored, and
    the program whose add completes it combines the token's row (`_combine_rows`, the sums
    combine_kernel forms), stores it and resets the counter (counters zeroed once, cached)."""
    return f"""tl.debug_barrier()  # every thread's partial stores before the release
tok = tl.where(rmask, ids // TOPK, 0)
need = tl.zeros((BM,), dtype=tl.int32)
for j in tl.static_range(TOPK):
    need += (tl.load(pos_ptr + tok * TOPK + j, mask=rmask, other=PROWS) < PROWS).to(tl.int32)
cptr = cnt_base + tok * tl.num_programs(1) + pid_n
done = tl.atomic_add(cptr, 1, mask=rmask, sem="acq_rel", scope="gpu")
ctm = rmask & (done == need * SPLIT - 1)
if tl.max(ctm.to(tl.int32), axis=0) > 0:
{_ind(_combine_rows())}
    tl.store(y_ptr + tok.to(tl.int64)[:, None] * NOUT + cols[None, :], _rnd(y).to(y_ptr.dtype.element_ty),
             mask=ctm[:, None] & cmask[None, :])
    tl.atomic_xchg(cptr, 0, mask=ctm, sem="relaxed", scope="gpu")"""


def _gemm_out_kernel(spec: KernelSpec) -> str:
    op = spec.op
    body = f"""{_PDL_ENTRY}
pid_m = tl.program_id(0)
pid_n = tl.program_id(1)
pid_k = tl.program_id(2)
e = tl.load(bexp_ptr + pid_m)
if e >= NE:
    return
{_row_index()}
cols = pid_n * BN + tl.arange(0, BN)
cmask = cols < NOUT
g = 0.0
if QDQ_A:
    if STATIC_A:
        g = tl.load(gs_ptr)
    else:
        g = {"_fp8_scale(tl.load(gs_ptr))" if op.act_kind == "fp8_tensor" else "tl.load(gs_ptr)"}
acc = _acc0(BM, BN, SWAP)
k_lo = pid_k * KTS * BK  # a multiple of BK the compiler can see: aligned, vectorised loads
k_hi = tl.minimum(K, k_lo + KTS * BK)
if EVEN_K:
    # K > 0 and no split is empty (launch._splits): without this fact LLVM keeps a
    # zero-trip path around the loop whose zeroed accumulators make ptxas serialize the
    # loop's register-operand wgmma (warning C7515: the swap path lost all MMA overlap)
    tl.assume(k_hi > k_lo)
{_w_first("_w_tile2", "cols", "w")}
for k0 in range(k_lo, k_hi, BK):
{_ind(_load_a_block())}
    if QDQ_A:
        ao = _opnd(_qdq_a(a, g, BM, BK))
    else:
        ao = _opnd_raw(araw)
{_ind(_w_mma(spec, "_w_tile2", "cols", "w", "w", "acc"))}
acc = _acc_rows(acc, SWAP)
if STORE == 2:
    # fp32 partial sums [SPLIT, PROWS, NOUT] for combine_kernel (bias, rounding, router weight there)
    tl.store(out_ptr + (pid_k * PROWS + offs).to(tl.int64)[:, None] * stride_o + cols[None, :], acc,
             mask=rmask[:, None] & cmask[None, :])
    if FUSE_COMB:
{_ind(_last_slot_combine(), 8)}
    return
if HAS_BIAS:
    c = _rnd(acc + tl.load(bias_ptr + {"e.to(tl.int64) * NOUT + " if spec.bias2 else ""}cols, mask=cmask, other=0.0).to(tl.float32)[None, :])
else:
    c = _rnd(acc)
omask = rmask[:, None] & cmask[None, :]
if STORE == 1:
    tw = tl.load(tw_ptr + tl.where(rmask, ids, 0), mask=rmask, other=0.0).to(tl.float32)
    if MUL_W:
        c = c * tw[:, None]
    tl.atomic_add(out_ptr + (tl.where(rmask, ids, 0) // TOPK)[:, None] * stride_o + cols[None, :], c, mask=omask)
else:
    tl.store(out_ptr + ids[:, None] * stride_o + cols[None, :], c, mask=omask)"""
    return f"""@triton.jit(do_not_specialize=["R", "KTS", "PROWS"])
def gemm_out_kernel(a_ptr, stride_a, w_ptr, s_ptr, alpha_ptr, ids_ptr, bexp_ptr, tw_ptr, gs_ptr, bias_ptr,
                    out_ptr, stride_o, pos_ptr, cnt_base, y_ptr, NOUT, K, R, NE, NW, stride_we, stride_wn, stride_se,
                    stride_sn, KTS, PROWS,
                    TOPK: tl.constexpr, A_INDEX: tl.constexpr, QDQ_A: tl.constexpr, STATIC_A: tl.constexpr,
                    HAS_BIAS: tl.constexpr, STORE: tl.constexpr, MUL_W: tl.constexpr, SPLIT: tl.constexpr,
                    FUSE_COMB: tl.constexpr,
                    SWAP: tl.constexpr, EVEN_K: tl.constexpr, PREFETCH: tl.constexpr, FASTDEC: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr = False):
    # MoE GEMM2 / grouped GEMM / linear: optional prologue QDQ, weight dequant in registers,
    # fp32 accumulation, one rounding; STORE 0: rows at their id, 1: fp32 atomics into
    # out[id // TOPK] (times the router weight when MUL_W), 2: fp32 partial sums of K split
    # pid_k (grid axis 2) at padded row positions, for combine_kernel -- or, FUSE_COMB, the
    # program that stores a token's last partial combines its row into y
{_ind(body)}
"""


_COMBINE_KERNEL = """@triton.jit(do_not_specialize=["T", "PROWS"])
def combine_kernel(part_ptr, pos_ptr, bexp_ptr, tw_ptr, bias_ptr, out_ptr, T, H, PROWS, TOPK: tl.constexpr,
                   SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, MUL_W: tl.constexpr, BM: tl.constexpr,
                   BH: tl.constexpr, PDL: tl.constexpr = False):
    # MoE output of token t: sum over its top-k slots j (in order, fp32) of
    # rnd(sum of GEMM2's SPLIT partial sums (+ bias)) (* router weight): the reference's
    # per-slot rounding and summation order, one launch (no atomics, no memset, no cast)
    if PDL:  # see _PDL_ENTRY in render.py
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    t = tl.program_id(0)
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    cm = cols < H
    y = tl.zeros([BH], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        r = t * TOPK + j
        pos = tl.load(pos_ptr + r)
        ok = pos < PROWS
        p = tl.where(ok, pos, 0)
        acc = tl.zeros([BH], dtype=tl.float32)
        for s in tl.static_range(SPLIT):
            acc += tl.load(part_ptr + (s * PROWS + p) * H + cols, mask=cm & ok, other=0.0)
        if HAS_BIAS:
            e = tl.load(bexp_ptr + p // BM)
            acc = acc + tl.load(bias_ptr + e.to(tl.int64) * H + cols, mask=cm & ok, other=0.0).to(tl.float32)
        c = tl.where(ok, _rnd(acc), 0.0)  # a row of no local expert is zeros, as in the reference
        if MUL_W:
            c = c * tl.load(tw_ptr + r).to(tl.float32)
        y += c
    tl.store(out_ptr + t.to(tl.int64) * H + cols, _rnd(y).to(out_ptr.dtype.element_ty), mask=cm)
"""


_QDQ_KERNEL = """@triton.jit(do_not_specialize=["M"])
def qdq_kernel(x_ptr, out_ptr, gs_ptr, M, K, STATIC_A: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    # standalone activation fake-QDQ of a [M, K] tensor (debugging and prequantization)
    offs = tl.program_id(0) * BM + tl.arange(0, BM)
    kk = tl.program_id(1) * BK + tl.arange(0, BK)
    m = (offs < M)[:, None] & (kk < K)[None, :]
    x = tl.load(x_ptr + offs[:, None] * K + kk[None, :], mask=m, other=0.0).to(tl.float32)
    if STATIC_A:
        g = tl.load(gs_ptr)
    else:
        g = GS_DYNAMIC
    tl.store(out_ptr + offs[:, None] * K + kk[None, :], _qdq_a(x, g, BM, BK), mask=m)
"""


def _prequant_kernel(spec: KernelSpec) -> str:
    op = spec.op
    g = _a_scale_prologue(op.act_kind, spec.a1_static, "gs_ptr", "g")
    return f"""@triton.jit(do_not_specialize=["M"])
def prequant_kernel(x_ptr, stride_x, tw_ptr, gs_ptr, out_ptr, stride_o, M, K, TOPK: tl.constexpr,
                    RW: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    _prequant_tile(x_ptr, stride_x, tw_ptr, gs_ptr, out_ptr, stride_o, M, K, tl.program_id(0), tl.program_id(1),
                   TOPK, RW, BM, BK)


@triton.jit(do_not_specialize=["M", "R", "NG"])
def prep_kernel(x_ptr, stride_x, tw_ptr, gs_ptr, out_ptr, stride_o, M, K, NQK,
                ids_ptr, map_ptr, sorted_ptr, bexp_ptr, pos_ptr, R, E, NG, P, MAXB,
                TOPK: tl.constexpr, RW: tl.constexpr, BMQ: tl.constexpr, BKQ: tl.constexpr,
                HAS_MAP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, LOG_BN: tl.constexpr,
                BE: tl.constexpr, BF: tl.constexpr, PDL: tl.constexpr = False):
    # decode's routing prep (program 0: routing.moe_align_sort) and the GEMM1 input rows'
    # fake-quant (programs 1..: prequant tiles, NQK per row block) in one launch
    if PDL:  # see _PDL_ENTRY in render.py
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    if pid == 0:
        moe_align_sort(ids_ptr, map_ptr, sorted_ptr, bexp_ptr, pos_ptr, R, E, NG, P, MAXB, HAS_MAP, BM, BN,
                       LOG_BN, BE, BF)
    else:
        _prequant_tile(x_ptr, stride_x, tw_ptr, gs_ptr, out_ptr, stride_o, M, K, (pid - 1) // NQK, (pid - 1) % NQK,
                       TOPK, RW, BMQ, BKQ)


@triton.jit
def _prequant_tile(x_ptr, stride_x, tw_ptr, gs_ptr, out_ptr, stride_o, M, K, pid_m, pid_k, TOPK: tl.constexpr,
                   RW: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    # MoE GEMM1 input rows, fake-quantized once (not once per N tile): out[r] = QDQ_a1(x[r // TOPK]
    # (* router weight r when RW)), the same ops as gemm_act_kernel's in-loop prologue
    offs = pid_m * BM + tl.arange(0, BM)
    kk = pid_k * BK + tl.arange(0, BK)
    rmask = offs < M
    m = rmask[:, None] & (kk < K)[None, :]
    a = tl.load(x_ptr + (offs // TOPK)[:, None] * stride_x + kk[None, :], mask=m, other=0.0).to(tl.float32)
    if RW:
        tw = _rnd(tl.load(tw_ptr + offs, mask=rmask, other=0.0).to(tl.float32))
        a = _rnd(a * tw[:, None])
    {g}
    a = _qdq_a(a, g, BM, BK)
    tl.store(out_ptr + offs[:, None] * stride_o + kk[None, :], a, mask=m)
"""


def render(spec: KernelSpec) -> str:
    """The Triton module source for `spec` (deterministic: same spec, same text)."""
    op = spec.op
    wfmt: BlockFormat = FORMATS[op.weight_fmt]
    parts = [
        # "emu_inductor.codegen" is this package's former name; kept in the header so the
        # generated text (and the cache digests, codegen snapshots) stays byte-identical
        f'"""Generated by emu_inductor.codegen (template v{TEMPLATE_VERSION}); do not edit.\n\n'
        f"kernel spec: {spec.to_json()}\n"
        f'"""\n',
        "import triton\nimport triton.language as tl\n\nfrom emu_inductor.kernels.routing import moe_align_sort\n",
        f"SIXTH = tl.constexpr({_f(1.0 / _E2M1_MAX)})  # fp32(1/6), a multiplier as vLLM uses it\n",
        _rnd_helper(spec),
        _dot_helper(spec),
        "@triton.jit\ndef _pow2(e):\n    # 2^e as fp32 for int32 e in [-126, 127], from the exponent bits\n"
        "    return ((e + 127) << 23).to(tl.float32, bitcast=True)\n",
        _decode(wfmt.element, "_decode_w"),
    ]
    rounders = []  # (element, rounding) pairs, each rendered once
    if op.act_kind == "fp8_tensor" or (op.act_kind == "block" and not FORMATS[op.act_fmt].is_mx):
        rounders.append((E4M3, "rne"))  # NVFP4 block scales / per-tensor fp8 use E4M3 RNE
    if op.act_kind == "fp8_tensor":
        rounders.append((E4M3, op.act_rounding))
    if op.act_kind == "block":
        rounders.append((FORMATS[op.act_fmt].element, op.act_rounding))
    if not wfmt.is_mx:
        parts.append(_decode(E4M3, "_decode_e4m3"))
    for el, rd in dict.fromkeys(rounders):
        parts.append(_round_elem(el, rd))
    if wfmt.is_mx or (op.act_kind == "block" and FORMATS[op.act_fmt].is_mx):
        parts.append(_E8M0)
    if wfmt.is_mx and op.w_e8m0_byte255 != "nan":
        parts.append(_E8M0_W_INF if op.w_e8m0_byte255 == "inf" else _E8M0_W_LDEXP)
    if op.act_kind == "block":
        afmt = FORMATS[op.act_fmt]
        if afmt.is_mx:
            parts.append(_e8m0_scale(afmt.element, op.act_scale_mode or "floor", spec.dtype))
    parts.append(_qdq_helper(spec))
    parts.append(_act_helper(spec))
    parts.append(_w_tile_helper(spec, "_w_tile1", spec.alpha1))
    parts.append(_w_tile_helper(spec, "_w_tile2", spec.alpha2))
    parts.append(KMASK)
    kinds = {fast_decode_kind(spec, a) for a in (spec.alpha1, spec.alpha2)} - {""}
    if kinds:
        parts.append(WORDS_IN_K_ORDER)
    if "mx" in kinds:
        parts.append(E2M1_FAST)
    if "nv" in kinds:
        parts.append(E2M1_NV_FAST)
        parts.append(scale_by_bits(wfmt.scale.element))
    parts.append(_gemm_act_kernel(spec))
    parts.append(_act_epilogue_kernel(spec))
    parts.append(_dequant_kernel(spec))
    parts.append(_gemm_out_kernel(spec))
    parts.append(_COMBINE_KERNEL)
    gs_dyn = ("_fp8_scale(tl.load(gs_ptr))" if op.act_kind == "fp8_tensor" else
              "tl.load(gs_ptr)" if op.act_kind == "block" else "0.0")
    parts.append(_QDQ_KERNEL.replace("GS_DYNAMIC", gs_dyn))
    parts.append(_prequant_kernel(spec))
    return "\n\n".join(p.rstrip("\n") + "\n" for p in parts)
