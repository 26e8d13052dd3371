"""Every activation-QDQ variant the recognisers can map user code onto, rendered one knob
away from the default, equals the reference exactly (identity-weight linear: the output row
is the fake-quantized activation). The same check runs on the GPU as
benchmarks/gpu_variant_check.py; here the interpreter variant of the kernels."""

import pytest

from benchmarks.gpu_variant_check import check_all, variants


@pytest.fixture(scope="module")
def rows():
    return check_all()


def test_every_variant_equals_the_reference(rows):
    checked = [r for r in rows if "skipped" not in r]
    assert len(checked) >= 25  # the check really ran (33 rendered variants today)
    bad = [r for r in checked if not r["ok"]]
    assert not bad, bad


def test_the_list_covers_nvfp4_in_dtype_roundings():
    # NVFP4 with microxcaling's in-dtype roundings was rendered without y's dtype rounding
    kinds = {(f, kw.get("act_rounding")) for f, kw in variants()}
    assert ("nvfp4", "microxcaling_nearest") in kinds and ("nvfp4", "microxcaling_even") in kinds
