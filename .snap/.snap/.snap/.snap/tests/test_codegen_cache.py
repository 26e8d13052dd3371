"""The per-user kernel file cache: private directory, env override, hash-verified import,
real files for tracebacks; autotune pinning."""

import inspect
import os
import stat

import pytest

from emu_inductor.kernels import cache, autotune
from emu_inductor.kernels.kernel_spec import KernelSpec
from emu_inductor.kernels.launch import get_module
from emu_inductor.kernels.render import render
from emu_inductor.spec import OpSpec


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    d = tmp_path / "c"
    monkeypatch.setenv("EMU_INDUCTOR_CACHE_DIR", str(d))
    monkeypatch.setattr(cache, "_modules", {})
    monkeypatch.setattr(cache, "_dir", None)
    return d


def test_private_dir_and_real_file(fresh_cache):
    src = "X = 1\n"
    mod = cache.load_module("t", src)
    assert mod.X == 1
    st = os.stat(fresh_cache)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
    assert os.path.dirname(mod.__file__) == str(fresh_cache / "kernels")
    assert os.path.basename(mod.__file__) == f"t_{cache.content_digest(src)[:40]}.py"


def test_tampered_file_is_not_imported(fresh_cache):
    src = "X = 1\n"
    path = cache.load_module("t", src).__file__
    with open(path, "w") as f:
        f.write("X = 666\n")
    cache._modules.clear()
    assert cache.load_module("t", src).X == 1  # rewritten from the rendered source
    with open(path) as f:
        assert f.read() == src


def test_shared_dir_is_refused(tmp_path, monkeypatch):
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o777)
    monkeypatch.setenv("EMU_INDUCTOR_CACHE_DIR", str(d))
    monkeypatch.setattr(cache, "_dir", None)
    assert cache.cache_dir() != str(d)
    assert stat.S_IMODE(os.stat(cache.cache_dir()).st_mode) == 0o700


def test_generated_kernels_live_in_files(fresh_cache):
    ks = KernelSpec(OpSpec.from_scheme("w_mxfp4_a_mxfp4"), "bf16", interpret=True)
    mod = get_module(ks)
    with open(mod.__file__) as f:
        assert f.read() == render(ks)
    fn = getattr(mod.gemm_act_kernel, "fn", mod.gemm_act_kernel)
    assert inspect.getsourcefile(fn) == mod.__file__


def test_pin_config(monkeypatch):
    autotune.pin_config(BM=32, BN=64, BK=64)
    try:
        assert autotune.pinned_config() == autotune.TileConfig(32, 64, 64)
    finally:
        autotune.pin_config(None)
    monkeypatch.setenv("EMU_INDUCTOR_KERNEL_CONFIG", "BM=64,BN=128,BK=64,num_warps=8,num_stages=3")
    assert autotune.pinned_config() == autotune.TileConfig(64, 128, 64, 8, 3)
    monkeypatch.setenv("EMU_INDUCTOR_KERNEL_CONFIG", "BM=x")
    with pytest.raises(ValueError, match="EMU_INDUCTOR_KERNEL_CONFIG"):
        autotune.pinned_config()
    assert autotune.token_bucket(1) == 1 and autotune.token_bucket(33) == 64 and autotune.token_bucket(10**6) == 8192


def test_autotune_skips_a_candidate_whose_outputs_disagree(fresh_cache, monkeypatch):
    """A fast config with wrong outputs (a miscompiled tile shape) must never win autotuning."""
    import torch

    from emu_inductor.kernels.launch import outputs_agree

    monkeypatch.setattr(autotune, "_autotune_enabled", lambda dev: True)
    monkeypatch.setattr(autotune, "_mem", {})
    cands = autotune.candidates(1000)
    fastest, second = cands[0], cands[1]
    times = {c: (0.5 if c == fastest else 1.0 + i) for i, c in enumerate(cands)}
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(64, 32, generator=g)
    noise = torch.randn(64, 32, generator=g) * 1e-3
    outs = {c: (ref + 20.0 if c == fastest else ref + noise) for c in cands}
    cfg = autotune.select_config("test|verify", torch.device("cpu"), 1000, bench=lambda c: times[c],
                                 verify=lambda c: outputs_agree(outs[c], ref))
    assert cfg == second
    # NaN / Inf positions must match as well
    y = ref.clone()
    y[0, 0] = float("nan")
    assert not outputs_agree(y, ref)
    assert outputs_agree(y, y.clone())
    assert outputs_agree(ref + noise, ref) and not outputs_agree(ref * 1.5, ref)


def test_autotuning_time_is_counted_and_reported(fresh_cache, monkeypatch):
    """The first call of a shape bucket on a GPU pays the autotuning; explain()'s compile
    report names it (seconds and keys) rather than hiding it in the first step."""
    import torch

    from emu_inductor.passes.timings import compile_report

    monkeypatch.setattr(autotune, "_autotune_enabled", lambda dev: True)
    monkeypatch.setattr(autotune, "_mem", {})
    monkeypatch.setattr(autotune, "_tuned", {"seconds": 0.0, "count": 0})
    before = compile_report()
    assert "autotuning" not in str(before)
    cfg = autotune.select_config("test|timed", torch.device("cpu"), 1000, bench=lambda c: float(c.BM))
    s, n = autotune.autotune_time()
    assert n == 1 and s > 0 and cfg.BM == min(c.BM for c in autotune.candidates(1000))
    autotune.select_config("test|timed", torch.device("cpu"), 1000, bench=lambda c: 1 / 0)  # cached: not tuned
    assert autotune.autotune_time()[1] == 1
    rep = compile_report().since(before)
    assert rep.autotunes == 1 and rep.autotune_s == s and "kernel autotuning" in str(rep)
