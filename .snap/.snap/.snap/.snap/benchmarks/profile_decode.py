"""Decode profile (issue 9, item 1): where the time of one MoE layer goes at 1-32 tokens.

    PYTHONPATH=. python3 benchmarks/profile_decode.py [--shape qwen3] [--scheme nvfp4_w4a4]
                                                      [--tokens 1,32] [--out DIR] [--ncu-target]

For each token count, in one run on the GPU:
  layer    the whole compiled layer (router, routing, both GEMMs, combine) through
           torch.compile(backend="mxemu"): wall time with eager launches, replay time of
           a manually captured CUDA graph, and torch.profiler's list of every kernel it
           launches (calls per step, device us per step);
  kernels  mxemu::moe's launcher alone (validated and not), same three views;
  floor    the touched experts' packed weights + scales over the copy bandwidth
           measured in the same run, and each GEMM kernel's achieved bandwidth.
`--ncu-target` only runs the kernels a few times (the process that `ncu` profiles; see
gpu_session.sh). Writes profile_decode_<device>.json under --out (default $OUT or
benchmarks/results) after every token count, so a time limit keeps what was measured.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from emu_inductor.demo import DemoConfig, _mxemu_backend, build_default_model  # noqa: E402
from emu_inductor.spec import SCHEMES  # noqa: E402

SHAPES = {"qwen3": (128, 8, 2048, 768), "gpt_oss": (32, 4, 2880, 2880), "mixtral": (8, 2, 4096, 14336),
          "deepseek": (256, 8, 7168, 2048)}


def device_slug() -> str:
    return torch.cuda.get_device_name().split()[-1].lower() if torch.cuda.is_available() else "cpu"


def copy_bandwidth() -> float:
    import triton.testing as tt

    a = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    t = tt.do_bench(lambda: b.copy_(a), warmup=5, rep=50)
    del a, b
    return 2 * (1 << 28) * 4 / (t * 1e-3)


def packed_bytes(scheme: str, H: int, I: int) -> int:
    fmt = SCHEMES[scheme].weight_fmt
    per = lambda N, K: N * fmt.packed_size(K) + N * (K // fmt.block_size)  # noqa: E731
    return per(2 * I, H) + per(H, I)


def graph_of(fn):
    """Capture fn() into a CUDA graph (after warm-up on a side stream); returns replay()."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def median_ms(fn, iters=200, warmup=20) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    ts = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return ts[len(ts) // 2]


def kernel_table(fn, steps=20) -> list[dict]:
    """Every device kernel / memset / memcpy fn() causes: calls and device us per step."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    agg = collections.defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            a = agg[ev.name]
            a[0] += 1
            a[1] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
    rows = [{"kernel": k[:160], "calls_per_step": c / steps, "us_per_step": t / steps} for k, (c, t) in agg.items()]
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3", choices=sorted(SHAPES))
    ap.add_argument("--scheme", default="nvfp4_w4a4")
    ap.add_argument("--tokens", default="1,32")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--ncu-target", action="store_true", help="only run the kernels (for ncu)")
    ap.add_argument("--skip-layer", action="store_true")
    args = ap.parse_args()
    import triton

    E, k, H, I = SHAPES[args.shape]
    tokens = [int(t) for t in args.tokens.split(",")]
    cfg = DemoConfig(num_experts=E, top_k=k, hidden=H, intermediate=I, tokens=max(tokens), scheme=args.scheme,
                     device="cuda", compile=False)
    model, _, _ = build_default_model(cfg)
    ex = model.experts
    from emu_inductor.ops.triton_impl import moe_triton
    from emu_inductor.spec import OpSpec

    spec = OpSpec.from_scheme(args.scheme)

    def moe_fn(x, validate):
        w, ids = model.route(x)
        return lambda: moe_triton(x, ex.w13, ex.w13_scale, getattr(ex, "w13_alpha", None), ex.w2, ex.w2_scale,
                                  getattr(ex, "w2_alpha", None), w, ids, getattr(ex, "a1_global_scale", None),
                                  getattr(ex, "a2_global_scale", None), None, spec, validate=validate)

    gen = torch.Generator(device="cuda").manual_seed(0)
    if args.ncu_target:
        for T in tokens:
            x = torch.randn(T, H, device="cuda", generator=gen).bfloat16()
            f = moe_fn(x, False)
            for _ in range(3):  # autotune + compile outside the profiled range
                f()
            torch.cuda.synchronize()
            torch.cuda.profiler.start()  # ncu --profile-from-start off
            f()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        return

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "shape": dict(name=args.shape, E=E, top_k=k, H=H, I=I), "scheme": args.scheme,
           "timing": "median of CUDA-event times; graph = replay of a manually captured CUDA graph",
           "copy_bandwidth_GBps": copy_bandwidth() / 1e9, "rows": []}
    bw = res["copy_bandwidth_GBps"] * 1e9
    out_path = os.path.join(args.out, f"profile_decode_{args.shape}_{args.scheme}_{device_slug()}.json")
    os.makedirs(args.out, exist_ok=True)
    mx = None
    with torch.no_grad():
        if not args.skip_layer:
            torch._dynamo.reset()
            mx = torch.compile(model, backend=_mxemu_backend(), dynamic=False)
        for T in tokens:
            t0 = time.time()
            x = torch.randn(T, H, device="cuda", generator=gen).bfloat16()
            w, ids = model.route(x)
            touched = int(torch.unique(ids).numel())
            floor_ms = touched * packed_bytes(args.scheme, H, I) / bw * 1e3
            row = {"tokens": T, "touched_experts": touched, "floor_mem_ms": floor_ms}
            for name, validate in (("kernels", False), ("kernels_validated", True)):
                f = moe_fn(x, validate)
                f()
                row[f"{name}_eager_ms"] = median_ms(f, iters=100)
                row[f"{name}_graph_ms"] = median_ms(graph_of(f))
                row[f"{name}_table"] = kernel_table(f)
            if mx is not None:
                y_ref = model(x)
                y = mx(x)
                row["layer_max_abs_diff_vs_eager"] = (y.float() - y_ref.float()).abs().max().item()
                lf = lambda: mx(x)  # noqa: E731
                row["layer_eager_ms"] = median_ms(lf, iters=100)
                row["layer_graph_ms"] = median_ms(graph_of(lf))
                row["layer_table"] = kernel_table(lf)
            row["kernels_pct_floor"] = 100 * floor_ms / row["kernels_graph_ms"]
            if "layer_graph_ms" in row:
                row["layer_pct_floor"] = 100 * floor_ms / row["layer_graph_ms"]
            row["seconds"] = time.time() - t0
            res["rows"].append(row)
            with open(out_path, "w") as fh:
                json.dump(res, fh, indent=1)
            print(f"T={T}: floor {floor_ms * 1e3:.1f} us | kernels graph {row['kernels_graph_ms'] * 1e3:.1f} us "
                  f"(validated {row['kernels_validated_graph_ms'] * 1e3:.1f}) | layer graph "
                  f"{row.get('layer_graph_ms', float('nan')) * 1e3:.1f} us eager {row.get('layer_eager_ms', float('nan')) * 1e3:.1f} us",
                  flush=True)
            for tname in ("kernels_table", "layer_table"):
                for r in row.get(tname, [])[:12]:
                    print(f"   {tname[:6]} {r['us_per_step']:8.1f} us  x{r['calls_per_step']:.0f}  {r['kernel'][:90]}")
    print("wrote", out_path)


if __name__ == "__main__":
    main()
