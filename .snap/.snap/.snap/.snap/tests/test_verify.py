"""``mxemu.verify`` (issue 8 item 4): the compiled graph checks each fused replacement
against the subgraph it replaced during the first N calls.

The mxemu ops run their eager reference here (EMU_INDUCTOR_KERNEL_BACKEND=reference) so
that a test can make the fused op wrong by swapping that reference. Compiles: eight,
about a second each once the pattern families are initialised.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache, run_and_get_code

import emu_inductor
from emu_inductor.ops import library
from emu_inductor.passes import MxemuPass, resolve_options
from emu_inductor.passes.verify import (
    VerifyMismatch,
    VerifyMode,
    VerifyWarning,
    compare,
    parse_verify,
    reset_states,
)
from emu_inductor.reference import QuantizedExperts, QuantizedLinear

N, K, T = 48, 128, 8


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("EMU_INDUCTOR_KERNEL_BACKEND", "reference")
    reset_states()
    counters.clear()
    yield
    reset_states()


def _linear(seed=0):
    torch.manual_seed(seed)
    return QuantizedLinear.from_float(torch.randn(N, K).bfloat16(), scheme="w_mxfp4_a_mxfp4")


def _x():
    return torch.randn(T, K).bfloat16()


def _eager(m, *args):
    with torch.no_grad():
        return m(*args)


def _compile(m, x, **options):
    torch._dynamo.reset()
    cm = torch.compile(m, backend=emu_inductor.backend(**options))
    with fresh_cache(), torch.no_grad():
        out, code = run_and_get_code(cm, x)
    return cm, out, "\n".join(code)


def _perturb(monkeypatch):
    """Make the fused linear wrong by a little more than the accumulation contract."""
    right = library._BACKENDS["reference"]["linear"]

    def wrong(*args, **kwargs):
        out = right(*args, **kwargs)
        return out + 0.1 * out.abs().amax().clamp_min(1.0)

    monkeypatch.setitem(library._BACKENDS["reference"], "linear", wrong)


@pytest.fixture(scope="module")
def verified_linear():
    """One compile with verify=2, shared by the tests that run it."""
    m = _linear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMU_INDUCTOR_KERNEL_BACKEND", "reference")
        counters.clear()
        cm, out, code = _compile(m, _x(), verify=2)
        assert counters["mxemu"]["linear"] == 1, dict(counters["mxemu"])
    return m, cm, code


# --- options --------------------------------------------------------------------------


def test_parse_verify_values_and_errors():
    assert parse_verify(False) is None and parse_verify(None) is None and parse_verify(0) is None
    assert parse_verify(True) == VerifyMode(3, False) == parse_verify(3)
    assert parse_verify("fallback") == VerifyMode(3, True)
    assert parse_verify("fallback:7") == VerifyMode(7, True)
    with pytest.raises(ValueError, match="mxemu.verify"):
        parse_verify(-1)
    with pytest.raises(ValueError, match="mxemu.verify"):
        parse_verify("sometimes")
    with pytest.raises(TypeError, match="mxemu.verify"):
        parse_verify(1.5)
    with pytest.raises(ValueError, match="mxemu.verify"):
        emu_inductor.backend(verify="always")
    with pytest.raises(ValueError, match="mxemu.verify"):
        emu_inductor.enable(verify=-2)
    assert resolve_options({"mxemu.verify": "fallback:2"})["verify"] == VerifyMode(2, True)


def test_verify_changes_the_pass_uuid():
    plain, on = MxemuPass().uuid(), MxemuPass({"verify": 2}).uuid()
    assert plain != on != MxemuPass({"verify": "fallback:2"}).uuid()
    assert MxemuPass({"verify": True}).uuid() == MxemuPass({"verify": 3}).uuid()
    assert MxemuPass({"verify": 0}).uuid() == plain


def test_compare_contract():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(16, 32, generator=g).bfloat16()
    assert compare(ref.clone(), ref) is None
    near = ref.clone()
    near[3, 4] += 0.01  # an accumulation-sized difference in one element
    assert compare(near, ref) is None
    far = ref + 0.5
    msg = compare(far, ref)
    assert msg is not None and "max |fused - original|" in msg
    nan = ref.clone()
    nan[1, 2] = float("nan")
    assert "NaN" in compare(nan, ref)
    assert compare(nan, nan.clone()) is None
    assert "shape/dtype" in compare(ref.float(), ref)
    ids = torch.arange(6)
    assert compare(ids, ids.clone()) is None and "differ" in compare(ids + (ids == 4), ids)


# --- compiled ---------------------------------------------------------------------------


def test_correct_fusion_verified_for_n_calls_then_not(verified_linear):
    m, cm, code = verified_linear
    assert "torch.ops.mxemu_verify.check" in code and "torch.ops.mxemu.linear" in code
    reset_states()
    counters.clear()
    with torch.no_grad():
        for call in range(4):
            x = _x()
            out = cm(x)
            assert torch.equal(out, _eager(m, x))
            assert counters["mxemu_verify"]["checks"] == min(call + 1, 2)
    assert counters["mxemu_verify"]["mismatches"] == 0


def test_wrong_fusion_raises_naming_the_subgraph(verified_linear, monkeypatch):
    m, cm, _ = verified_linear
    reset_states()
    _perturb(monkeypatch)
    with torch.no_grad(), pytest.raises(VerifyMismatch) as info:
        cm(_x())
    msg = str(info.value)
    assert "linear/" in msg and "at node" in msg and "original nodes:" in msg, msg
    assert "max |fused - original|" in msg and "call 1" in msg, msg
    assert counters["mxemu_verify"]["mismatches"] == 1


def test_fallback_warns_once_and_returns_the_original(monkeypatch):
    m = _linear(seed=1)
    _perturb(monkeypatch)
    x = _x()
    with pytest.warns(VerifyWarning, match="linear/.*running the original subgraph from now on"):
        cm, out, code = _compile(m, x, verify="fallback")
    assert counters["mxemu"]["linear"] == 1
    assert torch.equal(out, _eager(m, x))  # the original's result, not the wrong fused one
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: later calls stay quiet
        for _ in range(4):  # beyond the 3 verified calls: still the original
            x = _x()
            with torch.no_grad():
                assert torch.equal(cm(x), _eager(m, x))
    assert counters["mxemu_verify"]["mismatches"] == 1


def test_default_graph_holds_no_verify_op():
    m = _linear(seed=2)
    x = _x()
    _, out, code = _compile(m, x)
    assert "torch.ops.mxemu.linear" in code and "mxemu_verify" not in code
    assert torch.equal(out, _eager(m, x))


def test_moe_checked_against_the_users_code_not_the_grouped_ops():
    """The moe replacement absorbs two fused grouped_mm: its check inlines their
    originals, so one verify op guards the layer and its original has no mxemu op."""
    from emu_inductor.passes.verify import _decode  # the payload format is this module's

    torch.manual_seed(3)
    E, H, I, k = 4, 64, 32, 2
    m = QuantizedExperts.from_float((torch.randn(E, 2 * I, H) / 8).bfloat16(),
                                    (torch.randn(E, H, I) / 6).bfloat16(), scheme="w_mxfp4_a_mxfp4")
    x = torch.randn(T, H).bfloat16()
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(torch.int32)
    w = torch.rand(T, k)
    w = w / w.sum(-1, keepdim=True)
    torch._dynamo.reset()
    cm = torch.compile(m, backend=emu_inductor.backend(verify=1))
    with fresh_cache(), torch.no_grad():
        out, code = run_and_get_code(cm, x, w, ids)
    assert counters["mxemu"]["moe"] == 1 and counters["mxemu_verify"]["checks"] == 1
    code = "\n".join(code)
    keys = [line.split("'")[-2] for line in code.splitlines() if "torch.ops.mxemu_verify.check.default(" in line]
    assert len(keys) == 1, code
    original = _decode(keys[0])
    assert "moe/" in original.description
    targets = {str(n.target) for n in original.gm.graph.nodes if n.op == "call_function"}
    assert not any(t.startswith("mxemu.") for t in targets), targets
    assert any("grouped_mm" in t for t in targets), targets  # the user's aten._grouped_mm
    torch.testing.assert_close(out.float(), _eager(m, x, w, ids).float(), rtol=0, atol=0)


class _BitDecodeMxfp4(torch.nn.Module):
    """MXFP4 weights decoded by this test's own spelling (nibble LUT, exponent-bit E8M0
    with its edge bytes), bf16 activations: fused by the semantic family, whose match is
    only the GEMM."""

    def __init__(self, seed):
        super().__init__()
        from emu_inductor.formats import MXFP4, quantize

        torch.manual_seed(seed)
        q = quantize(torch.randn(32, 64), MXFP4)
        self.register_buffer("w", q.qdata)
        self.register_buffer("s", q.scale)

    def forward(self, x):
        e2m1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
        lut = torch.tensor(e2m1 + [-v for v in e2m1], device=x.device)
        codes = torch.stack([self.w & 0xF, self.w >> 4], -1).reshape(self.w.shape[0], -1)
        u = self.s.to(torch.int32)
        sc = torch.where(u == 0, torch.full_like(u, 0x00400000), u << 23)
        sc = torch.where(u == 255, torch.full_like(u, 0x7FC00000), sc).view(torch.float32)
        w = (lut[codes.long()].reshape(codes.shape[0], -1, 32) * sc.unsqueeze(-1)).reshape(codes.shape)
        return x @ w.to(x.dtype).t()


def test_semantic_fusion_original_holds_the_users_decode():
    """The cone a rewrite makes dead is part of the original (the semantic match is only
    the mm): the check runs the user's decode, and the compiled graph does not."""
    from emu_inductor.passes.verify import _decode

    m = _BitDecodeMxfp4(seed=4)
    x = torch.randn(4, 64).bfloat16()
    _, out, code = _compile(m, x, verify=1)
    assert counters["mxemu"]["semantic"] == 1 and counters["mxemu_verify"]["checks"] == 1, dict(counters["mxemu"])
    keys = [line.split("'")[-2] for line in code.splitlines() if "torch.ops.mxemu_verify.check.default(" in line]
    assert len(keys) == 1, code
    original = _decode(keys[0])
    assert original.kinds == ("t", "t", "t")  # x, codes, scale bytes: nothing decoded outside
    targets = {str(n.target) for n in original.gm.graph.nodes if n.op == "call_function"}
    assert {"aten.mm.default", "aten.__rshift__.Scalar", "aten.index.Tensor"} <= targets, targets
    assert "cpp_fused" not in code and "triton_" not in code, code  # no decode kernel left
    assert torch.equal(out, _eager(m, x))


def test_dynamic_shapes_pass_sizes_to_the_original():
    m = _linear(seed=5)
    torch._dynamo.reset()
    cm = torch.compile(m, backend=emu_inductor.backend(verify=3), dynamic=True)
    with fresh_cache(), torch.no_grad():
        for t in (8, 5, 3):
            x = torch.randn(t, K).bfloat16()
            out, code = run_and_get_code(cm, x)
            assert torch.equal(out, _eager(m, x))
            if t == 8:
                assert re.search(r"mxemu_verify\.check\.default\(\w+, \[[^\]]*\], \[\w+", code[0]), code[0]
    assert counters["mxemu"]["linear"] >= 1 and counters["mxemu_verify"]["checks"] == 3, dict(counters["mxemu"])


def test_enable_takes_verify_too():
    m = _linear(seed=6)
    x = _x()
    torch._dynamo.reset()
    with emu_inductor.enable(verify=1), fresh_cache(), torch.no_grad():
        out = torch.compile(m)(x)  # the stock inductor backend
    assert counters["mxemu"]["linear"] == 1 and counters["mxemu_verify"]["checks"] == 1, dict(counters["mxemu"])
    assert torch.equal(out, _eager(m, x))
