"""Library activation QDQs whose only differences from the generic MX QDQ are edge cases
(the sign of zeros, Inf blocks) fuse under torch.compile(backend="mxemu"), the edge cases
carried into the fused op's OpSpec. (Quark's linear is covered by the corpus compile test,
whose registry expects it fused; microxcaling's linear is compiled there in bf16 and here
in fp32, as formats' variant microxcaling_even: its element rounding computed in the dtype.)"""

from __future__ import annotations

import re

import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache, run_and_get_code

import emu_inductor  # noqa: F401  (registers the "mxemu" backend in a source checkout)
from emu_inductor.spec import OpSpec
from tests.corpus import BY_NAME
from tests.corpus.oracle import assert_within_accumulation

_SPEC = re.compile(r"torch\.ops\.mxemu\.linear\.default\(.*'(\{.*\})'")


def test_microxcaling_linear_fp32_fuses_its_activation_with_lt0_zeros():
    entry = BY_NAME["microxcaling_mx_linear"]
    m, (x,) = entry.make(2, torch.float32)
    x[0, :32] = -0.0  # a -0 block: microxcaling gives +0 (sign(-0) * ...), formats' lt0 too
    x[1, 5] = -1e-30  # rounds to zero and keeps its sign under lt0
    torch._dynamo.reset()
    counters.clear()
    with fresh_cache(), torch.no_grad():
        out, code = run_and_get_code(torch.compile(m, backend="mxemu"), x)
        ref = m(x)
    specs = [OpSpec.from_str(s) for s in _SPEC.findall("\n".join(code))]
    assert len(specs) == 1, code
    op = specs[0]
    assert (op.act_kind, op.act_scale_mode, op.act_rounding, op.act_signed_zero, op.act_inf_amax) == \
        ("block", "floor_log2", "microxcaling_even", "lt0", "nan"), op
    assert_within_accumulation(out, ref, entry.name)
