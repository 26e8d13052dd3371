"""GPU check of the inline-PTX weight decodes (render_helpers.E2M1_FAST, E2M1_NV_FAST), bit for bit.

    PYTHONPATH=. python3 benchmarks/gpu_fastdec_check.py [OUT_JSON]

A linear over one-hot rows reads the dequantized weights back exactly (one product per output,
accumulated from +0): y = eye(K) @ dequant(W).T = dequant(W).T. Every packed byte value at
every position of a block, under E8M0 scale bytes 0, 1, 2, 126, 127, 128, 253, 254, 255 and
random ones, through the fast decode and the plain decode (EMU_INDUCTOR_FAST_DECODE=0),
against the reference dequantization; +-0 compare equal (the GEMM sums from +0); a row with
a NaN / Inf block reads back non-finite throughout. Also one MoE call (MXFP4 w4a4, H and I multiples of the tile K) fast vs plain vs the
reference: bit-identical outputs under the deterministic reduction.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from emu_inductor.formats import FORMATS  # noqa: E402
from emu_inductor.kernels.tiles import TileConfig  # noqa: E402
from emu_inductor.ops.triton_impl import linear_triton, moe_triton  # noqa: E402
from emu_inductor.reference import moe_emulated  # noqa: E402
from emu_inductor.reference.modules import QuantizedExperts  # noqa: E402
from emu_inductor.reference.qdq import dequantize_weight  # noqa: E402
from emu_inductor.spec import OpSpec  # noqa: E402


def same(a, b) -> int:
    a, b = a.float(), b.float()
    both_nan = a.isnan() & b.isnan()
    return int(((a != b) & ~both_nan).sum())  # -0 == +0


def same_weights(y_t, ref, subnormal: bool = False) -> int:
    """y_t = dequant(W) read back through one-hot rows: rows of W holding a NaN / Inf block are
    NaN throughout (0 * NaN in every sum), so they must be all non-finite; the others exact.
    Weights below 2^-126 (E8M0 scale bytes 0 / 1) are counted apart (subnormal=True): a BLAS or
    an MMA may flush them, which says nothing about the decode."""
    bad_row = ~torch.isfinite(ref.float()).all(dim=1)
    a, b = y_t[~bad_row].float(), ref[~bad_row].float()
    tiny = (b != 0) & (b.abs() < 2.0 ** -126)
    keep = tiny if subnormal else ~tiny
    n = same(a[keep], b[keep])
    return n if subnormal else n + int(torch.isfinite(y_t[bad_row].float()).sum())


def run(fast: bool, fn):
    os.environ["EMU_INDUCTOR_FAST_DECODE"] = "1" if fast else "0"
    try:
        return fn()
    finally:
        os.environ.pop("EMU_INDUCTOR_FAST_DECODE", None)


def readback_row(row, x, w, s, alpha, ref, spec, cfg) -> dict:
    """One linear over one-hot rows x with the fast and the plain decode: mismatches against
    the reference weights `ref` and between the two, into `row` (an error is a result too)."""
    try:
        ys = {}
        for name, fast in (("fast", True), ("plain", False)):
            ys[name] = run(fast, lambda: linear_triton(x, w, s, alpha, None, None, spec, config=cfg)).t()
            row[f"{name}_vs_ref_mismatch"] = same_weights(ys[name], ref)
            row[f"{name}_vs_ref_subnormal_mismatch"] = same_weights(ys[name], ref, subnormal=True)
        row["fast_vs_plain_mismatch"] = same(ys["fast"], ys["plain"])
        row["ok"] = row["fast_vs_ref_mismatch"] == 0 and row["fast_vs_plain_mismatch"] == 0
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"[:800]
        row["ok"] = False
    return row


def main():
    dev = torch.device(os.environ.get("CHECK_DEVICE", "cuda"))  # cpu: a smoke run of the script (plain decode)
    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "linear": [], "moe": []}
    fmt = FORMATS["mxfp4"]
    N, K = (64, 128) if os.environ.get("CHECK_DEVICE") == "cpu" else (256, 512)
    g = torch.Generator().manual_seed(0)
    byt = ((torch.arange(N * K // 2) * 37 + torch.arange(N * K // 2) // 256) % 256).to(torch.uint8).reshape(N, K // 2)
    sc = torch.randint(100, 150, (N, K // 32), generator=g)
    edge = torch.tensor([0, 1, 2, 126, 127, 128, 253, 254, 255])
    sc.view(-1)[::5] = edge.repeat(sc.numel())[: sc.view(-1)[::5].numel()]
    sc = sc.to(torch.uint8)
    w, s = byt.to(dev), sc.to(dev)
    ref = dequantize_weight(w, s, fmt, dtype=torch.bfloat16)  # [N, K]
    x = torch.eye(K, dtype=torch.bfloat16, device=dev)
    for scheme in ("w_mxfp4", "w_mxfp4_a_mxfp4"):
        spec = OpSpec.from_scheme(scheme)
        for cfg in (TileConfig(16, 64, 64, 4, 3), TileConfig(64, 64, 64, 4, 4, prefetch=1),
                    TileConfig(16, 64, 128, 4, 3, swap=1), TileConfig(128, 64, 64, 4, 4, swap=1, prefetch=1)):
            # (w4a4: one-hot rows survive the MXFP4 activation QDQ exactly: 1.0 and 0 are E2M1 values)
            row = readback_row({"scheme": scheme, "config": cfg.to_dict()}, x, w, s, None, ref, spec, cfg)
            res["linear"].append(row)
            print("linear", row, flush=True)
    E, k, H, I, T = (4, 2, 128, 64, 20) if os.environ.get("CHECK_DEVICE") == "cpu" else (8, 2, 512, 256, 300)
    gg = torch.Generator().manual_seed(1)
    for act in ("silu", "swigluoai"):
        scheme = "w_mxfp4_a_mxfp4"
        qe = QuantizedExperts.from_float((torch.randn(E, 2 * I, H, generator=gg) * 0.1).bfloat16().to(dev),
                                         (torch.randn(E, H, I, generator=gg) * 0.1).bfloat16().to(dev),
                                         scheme=scheme, activation=act)
        xx = torch.randn(T, H, generator=gg).bfloat16().to(dev)
        tw, ids = torch.topk(torch.softmax(torch.randn(T, E, generator=gg), -1), k, -1)
        tw, ids = tw.to(dev), ids.to(torch.int32).to(dev)
        spec = OpSpec.from_scheme(scheme, activation=act)
        refm = moe_emulated(xx, qe.w13, qe.w2, tw, ids, scheme=scheme, w13_scale=qe.w13_scale, w2_scale=qe.w2_scale,
                            activation=act)
        for cfg in (TileConfig(16, 64, 128, 4, 3), TileConfig(64, 64, 64, 4, 4, prefetch=1),
                    TileConfig(16, 64, 128, 4, 3, split1=2, split2=2, swap=1)):
            row = {"activation": act, "config": cfg.to_dict()}
            try:
                outs = {}
                for name, fast in (("fast", True), ("plain", False)):
                    outs[name] = run(fast, lambda: moe_triton(xx, qe.w13, qe.w13_scale, None, qe.w2, qe.w2_scale, None,
                                                              tw, ids, None, None, None, spec, config=cfg,
                                                              reduction="deterministic"))
                row["fast_vs_plain_mismatch"] = same(outs["fast"], outs["plain"])
                row["fast_vs_ref_max_abs_err"] = float((outs["fast"].float() - refm.float()).abs().max())
                row["ok"] = row["fast_vs_plain_mismatch"] == 0
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:800]
                row["ok"] = False
            res["moe"].append(row)
            print("moe", row, flush=True)
    nvfp4_checks(dev, res)
    res["all_ok"] = all(r["ok"] for r in res["linear"] + res["moe"] + res["nv_linear"] + res["nv_moe"])
    print("fast decode all_ok:", res["all_ok"], flush=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(res, f, indent=1)


def nvfp4_checks(dev, res):
    """The NVFP4 inline decode (render_helpers.E2M1_NV_FAST): every packed byte at every
    position under every E4M3 scale byte (NaN codes too), for global scales the fast path
    takes (|a| <= 2^-7, or |g| >= 128 for s / g: tiny and subnormal products) and ones it
    must hand to the plain decode (a = 0.5, g = 1): fast == plain == reference, read back through
    one-hot rows (weight-only scheme: the rows reach the GEMM unchanged); then NVFP4 w4a4 MoE
    calls, fast vs plain bit for bit."""
    import dataclasses
    fmt = FORMATS["nvfp4"]
    N, K = (64, 128) if dev.type == "cpu" else (256, 512)
    byt = ((torch.arange(N * K // 2) * 37 + torch.arange(N * K // 2) // 256) % 256).to(torch.uint8).reshape(N, K // 2)
    sc = (torch.arange(N * K // 16) * 7 % 256).to(torch.uint8).reshape(N, K // 16)  # every byte, 0x7F / 0xFF too
    w, s = byt.to(dev), sc.view(torch.float8_e4m3fn).to(dev)
    x = torch.eye(K, dtype=torch.bfloat16, device=dev)
    res["nv_linear"], res["nv_moe"] = [], []
    for order, glob in (("s*a", [2.0 ** -7, 1 / 2688.0, 2.0 ** -118, 0.5]),
                        ("s/g", [128.0, 2688.0, 1.0])):
        spec = dataclasses.replace(OpSpec.from_scheme("nvfp4_w4a16"), w_scale_order=order)
        for g in glob:
            a = torch.tensor([g], dtype=torch.float32, device=dev)
            ref = dequantize_weight(w, s, fmt, alpha=a, dtype=torch.bfloat16, scale_order=order)
            for cfg in (TileConfig(16, 64, 64, 4, 3), TileConfig(64, 64, 64, 4, 4, prefetch=1),
                        TileConfig(16, 64, 128, 4, 3, swap=1)):
                row = readback_row({"order": order, "global": g, "config": cfg.to_dict()}, x, w, s, a, ref, spec, cfg)
                res["nv_linear"].append(row)
                print("nv linear", row, flush=True)
    E, k, H, I, T = (4, 2, 128, 64, 20) if dev.type == "cpu" else (8, 2, 512, 256, 300)
    gg = torch.Generator().manual_seed(2)
    for act in ("silu", "swigluoai"):
        scheme = "nvfp4_w4a4"
        qe = QuantizedExperts.from_float((torch.randn(E, 2 * I, H, generator=gg) * 0.1).bfloat16().to(dev),
                                         (torch.randn(E, H, I, generator=gg) * 0.1).bfloat16().to(dev),
                                         scheme=scheme, activation=act)
        xx = torch.randn(T, H, generator=gg).bfloat16().to(dev)
        tw, ids = torch.topk(torch.softmax(torch.randn(T, E, generator=gg), -1), k, -1)
        tw, ids = tw.to(dev), ids.to(torch.int32).to(dev)
        g1 = torch.tensor([448 * 6 / 4.0], device=dev)
        g2 = torch.tensor([448 * 6 / 2.0], device=dev)
        spec = OpSpec.from_scheme(scheme, activation=act)
        for cfg in (TileConfig(16, 64, 128, 4, 3), TileConfig(64, 64, 64, 4, 4, prefetch=1),
                    TileConfig(16, 64, 128, 4, 3, split1=2, split2=2, swap=1)):
            row = {"activation": act, "config": cfg.to_dict(), "w13_alpha_max": float(qe.w13_alpha.abs().max())}
            try:
                outs = {}
                for name, fast in (("fast", True), ("plain", False)):
                    outs[name] = run(fast, lambda: moe_triton(xx, qe.w13, qe.w13_scale, qe.w13_alpha, qe.w2, qe.w2_scale,
                                                              qe.w2_alpha, tw, ids, g1, g2, None, spec, config=cfg,
                                                              reduction="deterministic"))
                row["fast_vs_plain_mismatch"] = same(outs["fast"], outs["plain"])
                row["ok"] = row["fast_vs_plain_mismatch"] == 0
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:800]
                row["ok"] = False
            res["nv_moe"].append(row)
            print("nv moe", row, flush=True)


if __name__ == "__main__":
    main()
