"""kernels.fastlaunch: the remembered-kernel launch path must never reuse a kernel for a call
Triton would have specialised differently, and must hand the launcher the arguments in
signature order. A fake JITFunction / driver stands in for the GPU (the path is off under
the interpreter, which CI runs)."""

from __future__ import annotations

import types

import pytest
import torch

from emu_inductor.kernels import fastlaunch


class _Param:
    def __init__(self, name, dns=False, default=None, has_default=False, constexpr=False):
        self.name, self.do_not_specialize, self.default, self.has_default = name, dns, default, has_default
        self.is_constexpr = constexpr


class _Kernel:
    """A CompiledKernel stand-in: records what its launcher receives."""

    def __init__(self, tag):
        self.tag, self.launches = tag, []
        self.function, self.packed_metadata = f"fn{tag}", f"meta{tag}"

    def run(self, *a):
        self.launches.append(a)


class _Jit:
    """A JITFunction stand-in: `jit[grid](...)` is Triton's own path (a "compile" per new
    specialisation, as Triton's cache would key it)."""

    def __init__(self):
        self.params = [_Param("x_ptr"), _Param("T", dns=True), _Param("N"), _Param("f"),
                       _Param("BLOCK", constexpr=True), _Param("FLAG", default=False, has_default=True, constexpr=True)]
        self.slow_calls, self.kernels = [], {}

    def _spec(self, args, kw):
        # Triton's specialisation: pointer dtype + 16-byte alignment, int type of the dns T,
        # N's value-1 / divisibility, f's type, constexprs by value
        x, T, N, f = args[:4]
        return (x.dtype, x.data_ptr() % 16 == 0, fastlaunch._int_type(T), N == 1, N % 16 == 0, type(f),
                kw.get("BLOCK"), kw.get("FLAG", False), kw.get("num_warps"))

    def __getitem__(self, grid):
        def call(*args, **kw):
            self.slow_calls.append((grid, args, kw))
            spec = self._spec(args, kw)
            k = self.kernels.setdefault(spec, _Kernel(len(self.kernels)))
            k.run("slow", grid, *args)
            return k
        return call


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("EMU_INDUCTOR_FAST_LAUNCH", "1")
    drv = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda d: 1234)
    monkeypatch.setattr(fastlaunch, "_driver", lambda: drv)
    fastlaunch.clear()
    yield
    fastlaunch.clear()


def _fast_launches(jit):
    return [(k.tag, a) for k in jit.kernels.values() for a in k.launches if a[0] != "slow"]


def test_second_call_uses_the_remembered_kernel_with_arguments_in_signature_order(fast):
    jit = _Jit()
    x = torch.zeros(64)
    fastlaunch.launch_kernel(jit, (4, 2), x, 7, 32, 1.5, BLOCK=16, num_warps=4)
    assert len(jit.slow_calls) == 1 and not _fast_launches(jit)
    y = torch.zeros(64)  # another tensor, same dtype and alignment: same kernel
    fastlaunch.launch_kernel(jit, (4, 2), y, 9, 32, 2.5, BLOCK=16, num_warps=4)
    assert len(jit.slow_calls) == 1
    [(tag, a)] = _fast_launches(jit)
    # grid padded to 3, stream, handles, no launch metadata / hooks, then every parameter in
    # signature order: the call's own values, FLAG's default, constexprs included
    assert a[:9] == (4, 2, 1, 1234, "fn0", "meta0", None, None, None)
    assert a[9] is y and a[10:] == (9, 32, 2.5, 16, False)
    assert fastlaunch.stats()["hits"] == 1


@pytest.mark.parametrize("change", ["dtype", "misaligned", "N_value", "N_is_one", "f_type", "T_i64", "constexpr",
                                    "option", "grid", "default_given"])
def test_a_call_triton_would_specialise_differently_never_reuses_a_kernel(fast, change):
    jit = _Jit()
    x = torch.zeros(64)
    base = dict(grid=(4,), args=[x, 7, 32, 1.5], kw=dict(BLOCK=16, num_warps=4))
    fastlaunch.launch_kernel(jit, base["grid"], *base["args"], **base["kw"])
    grid, args, kw = base["grid"], list(base["args"]), dict(base["kw"])
    if change == "dtype":
        args[0] = torch.zeros(64, dtype=torch.bfloat16)
    elif change == "misaligned":
        args[0] = x[1:]
    elif change == "N_value":
        args[2] = 48
    elif change == "N_is_one":
        args[2] = 1
    elif change == "f_type":
        args[3] = 2
    elif change == "T_i64":
        args[1] = 2 ** 40
    elif change == "constexpr":
        kw["BLOCK"] = 32
    elif change == "option":
        kw["num_warps"] = 8
    elif change == "grid":
        grid = (5,)
    elif change == "default_given":
        kw["FLAG"] = True
    fastlaunch.launch_kernel(jit, grid, *args, **kw)
    assert len(jit.slow_calls) == 2, "a changed call went through the remembered kernel"
    assert not _fast_launches(jit)


def test_do_not_specialize_ints_share_the_kernel(fast):
    jit = _Jit()
    x = torch.zeros(64)
    for T in (1, 5, 1000, 2 ** 31 - 1):
        fastlaunch.launch_kernel(jit, (1,), x, T, 32, 1.5, BLOCK=16)
    assert len(jit.slow_calls) == 1 and len(_fast_launches(jit)) == 3


def test_launch_hooks_and_the_interpreter_take_tritons_path(fast, monkeypatch):
    from triton import knobs

    jit = _Jit()
    x = torch.zeros(64)
    chain = knobs.runtime.launch_enter_hook  # Triton 3.6: an (empty) HookChain, never None
    hook = lambda *a: None  # noqa: E731
    chain.add(hook)  # as a profiler (proton) does
    try:
        for _ in range(2):
            fastlaunch.launch_kernel(jit, (1,), x, 3, 32, 1.5, BLOCK=16)
    finally:
        chain.remove(hook)
    assert len(jit.slow_calls) == 2
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for _ in range(2):
        fastlaunch.launch_kernel(jit, (1,), x, 3, 32, 1.5, BLOCK=16)
    assert len(jit.slow_calls) == 4 and not _fast_launches(jit)


def test_env_switch_turns_it_off(fast, monkeypatch):
    monkeypatch.setenv("EMU_INDUCTOR_FAST_LAUNCH", "0")
    jit = _Jit()
    x = torch.zeros(64)
    for _ in range(3):
        fastlaunch.launch_kernel(jit, (1,), x, 3, 32, 1.5, BLOCK=16)
    assert len(jit.slow_calls) == 3


def test_a_tensor_keyword_or_a_changed_argument_type_is_not_reused(fast):
    jit = _Jit()
    x = torch.zeros(64)
    fastlaunch.launch_kernel(jit, (1,), x, 3, 32, 1.5, BLOCK=16)
    fastlaunch.launch_kernel(jit, (1,), x, 3, 32, 1.5, BLOCK=torch.ones(1))  # never remembered by identity
    fastlaunch.launch_kernel(jit, (1,), x, 3, 32, 1.5, BLOCK=torch.ones(1))
    assert len(jit.slow_calls) == 3 and fastlaunch.stats()["fallbacks"] == 2
    fastlaunch.launch_kernel(jit, (1,), x, 3, True, 1.5, BLOCK=16)  # bool where an int was: another pattern
    assert len(jit.slow_calls) == 4 and not _fast_launches(jit)


def test_a_callable_grid_takes_tritons_path(fast):
    jit = _Jit()
    x = torch.zeros(64)
    for _ in range(2):
        fastlaunch.launch_kernel(jit, lambda meta: (1,), x, 3, 32, 1.5, BLOCK=16)
    assert len(jit.slow_calls) == 2 and fastlaunch.stats()["fallbacks"] == 2


def test_a_positional_constexpr_float_is_keyed_by_value(fast):
    jit = _Jit()
    x = torch.zeros(64)
    fastlaunch.launch_kernel(jit, (1,), x, 3, 32, 1.5, 0.25)  # BLOCK passed positionally, a float
    fastlaunch.launch_kernel(jit, (1,), x, 3, 32, 1.5, 0.5)
    assert len(jit.slow_calls) == 2 and not _fast_launches(jit)
    fastlaunch.launch_kernel(jit, (1,), x, 3, 32, 2.5, 0.5)  # the runtime float f may change
    assert len(jit.slow_calls) == 2 and len(_fast_launches(jit)) == 1
