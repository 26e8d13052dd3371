"""The device scripts must not fail on something a CPU could have caught.

A device session has 30 minutes and a failed call is paid for: every benchmark module must
compile, every shell script must parse, and every python file a gpu_*.sh script runs must
exist. (Running them needs the GPU: benchmarks/gpu_*.sh.)"""

from __future__ import annotations

import glob
import os
import py_compile
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
PY = sorted(glob.glob(os.path.join(BENCH, "*.py")))
SH = sorted(glob.glob(os.path.join(BENCH, "*.sh")))


def test_there_are_scripts():
    assert PY and SH


@pytest.mark.parametrize("path", PY, ids=os.path.basename)
def test_benchmark_module_compiles(path, tmp_path):
    py_compile.compile(path, cfile=str(tmp_path / "x.pyc"), doraise=True)


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.parametrize("path", SH, ids=os.path.basename)
def test_shell_script_parses_and_runs_existing_files(path):
    r = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = open(path).read()
    for rel in sorted(set(re.findall(r"\b(benchmarks/[\w./-]+\.(?:py|sh))\b", text))):
        assert os.path.exists(os.path.join(ROOT, rel)), f"{os.path.basename(path)} runs {rel}, which does not exist"
