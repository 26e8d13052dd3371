"""Prefill design probe (issue 10): which weight path can reach bf16 grouped-GEMM speed?

One GPU call, under a minute or two. For the MoE's two GEMM shapes (GEMM1: K=H, N=2I;
GEMM2: K=I, N=H) at prefill token counts, MXFP4 weights (E2M1 codes packed two per byte
along K, E8M0 scales per 32), bf16 activations already fake-quantized (as after prequant):

  gmm      torch._grouped_mm on weights dequantized beforehand (the bf16 bar)
  dq_gmm   a Triton dequantize of every expert into a bf16 workspace, then torch._grouped_mm
           (the "dequantize once per call" design: its cost = dequant traffic + gmm)
  ds       a Triton grouped GEMM whose K loop calls tl.dot_scaled(x, bf16; w, e2m1, e8m0):
           Triton's own in-register upcast, weights the B operand
  ds_swap  the same with the product swapped (weights the register A operand, out^T)

Plus the exactness of tl.dot_scaled's E2M1 x E8M0 decode: every packed byte under every
scale byte, read back through an identity activation, against this package's MXFP4
reference decode (what a kernel built on dot_scaled would have to equal).

    python benchmarks/prefill_probe.py [--quick] [--out DIR]
Writes prefill_probe_<device>.json (device, versions, shapes, median ms, % of the bf16 rate).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPES = {"Qwen3-30B-A3B": (128, 8, 2048, 768), "gpt-oss-20b": (32, 4, 2880, 2880)}
# (BM, BN, BK, warps, stages); for ds_swap BM is the token tile and BN the weight-row tile
DS_CONFIGS = [(128, 128, 128, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (64, 128, 128, 4, 4)]
SWAP_CONFIGS = [(64, 128, 128, 4, 4), (128, 128, 128, 8, 3), (128, 128, 64, 4, 4), (64, 64, 128, 4, 4)]


@triton.jit
def ds_gemm_kernel(x_ptr, w_ptr, s_ptr, o_ptr, bexp_ptr, brow_ptr, bend_ptr, N, K,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SWAP: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(bexp_ptr + pid_m)
    if e < 0:
        return
    r0 = tl.load(brow_ptr + pid_m)
    r1 = tl.load(bend_ptr + pid_m)
    rows = r0 + tl.arange(0, BM)
    rmask = rows < r1
    cols = pid_n * BN + tl.arange(0, BN)
    we = w_ptr + e.to(tl.int64) * N * (K // 2)
    se = s_ptr + e.to(tl.int64) * N * (K // 32)
    if SWAP:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        s = tl.load(se + cols[:, None] * (K // 32) + (k0 // 32 + tl.arange(0, BK // 32))[None, :])
        if SWAP:
            w = tl.load(we + cols[:, None] * (K // 2) + (k0 // 2 + tl.arange(0, BK // 2))[None, :])
            xt = tl.load(x_ptr + rows[None, :].to(tl.int64) * K + (k0 + tl.arange(0, BK))[:, None],
                         mask=rmask[None, :], other=0.0)
            acc = tl.dot_scaled(w, s, "e2m1", xt, None, "bf16", acc)
        else:
            w = tl.load(we + cols[None, :] * (K // 2) + (k0 // 2 + tl.arange(0, BK // 2))[:, None])
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + (k0 + tl.arange(0, BK))[None, :],
                        mask=rmask[:, None], other=0.0)
            acc = tl.dot_scaled(x, None, "bf16", w, s, "e2m1", acc)
    if SWAP:
        tl.store(o_ptr + rows[None, :].to(tl.int64) * N + cols[:, None], acc.to(tl.bfloat16), mask=rmask[None, :])
    else:
        tl.store(o_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], acc.to(tl.bfloat16), mask=rmask[:, None])


@triton.jit
def _e2m1(c):
    m = c & 7
    v = tl.where(m < 2, m.to(tl.float32) * 0.5, (2 + (m & 1)).to(tl.float32) * tl.exp2(((m >> 1) - 2).to(tl.float32)))
    return tl.where((c & 8) != 0, -v, v)


@triton.jit
def dequant_kernel(w_ptr, s_ptr, o_ptr, R, KH, BR: tl.constexpr, BKH: tl.constexpr):
    """[R, KH] packed bytes + [R, KH // 16] scale bytes -> [R, 2 KH] bf16 (low nibble first)."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    kb = tl.program_id(1) * BKH + tl.arange(0, BKH)
    b = tl.load(w_ptr + r[:, None].to(tl.int64) * KH + kb[None, :]).to(tl.int32)
    sb = tl.load(s_ptr + r[:, None].to(tl.int64) * (KH // 16) + (kb // 16)[None, :]).to(tl.int32)
    sc = tl.where(sb == 0, 0x00400000, sb << 23).to(tl.float32, bitcast=True)
    lo = (_e2m1(b & 15) * sc).to(tl.bfloat16)
    hi = (_e2m1(b >> 4) * sc).to(tl.bfloat16)
    out = tl.interleave(lo, hi)
    kk = tl.program_id(1) * 2 * BKH + tl.arange(0, 2 * BKH)
    tl.store(o_ptr + r[:, None].to(tl.int64) * (2 * KH) + kk[None, :], out)


def ref_decode(w, s, byte255="nan"):
    """[N, K/2] bytes, [N, K/32] scale bytes -> fp32 [N, K]: this package's MXFP4 reference decode."""
    from emu_inductor.formats import FORMATS
    from emu_inductor.reference.qdq import dequantize_weight
    return dequantize_weight(w, s, FORMATS["mxfp4"], e8m0_byte255=byte255).float()


def block_map(counts, BM, dev):
    bexp, brow, bend = [], [], []
    start = 0
    for e, c in enumerate(counts.tolist()):
        for r in range(start, start + c, BM):
            bexp.append(e), brow.append(r), bend.append(start + c)
        start += c
    t = lambda v: torch.tensor(v, dtype=torch.int32, device=dev)  # noqa: E731
    return t(bexp), t(brow), t(bend)


def decode_check(dev):
    """dot_scaled's decode of every (byte, scale byte) pair, both operand sides."""
    N, K = 256, 512
    w = torch.arange(256, dtype=torch.uint8, device=dev).repeat(N, 1)                 # every byte in each row
    s = ((torch.arange(N, device=dev)[:, None] + 16 * torch.arange(K // 32, device=dev)[None, :]) % 256).to(torch.uint8)
    res = {}
    for byte255 in ("nan", "inf"):
        ref = ref_decode(w, s, byte255)                                               # [N, K]
        res.update(_decode_check_one(dev, w, s, ref, N, K, byte255))
    return res


def _decode_check_one(dev, w, s, ref, N, K, byte255):
    bad_col = ~torch.isfinite(ref).all(1)                                             # NaN/Inf poison a dot's column
    want = torch.where(bad_col[:, None], torch.nan, ref).T.contiguous()               # eye @ W^T
    x = torch.eye(K, device=dev, dtype=torch.bfloat16)
    counts = torch.tensor([K])
    res = {}
    for swap in (0, 1):
        bexp, brow, bend = block_map(counts, 64, dev)
        o = torch.empty(K, N, device=dev, dtype=torch.bfloat16)
        ds_gemm_kernel[(len(bexp), N // 64)](x, w, s, o, bexp, brow, bend, N, K, BM=64, BN=64, BK=128, SWAP=swap)
        got = o.float()
        same = (got == want) | (torch.isnan(got) & torch.isnan(want))
        # where they differ: which scale bytes
        diff_scales = sorted(set(s.repeat_interleave(32, -1).T[~same].tolist()))
        res[f"swap{swap}_byte255_{byte255}"] = {"mismatches": int((~same).sum()), "of": same.numel(), "scale_bytes_differing": diff_scales[:40],
                              "finite_cols_exact": bool(same[:, ~bad_col].all())}
    return res


def bench(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args()
    dev = "cuda"
    torch.manual_seed(0)
    name = torch.cuda.get_device_name().replace(" ", "_")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "what": __doc__.split("\n")[0], "rows": []}
    path = os.path.join(a.out, f"prefill_probe_{'h200' if 'H200' in name else name}.json")

    def write():
        os.makedirs(a.out, exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    t0 = time.time()
    try:
        result["decode_check"] = decode_check(dev)
    except Exception as ex:  # the probe reports, it does not stop
        result["decode_check"] = {"error": repr(ex)[:500]}
    print("decode check", json.dumps(result["decode_check"]), flush=True)
    write()
    # bf16 rate in this run
    m = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    mm_ms = bench(lambda: m @ m)
    result["bf16_tflops"] = 2 * 8192 ** 3 / mm_ms / 1e9
    points = [("Qwen3-30B-A3B", 8192)] if a.quick else [("Qwen3-30B-A3B", 2048), ("Qwen3-30B-A3B", 8192),
                                                         ("gpt-oss-20b", 8192)]
    for shape, T in points:
        E, k, H, I = SHAPES[shape]
        if True:
            ids = torch.rand(T, E, device=dev).topk(k, -1).indices.flatten()
            counts = torch.bincount(ids, minlength=E).cpu()
            offs = counts.cumsum(0).to(torch.int32).to(dev)
            M = T * k
            for gname, N, K in (("gemm1", 2 * I, H), ("gemm2", H, I)):
                w = torch.randint(0, 256, (E, N, K // 2), dtype=torch.uint8, device=dev)
                s = torch.randint(118, 130, (E, N, K // 32), dtype=torch.uint8, device=dev)
                x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
                wd = torch.empty(E, N, K, device=dev, dtype=torch.bfloat16)
                dq = lambda: dequant_kernel[(E * N // 64, K // 2 // 64)](w, s, wd, E * N, K // 2, BR=64, BKH=64)  # noqa: E731
                dq()
                floor_ms = 2 * M * N * K / result["bf16_tflops"] / 1e9
                row = {"shape": shape, "E_k_H_I": [E, k, H, I], "tokens": T, "gemm": gname, "M": M, "N": N, "K": K,
                       "bf16_floor_ms": floor_ms}
                ref = torch._grouped_mm(x, wd.transpose(1, 2), offs=offs)
                row["gmm_ms"] = bench(lambda: torch._grouped_mm(x, wd.transpose(1, 2), offs=offs))
                row["dequant_ms"] = bench(dq)
                row["dq_gmm_ms"] = bench(lambda: (dq(), torch._grouped_mm(x, wd.transpose(1, 2), offs=offs)))
                for swap, cfgs in ((0, DS_CONFIGS), (1, SWAP_CONFIGS)):
                    best = None
                    for (BM, BN, BK, nw, ns) in (cfgs[:2] if a.quick else cfgs):
                        if N % BN or K % BK:
                            continue
                        bexp, brow, bend = block_map(counts, BM, dev)
                        o = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
                        fn = lambda: ds_gemm_kernel[(len(bexp), N // BN)](  # noqa: E731
                            x, w, s, o, bexp, brow, bend, N, K, BM=BM, BN=BN, BK=BK, SWAP=swap,
                            num_warps=nw, num_stages=ns)
                        try:
                            fn()
                            err = float((o.float() - ref.float()).abs().max() / ref.float().abs().max())
                            ms = bench(fn)
                        except Exception as ex:
                            row.setdefault("errors", []).append(f"swap{swap} {BM}x{BN}x{BK}/{nw}w/{ns}s: {repr(ex)[:200]}")
                            continue
                        row.setdefault("ds_all", []).append({"swap": swap, "cfg": [BM, BN, BK, nw, ns], "ms": ms, "rel_err": err})
                        if best is None or ms < best[0]:
                            best = (ms, [BM, BN, BK, nw, ns], err)
                    if best:
                        row[f"ds{'_swap' if swap else ''}_ms"], row[f"ds{'_swap' if swap else ''}_cfg"], _ = best
                for key in ("gmm_ms", "dq_gmm_ms", "ds_ms", "ds_swap_ms"):
                    if key in row:
                        row[key.replace("_ms", "_pct_bf16")] = round(100 * floor_ms / row[key], 1)
                result["rows"].append(row)
                write()
                print(f"{shape:14s} T={T:5d} {gname}: floor {floor_ms:.3f}  gmm {row['gmm_ms']:.3f}  dequant "
                      f"{row['dequant_ms']:.3f}  dq+gmm {row['dq_gmm_ms']:.3f}  ds {row.get('ds_ms', float('nan')):.3f} "
                      f"{row.get('ds_cfg')}  ds_swap {row.get('ds_swap_ms', float('nan')):.3f} {row.get('ds_swap_cfg')}"
                      f"  [{time.time() - t0:.0f}s]", flush=True)
                del w, s, x, wd
    write()


if __name__ == "__main__":
    main()
