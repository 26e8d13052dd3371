"""Other GEMM styles of emu_inductor.reference.moe_emulated under backend="mxemu":
gemm_style="bmm" (per-row gathered expert weights) -> mxemu::grouped_mm (stage 1),
gemm_style="loop" (unrolled per-expert mm) -> one mxemu::linear per expert and GEMM,
and NVFP4 per gate/up [E, 2] global scales -> mxemu::moe. Bit-identical to eager (the bmm
style: within fp32-accumulation rounding of CPU BLAS's summation order)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache, run_and_get_code
from torch.testing import FileCheck

from emu_inductor.passes import recorder
from emu_inductor.reference import QuantizedExperts

E, H, I, T, K = 4, 64, 32, 8, 2


def _experts(scheme, **kw):
    torch.manual_seed(0)
    if scheme.startswith("nvfp4_w4a4"):
        # NVFP4 activation global scales given: without them the first compiled call
        # would be the calibrating graph (reference/modules.py), not the one under test
        kw.setdefault("a1_global_scale", torch.tensor(1.0))
        kw.setdefault("a2_global_scale", torch.tensor(1.0))
    return QuantizedExperts.from_float((torch.randn(E, 2 * I, H) / 8).bfloat16(),
                                       (torch.randn(E, H, I) / 6).bfloat16(), scheme=scheme, **kw)


def _route(t, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, H, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)]).to(torch.int32)
    w = torch.rand(t, K, generator=g)
    return x, w / w.sum(-1, keepdim=True), ids


def _close_within_accumulation(out, ref):
    """The bmm style's eager GEMM is a CPU BLAS fp32 bmm whose summation order is the
    library's: bit-identical to the fused kernel on torch 2.13, not on 2.11. The contract is
    fp32-accumulation rounding; an ulp there can flip a later fake-quantized element (one
    FP4 step), so: a few elements may differ, by at most a small fraction of the output."""
    d, r = (out.float() - ref.float()).abs(), ref.float().abs()
    # one flipped FP4 element moves its whole output row a little: bound the size, not the count
    assert d.max().item() <= 0.05 * max(1.0, r.max().item()), d.max().item()
    assert d.mean().item() <= 0.02 * max(1e-3, r.mean().item()), (d.mean().item(), r.mean().item())


def _run(m, args, exact=True):
    torch._dynamo.reset()
    counters.clear()
    recorder.RECORDS.clear()
    cm = torch.compile(m, backend="mxemu")
    with fresh_cache(), torch.no_grad():
        out, code = run_and_get_code(cm, *args)
        ref = m(*args)
    if exact:
        assert (out.float() - ref.float()).abs().max().item() == 0.0
    else:
        _close_within_accumulation(out, ref)
    return cm, "\n".join(code)


@pytest.mark.parametrize("scheme,dtype", [("nvfp4_w4a4", torch.bfloat16), ("w_mxfp4", torch.float16)])
def test_bmm_style_to_grouped_mm(scheme, dtype):
    """The bmm-style reference: its GEMMs become two mxemu::grouped_mm (traced patterns); in
    bf16 the whole-layer recogniser (semantic_moe) then proves the routing, activation and
    combine around them and makes the layer one mxemu::moe (it takes bf16 hidden states
    only, so the fp16 layer keeps the two fused GEMMs)."""
    m = _experts(scheme, gemm_style="bmm")
    cm, code = _run(m, _route(T, dtype=dtype), exact=False)
    c = counters["inductor"]
    assert c["mxemu_grouped_mm"] == 2, dict(counters["mxemu"])
    if dtype == torch.bfloat16:
        assert counters["mxemu"]["semantic_moe"] == 1, dict(counters["mxemu"])
        assert code.count("torch.ops.mxemu.moe.default(") == 1
        assert code.count("torch.ops.mxemu.grouped_mm.default(") == 0
    else:
        assert c["mxemu_moe"] == 0, dict(counters["mxemu"])
        assert code.count("torch.ops.mxemu.grouped_mm.default(") == 2
    FileCheck().check_not("extern_kernels.bmm").check_not("torch.ops.mxemu.linear").run(code)
    fresh = _route(13, seed=5, dtype=dtype)  # another token count (recompiles or not)
    with torch.no_grad():
        _close_within_accumulation(cm(*fresh), m(*fresh))


def test_loop_style_per_expert_linear():
    m = _experts("w_mxfp4_a_mxfp4", gemm_style="loop")
    _, code = _run(m, _route(T))
    assert counters["inductor"]["mxemu_linear"] == 2 * E, dict(counters["mxemu"])
    # the per-expert fused linears of each GEMM are then grouped (passes/semantic_group): one
    # mxemu::grouped_mm per GEMM, no linear and no stock mm left
    assert counters["mxemu"]["semantic_group"] == 2, dict(counters["mxemu"])
    assert code.count("torch.ops.mxemu.grouped_mm.default(") == 2
    assert code.count("torch.ops.mxemu.linear.default(") == 0
    FileCheck().check_not("extern_kernels.mm").run(code)


def test_nvfp4_gate_up_global_scales_moe():
    m = _experts("nvfp4_w4a4")
    a = m.w13_alpha
    m.w13_alpha = torch.stack([a, a * 1.5], 1).contiguous()  # [E, 2]: gate rows, up rows
    _, code = _run(m, _route(T))
    assert counters["inductor"]["mxemu_moe"] == 1, dict(counters["mxemu"])
    assert code.count("torch.ops.mxemu.moe.default(") == 1
    FileCheck().check_not("repeat_interleave").run(code)
