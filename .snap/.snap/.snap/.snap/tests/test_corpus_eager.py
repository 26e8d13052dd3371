"""The corpus of other people's emulation (tests/corpus/) against emu_inductor's reference
of each entry's named variant, in eager mode (no torch.compile), on fresh random inputs:
  * activation QDQ bit-identical on the probe rows (tests/corpus/probes.py), values first,
    then the sign of zero separately (several libraries never produce -0.0);
  * dequantized weights bit-identical (values, then the sign of zero);
  * layer outputs: bit-identical for linear layers (the same F.linear), within
    fp32-accumulation rounding for MoE layers (their GEMM and combine orders differ);
  * near misses differ from their nearest variant on some probe.
Measured disagreements are per-aspect xfail(strict=True) in the registry (entry.xfail)."""

from __future__ import annotations

import pytest
import torch

from tests.corpus import REGISTRY, TOKENS, UNAVAILABLE
from tests.corpus.data import tokens
from tests.corpus.oracle import act_reference, assert_within_accumulation, reference, weight_reference
from tests.corpus.probes import probe_rows, same_bits

MATCHING = [e for e in REGISTRY if e.near_miss is None]
NEAR = [e for e in REGISTRY if e.near_miss is not None]
LIBRARIES = ("torchao", "compressed-tensors", "modelopt", "transformers", "amd-quark", "vllm", "microxcaling")


def _params(entries, aspect, first_dtype_only=False):
    out = []
    for e in entries:
        for dt in e.dtypes[:1] if first_dtype_only else e.dtypes:
            dname = str(dt).split(".")[-1]
            reason = e.xfail.get(f"{aspect}@{dname}", e.xfail.get(aspect))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            out.append(pytest.param(e, dt, id=f"{e.name}-{dname}", marks=marks))
    return out


def _in_features(m) -> int:
    return getattr(m, "in_features", 64)


def _probes(m, dtype, seed):
    x = probe_rows(dtype, seed=seed)
    K = _in_features(m)
    return x if K == 64 else torch.cat([x] * (K // 64) + [x[:, : K % 64]], dim=1)


def _report(name, ok, x, got, want):
    bad = (~ok).nonzero()
    i = tuple(bad[0].tolist())
    return (f"{name}: {bad.shape[0]} of {ok.numel()} differ; first at {i}: x={x[i].item()!r} "
            f"got={got[i].item()!r} want={want[i].item()!r}")


def test_registry_metadata():
    assert not UNAVAILABLE, f"corpus modules whose library does not import here: {UNAVAILABLE}"
    assert len({e.name for e in REGISTRY}) == len(REGISTRY)
    for lib in LIBRARIES:
        assert {"linear", "moe"} <= {e.kind for e in REGISTRY if e.library == lib}, lib
    assert len([e for e in MATCHING if e.library == "respelling"]) >= 10
    assert {"tie_half_up", "nibble_swap", "block24", "nvfp4_bf16_scale"} <= {e.name[5:] for e in NEAR}
    aspects = {"layer", "act", "act_sign", "weights", "weights_sign"}
    for e in REGISTRY:
        assert e.kind in ("linear", "moe") and e.source and e.variant.weight.fmt in ("nvfp4", "mxfp4"), e.name
        assert not (e.near_miss and e.expect_fused), f"{e.name}: a near miss must never fuse"
        assert {k.split("@")[0] for k in e.xfail} <= aspects, (e.name, e.xfail)


@pytest.mark.parametrize("entry,dtype", _params(MATCHING, "layer"))
@pytest.mark.parametrize("T", TOKENS)
def test_layer_matches_reference(entry, dtype, T):
    for seed in (1, 2):
        m, _ = entry.make(seed, dtype)
        x = tokens(seed * 7 + T, T, _in_features(m), dtype)
        with torch.no_grad():
            out = m(x)
            ref = reference(entry, m, x)
        if entry.kind == "linear" and entry.exact_gemm:
            ok = same_bits(out, ref)
            assert bool(ok.all()), _report(entry.name, ok, out, out, ref)
        else:
            assert_within_accumulation(out, ref, entry.name)


def _act_pair(entry, dtype):
    m, _ = entry.make(3, dtype)
    x = _probes(m, dtype, seed=11)
    with torch.no_grad():
        return x, m.act_qdq(x), act_reference(x, entry.variant, m.emu_view().get("a1_global"))


WITH_ACT = [e for e in MATCHING if e.variant.act is not None]


@pytest.mark.parametrize("entry,dtype", _params(WITH_ACT, "act"))
def test_activation_qdq_values(entry, dtype):
    """Bit-identical on every probe, counting -0.0 and +0.0 as the same value."""
    x, got, want = _act_pair(entry, dtype)
    ok = same_bits(got, want) | ((got == 0) & (want == 0))
    assert bool(ok.all()), _report(entry.name, ok, x, got, want)


@pytest.mark.parametrize("entry,dtype", _params(WITH_ACT, "act_sign"))
def test_activation_qdq_signed_zeros(entry, dtype):
    x, got, want = _act_pair(entry, dtype)
    ok = same_bits(got, want) | ~((got == 0) & (want == 0))
    assert bool(ok.all()), _report(entry.name, ok, x, got, want)


def _weight_pairs(entry, dtype):
    for seed in (4, 5):
        m, _ = entry.make(seed, dtype)
        view = m.emu_view()
        with torch.no_grad():
            for name, w in m.dequantized_weights(dtype).items():
                yield name, w, weight_reference(view[name], entry.variant.weight, dtype)


@pytest.mark.parametrize("entry,dtype", _params(MATCHING, "weights"))
def test_weights_values(entry, dtype):
    for name, w, want in _weight_pairs(entry, dtype):
        ok = same_bits(w, want) | ((w == 0) & (want == 0))
        assert bool(ok.all()), _report(f"{entry.name}.{name}", ok, w, w, want)


@pytest.mark.parametrize("entry,dtype", _params(MATCHING, "weights_sign"))
def test_weights_signed_zeros(entry, dtype):
    for name, w, want in _weight_pairs(entry, dtype):
        ok = same_bits(w, want) | ~((w == 0) & (want == 0))
        assert bool(ok.all()), _report(f"{entry.name}.{name}", ok, w, w, want)


@pytest.mark.parametrize("entry,dtype", _params(NEAR, "none", first_dtype_only=True))
def test_near_miss_differs_from_nearest_variant(entry, dtype):
    """The proof that an entry is a near miss: a probe on which it and its nearest variant
    give different values (not only a different sign of zero)."""
    m, _ = entry.make(6, dtype)
    view = m.emu_view()
    found = []
    with torch.no_grad():
        if entry.variant.act is not None:
            x = _probes(m, dtype, seed=12)
            got, want = m.act_qdq(x), act_reference(x, entry.variant, view.get("a1_global"))
            n = int((~(same_bits(got, want) | ((got == 0) & (want == 0)))).sum())
            found.append(("act", n))
        for name, w in m.dequantized_weights(dtype).items():
            want = weight_reference(view[name], entry.variant.weight, dtype)
            found.append((name, int((~(same_bits(w, want) | ((w == 0) & (want == 0)))).sum())))
    assert any(n > 0 for _, n in found), f"{entry.name} equals its nearest variant on every probe: {found}"
