"""The demo: one MoE layer with Qwen3-MoE-like proportions, scaled down, quantized and run.

Eager emulation first (scheme, shapes, error against bf16), then the same layer under
torch.compile(backend="mxemu") when the backend is available: patterns matched, the
generated kernel files, max error against eager, and eager vs compiled time.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import warnings
from typing import Optional

import torch

from .kernels import cache as kernel_cache
from .reference import EmulatedMoE, QuantizedExperts, get_scheme

__all__ = ["DemoConfig", "build_default_model", "run_demo"]


@dataclasses.dataclass
class DemoConfig:
    # Qwen3-30B-A3B is (E=128, top-k=8, H=2048, I=768); this keeps E/k and H/I ratios
    # small enough for a CPU and Triton's interpreter.
    num_experts: int = 16
    top_k: int = 4
    hidden: int = 256
    intermediate: int = 96
    tokens: int = 8
    scheme: str = "nvfp4_w4a4"
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    compile: bool = True


def build_default_model(cfg: DemoConfig):
    """Random bf16 weights quantized to cfg.scheme; returns (model, bf16 weights, input)."""
    g = torch.Generator().manual_seed(cfg.seed)
    E, H, I = cfg.num_experts, cfg.hidden, cfg.intermediate
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).bfloat16()
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).bfloat16()
    router = (torch.randn(E, H, generator=g) / H**0.5).bfloat16()
    x = torch.randn(cfg.tokens, H, generator=g).bfloat16()
    experts = QuantizedExperts.from_float(w13, w2, scheme=cfg.scheme)
    model = EmulatedMoE(router, experts, cfg.top_k).to(cfg.device).eval()
    x = x.to(cfg.device)
    with torch.no_grad():
        w, ids = model.route(x)
        experts.calibrate_(x, w, ids)
    return model, (w13.to(cfg.device), w2.to(cfg.device)), x


def _bf16_forward(model, w13, w2, x):
    w, ids = model.route(x)
    I = w2.shape[-1]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    xf = x.float()
    for k in range(ids.shape[1]):
        h = torch.einsum("th,tnh->tn", xf, w13[ids[:, k].long()].float())
        a = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
        out += w[:, k : k + 1] * torch.einsum("ti,thi->th", a, w2[ids[:, k].long()].float())
    return out


def _mxemu_backend():
    """"mxemu" through the entry point when the package is installed, else (a source
    checkout, e.g. on a GPU box with no pip access) the backend function itself."""
    if "mxemu" in torch._dynamo.list_backends():
        return "mxemu"
    from .backend import mxemu

    return mxemu


def _time(fn, x, iters=5):
    if x.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def run_demo(cfg: Optional[DemoConfig] = None, out=print) -> dict:
    cfg = cfg or DemoConfig()
    scheme = get_scheme(cfg.scheme)
    model, (w13, w2), x = build_default_model(cfg)
    out(f"emu_inductor demo: one MoE layer, scheme {scheme.name} on {cfg.device}")
    out(f"  experts={cfg.num_experts} top_k={cfg.top_k} hidden={cfg.hidden} intermediate={cfg.intermediate} "
        f"tokens={cfg.tokens}")
    out(f"  w13 {tuple(model.experts.w13.shape)} {model.experts.w13.dtype}, scales "
        f"{tuple(model.experts.w13_scale.shape)} {model.experts.w13_scale.dtype}")
    with torch.no_grad():
        y = model(x)
        ref = _bf16_forward(model, w13, w2, x)
    rel = ((y.float() - ref).norm() / ref.norm()).item()
    result = {"scheme": scheme.name, "device": cfg.device, "rel_error_vs_bf16": rel}
    out(f"  eager emulation: relative error against the bf16 layer {rel:.4f}")
    if cfg.compile:
        result.update(_compiled_part(cfg, model, x, y, out))
    return result


def _compiled_part(cfg, model, x, y_eager, out) -> dict:
    try:
        from . import backend as _backend  # noqa: F401
    except Exception as e:  # the backend is optional for the eager demo
        out(f"  torch.compile(backend='mxemu') unavailable: {e}")
        return {}
    from torch._dynamo.utils import counters

    from .passes import fusion_counts
    from .passes.timings import compile_report, progress, progress_to

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=_mxemu_backend())
    with torch.no_grad(), warnings.catch_warnings():
        # numpy warns about masked-out lanes (x/0 under a where) in Triton's interpreter
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton")
        t_before = compile_report()
        progress("demo: first call of the compiled layer: Dynamo, the mxemu pass (its "
                 "pattern rules are built once per process), Inductor, kernel builds ...")
        t0 = time.perf_counter()
        with progress_to(sys.stderr):
            y = compiled(x)
        compile_s = time.perf_counter() - t0
        split = compile_report().since(t_before)
        err = (y.float() - y_eager.float()).abs().max().item()
        eager_ms = _time(model, x)
        comp_ms = _time(compiled, x)
    fused = fusion_counts()  # right after an FX-graph-cache hit too (the pass did not run)
    fired, variants = fused.families, fused.variants
    out(f"  torch.compile(backend='mxemu'): compiled in {compile_s:.1f} s"
        + (" (graphs loaded from Inductor's cache)" if fused.graphs_from_cache else ""))
    out(f"    pattern families fired: {fired or 'none'}" + (" (the layer is one mxemu::moe call)" if fired.get("moe") else ""))
    out("    fused ops in the compiled graph: "
        + (", ".join(f"mxemu::{k} x{v}" for k, v in sorted(fused.ops.items())) or "none"))
    if variants:
        out(f"    pattern variants: {variants}")
    out(f"    {split}")
    try:
        files = kernel_cache.generated_files()
        for f in files[-6:]:
            out(f"    generated kernel: {f}")
    except Exception:
        files = []
    out(f"    max |compiled - eager| = {err:.3g}")
    where = "GPU" if x.is_cuda else ("Triton interpreter" if _interp() else "reference fallback")
    out(f"    time per call: eager {eager_ms:.2f} ms, compiled {comp_ms:.2f} ms ({where})")
    return {"patterns": fired, "fused_ops": fused.ops, "variants": variants,
            "graphs_from_cache": fused.graphs_from_cache, "compile_s": compile_s,
            "compile_split": split.as_dict(), "max_abs_err_vs_eager": err, "eager_ms": eager_ms, "compiled_ms": comp_ms,
            "kernel_files": [str(f) for f in files]}


def _interp() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
