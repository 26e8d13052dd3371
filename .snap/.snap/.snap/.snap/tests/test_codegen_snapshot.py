"""Codegen snapshots: the generated Triton source for each scheme is pinned under
tests/snapshots/codegen/, so a template change reads as a diff. EXPECTTEST_ACCEPT=1
rewrites them (and the inline expectations below)."""

import ast
import difflib
import os

import expecttest
import pytest

from emu_inductor.kernels import KernelSpec, render
from emu_inductor.spec import OpSpec
from emu_inductor.reference.activations import ACTIVATIONS
from emu_inductor.spec.schemes import SCHEMES

SNAP = os.path.join(os.path.dirname(__file__), "snapshots", "codegen")


def _spec(scheme, activation="silu", interpret=False, **kw):
    op = OpSpec.from_scheme(scheme, activation=activation)
    nv = SCHEMES[scheme].weight_fmt.has_global_scale
    return KernelSpec(op, "bf16", "expert" if nv else "none", "expert" if nv else "none", interpret=interpret, **kw)


def _assert_snapshot(name, text):
    path = os.path.join(SNAP, name)
    if os.getenv("EXPECTTEST_ACCEPT"):
        os.makedirs(SNAP, exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        return
    if not os.path.exists(path):
        pytest.fail(f"missing snapshot {path}; run with EXPECTTEST_ACCEPT=1")
    with open(path) as f:
        old = f.read()
    if old != text:
        diff = "".join(difflib.unified_diff(old.splitlines(True), text.splitlines(True), path, "rendered"))
        pytest.fail(f"generated source changed (EXPECTTEST_ACCEPT=1 accepts):\n{diff[:6000]}")


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_scheme_source_snapshot(scheme):
    _assert_snapshot(f"{scheme}.py", render(_spec(scheme)))


def test_interpreter_variant_snapshot():
    _assert_snapshot("nvfp4_w4a4__interpret.py", render(_spec("nvfp4_w4a4", interpret=True)))


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("interpret", [False, True])
def test_every_variant_renders_valid_python(scheme, activation, interpret):
    src = render(_spec(scheme, activation, interpret))
    tree = ast.parse(src)
    names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert {"gemm_act_kernel", "gemm_out_kernel", "qdq_kernel"} <= names
    assert "libdevice" not in src and "float8" not in src  # no libdevice, no fp8 casts
    assert render(_spec(scheme, activation, interpret)) == src  # deterministic


class TestInline(expecttest.TestCase):
    def test_format_facts_come_from_spec(self):
        src = render(_spec("w_mxfp6_e3m2_a_mxfp6_e3m2"))
        lines = [l.strip() for l in src.splitlines() if "def _round_" in l or "_e8m0_scale(amax)" in l
                 or "bits = (bits +" in l or "tl.minimum(tl.abs(y)" in l]
        self.assertExpectedInline("\n".join(lines), """\
def _round_e3m2_rne(y):
a = tl.minimum(tl.abs(y), 28.0, propagate_nan=tl.PropagateNan.ALL)
def _e8m0_scale(amax):
bits = (bits + 1048576) & 0x7F800000""")
