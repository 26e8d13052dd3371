"""GPU check of the formats and reference layers (run on the device machine).

1. Every format x variant: quantize/fake_quantize on CUDA equal bit for bit to CPU.
2. moe_emulated on CUDA vs CPU for a few schemes (GEMM accumulation order may differ).
3. Eager reference vs stock torch.compile of it (emulate_precision_casts on and off) at
   Qwen3-30B-A3B shape, one token: time and max difference.
Writes JSON to $OUT (or benchmarks/results) with device and versions.
"""

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from emu_inductor.formats import FORMATS, MX_SCALE_MODES, NVFP4_RECIPES, fake_quantize, quantize  # noqa: E402
from emu_inductor.reference import QuantizedExperts, softmax_topk  # noqa: E402


def bits(t):
    """Bit patterns, with every NaN canonicalised (CPU and CUDA differ in NaN sign bits)."""
    t = torch.where(torch.isnan(t), torch.full_like(t, float("nan")), t)
    return t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t.view(torch.int32)


def check_formats():
    torch.manual_seed(0)
    x = (torch.randn(256, 512) * torch.exp(torch.randn(256, 1) * 2)).bfloat16()
    x[0, :32] = 0
    x[1, 5] = float("inf")
    x[2, 7] = float("nan")
    bad = []
    for f in FORMATS.values():
        variants = [dict(scale_mode=m) for m in MX_SCALE_MODES] if f.is_mx else [dict(recipe=r) for r in NVFP4_RECIPES]
        for v in variants:
            a = fake_quantize(x, f, **v)
            b = fake_quantize(x.cuda(), f, **v).cpu()
            qa, qb = quantize(x, f, **v), quantize(x.cuda(), f, **v)
            same = torch.equal(bits(a), bits(b)) and torch.equal(qa.qdata, qb.qdata.cpu())
            if not same:
                bad.append((f.name, v, int((bits(a) != bits(b)).sum())))
    return bad


def bench(fn, *args, iters=20):
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        fn(*args)
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    ts.sort()
    return ts[len(ts) // 2]


def main():
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import triton

    res["triton"] = triton.__version__
    res["formats_cpu_vs_cuda_mismatches"] = check_formats()
    print("formats mismatches:", res["formats_cpu_vs_cuda_mismatches"])
    E, k, H, I = 128, 8, 2048, 768
    torch.manual_seed(0)
    rows = []
    for scheme in ("nvfp4_w4a4", "w_mxfp4_a_mxfp4"):
        w13 = (torch.randn(E, 2 * I, H, device="cuda") / H**0.5).bfloat16()
        w2 = (torch.randn(E, H, I, device="cuda") / I**0.5).bfloat16()
        m = QuantizedExperts.from_float(w13, w2, scheme=scheme).cuda()
        del w13, w2
        for T in (1, 4096):
            x = torch.randn(T, H, device="cuda").bfloat16()
            w, ids = softmax_topk(torch.randn(T, E, device="cuda"), k)
            with torch.no_grad():
                y_eager = m(x, w, ids)
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                t_eager = bench(m, x, w, ids)
                peak = (torch.cuda.max_memory_allocated() - base) / 2**30
                row = {"scheme": scheme, "T": T, "eager_ms": t_eager, "eager_extra_GiB": peak}
                for epc in (True, False):
                    torch._dynamo.reset()
                    with torch._inductor.config.patch(emulate_precision_casts=epc):
                        c = torch.compile(m)
                        y = c(x, w, ids)
                        row[f"compile_epc{int(epc)}_ms"] = bench(c, x, w, ids)
                    row[f"compile_epc{int(epc)}_mismatch"] = int((y != y_eager).sum())
            rows.append(row)
            print(row, flush=True)
    res["moe_reference"] = rows
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gpu_reference_check.json"), "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
