"""ops.validate's memo of checked constant values: a scale passed unchanged is not checked
again, but an in-place change, another tensor object or EMU_INDUCTOR_VALUE_CHECK_MEMO=0
checks it again, and per-call values (expert ids, group ends) are checked on every call.
The GPU path (one Triton launch, kernels.checks) is replaced by a recorder here; its device
asserts are exercised on the GPU by benchmarks/gpu_value_checks.py."""

from __future__ import annotations

import pytest
import torch

from emu_inductor.kernels import checks
from emu_inductor.ops import validate
from emu_inductor.spec.opspec import OpSpec


@pytest.fixture
def launches(monkeypatch):
    seen = []

    def record(floats=(), ints=(), device=None):
        seen.append(([r.message.split(":")[0] for r in floats],
                     [(r.message.split(":")[0], r.nondecreasing) for r in ints]))
    monkeypatch.setattr(checks, "check_values", record)
    monkeypatch.setattr(validate, "_one_launch", lambda dev: True)
    monkeypatch.setattr(validate, "_values_checkable", lambda: True)
    monkeypatch.delenv("EMU_INDUCTOR_VALUE_CHECK_MEMO", raising=False)
    return seen


def test_linear_scales_are_checked_once_per_value(launches, monkeypatch):
    spec = OpSpec.from_scheme("nvfp4_w4a4")
    alpha, gs = torch.rand(1) + 0.5, torch.tensor([100.0])
    validate.check_linear_values(alpha, gs, spec)
    validate.check_linear_values(alpha, gs, spec)
    assert launches[0] == (["alpha", "input_global_scale"], [])
    assert launches[1] == ([], []), "an unchanged scale was checked again"
    alpha.mul_(2.0)  # in place: the version counter moves
    validate.check_linear_values(alpha, gs, spec)
    assert launches[2] == (["alpha"], [])
    validate.check_linear_values(alpha.clone(), gs, spec)  # another tensor object
    assert launches[3] == (["alpha"], [])
    monkeypatch.setenv("EMU_INDUCTOR_VALUE_CHECK_MEMO", "0")
    validate.check_linear_values(alpha, gs, spec)
    assert launches[4] == (["alpha", "input_global_scale"], [])


def test_moe_ids_every_call_scales_and_map_once(launches):
    spec = OpSpec.from_scheme("nvfp4_w4a4")
    E = 4
    w13 = torch.zeros(E, 8, 16, dtype=torch.uint8)
    a13, a2 = torch.ones(E), torch.ones(E)
    g1, g2 = torch.tensor([10.0]), torch.tensor([10.0])
    emap = torch.arange(E, dtype=torch.int32)
    for _ in range(3):
        ids = torch.randint(0, E, (2, 2), dtype=torch.int32)  # a new routing each step
        validate.check_moe_values(ids, w13, a13, a2, g1, g2, emap, spec)
    assert launches[0] == (["w13_alpha", "w2_alpha", "a1_global_scale", "a2_global_scale"],
                           [("topk_ids", False), ("expert_map", False)])
    assert launches[1] == launches[2] == ([], [("topk_ids", False)])
    g2.fill_(float("nan"))  # a bad value written in place is seen
    validate.check_moe_values(ids, w13, a13, a2, g1, g2, emap, spec)
    assert launches[3] == (["a2_global_scale"], [("topk_ids", False)])


def test_grouped_mm_offsets_every_call_as_one_launch(launches):
    spec = OpSpec.from_scheme("nvfp4_w4a4")
    alpha, gs = torch.ones(3), torch.tensor([50.0])
    for _ in range(2):
        validate.check_grouped_mm_values(alpha, torch.tensor([2, 5, 9], dtype=torch.int32), gs, spec)
    assert launches[0] == (["w_alpha", "a_global_scale"], [("offs", True)])
    assert launches[1] == ([], [("offs", True)])


def test_inference_tensors_are_never_remembered(launches):
    spec = OpSpec.from_scheme("nvfp4_w4a4")
    with torch.inference_mode():
        alpha = torch.ones(1)
    for _ in range(2):
        validate.check_linear_values(alpha, None, spec)
    assert launches == [(["alpha"], []), (["alpha"], [])]


def test_cpu_values_still_raise_now():
    # the CPU path reads the values directly (no memo, no launch): a bad scale raises at once
    spec = OpSpec.from_scheme("nvfp4_w4a4")
    with pytest.raises(ValueError, match="alpha"):
        validate.check_linear_values(torch.tensor([0.0]), None, spec)
