"""Offline SASS of a generated GEMM kernel's K loop (no GPU needed): compiles the kernel for
sm_90 with Triton's bundled ptxas, disassembles it with the bundled nvdisasm and counts the
instructions of the main loop (the longest backward branch) by opcode.

    PYTHONPATH=. python3 benchmarks/sass_loop.py [--scheme nvfp4_w4a4] [--kernel gemm_out]
        [--tile BM,BN,BK,warps,stages] [--prefetch 1] [--swap 0] [--sass OUT.sass]

The prefill and decode GEMMs are issue-bound on the in-register weight decode (docs/kernels.md),
so instructions per decoded weight element -- loop instructions / (BN * BK / threads) -- is
the figure a decode change must lower; this measures it on a CPU machine before spending
device time.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from emu_inductor.kernels.launch import get_module, kernel_spec_for  # noqa: E402
from emu_inductor.kernels.render_helpers import fast_decode_supported  # noqa: E402
from emu_inductor.spec import SCHEMES, OpSpec  # noqa: E402

_PTRS = {"a_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*u8", "alpha_ptr": "*fp32", "ids_ptr": "*i32",
         "bexp_ptr": "*i32", "tw_ptr": "*fp32", "gs_ptr": "*fp32", "gs1_ptr": "*fp32", "gs2_ptr": "*fp32",
         "bias_ptr": "*fp32", "out_ptr": "*fp32", "dbg_a_ptr": "*fp32", "dbg_c_ptr": "*fp32",
         "amax_ptr": "*fp32", "part_ptr": "*fp32", "cnt_base": "*i32", "pos_ptr": "*i64", "y_ptr": "*bf16"}
_ALIGNED = ("stride_a", "stride_o", "K", "NOUT", "NW", "stride_we", "stride_wn", "stride_se", "stride_sn")


def compile_sass(scheme: str, kernel: str, tile, prefetch: int, swap: int, fastdec: bool = True,
                 maxnreg: int = 0) -> tuple[str, int]:
    BM, BN, BK, warps, stages = tile
    spec = OpSpec.from_scheme(scheme)
    nv = SCHEMES[scheme].weight_fmt.has_global_scale
    act = spec.act_kind != "none"
    ks = kernel_spec_for(spec, torch.bfloat16, "expert" if nv else "none", "expert" if nv else "none",
                         nv and act, nv and act, torch.device("cuda"))
    fn = getattr(get_module(ks), kernel)
    names = fn.arg_names
    const = dict(TOPK=8, A_INDEX=2 if kernel == "gemm_out_kernel" else 0, QDQ_A=False, STATIC_A=False,
                 HAS_BIAS=False, STORE=1, MUL_W=True, SWAP=swap, EVEN_K=True, PREFETCH=bool(prefetch), DEBUG=False,
                 AMAX_OUT=False, PREQ=act, SPLIT=1, FUSE_EPI=False, FUSE_COMB=False, FASTDEC=fastdec and fast_decode_supported(ks), BM=BM, BN=BN, BK=BK)
    sig = {n: _PTRS.get(n, "constexpr" if n in const else "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n in _PTRS or n in _ALIGNED}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items() if k in names}, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {})})
    d = tempfile.mkdtemp()
    path = os.path.join(d, "k.cubin")
    with open(path, "wb") as f:
        f.write(k.asm["cubin"])
    nvd = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    return subprocess.run([nvd, "-c", path], capture_output=True, text=True, check=True).stdout, warps * 32


def loop_opcodes(sass: str) -> collections.Counter:
    """Opcode counts of the longest backward branch's body (the K loop)."""
    labels, addr, pending = {}, [], []
    for line in sass.splitlines():
        lm = re.match(r"^(\.L_x_\d+):", line.strip())
        if lm:
            pending.append(lm.group(1))
            continue
        m = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(.*?);", line)
        if m:
            a = int(m.group(1), 16)
            for p in pending:
                labels[p] = a
            pending = []
            addr.append((a, m.group(2)))
    best = None
    for a, ins in addr:
        m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", ins)
        if m and m.group(1) in labels and labels[m.group(1)] < a:
            if best is None or a - labels[m.group(1)] > best[1] - best[0]:
                best = (labels[m.group(1)], a)
    if best is None:
        return collections.Counter()
    body = [ins for a, ins in addr if best[0] <= a <= best[1]]
    return collections.Counter(re.sub(r"\..*", "", re.sub(r"^@!?U?P[T0-9]+\s+", "", ins).split()[0]) for ins in body)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scheme", default="nvfp4_w4a4")
    ap.add_argument("--kernel", default="gemm_out", choices=["gemm_out", "gemm_act"])
    ap.add_argument("--tile", default="64,64,64,4,4")
    ap.add_argument("--prefetch", type=int, default=1)
    ap.add_argument("--swap", type=int, default=0)
    ap.add_argument("--fastdec", type=int, default=1, help="the inline-PTX MX decode where it applies")
    ap.add_argument("--maxnreg", type=int, default=0, help="register cap (TileConfig.maxnreg)")
    ap.add_argument("--sass", help="also write the whole SASS here")
    args = ap.parse_args()
    tile = [int(v) for v in args.tile.split(",")]
    sass, threads = compile_sass(args.scheme, f"{args.kernel}_kernel", tile, args.prefetch, args.swap,
                                 bool(args.fastdec), args.maxnreg)
    if args.sass:
        with open(args.sass, "w") as f:
            f.write(sass)
    ops = loop_opcodes(sass)
    n = sum(ops.values())
    per = tile[1] * tile[2] * (2 if args.kernel == "gemm_act" else 1) / threads
    print(f"{args.scheme} {args.kernel} tile={args.tile} prefetch={args.prefetch} swap={args.swap}: "
          f"fastdec={args.fastdec}: {n} loop instructions per thread per K step, {per:.0f} weight elements each: {n / per:.1f} per element")
    for op, c in ops.most_common(20):
        print(f"  {op:10s} {c:5d}  {c / per:5.2f}/element")


if __name__ == "__main__":
    main()
