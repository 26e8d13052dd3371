"""GPU check of the activation-QDQ variants the recognisers map user code onto.

gpu_check covers every scheme at its default variant; user code recognised as another
variant (a tie rule, a signed-zero rule, a scale mode, an Inf-amax rule) runs kernels
rendered differently. Each variant here is rendered one knob away from the default and run
as a linear layer on the GPU against the CPU reference. The weight is the identity (E2M1
1.0 under a unit scale), so the output row IS the fake-quantized activation: the check is
exact against the reference's fake-quantized rows (a row holding a NaN / Inf is all NaN
through the dot: 0 * Inf).

    PYTHONPATH=. python3 benchmarks/gpu_variant_check.py [OUT_JSON]
"""

from __future__ import annotations

import json
import os
import sys

import torch

from emu_inductor.formats import ROUNDING_MODES, SIGNED_ZERO_MODES
from emu_inductor.reference.qdq import act_fake_quantize
from emu_inductor.ops.triton_impl import linear_triton
from emu_inductor.spec import OpSpec
from emu_inductor.spec.compat import FUSED_MX_INF_AMAX, FUSED_MX_SCALE_MODES

K = 64
# on a machine without a GPU (TRITON_INTERPRET=1) the same check runs the interpreter
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def probe_rows() -> torch.Tensor:
    """Ties at several binades, specials, and random rows at many magnitudes ([R, K] fp32)."""
    g = torch.Generator().manual_seed(0)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5])
    tie_row = torch.cat([torch.tensor([6.0]), ties.repeat(4)[:31], torch.tensor([-4.0]), -ties.repeat(4)[:31]])
    rows = [tie_row * 2.0 ** p for p in (-20, -3, 0, 5, 40)]
    rows.append(torch.zeros(K))
    z = torch.zeros(K)
    z[1::2] = -0.0
    rows.append(z)
    sub = torch.full((K,), 1e-40)
    sub[::3] = -3e-39
    rows.append(sub)
    big = torch.randn(K, generator=g) * 1e38
    rows.append(big)
    inf = torch.randn(K, generator=g)
    inf[5] = float("inf")
    rows.append(inf)
    nan = torch.randn(K, generator=g)
    nan[40] = float("nan")
    rows.append(nan)
    for p in range(-30, 31, 6):
        rows.append(torch.randn(K, generator=g) * 2.0 ** p)
    return torch.stack(rows)


def _ftz(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t.abs() < 2.0 ** -126, 0.0, t)


def identity_weight(weight_fmt: str):
    """Packed codes and scales of the [K, K] identity (E2M1 code 2 = 1.0, unit scales)."""
    codes = torch.zeros(K, K, dtype=torch.uint8)
    codes[torch.arange(K), torch.arange(K)] = 2
    w = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    if weight_fmt == "nvfp4":
        s = torch.full((K, K // 16), 0x38, dtype=torch.uint8).view(torch.float8_e4m3fn)  # 1.0
        return w, s, torch.tensor(1.0)
    return w, torch.full((K, K // 32), 127, dtype=torch.uint8), None


def variants():
    base = {"nvfp4": dict(), "mxfp4": dict(act_scale_mode="even")}
    out = []
    for fmt, kw in base.items():
        for r in ROUNDING_MODES:
            out.append((fmt, {**kw, "act_rounding": r}))
        for z in SIGNED_ZERO_MODES:
            out.append((fmt, {**kw, "act_signed_zero": z}))
    for m in FUSED_MX_SCALE_MODES:
        for inf in FUSED_MX_INF_AMAX:
            out.append(("mxfp4", {"act_scale_mode": m, "act_inf_amax": inf}))
    return out


def check_all(verbose: bool = False) -> list:
    """One row per variant: ok / mismatch count / first differing element, or skipped."""
    x = probe_rows().to(torch.bfloat16)
    res = []
    start = int(os.environ.get("EMU_VARIANT_START", "0"))  # resume: skip variants a previous run checked
    for fmt, kw in variants()[start:]:
        row = {"fmt": fmt, **kw}
        try:
            if fmt == "nvfp4":
                spec = OpSpec("nvfp4", "block", "nvfp4", None, **kw)
            else:
                spec = OpSpec("mxfp4", "block", "mxfp4", kw.pop("act_scale_mode"), **kw)
        except ValueError as e:  # a combination the kernels do not render: not a failure here
            row["skipped"] = str(e)[:200]
            res.append(row)
            continue
        w, s, alpha = identity_weight(fmt)
        gs = torch.tensor(1.0) if fmt == "nvfp4" else None
        try:
            # the fake-quantized rows themselves, through the identity dot: element j is q[j]
            # unless another element of its row is NaN / Inf (0 * Inf in the sum). Subnormal results compare as zero on both sides: GEMMs
            # differ there (the CPU's bf16 GEMM and the interpreter's dot flush them, the
            # H200's MMA keeps them); the QDQ rows' bits are checked elsewhere (gpu_check's A1)
            q = act_fake_quantize(x, spec.scheme().act, gs).float()
            bad = (~torch.isfinite(q)).sum(1, keepdim=True) - (~torch.isfinite(q)).int()  # others' 0 * Inf
            ref = _ftz(torch.where(bad > 0, float("nan"), q))
            dev = lambda t: None if t is None else t.to(DEV)  # noqa: E731
            out = _ftz(linear_triton(dev(x), dev(w), dev(s), dev(alpha), dev(gs), None, spec).cpu().float())
            same = (out == ref) | (out.isnan() & ref.isnan())
            row["mismatch"] = int((~same).sum())
            row["ok"] = row["mismatch"] == 0
            if not row["ok"]:
                r, c = (~same).nonzero()[0].tolist()
                row["first"] = {"row": r, "col": c, "x": float(x[r, c]), "gpu": float(out[r, c]), "ref": float(ref[r, c])}
        except Exception as e:
            row["ok"] = False
            row["error"] = f"{type(e).__name__}: {e}"[:400]
        res.append(row)
        if verbose:
            print(json.dumps(row), flush=True)
    return res


def main():
    res = check_all(verbose=True)
    checked = [r for r in res if "skipped" not in r]
    summary = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter)", "torch": torch.__version__, "checked": len(checked),
               "skipped": len(res) - len(checked), "all_ok": all(r["ok"] for r in checked), "rows": res}
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(summary, f, indent=1)
    print("gpu_variant_check all_ok:", summary["all_ok"], f"({len(checked)} variants, {summary['skipped']} skipped)")


if __name__ == "__main__":
    main()
