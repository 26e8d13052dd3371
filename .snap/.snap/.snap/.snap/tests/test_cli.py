"""The `mxemu` command line: --version, one-line usage errors with exit code 2 (never a
traceback), the aliases listed by `mxemu schemes`, help text on every option."""

import argparse
import os
import subprocess
import sys

import pytest
import torch

from emu_inductor import __version__
from emu_inductor.cli import build_parser, main
from emu_inductor.reference import get_scheme
from emu_inductor.reference.schemes import ALIASES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_version(capsys):
    rc, out, _ = _run(["--version"], capsys)
    assert rc == 0 and out.strip() == f"mxemu {__version__}"


@pytest.mark.parametrize(
    "argv, option",
    [
        (["demo", "--tokens", "-3"], "--tokens"),
        (["demo", "--tokens", "0"], "--tokens"),
        (["demo", "--tokens", "1e9"], "--tokens"),
        (["demo", "--tokens", "100000000"], "--tokens"),
        (["demo", "--device", "tpu"], "--device"),
        (["demo", "--device", "cuda:x"], "--device"),
        (["demo", "--scheme", "nvfp5"], "--scheme"),
        (["demo", "--frobnicate"], "--frobnicate"),
        ([], "demo,schemes"),
    ],
)
def test_bad_values_are_one_line_errors_with_exit_2(argv, option, capsys):
    rc, out, err = _run(argv, capsys)
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert option in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda(capsys):
    rc, _, err = _run(["demo", "--device", "cuda", "--no-compile"], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert "--device" in err and "CUDA is not available" in err and "--device cpu" in err


def test_tokens_error_in_a_real_process_has_no_traceback():
    """What a user sees from the installed entry point: exit code 2, one line, no traceback."""
    r = subprocess.run([sys.executable, "-m", "emu_inductor", "demo", "--tokens", "-3"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert "--tokens" in r.stderr and "-3" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU demo path (Triton interpreter)")
def test_readme_demo_runs_in_a_fresh_process_on_the_cpu():
    """The README's main job as a user runs it: a fresh process WITHOUT TRITON_INTERPRET set (the
    suite sets it). The CLI must switch the interpreter on before anything imports
    triton.language, or Triton's own jit functions (tl.sum) stay compiled and every interpreted
    kernel that calls them fails ("Cannot call @triton.jit'd outside of the scope of a kernel")."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "emu_inductor", "demo", "--tokens", "2"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "max |compiled - eager| = 0" in r.stdout, r.stdout[-2000:]


def test_schemes_lists_every_alias(capsys):
    rc, out, _ = _run(["schemes"], capsys)
    assert rc == 0
    lines = out.splitlines()
    for alias, name in ALIASES.items():
        assert any(line.split()[:3] == [alias, "=", name] for line in lines), alias
        assert get_scheme(alias).name == name
    # every listed alias is accepted by demo's --scheme
    ns = build_parser().parse_args(["demo", "--scheme", next(iter(ALIASES)).upper()])
    assert ns.scheme == ALIASES[next(iter(ALIASES))]


def _all_actions(parser):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for choice in a._choices_actions:
                yield parser.prog, choice
            for sub in a.choices.values():
                yield from _all_actions(sub)
        else:
            yield parser.prog, a


def test_every_option_has_help():
    missing = [f"{prog} {a.option_strings or a.dest}" for prog, a in _all_actions(build_parser())
               if not a.help or a.help == argparse.SUPPRESS]
    assert not missing, missing
