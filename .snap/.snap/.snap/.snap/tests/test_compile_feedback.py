"""Compile feedback: progress lines for pattern-rule building, and the compile-time split
(emu_inductor.compile_report(), ExplainReport.compile_time). No timing targets here:
only that the phases are reported, attributed to the right family, and consistent."""

import torch

import emu_inductor
from emu_inductor.passes import timings

from helpers import affine_init, affine_search, temp_family

aten = torch.ops.aten


def test_explain_reports_rule_building_matching_and_inductor(capfd):
    name = "mxemu_test_feedback"  # a fresh family: its rules are built during this explain
    with temp_family(name, affine_init, anchors=[aten.add.Tensor]):
        report = emu_inductor.explain(affine_search, torch.randn(16), enabled_patterns=[name])
    err = capfd.readouterr().err
    assert f"mxemu: building pattern rules for family {name}" in err
    assert f"pattern rule(s) for family {name} in" in err
    assert [c.fused for c in report.candidates] == [True]
    t = report.compile_time
    assert set(t.rules_s) == {name} and set(t.matching_s) == {name}
    assert t.compiles == 1 and t.compile_s >= t.pass_s >= t.rules_s[name] > 0
    assert t.inductor_s == t.compile_s - t.pass_s
    assert report.fusion.families == {name: 1}
    text = str(report)
    assert "compile time (s): Inductor" in text and f"{name} " in text
    assert emu_inductor.compile_report().compile_s >= t.compile_s


def test_progress_goes_to_the_log_and_to_active_streams(caplog):
    import io
    import logging

    buf = io.StringIO()
    with caplog.at_level(logging.INFO, logger="emu_inductor"), timings.progress_to(buf):
        timings.progress("step %s took %.1f s", "x", 1.25)
    timings.progress("not shown")
    assert buf.getvalue() == "mxemu: step x took 1.2 s\n"
    assert "step x took 1.2 s" in caplog.text
