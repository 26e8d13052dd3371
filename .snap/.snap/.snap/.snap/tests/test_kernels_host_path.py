"""The per-call host path of the mxemu ops: what is computed once, not on every call.

Without CUDA graphs a decode step is bound by host work (benchmarks/profile_overhead.py
on the H200: ~0.6 ms per mxemu linear call against ~0.08 ms for stock compile), so the
launchers cache what is constant for a compiled graph: the parsed spec string, the
spec's autotune key, the device name, a linear's row ids and block -> expert map (read-only
tensors instead of an arange and a zeros launch per call). These tests check the caches
return what the uncached code computed, and that nothing first made while a CUDA graph
is being captured is cached (it would live in the graph's private pool)."""

from __future__ import annotations

import pytest
import torch

from emu_inductor.kernels import autotune, launch, launch_common
from emu_inductor.ops import library
from emu_inductor.spec.opspec import OpSpec


def test_spec_parsed_once_and_errors_every_time():
    s = OpSpec.from_scheme("w_mxfp4_a_mxfp4").to_str()
    a, b = library._parse_spec(s), library._parse_spec(s)
    assert a is b and a == OpSpec.from_str(s)
    for _ in range(2):  # a failed parse is not cached: the error comes back each call
        with pytest.raises(ValueError, match="spec"):
            library._parse_spec("{not json")


def test_spec_key_is_the_specs_json():
    for scheme in ("nvfp4_w4a4", "w_mxfp4_a_mxfp4", "w_mxfp4"):
        spec = OpSpec.from_scheme(scheme)
        assert launch._spec_key(spec) == spec.to_str()
        assert launch._spec_key(OpSpec.from_str(spec.to_str())) == spec.to_str()  # equal specs share a key


def test_linear_row_ids_are_cached_constants():
    dev = torch.device("cpu")
    ids, bexp = launch_common._iota_i32(dev, 48), launch_common._zeros_i32(dev, 3)
    assert torch.equal(ids, torch.arange(48, dtype=torch.int32)) and ids.dtype == torch.int32
    assert torch.equal(bexp, torch.zeros(3, dtype=torch.int32))
    assert launch_common._iota_i32(dev, 48) is ids and launch_common._zeros_i32(dev, 3) is bexp
    assert launch_common._iota_i32(dev, 64) is not ids and launch_common._iota_i32(dev, 64).numel() == 64


def test_nothing_made_during_capture_is_cached(monkeypatch):
    monkeypatch.setattr(launch_common, "_DUMMIES", {})
    monkeypatch.setattr(launch_common, "_capturing", lambda dev: True)
    a = launch_common._iota_i32(torch.device("cpu"), 16)
    assert torch.equal(a, torch.arange(16, dtype=torch.int32))
    assert launch_common._iota_i32(torch.device("cpu"), 16) is not a and launch_common._DUMMIES == {}
    monkeypatch.setattr(launch_common, "_capturing", lambda dev: False)
    assert launch_common._iota_i32(torch.device("cpu"), 16) is launch_common._iota_i32(torch.device("cpu"), 16)


def test_env_config_parsed_once_per_value(monkeypatch):
    monkeypatch.setenv("EMU_INDUCTOR_KERNEL_CONFIG", "BM=16,BN=64,BK=128,num_warps=4,num_stages=3")
    a = autotune.pinned_config()
    assert a == autotune.TileConfig(16, 64, 128, 4, 3) and autotune.pinned_config() is a
    monkeypatch.setenv("EMU_INDUCTOR_KERNEL_CONFIG", "BM=32,BN=64,BK=128,num_warps=4,num_stages=3")
    assert autotune.pinned_config().BM == 32  # a new value is parsed, not the cached one
    monkeypatch.setenv("EMU_INDUCTOR_KERNEL_CONFIG", "BM=oops")
    with pytest.raises(ValueError, match="EMU_INDUCTOR_KERNEL_CONFIG"):
        autotune.pinned_config()
