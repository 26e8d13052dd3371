"""Library behaviours the recogniser names instead of refusing blindly.

* Activation QDQ: the libraries' own MX quantizers (emu_inductor.formats.variants) are
  activation variants, so AMD Quark's fake_quantize_mx (+0 where an element rounds to
  zero, Inf blocks scaled from the max) is recognised as `quark_hw` instead of "no variant
  matches", and fused: its edge cases map to OpSpec act_signed_zero / act_inf_amax.
* Weight tables held in graph inputs whose values are unknown at compile time: when two
  hypotheses fit and give different weights (the formats' E2M1 table with -0 at code 8
  and ModelOpt's e2m1_values with +0), the weight is refused, not fused under a guard
  that would fail at run time for one of them.
"""

from unittest import mock

import torch
from torch._inductor.decomposition import select_decomp_table
from torch._inductor.fx_passes.post_grad import view_to_reshape
from torch.fx.experimental.proxy_tensor import make_fx

from emu_inductor.formats import fake_quantize
from emu_inductor.recognize import ActVerdict, Rejection, WeightVerdict, gemm_nodes, recognize_activation, \
    recognize_weight
from tests.corpus.quark_style import fake_quantize_mx

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def trace(fn, *args):
    with mock.patch("torch.compiler.is_compiling", lambda: True):
        gm = make_fx(fn, decomposition_table=select_decomp_table(), tracing_mode="fake")(*args)
    view_to_reshape(gm)
    gm.graph.eliminate_dead_code()
    return gm


def test_quark_activation_is_the_named_variant_quark_hw():
    x, w = torch.randn(8, 64, dtype=torch.bfloat16), torch.randn(32, 64, dtype=torch.bfloat16)
    gm = trace(lambda x, w: fake_quantize_mx(x) @ w.t(), x, w)
    (gemm,) = gemm_nodes(gm.graph)
    v = recognize_activation(gemm, use_cache=False)
    assert isinstance(v, ActVerdict), v.reason
    assert v.variant.named == "quark_hw" and v.kernel_supported, v.unsupported_reason
    assert v.variant.spec_fields == {"act_signed_zero": "positive", "act_inf_amax": "max", "act_byte0_inverse": "pow2"}
    for seed in (3, 4):  # the named variant reproduces Quark's function on fresh data, -0 included
        g = torch.Generator().manual_seed(seed)
        xs = (torch.randn(16, 64, generator=g) * torch.exp2(torch.randint(-20, 20, (16, 1), generator=g))).bfloat16()
        xs[0, :8] = -1e-30  # rounds to zero: Quark gives +0
        ref, user = v.variant.reference(xs), fake_quantize_mx(xs)
        assert torch.equal(ref.view(torch.int16), user.view(torch.int16))
    # and it is not the generic 'even' variant: that one keeps -0
    assert torch.signbit(fake_quantize(xs, "mxfp4", scale_mode="even")[0, 0])


def test_unknown_sixteen_entry_table_that_two_libraries_fill_differently_is_refused():
    def deq(w, s, lut):  # ModelOpt's spelling: a 16-entry signed table indexed by the code
        c = torch.stack([w & 0x0F, w >> 4], -1).reshape(w.shape[0], -1).long()
        v = lut[c].reshape(w.shape[0], -1, 32)
        return (v * torch.exp2(s.float() - 127).unsqueeze(-1)).reshape(w.shape[0], -1).to(torch.bfloat16)

    w = torch.randint(0, 256, (48, 32), dtype=torch.uint8)
    s = torch.randint(100, 140, (48, 2), dtype=torch.uint8)
    lut = torch.tensor(E2M1 + [-v for v in E2M1])
    gm = trace(lambda x, w, s, lut: x @ deq(w, s, lut).t(), torch.randn(4, 64, dtype=torch.bfloat16), w, s, lut)
    (gemm,) = gemm_nodes(gm.graph)
    v = recognize_weight(gemm, use_cache=False)
    assert isinstance(v, Rejection), v
    assert "both fit" in v.reason and "+0 for code 8" in v.reason, v.reason
    # with its value known (the caller's values mapping), the same cone is proven
    lut_node = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.meta["val"].shape == (16,))
    v = recognize_weight(gemm, values={lut_node: lut}, use_cache=False)
    assert isinstance(v, WeightVerdict) and v.variant.fmt == "mxfp4", getattr(v, "reason", v)
