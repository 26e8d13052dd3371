"""Safe default for NVFP4 activation global scales (issue 12, item 3): a QuantizedExperts /
QuantizedLinear built without them calibrates on its first call (2688/amax of that batch,
logged once) instead of running with 1.0, which turns small activations into all zeros.
Scales that were given, loaded or written are kept. Under torch.compile(backend="mxemu")
the first call calibrates inside the graph: no graph break, one recompile, then the layer
is one fused mxemu::moe.
"""

import logging

import pytest
import torch

from emu_inductor.reference import QuantizedExperts, QuantizedLinear, softmax_topk

E, H, I, T, K = 4, 64, 32, 6, 2


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(E, 2 * I, H, generator=g) / 8).bfloat16(), (torch.randn(E, H, I, generator=g) / 6).bfloat16()


def _batch(seed, scale=1.0, t=T):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(t, H, generator=g) * scale).bfloat16()
    w, ids = softmax_topk(torch.randn(t, E, generator=g), K)
    return x, w, ids


def _bf16_moe(x, w13, w2, w, ids):
    """The unquantized layer in fp32 (silu-and-mul), for a sanity bound on the error."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for k in range(ids.shape[1]):
        h = torch.einsum("th,tnh->tn", x.float(), w13[ids[:, k].long()].float())
        a = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
        out += w[:, k:k + 1].float() * torch.einsum("ti,thi->th", a, w2[ids[:, k].long()].float())
    return out


def _rel(y, ref):
    return ((y.float() - ref).norm() / ref.norm()).item()


def test_small_activations_no_longer_give_zeros():
    w13, w2 = _weights()
    x, w, ids = _batch(1, scale=1e-3)
    m = QuantizedExperts.from_float(w13, w2, scheme="nvfp4_w4a4")
    assert not m.calibrated and torch.isnan(m.a1_global_scale) and torch.isnan(m.a2_global_scale)
    with torch.no_grad():
        y = m(x, w, ids)
    assert m.calibrated
    assert _rel(y, _bf16_moe(x, w13, w2, w, ids)) < 0.3  # was 1.0 (all zeros) with global scale 1.0
    # exactly what calibrate_() on that batch gives
    ref = QuantizedExperts.from_float(w13, w2, scheme="nvfp4_w4a4").calibrate_(x, w, ids)
    assert torch.equal(m.a1_global_scale, ref.a1_global_scale) and torch.equal(m.a2_global_scale, ref.a2_global_scale)
    with torch.no_grad():
        assert torch.equal(y, ref(x, w, ids))


def test_first_call_only_and_given_scales_are_kept():
    w13, w2 = _weights()
    m = QuantizedExperts.from_float(w13, w2, scheme="nvfp4_w4a4")
    x, w, ids = _batch(2)
    with torch.no_grad():
        m(x, w, ids)
        g1, g2 = m.a1_global_scale.clone(), m.a2_global_scale.clone()
        m(*_batch(3, scale=50.0))  # a later batch does not recalibrate
    assert torch.equal(m.a1_global_scale, g1) and torch.equal(m.a2_global_scale, g2)
    # given in the constructor: calibrated from the start
    given = QuantizedExperts.from_float(w13, w2, scheme="nvfp4_w4a4", a1_global_scale=torch.tensor(7.0),
                                        a2_global_scale=torch.tensor(9.0))
    assert given.calibrated
    # written into the buffer (or loaded) before the first call: kept; only the NaN one is set
    part = QuantizedExperts.from_float(w13, w2, scheme="nvfp4_w4a4")
    part.a1_global_scale.fill_(7.0)
    with torch.no_grad():
        part(x, w, ids)
    assert part.a1_global_scale.item() == 7.0 and torch.equal(part.a2_global_scale, g2)
    loaded = QuantizedExperts.from_float(w13, w2, scheme="nvfp4_w4a4")
    loaded.load_state_dict(given.state_dict())
    with torch.no_grad():
        loaded(x, w, ids)
    assert loaded.a1_global_scale.item() == 7.0 and loaded.a2_global_scale.item() == 9.0


def test_weight_only_and_mx_schemes_need_no_calibration():
    w13, w2 = _weights()
    for scheme in ("nvfp4_w4a16", "w_mxfp4_a_mxfp4"):
        m = QuantizedExperts.from_float(w13, w2, scheme=scheme)
        assert m.calibrated and m.a1_global_scale is None


def test_quantized_linear_small_activations():
    g = torch.Generator().manual_seed(4)
    wt = (torch.randn(32, H, generator=g) / 8).bfloat16()
    x = (torch.randn(5, H, generator=g) * 1e-3).bfloat16()
    lin = QuantizedLinear.from_float(wt, scheme="nvfp4_w4a4")
    assert not lin.calibrated and torch.isnan(lin.input_global_scale)
    with torch.no_grad():
        y = lin(x)
    ref = x.float() @ wt.float().t()
    assert lin.calibrated and _rel(y, ref) < 0.3
    explicit = QuantizedLinear.from_float(wt, scheme="nvfp4_w4a4").calibrate_(x)
    assert torch.equal(explicit.input_global_scale, lin.input_global_scale)


def test_first_call_is_logged_once_per_layer(caplog):
    w13, w2 = _weights()
    m = QuantizedExperts.from_float(w13, w2, scheme="nvfp4_w4a4")
    x, w, ids = _batch(5)
    with caplog.at_level(logging.INFO, logger="emu_inductor"), torch.no_grad():
        m(x, w, ids)
        m(x, w, ids)
    msgs = [r.getMessage() for r in caplog.records if "first batch" in r.getMessage()]
    assert len(msgs) == 1 and "QuantizedExperts (nvfp4_w4a4)" in msgs[0] and "calibrate_()" in msgs[0], msgs


def test_uncalibrated_scale_used_directly_is_an_error():
    """The NaN placeholder is never used silently: the reference rejects it."""
    from emu_inductor.reference import moe_emulated

    w13, w2 = _weights()
    m = QuantizedExperts.from_float(w13, w2, scheme="nvfp4_w4a4")
    x, w, ids = _batch(6)
    with pytest.raises(ValueError, match="a1_global_scale"):
        moe_emulated(x, m.w13, m.w2, w, ids, scheme=m.scheme, w13_scale=m.w13_scale, w2_scale=m.w2_scale,
                     w13_alpha=m.w13_alpha, w2_alpha=m.w2_alpha, a1_global_scale=m.a1_global_scale,
                     a2_global_scale=m.a2_global_scale)


def test_compiled_first_call_calibrates_without_graph_break():
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache

    w13, w2 = _weights()
    m = QuantizedExperts.from_float(w13, w2, scheme="nvfp4_w4a4")
    twin = QuantizedExperts.from_float(w13, w2, scheme="nvfp4_w4a4")
    batches = [_batch(10, scale=1e-3), _batch(11, scale=1e-3), _batch(12, scale=1e-3)]
    torch._dynamo.reset()
    counters.clear()
    try:
        with fresh_cache(), torch.no_grad():
            cm = torch.compile(m, backend="mxemu")
            outs = [cm(*b) for b in batches]
            refs = [twin(*b) for b in batches]  # eager: calibrates on batches[0] too
    finally:
        torch._dynamo.reset()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # calibrating, then steady
    assert m.calibrated
    torch.testing.assert_close(m.a1_global_scale, twin.a1_global_scale, rtol=0, atol=0)
    torch.testing.assert_close(m.a2_global_scale, twin.a2_global_scale, rtol=1e-2, atol=0)
    assert counters["mxemu"]["moe"] >= 1, dict(counters["mxemu"])
    for out, ref in zip(outs, refs):
        assert out.abs().max() > 0
        torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)


def test_readme_example_gives_a_sensible_result():
    """The README's QuantizedExperts example: close to the bf16 layer, and the same with
    the explicit calibrate_() line left out (the first call calibrates on that batch)."""
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "README.md")).read()
    block = re.search(r"```python\n(.*?)```", text[text.index("## Public API"):], re.S).group(1)
    results = []
    for src in (block, re.sub(r"\n\s*experts\.calibrate_\(.*", "", block)):
        assert src == block or "calibrate_" not in src
        torch.manual_seed(0)
        ns: dict = {}
        with torch.no_grad():
            exec(compile(src, "README.md:Public API", "exec"), ns)
        results.append(ns["out"])
        E_, I_ = ns["E"], ns["I"]
        ref = torch.zeros(ns["x"].shape)
        for k in range(ns["ids"].shape[1]):
            h = torch.einsum("th,tnh->tn", ns["x"].float(), ns["w13"][ns["ids"][:, k].long()].float())
            a = torch.nn.functional.silu(h[:, :I_]) * h[:, I_:]
            ref += ns["w"][:, k:k + 1].float() * torch.einsum("ti,thi->th", a, ns["w2"][ns["ids"][:, k].long()].float())
        assert E_ == ns["experts"].num_experts
        assert _rel(ns["out"], ref) < 0.3, _rel(ns["out"], ref)
    assert torch.equal(results[0], results[1])
