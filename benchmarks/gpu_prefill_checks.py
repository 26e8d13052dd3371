"""Prefill checks on the GPU (issue #10): where the dequantized-workspace (wdq) fault is,
and whether the large prefill tiles (BM 128/256, swap) keep the numerics.

    PYTHONPATH=. python3 benchmarks/gpu_prefill_checks.py [OUT_JSON]

1. dequant_kernel alone: its [E, N, K] bf16 output against the reference dequantization,
   bit for bit, per scheme and GEMM (which = 1: w13 with its alpha, 2: w2).
2. mxemu::moe at every prefill tile config of bench_moe_kernels.PREFILL_CONFIGS against
   the reference: A1 / C2 / A2 debug rows (bit identity) and the output (max abs error).
"""

import json
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_moe_kernels import PREFILL_CONFIGS  # noqa: E402
from emu_inductor.kernels.launch import _dequant_all, _dummy, get_module, kernel_spec_for  # noqa: E402
from emu_inductor.kernels.kernel_spec import alpha_mode_of  # noqa: E402
from emu_inductor.ops.triton_impl import moe_triton  # noqa: E402
from emu_inductor.reference import moe_emulated  # noqa: E402
from emu_inductor.reference.modules import QuantizedExperts  # noqa: E402
from emu_inductor.reference.moe import dequantize_experts  # noqa: E402
from emu_inductor.spec import SCHEMES, OpSpec  # noqa: E402


def run_case(case):
    scheme, act = case
    os.environ.setdefault("EMU_INDUCTOR_MOE_WDQ", "1")
    dev = torch.device(os.environ.get("CHECK_DEVICE", "cuda"))  # cpu: a smoke run under TRITON_INTERPRET=1
    res = {"dequant": [], "moe": []}
    smoke = dev.type == "cpu"
    E, k, H, I, T = (4, 2, 128, 64, 40) if smoke else (8, 2, 512, 256, 300)
    configs = PREFILL_CONFIGS[:2] + [c for c in PREFILL_CONFIGS if c.swap][:1] if smoke else PREFILL_CONFIGS
    if True:
        if True:
            g = torch.Generator(device="cpu").manual_seed(0)
            w13f = (torch.randn(E, 2 * I, H, generator=g) * 0.1).to(torch.bfloat16).to(dev)
            w2f = (torch.randn(E, H, I, generator=g) * 0.1).to(torch.bfloat16).to(dev)
            qe = QuantizedExperts.from_float(w13f, w2f, scheme=scheme, activation=act)
            if qe.a1_global_scale is not None:
                qe.a1_global_scale.fill_(2688.0 / 4.0)
                qe.a2_global_scale.fill_(2688.0 / 2.0)
            fmt = SCHEMES[scheme].weight_fmt
            spec = OpSpec.from_scheme(scheme, activation=act)
            ks = kernel_spec_for(spec, torch.bfloat16, alpha_mode_of(qe.w13_alpha, E, 2 * I),
                                 alpha_mode_of(qe.w2_alpha, E, H), qe.a1_global_scale is not None,
                                 qe.a2_global_scale is not None, dev)
            mod = get_module(ks)
            for which, (w, s, al, N, K) in ((1, (qe.w13, qe.w13_scale, qe.w13_alpha, 2 * I, H)),
                                             (2, (qe.w2, qe.w2_scale, qe.w2_alpha, H, I))):
                try:
                    got = _dequant_all(mod, w, s, al, N, K, which, torch.bfloat16, _dummy(dev))
                    ref = dequantize_experts(w, s, fmt, al, torch.bfloat16)
                    bad = (got.view(torch.int16) != ref.view(torch.int16))
                    row = {"scheme": scheme, "activation": act, "which": which, "mismatch": int(bad.sum()),
                           "numel": ref.numel()}
                    if bad.any():
                        idx = bad.nonzero()[:8].tolist()
                        row["first_bad"] = [[i, float(got[tuple(i)]), float(ref[tuple(i)])] for i in idx]
                        row["bad_k_mod_128"] = sorted({i[2] % 128 for i in bad.nonzero()[:4096].tolist()})[:64]
                        row["bad_rows_mod_64"] = sorted({i[1] % 64 for i in bad.nonzero()[:4096].tolist()})[:64]
                except Exception as e:
                    row = {"scheme": scheme, "which": which, "error": f"{type(e).__name__}: {e}"[:1000]}
                    traceback.print_exc()
                res["dequant"].append(row)
                print("dequant", row, flush=True)
            x = torch.randn(T, H, generator=g).to(torch.bfloat16).to(dev)
            logits = torch.randn(T, E, generator=g).to(dev)
            tw, ids = torch.topk(torch.softmax(logits, -1), k, -1)
            ids = ids.to(torch.int32)
            ref = moe_emulated(x, qe.w13, qe.w2, tw, ids, scheme=scheme, w13_scale=qe.w13_scale,
                               w2_scale=qe.w2_scale, w13_alpha=qe.w13_alpha, w2_alpha=qe.w2_alpha,
                               a1_global_scale=qe.a1_global_scale, a2_global_scale=qe.a2_global_scale, activation=act)
            args = (x, qe.w13, qe.w13_scale, qe.w13_alpha, qe.w2, qe.w2_scale, qe.w2_alpha, tw, ids,
                    qe.a1_global_scale, qe.a2_global_scale, None, spec)
            base = None
            for cfg in configs:
                row = {"scheme": scheme, "activation": act, "config": cfg.to_dict()}
                try:
                    d = moe_triton(*args, debug=True, reduction="deterministic", config=cfg)
                    if base is None:
                        base = d
                    v = d["valid"]
                    row["out_max_abs_err"] = float((d["out"].float() - ref.float()).abs().max())
                    row["ref_max_abs"] = float(ref.float().abs().max())
                    row["a1_vs_first"] = int((d["a1"][v] != base["a1"][v]).sum())
                    row["c2_vs_first"] = int((d["c2"][v] != base["c2"][v]).sum())
                    row["c2_max_diff_vs_first"] = float((d["c2"][v] - base["c2"][v]).abs().max())
                    if d["a2"] is not None:
                        row["a2_vs_first"] = int((d["a2"][v] != base["a2"][v]).sum())
                    row["ok"] = row["out_max_abs_err"] <= 0.02 * max(1.0, row["ref_max_abs"]) and row["a1_vs_first"] == 0
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"[:1000]
                    row["ok"] = False
                    traceback.print_exc()
                res["moe"].append(row)
                print("moe", row, flush=True)
    return res


def main():
    import multiprocessing as mp

    smoke = os.environ.get("CHECK_DEVICE", "cuda") == "cpu"
    cases = [("nvfp4_w4a4", "silu")] if smoke else [(s, a) for s in ("nvfp4_w4a4", "w_mxfp4_a_mxfp4", "nvfp4_w4a16")
                                                   for a in ("silu", "swigluoai")]
    if smoke:
        parts = [run_case(c) for c in cases]
    else:  # one process per case: kernel compilation dominates and is per process
        with mp.get_context("spawn").Pool(len(cases)) as pool:
            parts = pool.map(run_case, cases)
    res = {"device": torch.cuda.get_device_name() if not smoke else "cpu",
           "dequant": [r for p in parts for r in p["dequant"]], "moe": [r for p in parts for r in p["moe"]]}
    res["all_ok"] = all(r.get("ok") for r in res["moe"] if not r["config"].get("wdq"))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(res, f, indent=1)
    print("prefill checks all_ok (non-wdq):", res["all_ok"])


if __name__ == "__main__":
    main()
