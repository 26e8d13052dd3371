"""Where the host time of one compiled call goes, at 1 token (no CUDA graphs).

Without CUDA graphs a decode step is bound by host work: bench_corpus measured mxemu
linears at ~0.45 ms per call against ~0.1 ms for stock compile on the H200. This script
compiles corpus entries at a real model's widths with backend="mxemu" (and stock), then
runs cProfile over many calls and prints the functions with the most own time, plus the
device kernels one call launches (torch.profiler), so the overhead can be attributed.

    PYTHONPATH=. python3 benchmarks/profile_overhead.py [--shape qwen3] [ENTRY ...]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

from corpus_dims import SHAPES, corpus_dims_env  # noqa: E402  (benchmarks/ is the script dir)

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("entries", nargs="*", default=["vllm_mxfp4_linear", "gptoss_mxfp4_moe"])
p.add_argument("--shape", default="qwen3", choices=sorted(SHAPES))
p.add_argument("--calls", type=int, default=200)
p.add_argument("--top", type=int, default=30)
ARGS = p.parse_args()
os.environ["EMU_CORPUS_DIMS"] = corpus_dims_env(ARGS.shape)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import emu_inductor  # noqa: E402,F401
from tests import corpus  # noqa: E402
from tests.corpus.placement import build_on  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def host_us(fn, x, calls):
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(x)
    sync()
    return (time.perf_counter() - t0) / calls * 1e6


def kernels_per_call(fn, x):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(5):
            fn(x)
        sync()
    rows = []
    for e in prof.key_averages():
        dev_us = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0))
        if DEV == "cuda" and dev_us and e.count:
            rows.append((e.key[:70], e.count / 5, dev_us / 5))
    return sorted(rows, key=lambda r: -r[2])


def direct_layers():
    """Host us per call of the linear op one layer down at a time (w_mxfp4, [1, H] @ [2I, H]):
    the dispatcher's op, the validated launcher, the bare launcher with the config fixed."""
    from emu_inductor.formats.quantize import quantize
    from emu_inductor.kernels import launch
    from emu_inductor.kernels.autotune import pinned_config  # noqa: F401
    from emu_inductor.ops.triton_impl import linear_triton
    from emu_inductor.spec.opspec import OpSpec

    spec = OpSpec.from_scheme("w_mxfp4")
    q = quantize(torch.randn(2 * corpus.I, corpus.H, device=DEV), "mxfp4")
    x = (torch.randn(1, corpus.H, device=DEV) * 0.5).to(torch.bfloat16)
    s = spec.to_str()
    op = lambda x: torch.ops.mxemu.linear(x, q.qdata, q.scale, None, None, None, s)  # noqa: E731
    op(x)
    cfg = {}
    orig = launch._gemm_cfg

    def spy(*a, **k):
        cfg["c"] = orig(*a, **k)
        return cfg["c"]

    launch._gemm_cfg = spy
    op(x)
    launch._gemm_cfg = orig
    w = launch.GemmWeights(q.qdata, q.scale, None, None)
    rows = [("torch.ops.mxemu.linear", op),
            ("linear_triton (validated)", lambda x: linear_triton(x, q.qdata, q.scale, None, None, None, spec)),
            ("launch_linear (config chosen)", lambda x: launch.launch_linear(x, w, None, spec)),
            (f"launch_linear (config fixed {cfg.get('c')})", lambda x: launch.launch_linear(x, w, None, spec,
                                                                                      config=cfg.get("c")))]
    print("\n##### host us per call, one layer down at a time (w_mxfp4 linear, 1 token)")
    for label, fn in rows:
        print(f"   {host_us(fn, x, ARGS.calls):8.1f} us  {label}", flush=True)


def main():
    if DEV == "cuda":
        direct_layers()
    for name in ARGS.entries:
        entry = corpus.BY_NAME[name]
        module = build_on(entry, DEV)
        x = (torch.randn(1, corpus.H, device=DEV) * 0.5).to(torch.bfloat16)
        with torch.no_grad():
            for label, backend in (("stock", "inductor"), ("mxemu", "mxemu")):
                torch._dynamo.reset()
                fn = torch.compile(module, backend=backend)
                for _ in range(5):
                    fn(x)
                us = host_us(fn, x, ARGS.calls)
                print(f"\n##### {name} {label}: {us:.1f} us per call (host loop, sync at the end)", flush=True)
                for k, n, d in kernels_per_call(fn, x):
                    print(f"   {n:5.1f} x {d:8.1f} us  {k}")
                if label == "mxemu":
                    pr = cProfile.Profile()
                    pr.enable()
                    for _ in range(ARGS.calls):
                        fn(x)
                    sync()
                    pr.disable()
                    s = io.StringIO()
                    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(ARGS.top)
                    print(s.getvalue()[-9000:])
                    s = io.StringIO()
                    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(ARGS.top)
                    print(s.getvalue()[-9000:], flush=True)


if __name__ == "__main__":
    main()
