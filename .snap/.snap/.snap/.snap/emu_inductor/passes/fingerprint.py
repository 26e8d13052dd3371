"""What the pass uuid (the FX-graph-cache key of the rewrite) is computed from.

``pass_uuid_files``: every ``.py`` file of the installed package: ``emu_inductor/`` and
the folder ``emu_inductor.patterns`` is imported from (the repository's ``patterns/``
in an editable install), plus files the registered families name. ``declarations_file``
turns the opaque-op declarations into such a file, so declaring an op changes the uuid.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Optional

from torch._inductor.custom_graph_pass import get_hash_for_files

__all__ = ["pass_uuid_files", "files_digest", "stable_repr", "declarations_file"]

_SKIP_DIRS = {"__pycache__", ".git", ".pytest_cache", ".hypothesis", "build", "dist"}


def _py_files_under(root: str) -> list[str]:
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return out


def pass_uuid_files(extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The source files hashed into the pass uuid (sorted, real paths)."""
    roots = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]  # emu_inductor/
    try:
        spec = importlib.util.find_spec("emu_inductor.patterns")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        roots.extend(spec.submodule_search_locations)
    files = {os.path.realpath(f) for r in roots if os.path.isdir(r) for f in _py_files_under(r)}
    files.update(os.path.realpath(f) for f in extra if os.path.isfile(f))
    return tuple(sorted(files))



_digest_lock = threading.Lock()
_digest_cache: dict[tuple[str, ...], bytes] = {}


def files_digest(files: tuple[str, ...]) -> bytes:
    # Cached per process: an edit to a pattern file while a process runs is not seen
    # (same as torch's own lru_cache). Debug pattern code with caches disabled.
    with _digest_lock:
        d = _digest_cache.get(files)
        if d is None:
            d = _digest_cache[files] = get_hash_for_files(files)
        return d


def stable_repr(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k!r}:{stable_repr(value[k])}" for k in sorted(value)) + "}"
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(stable_repr(v) for v in value) + ")"
    if isinstance(value, (set, frozenset)):
        return "{" + ",".join(sorted(stable_repr(v) for v in value)) + "}"
    return repr(value)


def declarations_file(text: str) -> Optional[str]:
    """A file whose name and contents are the declarations' fingerprint: families list it
    in `files`, so the pass uuid (and the FX-cache key) changes with the declarations."""
    if not text:
        return None
    h = hashlib.sha256(text.encode()).hexdigest()[:24]
    d = os.path.join(tempfile.gettempdir(), f"emu_inductor_opaque_{os.getuid() if hasattr(os, 'getuid') else 0}")
    path = os.path.join(d, f"{h}.txt")
    try:
        os.makedirs(d, exist_ok=True)
        if not os.path.isfile(path):
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        return path
    except OSError:  # pragma: no cover
        return None
