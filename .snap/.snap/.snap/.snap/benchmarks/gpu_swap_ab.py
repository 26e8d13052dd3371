"""A/B of the swapped product's GPU faults (issue #10): MoE outputs of a few tile configs
against the reference, with the inline-PTX weight decode on and off, for whichever
emu_inductor the import path holds (run it once per code version to find which change a
fault came with).

    PYTHONPATH=<code dir> python3 benchmarks/gpu_swap_ab.py [scheme ...]
"""

import json
import os
import sys

import torch

import emu_inductor
from emu_inductor.kernels.tiles import TileConfig
from emu_inductor.ops.triton_impl import moe_triton
from emu_inductor.reference import moe_emulated
from emu_inductor.reference.modules import QuantizedExperts
from emu_inductor.spec import OpSpec

CONFIGS = [TileConfig(128, 64, 64, 4, 4, swap=1), TileConfig(128, 64, 64, 4, 4, swap=1, prefetch=1),
           TileConfig(256, 64, 64, 8, 3, swap=1, prefetch=1), TileConfig(128, 128, 64, 8, 3, swap=1, prefetch=1),
           TileConfig(128, 64, 64, 4, 3, prefetch=1)]


def main():
    schemes = sys.argv[1:] or ["w_mxfp4_a_mxfp4"]
    print("code:", os.path.dirname(emu_inductor.__file__), flush=True)
    dev = torch.device("cuda")
    E, k, H, I, T = 8, 2, 512, 256, 300
    rows = []
    for scheme in schemes:
        g = torch.Generator(device="cpu").manual_seed(0)
        w13f = (torch.randn(E, 2 * I, H, generator=g) * 0.1).to(torch.bfloat16).to(dev)
        w2f = (torch.randn(E, H, I, generator=g) * 0.1).to(torch.bfloat16).to(dev)
        qe = QuantizedExperts.from_float(w13f, w2f, scheme=scheme, activation="silu")
        if qe.a1_global_scale is not None:
            qe.a1_global_scale.fill_(2688.0 / 4.0)
            qe.a2_global_scale.fill_(2688.0 / 2.0)
        spec = OpSpec.from_scheme(scheme, activation="silu")
        x = torch.randn(T, H, generator=g).to(torch.bfloat16).to(dev)
        tw, ids = torch.topk(torch.softmax(torch.randn(T, E, generator=g).to(dev), -1), k, -1)
        ref = moe_emulated(x, qe.w13, qe.w2, tw, ids.to(torch.int32), scheme=scheme, w13_scale=qe.w13_scale,
                           w2_scale=qe.w2_scale, w13_alpha=qe.w13_alpha, w2_alpha=qe.w2_alpha,
                           a1_global_scale=qe.a1_global_scale, a2_global_scale=qe.a2_global_scale, activation="silu")
        args = (x, qe.w13, qe.w13_scale, qe.w13_alpha, qe.w2, qe.w2_scale, qe.w2_alpha, tw, ids.to(torch.int32),
                qe.a1_global_scale, qe.a2_global_scale, None, spec)
        for fast in ("1", "0"):
            os.environ["EMU_INDUCTOR_FAST_DECODE"] = fast
            for cfg in CONFIGS:
                errs = []
                for _ in range(3):  # a moving error is a race
                    out = moe_triton(*args, reduction="deterministic", config=cfg)
                    errs.append(float((out.float() - ref.float()).abs().max()))
                row = {"scheme": scheme, "fast_decode": fast, "config": cfg.to_dict(), "max_abs_err": errs,
                       "ref_max_abs": float(ref.float().abs().max())}
                row["ok"] = max(errs) <= 0.02 * max(1.0, row["ref_max_abs"])
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("all ok:", all(r["ok"] for r in rows))


if __name__ == "__main__":
    main()
