"""A corpus MoE layer compiled again for a new token count (automatic dynamic shapes): does the
whole layer still fuse? Per entry: the compile sequence 1 -> 32 -> 2048 tokens without a reset
(fusion counters and error against eager at each), then explain(dynamic=True) at 32 tokens.

    PYTHONPATH=. python3 benchmarks/gpu_dynamic.py [--shape qwen3] ENTRY ...
"""

import argparse
import os
import sys

from corpus_dims import SHAPES, corpus_dims_env  # noqa: E402  (benchmarks/ is the script dir)
ap = argparse.ArgumentParser()
ap.add_argument("--shape", default="qwen3", choices=sorted(SHAPES))
ap.add_argument("--tokens", default="1,32,2048")
ap.add_argument("--no-explain", action="store_true")
ap.add_argument("entries", nargs="+")
args = ap.parse_args()
os.environ["EMU_CORPUS_DIMS"] = corpus_dims_env(args.shape)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import emu_inductor  # noqa: E402
from tests import corpus  # noqa: E402
from tests.corpus.placement import build_on  # noqa: E402

dev = "cuda" if torch.cuda.is_available() else "cpu"
for name in args.entries:
    entry = corpus.BY_NAME[name]
    module = build_on(entry, dev)
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="mxemu")
    print(f"===== {name} ({args.shape}, {dev})", flush=True)
    for T in (int(t) for t in args.tokens.split(",")):
        g = torch.Generator(device=dev).manual_seed(T)
        x = (torch.randn(T, corpus.H, generator=g, device=dev) * 0.5).to(torch.bfloat16)
        counters.clear()
        with torch.no_grad():
            ref = module(x)
            y = compiled(x)
        err = float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
        fused = {k: v for k, v in counters["mxemu"].items() if k != "pass_runs"}
        print(f"T={T}: fused {fused} rel_err {err:.3g}", flush=True)
    if not args.no_explain:
        x = (torch.randn(32, corpus.H, device=dev) * 0.5).to(torch.bfloat16)
        torch._dynamo.reset()
        with torch.no_grad():
            print(emu_inductor.explain(module, x, dynamic=True, verbose=True), flush=True)
