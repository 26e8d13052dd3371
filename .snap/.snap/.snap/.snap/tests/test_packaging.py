"""pyproject's explicit package list matches the folders on disk, and the repo-root
patterns/ folder is the package emu_inductor.patterns (no import hooks: an installed or
editable-installed package maps it through pyproject's package-dir)."""

from __future__ import annotations

import importlib
import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _packages_on_disk() -> set[str]:
    out = set()
    for base, name in ((os.path.join(ROOT, "emu_inductor"), "emu_inductor"),
                       (os.path.join(ROOT, "patterns"), "emu_inductor.patterns")):
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
            if "__init__.py" in filenames:
                rel = os.path.relpath(dirpath, base)
                out.add(name if rel == "." else f"{name}.{rel.replace(os.sep, '.')}")
    return out


def test_package_list_matches_folders():
    tool = _pyproject()["tool"]["setuptools"]
    assert set(tool["packages"]) == _packages_on_disk()
    assert tool["package-dir"] == {"emu_inductor.patterns": "patterns"}


def test_patterns_is_the_repo_root_folder_without_import_hooks():
    import sys

    mod = importlib.import_module("emu_inductor.patterns")
    here = os.path.realpath(os.path.dirname(mod.__file__))
    assert here in (os.path.realpath(os.path.join(ROOT, "patterns")),
                    os.path.realpath(os.path.join(os.path.dirname(importlib.import_module("emu_inductor").__file__),
                                                  "patterns")))
    assert not any("RootPatterns" in type(f).__name__ for f in sys.meta_path)
