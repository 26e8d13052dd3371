"""Command line: `mxemu demo` / `mxemu schemes` / `mxemu --version` (also `python -m emu_inductor`).

Bad input on the command line (an unknown scheme, `--tokens -3`, `--device cuda` on a
machine without CUDA) ends in one line on stderr naming the option, and exit code 2,
argparse's convention for usage errors; never in a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

#: Largest --tokens the demo accepts: the layer's activations and the bf16 comparison
#: are materialized whole; beyond this a typo (an extra digit) would just run out of memory.
MAX_TOKENS = 65536


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse prints the whole usage block first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _tokens(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of tokens, got {text!r}") from None
    if not 1 <= n <= MAX_TOKENS:
        raise argparse.ArgumentTypeError(f"expected 1 to {MAX_TOKENS} tokens, got {n}")
    return n


def _scheme(text: str) -> str:
    from .reference import get_scheme

    try:
        return get_scheme(text).name
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"unknown scheme {text!r}; `mxemu schemes` lists the names and aliases"
        ) from None


def _device(text: str) -> str:
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text!r} requested but CUDA is not available here (torch {torch.__version__}); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r} requested but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    return str(dev)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("emu_inductor")
    except Exception:  # a source checkout that was never pip-installed
        from . import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mxemu", description="emu_inductor: fast microscaling (NVFP4/MX) MoE emulation")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                   help="print the emu_inductor version and exit")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{demo,schemes}", parser_class=_Parser)
    d = sub.add_parser("demo", help="quantize, run and compile the embedded default MoE layer",
                       description="Quantize one embedded MoE layer, run the eager emulation, then the same "
                                   "layer under torch.compile(backend='mxemu').")
    d.add_argument("--scheme", type=_scheme, default="nvfp4_w4a4",
                   help="emulation scheme or alias (default nvfp4_w4a4; `mxemu schemes` lists them)")
    d.add_argument("--tokens", type=_tokens, default=8,
                   help=f"number of tokens in the input batch, 1 to {MAX_TOKENS} (default 8)")
    d.add_argument("--device", type=_device, default=None,
                   help="cpu or cuda[:N] (default: cuda when available, else cpu with Triton's interpreter)")
    d.add_argument("--no-compile", action="store_true", help="eager emulation only (skip torch.compile)")
    d.add_argument("--json", action="store_true", help="also print the result as JSON")
    sub.add_parser("schemes", help="list the emulation schemes and the aliases accepted for them",
                   description="List the emulation schemes (weight and activation formats) and their aliases.")
    return p


def _print_schemes() -> None:
    from .reference import SCHEMES
    from .reference.schemes import ALIASES

    for name, s in SCHEMES.items():
        act = "-" if s.act is None else (s.act.fmt.name if s.act.fmt else s.act.kind)
        print(f"{name:30s} weights {s.weight_fmt.name:11s} activations {act}")
    print("\naliases (accepted wherever a scheme name is, case-insensitive):")
    for alias, name in ALIASES.items():
        print(f"{alias:30s} = {name}")


def _interpret_if_cpu_demo(argv) -> None:
    """A demo on the CPU runs the generated Triton kernels through Triton's interpreter, which
    must be switched on before anything imports triton.language: @triton.jit decides
    interpreted or compiled when a function is decorated (Triton's own tl.sum included), and
    building the parser imports the reference, which imports triton.language through torch."""
    import os

    args = list(sys.argv[1:] if argv is None else argv)
    if "demo" not in args or os.environ.get("TRITON_INTERPRET"):
        return
    dev = None
    for i, a in enumerate(args):
        if a == "--device" and i + 1 < len(args):
            dev = args[i + 1]
        elif a.startswith("--device="):
            dev = a.split("=", 1)[1]
    if dev is None:
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cpu"):
        os.environ["TRITON_INTERPRET"] = "1"


def main(argv=None) -> int:
    _interpret_if_cpu_demo(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version (0) and usage errors (2)
        return e.code if isinstance(e.code, int) else 2

    if args.cmd == "schemes":
        _print_schemes()
        return 0

    import os

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        # the generated Triton kernels run on the CPU through Triton's interpreter
        # (switched on by _interpret_if_cpu_demo before triton.language was imported)
        os.environ.setdefault("TRITON_INTERPRET", "1")

    from .demo import DemoConfig, run_demo

    try:
        cfg = DemoConfig(scheme=args.scheme, tokens=args.tokens, device=device, compile=not args.no_compile)
        result = run_demo(cfg)
    except ValueError as e:
        print(f"mxemu demo: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
