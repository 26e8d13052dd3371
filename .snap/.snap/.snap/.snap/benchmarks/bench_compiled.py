"""Compiled-model benchmark: eager emulation vs stock torch.compile vs backend="mxemu".

Part A (issue 4): one EmulatedMoE layer (router + experts) per scheme at a real shape,
  compiled once with dynamic token counts; checks on the GPU that mxemu fused the layer
  (counters) and matches eager, then times eager / inductor / mxemu (median ms, CUDA
  events, eager launch) and mxemu under mode="reduce-overhead" (CUDA graphs).
Part B (issue 5): a slice of a real-proportioned transformers model (Qwen3-30B-A3B
  widths, a few decoder layers, random weights) through quantize_model: prefill and
  decode tokens/s for eager, stock torch.compile and mxemu.

Usage (repo root): PYTHONPATH=. python3 benchmarks/bench_compiled.py [--small] [--skip-model]
--small runs tiny shapes on the CPU (a smoke test of the script). Writes JSON to $OUT or
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from emu_inductor.demo import DemoConfig, _mxemu_backend, build_default_model  # noqa: E402


def timed(fn, *args, iters=10, warmup=2):
    for _ in range(warmup):
        fn(*args)
    cuda = torch.cuda.is_available()
    ts = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(*args)
        if cuda:
            torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def fresh_counters():
    from torch._dynamo.utils import counters

    counters.clear()
    return counters


def part_a(args, dev):
    rows = []
    shape = dict(num_experts=8, top_k=2, hidden=64, intermediate=32) if args.small else \
        dict(num_experts=128, top_k=8, hidden=2048, intermediate=768)
    tokens = (1, 5) if args.small else (1, 32, 2048)
    for scheme in args.schemes:
        cfg = DemoConfig(scheme=scheme, tokens=tokens[0], device=dev, compile=False, **shape)
        model, _, _ = build_default_model(cfg)
        xs = {T: torch.randn(T, cfg.hidden, device=dev).bfloat16() for T in tokens}
        with torch.no_grad():
            torch._dynamo.reset()
            counters = fresh_counters()
            mx = torch.compile(model, backend=_mxemu_backend(), dynamic=True)
            mx(xs[tokens[0]])
            fused = dict(counters["mxemu"])
            torch._dynamo.reset()
            with torch._inductor.config.patch(emulate_precision_casts=True):
                ind = torch.compile(model, dynamic=True)
                ind(xs[tokens[0]])
            rg = None
            if dev == "cuda" and scheme == args.schemes[0]:  # CUDA graphs: one scheme is enough
                torch._dynamo.reset()
                rg = torch.compile(model, backend=_mxemu_backend(), mode="reduce-overhead", dynamic=False)
            for T, x in xs.items():
                y_e = model(x)
                y_m = mx(x)
                row = {"part": "layer", "scheme": scheme, "tokens": T, **shape,
                       "fused": fused, "max_abs_diff_mxemu_vs_eager": (y_m.float() - y_e.float()).abs().max().item(),
                       "mismatch_frac_mxemu_vs_eager": (y_m != y_e).float().mean().item(),
                       "eager_ms": timed(model, x, iters=3 if T > 32 else 5),
                       "inductor_ms": timed(ind, x), "mxemu_ms": timed(mx, x)}
                if rg is not None:
                    y_g = rg(x).clone()
                    row["mxemu_cudagraph_ms"] = timed(rg, x)
                    row["cudagraph_max_abs_diff"] = (y_g.float() - y_m.float()).abs().max().item()
                rows.append(row)
                print(json.dumps(row), flush=True)
        del model
        if dev == "cuda":
            torch.cuda.empty_cache()
    return rows


def part_b(args, dev):
    import emu_inductor
    from emu_inductor.models.tiny import tiny_model

    over = {} if args.small else dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144,
                                      num_experts=128, num_experts_per_tok=8, num_hidden_layers=args.layers,
                                      num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                      vocab_size=32000, max_position_embeddings=4096)
    rows = []
    prefill_T = 16 if args.small else 512
    for scheme in ("nvfp4_w4a4",):
        model = tiny_model("qwen3_moe", **over).to(dev)
        vocab = model.config.vocab_size
        calib = torch.randint(0, vocab, (1, 32), device=dev)
        emu_inductor.quantize_model(model, scheme, calibration_data=calib)
        prefill = torch.randint(0, vocab, (1, prefill_T), device=dev)
        decode = torch.randint(0, vocab, (8, 1), device=dev)  # 8 sequences, one new token each

        def fwd(m, ids):
            return m(input_ids=ids, use_cache=False).logits

        with torch.no_grad():
            ref_p = fwd(model, prefill)
            res = {"part": "model_slice", "arch": "qwen3_moe", "scheme": scheme, "layers": model.config.num_hidden_layers,
                   "hidden": model.config.hidden_size, "prefill_tokens": prefill_T, "decode_batch": 8,
                   "decode_note": "decode = one new token for each of 8 sequences, no KV history"}
            for name, mk in (("eager", lambda: model),
                             ("inductor", lambda: torch.compile(model, dynamic=True)),
                             ("mxemu", lambda: torch.compile(model, backend=_mxemu_backend(), dynamic=True))):
                torch._dynamo.reset()
                counters = fresh_counters()
                m = mk()
                with torch._inductor.config.patch(emulate_precision_casts=True):
                    out = fwd(m, prefill)
                    tp = timed(fwd, m, prefill, iters=3)
                    td = timed(fwd, m, decode, iters=5)
                res[f"{name}_prefill_tok_s"] = prefill_T / tp * 1e3
                res[f"{name}_decode_tok_s"] = 8 / td * 1e3
                res[f"{name}_prefill_ms"], res[f"{name}_decode_ms"] = tp, td
                res[f"{name}_logits_max_abs_diff_vs_eager"] = (out.float() - ref_p.float()).abs().max().item()
                if name == "mxemu":
                    res["mxemu_fused"] = dict(counters["mxemu"])
                print(json.dumps({k: v for k, v in res.items() if k.startswith(name)}), flush=True)
            rows.append(res)
        del model
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--small", action="store_true")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--skip-layer", action="store_true")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--schemes", nargs="+", default=["nvfp4_w4a4", "w_mxfp4_a_mxfp4", "nvfp4_w4a16"])
    args = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    import triton

    res = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
           "triton": triton.__version__, "timing": "median wall ms over iterations, synchronized (eager launch)"}
    res["layer"] = [] if args.skip_layer else part_a(args, dev)
    try:
        res["model"] = [] if args.skip_model else part_b(args, dev)
    except Exception as e:  # report, don't lose part A
        res["model_error"] = f"{type(e).__name__}: {e}"
        print("model slice failed:", res["model_error"], flush=True)
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    part = "layer" if args.skip_model else ("model" if args.skip_layer else "all")
    slug = "cpu_smoke" if args.small else torch.cuda.get_device_name().split()[-1].lower()  # e.g. h200
    name = f"compiled_{part}_{slug}.json"
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(res, f, indent=2)
    print("wrote", os.path.join(out_dir, name))


if __name__ == "__main__":
    main()
