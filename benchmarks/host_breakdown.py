"""Host time of one fused call, layer by layer, down to the bare Triton launches (no CUDA graphs).

Without CUDA graphs a decode step is bound by host work. `profile_overhead.py` showed a fused
linear at ~350 us per op call and ~820 us per compiled call, where stock compile takes ~190 us.
This script splits that time without a profiler's distortion: each layer is timed on its own
(host loop of N calls, one sync at the end), and the Triton launches the layer makes are
captured and replayed bare -- through `JITFunction[grid](...)` and through the compiled
kernel's launcher directly -- so what is ours and what is Triton's is separated. Then the
compiled module's CPU-side profile (torch.profiler, CPU time per op) shows what the compiled
wrapper adds around the op.

    PYTHONPATH=. python3 benchmarks/host_breakdown.py [--calls 300] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--calls", type=int, default=300)
p.add_argument("--out", default=None, help="directory for host_breakdown_<device>.json")
p.add_argument("--tag", default="")
ARGS = p.parse_args()

from corpus_dims import corpus_dims_env  # noqa: E402

os.environ.setdefault("EMU_CORPUS_DIMS", corpus_dims_env("qwen3"))

import torch  # noqa: E402

import emu_inductor  # noqa: E402,F401
from emu_inductor.formats.quantize import quantize  # noqa: E402
from emu_inductor.kernels import launch, launch_common  # noqa: E402
from emu_inductor.ops.triton_impl import linear_triton, moe_triton  # noqa: E402
from emu_inductor.spec.opspec import OpSpec  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke test under TRITON_INTERPRET=1


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()
RESULTS: dict = {"rows": []}


def host_us(fn, calls=None):
    calls = calls or ARGS.calls
    for _ in range(3):
        fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync()
    return (time.perf_counter() - t0) / calls * 1e6


def row(group, label, us):
    print(f"  {us:8.1f} us  {label}", flush=True)
    RESULTS["rows"].append({"group": group, "what": label, "host_us": round(us, 2), "host_ms": round(us / 1e3, 5)})


class _Capture:
    """Wraps a JITFunction so `k[grid](*args, **kw)` records its launches (and still runs them)."""

    def __init__(self, jit, log):
        self.jit, self.log = jit, log

    def __getitem__(self, grid):
        def call(*args, **kw):
            self.log.append((self.jit, grid, args, kw))
            return self.jit[grid](*args, **kw)
        return call

    def __getattr__(self, name):
        return getattr(self.jit, name)


def capture_launches(fn):
    """The Triton launches one call of fn makes: [(jit, grid, args, kwargs)]."""
    log = []
    # the generated modules loaded so far (get_module's cache) and the routing / checks kernels
    mods = [m for m in sys.modules.values() if m is not None and hasattr(m, "gemm_out_kernel")]
    from emu_inductor.kernels import checks, routing
    mods += [checks, routing]
    saved = []
    for m in mods:
        for name in dir(m):
            obj = getattr(m, name)
            if type(obj).__name__ == "JITFunction" and name.endswith("_kernel"):
                saved.append((m, name, obj))
                setattr(m, name, _Capture(obj, log))
    try:
        fn()
        _sync()
    finally:
        for m, name, obj in saved:
            setattr(m, name, obj)
    return log


def bare_launches(group, log):
    """Each captured launch replayed through JITFunction[grid] and through its compiled
    kernel's launcher (bound arguments precomputed once)."""
    from triton import knobs
    from triton.runtime.driver import driver

    for jit, grid, args, kw in log:
        name = jit.__name__
        row(group, f"{name}[grid](...) (Triton's JITFunction.run)", host_us(lambda: jit[grid](*args, **kw)))
        from emu_inductor.kernels.fastlaunch import launch_kernel
        row(group, f"{name} through kernels.fastlaunch.launch_kernel",
            host_us(lambda: launch_kernel(jit, grid, *args, **kw)))
        try:
            kernel = jit.run(*args, grid=grid, warmup=False, **kw)
            dev = driver.active.get_current_device()
            binder = jit.device_caches[dev][4]
            bound, _, _ = binder(*args, **kw)
            vals = list(bound.values())
            stream = driver.active.get_current_stream(dev)
            g = tuple(grid) + (1,) * (3 - len(grid))

            def direct():
                kernel.run(g[0], g[1], g[2], stream, kernel.function, kernel.packed_metadata, None,
                           knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *vals)
            row(group, f"{name} compiled launcher, arguments bound once", host_us(direct))
            row(group, f"{name} binder only (specialisation of {len(vals)} arguments)",
                host_us(lambda: binder(*args, **kw)))
        except Exception as e:  # noqa: BLE001 -- a Triton internals change must not stop the run
            print(f"  direct launch of {name} failed: {type(e).__name__}: {e}")


def linear_layers():
    print("\n##### linear w_mxfp4, [1, 2048] @ [1536, 2048]^T", flush=True)
    spec = OpSpec.from_scheme("w_mxfp4")
    q = quantize(torch.randn(1536, 2048, device=DEV), "mxfp4")
    x = (torch.randn(1, 2048, device=DEV) * 0.5).to(torch.bfloat16)
    s = spec.to_str()
    torch.ops.mxemu.linear(x, q.qdata, q.scale, None, None, None, s)
    w = launch.GemmWeights(q.qdata, q.scale, None, None)
    cfg = {}
    orig = launch._gemm_cfg

    def spy(*a, **k):
        cfg["c"] = orig(*a, **k)
        return cfg["c"]
    launch._gemm_cfg = spy
    launch.launch_linear(x, w, None, spec)
    launch._gemm_cfg = orig
    c = cfg["c"]
    print("  config:", c)
    g = "linear"
    row(g, "torch.ops.mxemu.linear (dispatcher, custom_op)", host_us(
        lambda: torch.ops.mxemu.linear(x, q.qdata, q.scale, None, None, None, s)))
    row(g, "linear_triton (validated)", host_us(lambda: linear_triton(x, q.qdata, q.scale, None, None, None, spec)))
    row(g, "linear_triton (validate=False)", host_us(
        lambda: linear_triton(x, q.qdata, q.scale, None, None, None, spec, validate=False)))
    row(g, "launch_linear (config chosen)", host_us(lambda: launch.launch_linear(x, w, None, spec)))
    row(g, "launch_linear (config fixed)", host_us(lambda: launch.launch_linear(x, w, None, spec, config=c)))
    row(g, "torch.empty((1, 1536)) x1 (reference point)", host_us(
        lambda: torch.empty((1, 1536), dtype=torch.bfloat16, device=DEV)))
    log = capture_launches(lambda: launch.launch_linear(x, w, None, spec, config=c))
    bare_launches(g, log)


def moe_layers():
    print("\n##### MoE nvfp4_w4a4, Qwen3-30B-A3B, 1 token", flush=True)
    from tests.helpers import random_moe_case

    qe, x, tw, ids, _, _ = random_moe_case("nvfp4_w4a4", "silu", "host", E=128, H=2048, I=768, T=1, k=8)
    qe = qe.to(DEV)
    args = (x.to(DEV), qe.w13, qe.w13_scale, qe.w13_alpha, qe.w2, qe.w2_scale, qe.w2_alpha, tw.to(DEV),
            ids.to(DEV), qe.a1_global_scale, qe.a2_global_scale, None)
    spec = OpSpec.from_scheme("nvfp4_w4a4", activation="silu")
    moe_triton(*args, spec)
    g = "moe"
    s = spec.to_str()
    row(g, "torch.ops.mxemu.moe", host_us(lambda: torch.ops.mxemu.moe(*args, s)))
    row(g, "moe_triton (validated)", host_us(lambda: moe_triton(*args, spec)))
    row(g, "moe_triton (validate=False)", host_us(lambda: moe_triton(*args, spec, validate=False)))
    log = capture_launches(lambda: moe_triton(*args, spec, validate=False))
    print(f"  {len(log)} Triton launches per call: {[j.__name__ for j, *_ in log]}")
    bare_launches(g, log)


def compiled_table():
    from torch.profiler import ProfilerActivity, profile

    from tests import corpus
    from tests.corpus.placement import build_on

    for name in ("vllm_mxfp4_linear", "resp_moe_chunk"):
        module = build_on(corpus.BY_NAME[name], DEV)
        x = (torch.randn(1, corpus.H, device=DEV) * 0.5).to(torch.bfloat16)
        with torch.no_grad():
            for label, backend in (("stock", "inductor"), ("mxemu", "mxemu")):
                torch._dynamo.reset()
                fn = torch.compile(module, backend=backend)
                us = host_us(lambda: fn(x), 100)
                row(f"compiled {name}", f"{label}: whole compiled call", us)
                if label != "mxemu":
                    continue
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(20):
                        fn(x)
                    _sync()
                print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))


def main():
    for part in (linear_layers, moe_layers, compiled_table):
        try:
            part()
        except Exception as e:  # noqa: BLE001 -- keep the other parts
            import traceback
            traceback.print_exc()
            print(f"{part.__name__} failed: {type(e).__name__}: {e}")
    if ARGS.out:
        import triton
        RESULTS.update(device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu", torch=torch.__version__, triton=triton.__version__,
                       calls=ARGS.calls)
        slug = RESULTS["device"].split()[-1].lower()
        path = os.path.join(ARGS.out, f"host_breakdown{ARGS.tag}_{slug}.json")
        with open(path, "w") as f:
            json.dump(RESULTS, f, indent=1)
        print("wrote", path)


if __name__ == "__main__":
    main()
