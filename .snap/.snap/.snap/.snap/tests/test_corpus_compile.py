"""The corpus under torch.compile(backend="mxemu"): outputs equal eager within the contract
(fp32-accumulation rounding), and what fused is what the registry says.

`entry.expect_fused` (whole layer fused as its variant) drives the assertion in both
directions, so when the semantic matcher lands, flipping it to True is all that is needed.
Near misses: the part that is off (`near_part`) must never be fused. The counters of every
run are recorded as a junit property ("mxemu") and printed with -s. Only entries with
`compile_smoke` are compiled (each compile costs 3-30 s on 2 shared cores)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache, run_and_get_code

import emu_inductor  # noqa: F401  (registers the "mxemu" backend in a source checkout)
from tests.corpus import REGISTRY
from tests.corpus.oracle import assert_within_accumulation

SMOKE = [pytest.param(e, id=e.name) for e in REGISTRY if e.compile_smoke]
_OP = re.compile(r"torch\.ops\.mxemu\.(\w+)\.default\((.*)\)\s*$")
_NOT_FUSIONS = {"pass_runs", "internal_errors"}


def fusion_summary(code: str) -> dict:
    """Which mxemu ops the generated code calls, and whether any carries an activation QDQ."""
    ops, act = {}, False
    for line in code.splitlines():
        m = _OP.search(line.strip())
        if not m or "assert_size_stride" in line:
            continue
        ops[m.group(1)] = ops.get(m.group(1), 0) + 1
        cfg = re.search(r"'(\{.*\})'", m.group(2))
        if cfg and json.loads(cfg.group(1)).get("act_kind", "none") != "none":
            act = True
    fams = {k: v for k, v in counters["mxemu"].items() if k not in _NOT_FUSIONS and v}
    return {"ops": ops, "act_fused": act, "families": fams,
            "graph_breaks": sum(counters["graph_break"].values())}


def whole_layer_fused(entry, s: dict) -> bool:
    if entry.kind == "moe":
        return s["ops"].get("moe", 0) == 1
    return s["ops"].get("linear", 0) >= 1 and (entry.variant.act is None or s["act_fused"])


@pytest.mark.parametrize("entry", SMOKE)
def test_compiled_matches_eager_and_fusion_is_as_registered(entry, record_property):
    m, (x,) = entry.make(1, torch.bfloat16)
    torch._dynamo.reset()
    counters.clear()
    with fresh_cache(), torch.no_grad():
        out, code = run_and_get_code(torch.compile(m, backend="mxemu"), x)
        ref = m(x)
    s = fusion_summary("\n".join(code))
    record_property("mxemu", json.dumps(s))
    print(entry.name, s)
    assert_within_accumulation(out, ref, entry.name)
    if entry.near_miss:
        if entry.near_part == "act":
            assert not s["act_fused"] and not s["ops"].get("moe"), f"{entry.name}: near-miss QDQ fused: {s}"
        else:
            assert not s["ops"], f"{entry.name}: near-miss weights fused: {s}"
        return
    fused = whole_layer_fused(entry, s)
    assert fused == entry.expect_fused, (
        f"{entry.name}: whole-layer fusion {fused}, registry says expect_fused={entry.expect_fused}: {s}")
