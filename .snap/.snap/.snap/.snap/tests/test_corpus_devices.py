"""Every corpus layer runs on the device its tensors and input are on (issue 8 item 9).

On the H200, benchmarks/bench_corpus.py's layers failed in forward where a tensor left on
the CPU (a lookup table built without a device, a plain-attribute weight the move missed,
an output buffer made by torch.zeros without device=) met the CUDA input. This machine has
no GPU, and the meta device is no stand-in: it runs cpu_table[meta_idx], bucketize against
CPU boundaries and scatter into a CPU tensor without complaint, and cannot run the
data-dependent ops the MoE loops use (nonzero, boolean masks, .tolist()).

So the check runs the real computation on the CPU under a device that only the test sees:
the layer's tensors (moved by tests/corpus/placement.py, as the benchmark moves them) and
its input are wrapped in `OnDevice`, a tensor that reports device "meta" (so code that
builds tensors with device=x.device or .to(x.device) builds them "on the device") and holds
its data in a CPU tensor. A dispatch mode runs every aten op on the data and refuses an op
where a plain CPU tensor meets an OnDevice one, with CUDA's two exceptions: a 0-dim CPU
tensor (a CPU scalar) and CPU index tensors for indexing a device tensor. Outputs must be
on the device and bit-equal to the plain CPU run.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from tests.corpus import REGISTRY
from tests.corpus.data import tokens
from tests.corpus.placement import map_module_tensors, plain_tensor_attributes
from tests.corpus.probes import same_bits

STAND_IN = torch.device("meta")


class DeviceMixError(RuntimeError):
    pass


class OnDevice(torch.Tensor):
    """A CPU tensor that says it lives on STAND_IN."""

    @staticmethod
    def __new__(cls, data: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls, data.shape, strides=data.stride(), storage_offset=data.storage_offset(), dtype=data.dtype,
            layout=data.layout, device=STAND_IN, requires_grad=data.requires_grad)

    def __init__(self, data: torch.Tensor):
        self.data_ = data

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})

    def __repr__(self):
        return f"OnDevice({self.data_!r})"


def _index_args(func) -> set:
    # CUDA accepts CPU index tensors for indexing a device tensor (it moves them)
    return {a.name for a in func._schema.arguments if a.name == "indices"}


def _run(func, args, kwargs):
    """func on the CPU data; DeviceMixError where a CPU tensor meets an OnDevice one."""
    flat = tree_flatten((args, kwargs))[0]
    on_dev = [t for t in flat if isinstance(t, OnDevice)]
    device_kw = kwargs.get("device")
    to_stand_in = device_kw is not None and torch.device(device_kw) == STAND_IN
    leaked = [t for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, OnDevice) and t.device == STAND_IN]
    if leaked:  # a tensor built below dispatch on the stand-in device has no data: refuse, never compute garbage
        raise AssertionError(f"{func}: a real {STAND_IN} tensor {tuple(leaked[0].shape)} leaked into the check")
    if on_dev:
        index_args = _index_args(func)
        allowed = set()
        for a, v in list(zip(func._schema.arguments, args)) + [(k, v) for k, v in kwargs.items()]:
            if getattr(a, "name", a) in index_args:
                allowed.update(id(t) for t in tree_flatten(v)[0] if isinstance(t, torch.Tensor))
        for t in flat:
            if isinstance(t, torch.Tensor) and not isinstance(t, OnDevice) and t.dim() > 0 and id(t) not in allowed:
                raise DeviceMixError(f"{func}: a {t.device} tensor {tuple(t.shape)} {t.dtype} meets device "
                                     f"tensors {[tuple(d.shape) for d in on_dev]}")
    if to_stand_in:
        kwargs = {**kwargs, "device": torch.device("cpu")}
    own = {id(t.data_): t for t in on_dev}
    out = func(*tree_map(_data, args), **tree_map(_data, kwargs))
    leaves_cpu = device_kw is not None and not to_stand_in  # .to("cpu"), .cpu(), tolist()
    if not (to_stand_in or (on_dev and not leaves_cpu)):
        return out

    def wrap(t):
        if not isinstance(t, torch.Tensor):
            return t
        return own[id(t)] if id(t) in own else OnDevice(t)  # in-place ops return their own wrapper
    return tree_map(wrap, out)


def _data(t):
    return t.data_ if isinstance(t, OnDevice) else t


class _Dispatch(TorchDispatchMode):
    """Sees the aten factories (torch.zeros(.., device=x.device)), which take no OnDevice input."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


class _Functions(TorchFunctionMode):
    """What does not reach aten dispatch as itself: torch.tensor(.., device=d) and the index
    tensor of t[[1, 3, 5]] are built below it on t's device, and Tensor.tolist refuses
    subclasses (on CUDA it copies to the CPU)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.tolist and isinstance(args[0], OnDevice):
            return args[0].data_.tolist()
        if func is torch.Tensor.__getitem__ and isinstance(args[0], OnDevice):
            # CUDA takes CPU or device index tensors for a device tensor
            return OnDevice(args[0].data_[tree_map(_data, args[1])])
        if func is torch.Tensor.__setitem__ and isinstance(args[0], OnDevice):
            value = args[2]
            if isinstance(value, torch.Tensor) and not isinstance(value, OnDevice) and value.dim() > 0:
                raise DeviceMixError(f"t[..] = v: a {value.device} value {tuple(value.shape)} into a device tensor")
            args[0].data_[tree_map(_data, args[1])] = _data(value)
            return None
        if func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None \
                and torch.device(kwargs["device"]) == STAND_IN:
            return OnDevice(func(*args, **{**kwargs, "device": torch.device("cpu")}))
        return func(*args, **kwargs)


class CheckDevices:
    """Runs a layer's computation on the CPU with OnDevice tensors (see the module doc)."""

    def __enter__(self):
        self._modes = [_Functions(), _Dispatch()]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)


def to_stand_in(t: torch.Tensor) -> torch.Tensor:
    return t if isinstance(t, OnDevice) else OnDevice(t.detach().clone())


def _calls(entry, m):
    """The layer's computations: forward (what the benchmark runs), and the layer's own
    activation QDQ and weight dequant (what forward calls, and what the oracle reads)."""
    calls = [("forward", m)]
    if getattr(m, "act_qdq", None) is not None:
        calls.append(("act_qdq", m.act_qdq))
    calls.append(("dequantized_weights", lambda x: m.dequantized_weights(x.dtype)))
    return calls


def _on_device(out):
    return all(isinstance(t, OnDevice) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))


def _same(a, b):
    fa, fb = tree_flatten(a)[0], tree_flatten(b)[0]
    return len(fa) == len(fb) and all(bool(same_bits(x.data_, y).all()) for x, y in zip(fa, fb))


@pytest.mark.parametrize("entry", REGISTRY, ids=[e.name for e in REGISTRY])
def test_layer_runs_on_its_device(entry):
    dtype = entry.dtypes[0]
    m, (x,) = entry.make(0, dtype)
    x = tokens(3, 5, x.shape[-1], dtype)
    m.eval()
    with torch.no_grad():
        want = {name: fn(x) for name, fn in _calls(entry, m)}
        map_module_tensors(m, to_stand_in)
        with CheckDevices():
            xd = OnDevice(x.clone())
            for name, fn in _calls(entry, m):
                got = fn(xd)
                assert _on_device(got), f"{entry.name}.{name}: an output left the device"
                assert _same(got, want[name]), f"{entry.name}.{name}: differs from the CPU run"


@pytest.mark.parametrize("entry", REGISTRY, ids=[e.name for e in REGISTRY])
def test_layer_tensors_are_registered(entry):
    """Weight-side tensors are parameters or buffers, as the libraries keep them (so
    module.to(), state_dict() and Dynamo see them as the layer's state)."""
    m, _ = entry.make(0, entry.dtypes[0])
    assert plain_tensor_attributes(m) == [], entry.name


def _mix(*a):
    with CheckDevices():
        return a[0](*a[1:])


def test_checker_refuses_cpu_meeting_device():
    """The mixes the H200 reported raise; what CUDA accepts does not."""
    d = OnDevice(torch.arange(8.0))
    table = torch.tensor([0.0, 0.5, 1.0, 1.5])
    for bad in (lambda: d * torch.ones(8), lambda: torch.bucketize(d, torch.tensor([1.0, 2.0])),
                lambda: table[(d % 4).long()], lambda: torch.zeros(8).index_add_(0, d.long() % 8, d),
                lambda: torch.where(d > 2, torch.ones(8), d), lambda: d.__setitem__(d > 2, torch.ones(8)[:5])):
        with pytest.raises(DeviceMixError):
            _mix(bad)
    ok = _mix(lambda: (d * torch.tensor(2.0), d[torch.tensor([1, 2])], table.to(d.device)[(d % 4).long()],
                       torch.zeros(8, device=d.device).index_add_(0, d.long() % 8, d), d[[1, 3, 5]],
                       torch.tensor([1.0, 2.0], device=d.device)))
    assert _on_device(ok)
    assert torch.equal(ok[2].data_, table[(torch.arange(8.0) % 4).long()])
    assert torch.equal(ok[4].data_, torch.tensor([1.0, 3.0, 5.0]))


def test_map_module_tensors_reaches_plain_attributes():
    m = torch.nn.Linear(4, 2)
    m.plain = torch.ones(3)
    m.nested = {"a": [torch.ones(1), (torch.ones(2), 5)], "b": "text"}
    m.register_buffer("buf", torch.zeros(2))
    assert plain_tensor_attributes(m) == ["plain", "nested"]
    map_module_tensors(m, to_stand_in)
    assert isinstance(m.weight, torch.nn.Parameter) and m.weight.requires_grad
    held = [m.weight, m.bias, m.buf, m.plain, m.nested["a"][0], m.nested["a"][1][0]]
    assert all(isinstance(t, OnDevice) for t in held), [type(t) for t in held]
    assert m.nested["a"][1][1] == 5 and m.nested["b"] == "text"
    with pytest.raises(TypeError, match="module"):
        map_module_tensors(torch.ones(2), to_stand_in)


def test_build_on_gives_the_layer_eval_on_the_device():
    """benchmarks/*.py build their layers with build_on: same outputs as entry.make's layer."""
    from tests.corpus import BY_NAME
    from tests.corpus.placement import build_on

    entry = BY_NAME["resp_all_slots"]
    m = build_on(entry, "cpu")
    ref, (x,) = entry.make(0, torch.bfloat16)
    assert not m.training
    with torch.no_grad():
        assert bool(same_bits(m(x), ref.eval()(x)).all())
