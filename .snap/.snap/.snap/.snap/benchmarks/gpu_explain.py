"""explain() of corpus layers on the GPU at a real model's widths: the fusion report as a
user sees it on the device (a layer can fuse on the CPU and not on the GPU: device copies
and constants differ), with verbose candidate reasons.

    PYTHONPATH=. python3 benchmarks/gpu_explain.py [--shape qwen3] ENTRY ...
"""

import argparse
import os
import sys

from corpus_dims import SHAPES, corpus_dims_env  # noqa: E402  (benchmarks/ is the script dir)
ap = argparse.ArgumentParser()
ap.add_argument("--shape", default="qwen3", choices=sorted(SHAPES))
ap.add_argument("entries", nargs="+")
args = ap.parse_args()
os.environ["EMU_CORPUS_DIMS"] = corpus_dims_env(args.shape)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import emu_inductor  # noqa: E402
from tests import corpus  # noqa: E402
from tests.corpus.placement import build_on  # noqa: E402

dev = "cuda" if torch.cuda.is_available() else "cpu"
for name in args.entries:
    entry = corpus.BY_NAME[name]
    module = build_on(entry, dev)
    x = (torch.randn(1, corpus.H, device=dev) * 0.5).to(torch.bfloat16)
    torch._dynamo.reset()
    with torch.no_grad():
        print(f"===== {name} ({args.shape}, {dev})", flush=True)
        print(emu_inductor.explain(module, x, verbose=True), flush=True)
