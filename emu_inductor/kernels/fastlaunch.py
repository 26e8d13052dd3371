"""Launch a Triton kernel with less host time than `JITFunction[grid](...)`.

Without CUDA graphs a decode step is bound by host work, and Triton 3.6's own launch path
costs about 20-40 us per launch of our kernels on the H200's host (benchmarks/results/
host_breakdown_h200.json: gemm_out_kernel 34 us through `JITFunction.run`, 12 us through
its compiled launcher with the arguments bound once): `run` re-derives the kernel's
specialisation from every argument (a C++ call per argument), builds its cache key from
it, checks the kernel's globals, binds the arguments to the signature and builds launch
metadata for its (empty) hook chain. Measured gain of this path: 23 us against 31 us for the
43-argument GEMM launches, about equal for small kernels (host_breakdown_after2_h200.json).

`launch_kernel(jit, grid, *args, **kwargs)` keeps, per JITFunction, a table from a *call key* to
the compiled kernel and the argument order. The call key is strictly finer than Triton's
specialisation, so a hit can never select a kernel that Triton would not have selected:
  - a tensor argument: its dtype and whether its address is a multiple of 16 (the two
    facts Triton specialises a pointer on);
  - an int of a `do_not_specialize` parameter: its integer type (i32 / i64 / u64 by
    range), which is all Triton looks at;
  - a float of a runtime (not constexpr) parameter: its type (Triton passes every runtime
    float as fp32);
  - any other argument, constexprs and launch options (num_warps, ...) included: its exact
    value and type;
  - the grid, the current device, and Triton's global debug / instrumentation knobs.
A miss goes through `JITFunction.run` (which compiles if needed and returns the kernel),
and the result is remembered. Launch hooks (a profiler such as proton), the interpreter
and anything unexpected take Triton's own path every time.
"""

from __future__ import annotations

import operator
import os
import threading

import torch

__all__ = ["launch_kernel", "enabled", "stats", "clear"]

_Tensor = torch.Tensor
_MAX_ENTRIES = 512  # per kernel: a new entry per (shape bucket, alignment pattern)
_lock = threading.Lock()
_STATS = {"hits": 0, "misses": 0, "fallbacks": 0}


def enabled() -> bool:
    """On unless EMU_INDUCTOR_FAST_LAUNCH=0 (or under the Triton interpreter)."""
    return (os.environ.get("EMU_INDUCTOR_FAST_LAUNCH", "1") != "0"
            and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))


def stats() -> dict:
    return dict(_STATS)


class _KernelTable:
    """The compiled kernels of one JITFunction by call key, and its signature facts."""

    __slots__ = ("jit", "names", "dns", "const", "defaults", "layouts", "entries")

    def __init__(self, jit):
        self.jit = jit  # held: the table is found by id(jit), which must not be reused
        params = jit.params
        self.names = [p.name for p in params]
        self.dns = frozenset(i for i, p in enumerate(params) if p.do_not_specialize)
        self.const = frozenset(i for i, p in enumerate(params) if getattr(p, "is_constexpr", False))
        self.defaults = [p.default if p.has_default else _MISSING for p in params]
        self.layouts: dict = {}
        self.entries: dict = {}


_MISSING = object()
_TABLES: dict = {}
_SIMPLE = frozenset({int, bool, str, float, type(None)})  # keyword values keyed by value


def _int_type(v: int) -> str:
    # Triton's integer argument types by range (what a do_not_specialize int is keyed on)
    if -(2 ** 31) <= v < 2 ** 31:
        return "i32"
    return "u64" if v >= 2 ** 63 else "i64"


def _getter(idx):
    # a C-level picker of positions (operator.itemgetter returns a bare item for one index)
    if not idx:
        return lambda a: ()
    if len(idx) == 1:
        i = idx[0]
        return lambda a: (a[i],)
    return operator.itemgetter(*idx)


class _Layout:
    """One call pattern (the positional arguments' exact types): which positions hold tensors
    (keyed by dtype and 16-byte alignment), do_not_specialize ints (keyed by integer type),
    floats (keyed by type: already in the pattern) and everything else (keyed by value)."""

    __slots__ = ("tensors", "plain", "loose")

    def __init__(self, types, dns, const):
        tens = [i for i, t in enumerate(types) if issubclass(t, _Tensor)]
        loose = [i for i, t in enumerate(types) if t is int and i in dns]
        # a runtime float is keyed by its type alone; a constexpr float (specialised on its
        # value) stays with the values
        floats = {i for i, t in enumerate(types) if t is float and i not in const}
        skip = set(tens) | set(loose) | floats
        self.tensors = _getter(tens)
        self.plain = _getter([i for i in range(len(types)) if i not in skip])
        self.loose = loose


def _call_key(table: _KernelTable, grid, args, kwargs, device):
    """The call key (module docstring); None when a keyword value is not a plain constant."""
    types = tuple(map(type, args))
    lay = table.layouts.get(types)
    if lay is None:
        lay = table.layouts.setdefault(types, _Layout(types, table.dns, table.const))
    kw = tuple(kwargs.items())
    if not _SIMPLE.issuperset(map(type, kwargs.values())):
        return None
    flags = tuple([(t.dtype, not (t.data_ptr() & 15)) for t in lay.tensors(args)])
    loose = tuple([_int_type(args[i]) for i in lay.loose]) if lay.loose else ()
    return (grid, device, types, lay.plain(args), flags, loose, kw)


def _tail_args(table: _KernelTable, n_pos: int, kwargs):
    """The parameters after the positional ones, as JITFunction.run binds them (keyword
    values, else defaults); None where one is missing. Part of the call key, so a hit
    reuses the tuple remembered with its kernel."""
    vals = []
    for i in range(n_pos, len(table.names)):
        name = table.names[i]
        if name in kwargs:
            vals.append(kwargs[name])
        elif table.defaults[i] is not _MISSING:
            vals.append(table.defaults[i])
        else:
            return None
    return tuple(vals)


def _hooked(hook) -> bool:
    """A launch hook is set (Triton 3.6 keeps an always-present HookChain, empty unless a
    profiler such as proton added a call; older releases use None)."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return bool(calls) if calls is not None else True


def _driver():
    """Triton's active driver (current device and stream; tests substitute a fake)."""
    from triton.runtime.driver import driver

    return driver.active


def launch_kernel(jit, grid, *args, **kwargs) -> None:
    """`jit[grid](*args, **kwargs)`, through the compiled kernel's launcher when this call's
    key was seen before (module docstring)."""
    if not enabled():
        jit[grid](*args, **kwargs)
        return
    try:
        from triton import knobs
        drv = _driver()
    except (ImportError, RuntimeError):  # an older Triton, no active driver: Triton's own path
        jit[grid](*args, **kwargs)
        return
    rt = knobs.runtime
    if _hooked(rt.launch_enter_hook) or _hooked(rt.launch_exit_hook):
        _STATS["fallbacks"] += 1
        jit[grid](*args, **kwargs)
        return
    if type(grid) is not tuple or len(grid) > 3:  # a callable grid (or a list): Triton's path
        _STATS["fallbacks"] += 1
        jit[grid](*args, **kwargs)
        return
    table = _TABLES.get(id(jit))
    if table is None:
        with _lock:
            table = _TABLES.setdefault(id(jit), _KernelTable(jit))
    device = drv.get_current_device()
    key = _call_key(table, grid, args, kwargs, device)
    if key is None:
        _STATS["fallbacks"] += 1
        jit[grid](*args, **kwargs)
        return
    key += (rt.debug, knobs.compilation.instrumentation_mode)
    entry = table.entries.get(key)
    if entry is None:
        _STATS["misses"] += 1
        kernel = jit[grid](*args, **kwargs)  # compiles if needed; returns the CompiledKernel
        if hasattr(kernel, "result"):  # an async compile future
            kernel = kernel.result()
        tail = _tail_args(table, len(args), kwargs)
        if kernel is None or tail is None:
            return
        kernel.run  # noqa: B018 -- loads the module and function handles now, not per call
        g = tuple(grid) + (1,) * (3 - len(grid))
        with _lock:
            if len(table.entries) >= _MAX_ENTRIES:
                table.entries.clear()
            table.entries[key] = (kernel, g, tail)
        return
    _STATS["hits"] += 1
    kernel, g, tail = entry
    kernel.run(g[0], g[1], g[2], drv.get_current_stream(device), kernel.function, kernel.packed_metadata,
               None, None, None, *args, *tail)


def clear() -> None:
    """Forget every remembered kernel (tests; a Triton cache reset)."""
    with _lock:
        _TABLES.clear()
        for k in _STATS:
            _STATS[k] = 0
