"""The kernels' NVFP4 activation recipes are the formats' own (kernels/recipe_source.py
traces formats.nvfp4.RECIPES and writes them op for op): under Triton's interpreter the
rendered QDQ equals formats.fake_quantize bit for bit on the edge probes, for every
recipe the kernels claim, both roundings, bf16 and fp32; a recipe they cannot write
exactly is refused with its reason instead of computing something else."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from emu_inductor.formats import E2M1, NVFP4_RECIPES, fake_quantize
from emu_inductor.kernels import KernelSpec, render
from emu_inductor.kernels import recipe_source
from emu_inductor.kernels.launch import get_module
from emu_inductor.recognize.probes import act_blocks
from emu_inductor.spec import OpSpec

GS = 7.0  # quantize-direction global scale of the probes (formats.recipe: g ~ 2688/amax)
# the interpreter on CPU; the GPU variant of the kernels where CUDA is available (NaN
# handling of tl.minimum / tl.max differs between numpy and the GPU: checked there)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _kernel_qdq(x: torch.Tensor, recipe: str, rounding: str, g: torch.Tensor) -> torch.Tensor:
    op = OpSpec(weight_fmt="nvfp4", act_kind="block", act_fmt="nvfp4", act_recipe=recipe, act_rounding=rounding)
    mod = get_module(KernelSpec(op, KernelSpec.dtype_name(x.dtype), interpret=DEVICE == "cpu"))
    M, K = x.shape
    xd = x.to(DEVICE)
    out = torch.empty_like(xd)
    BM = 1024 if DEVICE == "cpu" else 64
    mod.qdq_kernel[(-(-M // BM), 1)](xd, out, g.to(DEVICE), M, K, STATIC_A=True, BM=BM, BK=K)
    return out.cpu()


def _same_bits(a: torch.Tensor, b: torch.Tensor, zero_sign: bool = True) -> torch.Tensor:
    """Per element: both NaN, or the same bits (-0.0 and +0.0 differ unless zero_sign=False)."""
    ia = a.view(torch.int16 if a.dtype == torch.bfloat16 else torch.int32)
    ib = b.view(ia.dtype)
    same = (torch.isnan(a) & torch.isnan(b)) | (ia == ib)
    return same if zero_sign else same | ((a == 0) & (b == 0))


def test_every_formats_recipe_is_claimed():
    assert {r: recipe_source.recipe_unsupported_reason(r) for r in NVFP4_RECIPES} == {r: None for r in NVFP4_RECIPES}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("rounding", ["rne", "half_away"])
@pytest.mark.parametrize("recipe", sorted(NVFP4_RECIPES))
def test_kernel_recipe_equals_formats_bit_for_bit(recipe, rounding, dtype):
    probes = act_blocks(16, dtype, [E2M1], global_scale=GS)
    x = probes.blocks.reshape(-1, 16).contiguous()
    # the probes aim at E4M3 block-scale values for g = GS (quantize direction);
    # dequantize-direction recipes (ModelOpt, torchao) take the reciprocal
    native = GS if NVFP4_RECIPES[recipe].global_direction == "quantize" else 1.0 / GS
    g = torch.tensor([native], dtype=torch.float32)
    ref = fake_quantize(x, "nvfp4", recipe=recipe, rounding=rounding, global_scale=g)
    out = _kernel_qdq(x, recipe, rounding, g)
    # Recipes that keep the zero sign ("keep": vllm, vllm_ref, te, torchao) come out +0.0
    # where formats gives -0.0 (tiny negatives, -0.0): the shared element rounder negates
    # as 0 - v and its text is pinned by the codegen snapshots. Known, value-equal, and
    # invisible after the GEMM; recipes whose zero sign is data (compressed_tensors,
    # modelopt) are compared with their zero signs.
    r = NVFP4_RECIPES[recipe]
    zero_sign = r.signed_zero != "keep" or r.negzero_decode != "keep"
    same = _same_bits(out, ref, zero_sign)
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        # Triton's interpreter flushes bf16 subnormals to zero when it widens them to fp32
        # (the GPU's widening is exact): their results are zeros either way, only the
        # zero's sign can differ
        sub = (x != 0) & (x.abs() < torch.finfo(dtype).tiny)
        same |= sub & (out == 0) & (ref == 0)
    ok = same.all(dim=1)
    bad = [probes.labels[i] for i in torch.nonzero(~ok).flatten()[:5].tolist()]
    assert bool(ok.all()), f"{int((~ok).sum())} of {ok.numel()} probe blocks differ, e.g. {bad}"


def test_unrenderable_recipe_is_refused(monkeypatch):
    """A recipe with an operation the template cannot write (log2 here) is refused, by
    the support check and by render, naming the operation."""
    vllm = NVFP4_RECIPES["vllm"]
    odd = dataclasses.replace(vllm, name="odd_log2", block_scale=lambda a32, a_x, g: torch.log2(a32 * g))
    monkeypatch.setitem(recipe_source.NVFP4_RECIPES, "odd_log2", odd)
    reason = recipe_source.recipe_unsupported_reason("odd_log2")
    assert reason is not None and "log2" in reason
    op = OpSpec(weight_fmt="nvfp4", act_kind="block", act_fmt="nvfp4", act_recipe="odd_log2")
    with pytest.raises(ValueError, match="act_recipe: .*log2"):
        render(KernelSpec(op, "bf16", interpret=True))
