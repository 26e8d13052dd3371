"""Moving a corpus layer to another device: every tensor it holds, not only what
nn.Module.to() knows about.

The layers keep their spelling's functions in slots named like nn.Module methods (which
Module._apply trips over), and some libraries keep weight-side tensors as plain attributes
or in lists / dicts; a tensor left behind meets the device input in forward. Used by
benchmarks/bench_corpus.py, gpu_explain.py and profile_overhead.py (to the GPU, through
`build_on`) and tests/test_corpus_devices.py (to a checked stand-in device on the CPU), so
the test covers what the benchmarks move.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_MODULE_STORES = ("_parameters", "_buffers", "_modules")


def _map_nested(value, fn: Callable[[torch.Tensor], torch.Tensor]):
    """fn applied to every tensor in value (a tensor, or lists / tuples / dicts of them);
    value itself when it holds none, so unrelated attributes are left as they are."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        items = [_map_nested(v, fn) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        if isinstance(value, list):
            return items
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # namedtuple / tuple
    if isinstance(value, dict):
        items = {k: _map_nested(v, fn) for k, v in value.items()}
        if all(items[k] is value[k] for k in value):
            return value
        return type(value)(items)
    return value


def _holds_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    return False


def map_module_tensors(module: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.nn.Module:
    """Replace, in place, every tensor module (and its submodules) holds by fn(tensor):
    parameters (kept Parameters, same requires_grad), buffers, and plain tensor attributes,
    also inside lists / tuples / dicts held as attributes. Returns module."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    for m in module.modules():
        for k, v in list(m._parameters.items()):
            if v is not None:
                m._parameters[k] = torch.nn.Parameter(fn(v.detach()), v.requires_grad)
        for k, v in list(m._buffers.items()):
            if v is not None:
                m._buffers[k] = fn(v)
        for k, v in list(vars(m).items()):
            if k in _MODULE_STORES:
                continue
            moved = _map_nested(v, fn)
            if moved is not v:
                m.__dict__[k] = moved
    return module


def plain_tensor_attributes(module: torch.nn.Module) -> list:
    """Qualified names of the attributes (of module and its submodules) that hold tensors
    but are neither parameters nor buffers: what nn.Module.to() and state_dict() miss."""
    found = []
    for prefix, m in module.named_modules():
        for k, v in vars(m).items():
            if k in _MODULE_STORES:
                continue
            if _holds_tensor(v):
                found.append(f"{prefix}.{k}" if prefix else k)
    return found


def to_device(module: torch.nn.Module, device) -> torch.nn.Module:
    """Every tensor module holds moved to device (see map_module_tensors)."""
    device = torch.device(device)
    return map_module_tensors(module, lambda t: t.to(device))


def build_on(entry, device, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """`entry.make(0, dtype)`'s layer on `device`, in eval mode. Built under the device
    context only for speed (quantizing many experts on the GPU); then every tensor it holds
    is moved, and forward runs without a default device: the layers are device-correct on
    their own (tests/test_corpus_devices.py)."""
    with torch.device(device):
        module, _ = entry.make(0, dtype)
    to_device(module, device)
    return module.eval()
