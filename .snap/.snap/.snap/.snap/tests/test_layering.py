"""The import rule of docs/architecture.md, checked on the source (no imports run).

Every module under emu_inductor/ and patterns/ (installed as emu_inductor.patterns) is
parsed; each of its imports, at module level or inside a function, that resolves into
the package is an edge from the importer's layer to the imported one. The test fails on
an edge the rule does not allow (a back edge), on a cycle between layers, and on a
private name (`_x`) imported from another layer. `_compat` and `_logging` are leaf
utilities anyone may import; the package root (`emu_inductor`, i.e. `__version__`)
imports only `formats`, so anyone may import it too.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_BELOW_BACKEND = {"formats", "spec", "reference", "patterns", "recognize", "kernels", "ops", "passes"}

#: layer -> the layers it may import (besides itself, the root and the leaf utilities).
ALLOWED: dict[str, set[str]] = {
    "formats": set(),
    "spec": {"formats"},
    "reference": {"formats", "spec"},
    "patterns": {"formats", "spec", "reference"},
    "recognize": {"formats", "spec", "reference"},
    "kernels": {"formats", "spec"},
    "ops": {"formats", "spec", "reference", "kernels"},
    "passes": {"formats", "spec", "reference", "patterns", "recognize", "ops"},
    "models": {"formats", "spec", "reference"},
    "checkpoints": {"formats", "spec", "reference", "models"},
    "backend": _BELOW_BACKEND,
    "explain": _BELOW_BACKEND | {"backend"},
    "demo": _BELOW_BACKEND | {"backend", "explain"},
    "cli": _BELOW_BACKEND | {"backend", "explain", "demo", "models", "checkpoints"},
    "__main__": {"cli"},
}
LEAVES = {"_compat", "_logging"}
PKG = "emu_inductor"


def package_modules(root: str = ROOT) -> dict[str, str]:
    """{dotted module name: file} for emu_inductor/ and patterns/ (as emu_inductor.patterns)."""
    out = {}
    for base, prefix in ((os.path.join(root, "emu_inductor"), PKG), (os.path.join(root, "patterns"),
                                                                     f"{PKG}.patterns")):
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            rel = os.path.relpath(dirpath, base)
            parts = [] if rel == "." else rel.split(os.sep)
            for f in sorted(filenames):
                if not f.endswith(".py"):
                    continue
                mod = [prefix, *parts] + ([] if f == "__init__.py" else [f[:-3]])
                out[".".join(mod)] = os.path.join(dirpath, f)
    return out


def layer_of(module: str) -> str:
    """'emu_inductor.passes.linear' -> 'passes'; the root package -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: str, known: set[str]):
    """(imported module, imported name or None, line) for every import into the package."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    is_pkg = path.endswith("__init__.py")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == PKG or a.name.startswith(PKG + "."):
                    yield a.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_pkg, node)
            if target != PKG and not target.startswith(PKG + "."):
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in known:  # `from . import recorder`: the submodule itself
                    yield sub, None, node.lineno
                else:
                    yield target, a.name, node.lineno


def violations(root: str = ROOT) -> list[str]:
    mods = package_modules(root)
    known = set(mods)
    out, edges = [], set()
    for mod, path in mods.items():
        src = layer_of(mod)
        for target, name, line in imports_of(mod, path, known):
            dst = layer_of(target)
            where = f"{os.path.relpath(path, root)}:{line}"
            if dst in LEAVES or dst == "":
                continue
            if src == "":  # the root imports formats only
                if dst != "formats":
                    out.append(f"{where}: the package root imports {target} (only formats at import)")
                continue
            if name is not None and name.startswith("_") and not name.startswith("__") and dst != src:
                out.append(f"{where}: private name {name} imported from another layer ({target})")
            if dst == src:
                continue
            if src in LEAVES:
                out.append(f"{where}: leaf utility {src} imports {target}")
                continue
            if dst not in ALLOWED.get(src, set()):
                out.append(f"{where}: back edge {src} -> {dst} ({target}); {src} may import "
                           f"{sorted(ALLOWED.get(src, ()))}")
            edges.add((src, dst))
    # no cycle between layers (whatever the table says)
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                out.append("package cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            elif m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    return out


def test_import_rule_holds():
    found = violations()
    assert not found, "import rule broken (docs/architecture.md):\n" + "\n".join(found)


def test_every_layer_is_in_the_rule():
    layers = {layer_of(m) for m in package_modules()} - {""} - LEAVES
    assert layers <= set(ALLOWED), f"layers without a rule: {sorted(layers - set(ALLOWED))}"


def _tree(tmp_path, files: dict[str, str]) -> str:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for d in ("emu_inductor", "patterns"):
        (tmp_path / d).mkdir(exist_ok=True)
        (tmp_path / d / "__init__.py").touch()
    return str(tmp_path)


@pytest.mark.parametrize("files, expect", [
    ({"emu_inductor/formats/__init__.py": "", "emu_inductor/formats/a.py": "from ..passes import x\n",
      "emu_inductor/passes/__init__.py": ""}, "back edge formats -> passes"),
    ({"emu_inductor/kernels/__init__.py": "", "emu_inductor/kernels/a.py": "def f():\n    from ..ops import y\n",
      "emu_inductor/ops/__init__.py": ""}, "back edge kernels -> ops"),
    ({"emu_inductor/spec/__init__.py": "", "emu_inductor/reference/__init__.py": "",
      "emu_inductor/reference/a.py": "from ..spec.b import _hidden\n", "emu_inductor/spec/b.py": ""},
     "private name _hidden"),
    ({"patterns/a.py": "from ..passes.linear import z\n", "emu_inductor/passes/__init__.py": ""},
     "back edge patterns -> passes"),
])
def test_the_check_fails_on_a_synthetic_violation(tmp_path, files, expect):
    found = violations(_tree(tmp_path, files))
    assert any(expect in v for v in found), found


def test_the_check_passes_a_clean_synthetic_tree(tmp_path):
    root = _tree(tmp_path, {"emu_inductor/formats/__init__.py": "", "emu_inductor/spec/__init__.py":
                            "from ..formats import X\nfrom .. import _compat\n", "emu_inductor/_compat.py": ""})
    assert violations(root) == []


def test_a_cycle_is_reported(monkeypatch, tmp_path):
    monkeypatch.setitem(ALLOWED, "formats", {"spec"})  # a rule that would let a cycle through
    root = _tree(tmp_path, {"emu_inductor/formats/__init__.py": "from ..spec import a\n",
                            "emu_inductor/spec/__init__.py": "from ..formats import b\n"})
    assert any("package cycle" in v for v in violations(root))
