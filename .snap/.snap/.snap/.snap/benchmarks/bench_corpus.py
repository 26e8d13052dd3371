"""Other people's emulation at real shapes: eager vs stock torch.compile vs backend="mxemu".

The layers are tests/corpus's entries (torchao / compressed-tensors / ModelOpt / gpt-oss /
Quark / vLLM / microxcaling styles and the respellings), built at a real model's widths
through EMU_CORPUS_DIMS. For each entry and token count it records the fusion counters of
the mxemu compile, the relative error of stock and mxemu against eager, and median ms of
eager, stock compile, mxemu, and all three replayed from a manual CUDA graph (where
capture works: library code that copies a CPU table per call cannot be captured) that
holds --graph-calls back-to-back calls (median replay time / calls: the device time
of one call without Python or cudagraph-tree overhead, which at 1 token is ~0.1 ms per call
and hides the difference being measured). Rows are appended to the JSON as they finish, so a time limit
still leaves every finished row (issue 8 item 9).

    PYTHONPATH=. python3 benchmarks/bench_corpus.py [--shape qwen3|gpt_oss|tiny] [--quick]
        [--entries NAME ...] [--tokens 1 32 2048] [--out DIR]

--quick: two linear entries and one MoE entry, 1 and 32 tokens (under a minute of timing
after compilation). Entries whose library is not installed are skipped with the reason.
Library code that Dynamo cannot trace whole (graph breaks) is measured as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

from corpus_dims import SHAPES, corpus_dims_env  # noqa: E402  (benchmarks/ is the script dir)

QUICK = ["resp_all_slots", "vllm_nvfp4_linear", "resp_moe_chunk"]
DEFAULT = [  # most informative first: a time limit keeps the rows already written
    "vllm_nvfp4_linear", "gptoss_mxfp4_linear", "resp_all_slots", "quark_mxfp4_linear",
    "resp_moe_chunk", "vllm_mxfp4_linear", "microxcaling_mx_linear", "resp_vllm_nvfp4_where",
    "resp_e8m0_frexp", "resp_round_bucketize", "gptoss_mxfp4_moe", "torchao_nvfp4_moe",
]


def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--entries", nargs="+")
    p.add_argument("--tokens", nargs="+", type=int)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--tag", default="", help="suffix of the JSON file name (a second run at the same shape)")
    p.add_argument("--graph-calls", type=int, default=20,
                   help="calls captured in one CUDA graph for the *_graph_ms columns")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    return p.parse_args()


ARGS = _parse()
os.environ["EMU_CORPUS_DIMS"] = corpus_dims_env(ARGS.shape)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402

import emu_inductor  # noqa: E402
from tests import corpus  # noqa: E402
from tests.corpus.placement import build_on  # noqa: E402


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_ms(fn, x, iters):
    for _ in range(3):
        fn(x)
    _sync()
    ts = []
    for _ in range(iters):
        if torch.cuda.is_available():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(x)
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn(x)
            ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def graph_ms(fn, x, calls, iters):
    """Device ms per call of fn(x), from a CUDA graph of `calls` back-to-back calls.

    Warm-up runs on a side stream first (compilation and autotuning must not happen inside
    the capture). Inputs stay fixed, as they do in a decode step's graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn(x)
    for _ in range(3):
        g.replay()
    _sync()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / calls)
    ts.sort()
    del g
    return ts[len(ts) // 2]


def rel_err(y, ref):
    y, ref = y.float(), ref.float()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def mxemu_counts():
    from torch._dynamo.utils import counters

    return {k: v for k, v in counters["mxemu"].items() if k != "pass_runs"}


def run_entry(entry, dev, tokens, iters):
    from torch._dynamo.utils import counters

    module = build_on(entry, dev)
    rows = []
    for T in tokens:
        try:
            torch._dynamo.reset()
            g = torch.Generator(device=dev).manual_seed(T)
            x = (torch.randn(T, corpus.H, generator=g, device=dev) * 0.5).to(torch.bfloat16)
            row = {"entry": entry.name, "kind": entry.kind, "library": entry.library, "tokens": T}
            with torch.no_grad():
                ref = module(x)
                row["eager_ms"] = median_ms(module, x, max(3, iters // 4))
                stock = torch.compile(module, backend="inductor")
                t0 = time.perf_counter()
                y = stock(x)
                row["stock_compile_s"] = time.perf_counter() - t0
                row["stock_rel_err"] = rel_err(y, ref)
                row["stock_ms"] = median_ms(stock, x, iters)
                counters.clear()
                mx = torch.compile(module, backend="mxemu")
                t0 = time.perf_counter()
                y = mx(x)
                row["mxemu_compile_s"] = time.perf_counter() - t0
                row["fused"] = mxemu_counts()
                row["mxemu_rel_err"] = rel_err(y, ref)
                row["mxemu_max_abs_diff"] = float((y.float() - ref.float()).abs().max())
                row["mxemu_ms"] = median_ms(mx, x, iters)
                if dev == "cuda":
                    for name, fn in (("eager_graph_ms", module), ("stock_graph_ms", stock), ("mxemu_graph_ms", mx)):
                        try:
                            row[name] = graph_ms(fn, x, ARGS.graph_calls, iters)
                        except Exception as e:  # capture can fail on library code; record why
                            row[name + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            best_stock = min(v for k, v in row.items() if k in ("stock_ms", "stock_graph_ms"))
            best_mx = min(v for k, v in row.items() if k in ("mxemu_ms", "mxemu_graph_ms"))
            row["speedup_vs_stock"] = best_stock / best_mx
            rows.append(row)
            print(json.dumps(row), flush=True)
        except Exception as e:  # e.g. a gather + bmm layer out of memory at 2048 tokens
            rows.append({"entry": entry.name, "kind": entry.kind, "tokens": T,
                         "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print("error", entry.name, T, rows[-1]["error"], flush=True)
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


def main():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    names = ARGS.entries or (QUICK if ARGS.quick else DEFAULT)
    tokens = ARGS.tokens or ((1, 32) if ARGS.quick else (1, 32, 2048))
    if dev == "cpu" and ARGS.shape != "tiny":
        print("no GPU: use --shape tiny on the CPU", file=sys.stderr)
        return 2
    res = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
           "triton": triton.__version__, "shape": dict(zip(("H", "I", "E", "top_k"), SHAPES[ARGS.shape])),
           "shape_name": ARGS.shape, "timing": ("median ms (CUDA events around each call); *_graph_ms: median replay of a manual "
                      f"CUDA graph of {ARGS.graph_calls} calls / {ARGS.graph_calls}"),
           "rows": [], "skipped": {}}
    os.makedirs(ARGS.out, exist_ok=True)
    slug = "cpu" if dev == "cpu" else res["device"].split()[-1].lower()
    path = os.path.join(ARGS.out, f"corpus_{ARGS.shape}_{slug}{'_quick' if ARGS.quick else ''}{'_' + ARGS.tag if ARGS.tag else ''}.json")
    for name in names:
        entry = corpus.BY_NAME.get(name)
        if entry is None:
            res["skipped"][name] = "not in the corpus (library not importable here?)"
            continue
        try:
            res["rows"].extend(run_entry(entry, dev, tokens, ARGS.iters))
        except Exception as e:
            res["skipped"][name] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
    print(f"{'entry':28} {'T':>5} {'fused':24} {'eager':>8} {'stock':>8} {'mxemu':>8} {'st+graph':>8} "
          f"{'mx+graph':>8} {'x stock':>7}")
    for r in res["rows"]:
        if "error" in r:
            print(f"{r['entry']:28} {r['tokens']:5d} {r['error'][:80]}")
            continue
        print(f"{r['entry']:28} {r['tokens']:5d} {str(r['fused'])[:24]:24} {r['eager_ms']:8.3f} "
              f"{r['stock_ms']:8.3f} {r['mxemu_ms']:8.3f} {r.get('stock_graph_ms', float('nan')):8.3f} "
              f"{r.get('mxemu_graph_ms', float('nan')):8.3f} "
              f"{r['speedup_vs_stock']:7.2f}")
    for k, v in res["skipped"].items():
        print("skipped", k, v)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
