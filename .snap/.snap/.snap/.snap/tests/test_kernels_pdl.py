"""Programmatic dependent launch (render._PDL_ENTRY, launch._pdl_kw): the ordering argument
holds only if every program of a PDL kernel waits for the previous grid before it reads,
writes or returns, and lets the next grid launch only after that wait. Checked on the
generated source of every scheme (the GPU behaviour itself is checked by gpu_check and the
graph replays of benchmarks/profile_decode.py)."""

import ast

import pytest
import torch

from emu_inductor.kernels import launch, render
from emu_inductor.spec import OpSpec
from emu_inductor.spec.schemes import SCHEMES

PDL_KERNELS = {"gemm_act_kernel", "act_epilogue_kernel", "gemm_out_kernel", "combine_kernel", "prep_kernel"}


def _is_call(node, name):
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name


def _first_pdl_block(fn: ast.FunctionDef):
    """The `if PDL:` statement and everything before it."""
    for i, stmt in enumerate(fn.body):
        if isinstance(stmt, ast.If) and isinstance(stmt.test, ast.Name) and stmt.test.id == "PDL":
            return stmt, fn.body[:i]
    return None, fn.body


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_pdl_kernels_wait_before_anything(scheme):
    ks = launch.kernel_spec_for(OpSpec.from_scheme(scheme), torch.bfloat16, device=torch.device("cuda"))
    tree = ast.parse(render(ks))
    fns = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert PDL_KERNELS <= set(fns), PDL_KERNELS - set(fns)
    for name in PDL_KERNELS:
        fn = fns[name]
        pdl = [a for a in fn.args.args if a.arg == "PDL"]
        assert pdl, f"{name} has no PDL parameter"
        block, before = _first_pdl_block(fn)
        assert block is not None, f"{name}: no `if PDL:` block"
        # only docstring-free, side-effect-free statements may come first: none at all
        assert not before, f"{name}: {len(before)} statements run before the PDL wait"
        calls = [s.value for s in block.body if isinstance(s, ast.Expr)]
        assert len(calls) == 2 and _is_call(calls[0], "gdc_wait") and _is_call(calls[1], "gdc_launch_dependents"), name
    # kernels outside the chain never wait (they are launched without PDL)
    for name, fn in fns.items():
        if name not in PDL_KERNELS:
            assert not any(_is_call(n, "gdc_wait") for n in ast.walk(fn)), name


def test_pdl_is_opt_in_and_off_on_the_cpu(monkeypatch):
    monkeypatch.delenv("EMU_INDUCTOR_PDL", raising=False)
    assert launch._pdl_kw(torch.device("cuda")) == {}  # default off: no measured gain on the H200
    monkeypatch.setenv("EMU_INDUCTOR_PDL", "1")
    assert launch._pdl_kw(torch.device("cpu")) == {}
