"""Per-user file cache of generated kernel modules.

Triton's JIT refuses `exec`'d source ("@jit functions should be defined in a Python
file"), and tracebacks and profilers should point at a real file and line. So every
rendered module is written to `<cache>/kernels/<name>_<sha256 of the content>.py` and
imported from there.

Safety on shared machines: the cache directory is created with mode 0700 and must be
owned by the current user and not writable by group or others (else it is refused and a
fresh private temporary directory is used); a module is imported only after its bytes
are read back and hash to the digest in its file name (a mismatch is rewritten from the
rendered source, atomically). `EMU_INDUCTOR_CACHE_DIR` overrides the location (default
`$XDG_CACHE_HOME/emu_inductor` or `~/.cache/emu_inductor`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import stat
import sys
import tempfile
import threading
from types import ModuleType

from .._logging import progress

__all__ = ["cache_dir", "load_module", "content_digest", "generated_files"]

log = logging.getLogger("emu_inductor.kernels")

_lock = threading.Lock()
_modules: dict[str, ModuleType] = {}
_paths: list[str] = []  # kernel files imported by this process, in load order
_dir: "str | None" = None


def content_digest(src: str) -> str:
    return hashlib.sha256(src.encode("utf-8")).hexdigest()


def _private_dir_ok(path: str) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        return False
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return False
    return not (st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _make_private(path: str) -> str:
    os.makedirs(path, mode=0o700, exist_ok=True)
    if not _private_dir_ok(path):
        raise PermissionError(path)
    return path


def cache_dir() -> str:
    """The per-user cache root (created 0700 on first use)."""
    global _dir
    if _dir is not None and os.environ.get("EMU_INDUCTOR_CACHE_DIR", _dir) == _dir:
        return _dir
    root = os.environ.get("EMU_INDUCTOR_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "emu_inductor")
    try:
        _dir = _make_private(os.path.abspath(root))
    except (OSError, PermissionError) as e:
        fallback = tempfile.mkdtemp(prefix="emu_inductor-")  # mkdtemp is 0700
        log.warning("emu_inductor: cache directory %s is not private to this user (%s); using %s",
                    root, e, fallback)
        _dir = fallback
    return _dir


def _write_atomic(path: str, src: str) -> None:
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(src)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def generated_files() -> list[str]:
    """Paths of the generated kernel modules this process has imported (demo, logs)."""
    return list(_paths)


def load_module(name: str, src: str) -> ModuleType:
    """Import the module whose source is `src`, from the file cache (written if absent).

    `name` is a readable prefix (spec short name); the file name ends with the sha256 of
    the content, which is verified against the bytes on disk before importing.
    """
    digest = content_digest(src)
    with _lock:
        mod = _modules.get(digest)
        if mod is not None:
            return mod
        kdir = _make_private(os.path.join(cache_dir(), "kernels"))
        path = os.path.join(kdir, f"{name}_{digest[:40]}.py")
        ok = False
        if os.path.exists(path):
            with open(path, "rb") as f:
                ok = hashlib.sha256(f.read()).hexdigest() == digest
            if not ok:
                log.warning("emu_inductor: %s does not hash to its name; rewriting it", path)
        if not ok:
            progress("generated Triton kernel module %s (compiled by Triton on first launch)",
                     os.path.basename(path))
            _write_atomic(path, src)
            with open(path, "rb") as f:  # read back: import only what hashes to the name
                if hashlib.sha256(f.read()).hexdigest() != digest:
                    raise RuntimeError(f"emu_inductor: kernel file {path} changed while being written")
        modname = f"emu_inductor_kernels.k_{digest[:40]}"
        spec = importlib.util.spec_from_file_location(modname, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[modname] = mod
        spec.loader.exec_module(mod)
        _modules[digest] = mod
        _paths.append(path)
        log.debug("emu_inductor: loaded kernel module %s", path)
        return mod
