"""Read-only access to safetensors checkpoints (one file, a folder of shards, or a
`*.safetensors.index.json`). Never unpickles: `.bin` / `.pt` / `.pth` / `.ckpt` files are
refused, and tensors are read with `safetensors.safe_open` only."""

from __future__ import annotations

import json
import os
from typing import Iterable, Optional

import torch

__all__ = ["SafetensorsCheckpoint", "open_checkpoint", "PICKLE_SUFFIXES"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class SafetensorsCheckpoint:
    """A name -> tensor view over one or more .safetensors files.

    Tensors are loaded on demand (`get`); `used` records the names handed out so a
    loader can report tensors it never consumed.
    """

    def __init__(self, files: Iterable[str], config: Optional[dict] = None):
        from safetensors import safe_open

        self.files = list(files)
        self.config = config or {}
        self._where: dict[str, str] = {}
        self._handles = {}
        for f in self.files:
            h = safe_open(f, framework="pt", device="cpu")
            self._handles[f] = h
            for k in h.keys():
                if k in self._where:
                    raise ValueError(f"{k}: tensor appears in both {self._where[k]} and {f}")
                self._where[k] = f
        self.used: set[str] = set()

    def keys(self):
        return self._where.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)

    def get(self, name: str, *, what: str = "tensor") -> torch.Tensor:
        f = self._where.get(name)
        if f is None:
            raise ValueError(f"{name}: missing {what} in the checkpoint ({self.describe()})")
        self.used.add(name)
        return self._handles[f].get_tensor(name)

    def get_optional(self, name: str) -> Optional[torch.Tensor]:
        return self.get(name) if name in self._where else None

    def unused(self) -> list[str]:
        return sorted(set(self._where) - self.used)

    def describe(self) -> str:
        if len(self.files) == 1:
            return self.files[0]
        return f"{len(self.files)} files in {os.path.dirname(self.files[0])}"


def _read_json(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def open_checkpoint(path: "str | os.PathLike") -> SafetensorsCheckpoint:
    """Open a .safetensors file, a `model.safetensors.index.json`, or a folder holding
    either (plus an optional config.json / hf_quant_config.json, read as JSON)."""
    path = os.fspath(path)
    if path.endswith(PICKLE_SUFFIXES):
        raise ValueError(f"{path}: pickle checkpoints are not read (unsafe); convert it to .safetensors")
    config: dict = {}
    if os.path.isdir(path):
        folder = path
        for name in ("config.json", "hf_quant_config.json"):
            p = os.path.join(folder, name)
            if os.path.isfile(p):
                config[name] = _read_json(p)
        index = [f for f in os.listdir(folder) if f.endswith(".safetensors.index.json")]
        if index:
            files = sorted(set(_read_json(os.path.join(folder, index[0]))["weight_map"].values()))
            files = [os.path.join(folder, f) for f in files]
        else:
            files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))
        if not files:
            pickles = [f for f in os.listdir(folder) if f.endswith(PICKLE_SUFFIXES)]
            extra = f" (found pickle files {pickles[:3]}, which are not read)" if pickles else ""
            raise ValueError(f"{path}: no .safetensors files{extra}")
    elif path.endswith(".safetensors.index.json"):
        folder = os.path.dirname(path)
        files = sorted(set(_read_json(path)["weight_map"].values()))
        files = [os.path.join(folder, f) for f in files]
    elif path.endswith(".safetensors"):
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such file")
        files = [path]
    else:
        raise ValueError(f"{path}: expected a .safetensors file, an index .json or a folder")
    for f in files:
        if not os.path.isfile(f):
            raise ValueError(f"{f}: shard named by the index is missing")
    return SafetensorsCheckpoint(files, config)
