"""GPU check of the fused decode launches (gemm_act's last split runs the activation epilogue,
gemm_out's completing program combines a token, prep_kernel routes and prequantizes): bit for
bit against the separate act_epilogue_kernel / combine_kernel / routing / prequant launches
(EMU_INDUCTOR_FUSED_EPILOGUE=0, EMU_INDUCTOR_PREP_MERGED=0), repeated many
times per config, eagerly and as CUDA-graph replays -- a missing release / acquire or a
counter left non-zero shows as an intermittent mismatch, which one run would likely miss.

    PYTHONPATH=. python3 benchmarks/gpu_fused_check.py [OUT_JSON]
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from emu_inductor.kernels.tiles import TileConfig  # noqa: E402
from emu_inductor.ops.triton_impl import moe_triton  # noqa: E402
from emu_inductor.reference.modules import QuantizedExperts  # noqa: E402
from emu_inductor.spec import OpSpec  # noqa: E402


def main():
    dev = torch.device(os.environ.get("CHECK_DEVICE", "cuda"))
    small = dev.type == "cpu"
    E, k, H, I = (8, 2, 128, 64) if small else (64, 8, 1024, 512)
    reps = 2 if small else int(os.environ.get("FUSED_REPS", "30"))
    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "rows": []}
    g = torch.Generator().manual_seed(0)
    for scheme, act in (("nvfp4_w4a4", "silu"), ("w_mxfp4_a_mxfp4", "swigluoai")):
        qe = QuantizedExperts.from_float((torch.randn(E, 2 * I, H, generator=g) * 0.1).bfloat16().to(dev),
                                         (torch.randn(E, H, I, generator=g) * 0.1).bfloat16().to(dev),
                                         scheme=scheme, activation=act)
        g1 = torch.tensor([448 * 6 / 4.0], device=dev) if qe.w13_alpha is not None else None
        g2 = torch.tensor([448 * 6 / 2.0], device=dev) if qe.w13_alpha is not None else None
        spec = OpSpec.from_scheme(scheme, activation=act)
        for T in ((1, 5) if small else (1, 4, 32, 128)):
            x = torch.randn(T, H, generator=g).bfloat16().to(dev)
            tw, ids = torch.topk(torch.softmax(torch.randn(T, E, generator=g), -1), k, -1)
            tw, ids = tw.to(dev), ids.to(torch.int32).to(dev)
            for emap in (None, torch.tensor([e if e % 3 else -1 for e in range(E)], dtype=torch.int32, device=dev)):
                for cfg in (TileConfig(16, 64, 128, 4, 3, split1=4, split2=2),
                            TileConfig(16, 64, 128, 4, 3, split1=8, split2=4, swap=1),
                            TileConfig(16, 32, 128, 4, 4, split1=2, split2=1)):
                    row = {"scheme": scheme, "T": T, "expert_map": emap is not None, "config": cfg.to_dict()}

                    def call():
                        return moe_triton(x, qe.w13, qe.w13_scale, qe.w13_alpha, qe.w2, qe.w2_scale, qe.w2_alpha,
                                          tw, ids, g1, g2, emap, spec, config=cfg, validate=False)
                    try:
                        os.environ["EMU_INDUCTOR_FUSED_EPILOGUE"] = "0"
                        os.environ["EMU_INDUCTOR_PREP_MERGED"] = "0"
                        want = call()
                        os.environ["EMU_INDUCTOR_FUSED_EPILOGUE"] = "1"
                        os.environ.pop("EMU_INDUCTOR_PREP_MERGED")
                        bad = sum(int(not torch.equal(call().view(torch.int16), want.view(torch.int16)))
                                  for _ in range(reps))
                        row["eager_mismatching_runs"] = bad
                        if dev.type == "cuda":
                            call()
                            torch.cuda.synchronize()
                            graph = torch.cuda.CUDAGraph()
                            with torch.cuda.graph(graph):
                                out = call()
                            gbad = 0
                            for _ in range(reps):
                                graph.replay()
                                gbad += int(not torch.equal(out.view(torch.int16), want.view(torch.int16)))
                            row["graph_mismatching_runs"] = gbad
                            bad += gbad
                        row["ok"] = bad == 0
                    except Exception as e:  # a failing config is a result, not a crash of the check
                        row["error"] = f"{type(e).__name__}: {e}"[:600]
                        row["ok"] = False
                    finally:
                        os.environ.pop("EMU_INDUCTOR_FUSED_EPILOGUE", None)
                        os.environ.pop("EMU_INDUCTOR_PREP_MERGED", None)
                    res["rows"].append(row)
                    print(row, flush=True)
    res["all_ok"] = all(r["ok"] for r in res["rows"])
    print("fused epilogues all_ok:", res["all_ok"], flush=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
