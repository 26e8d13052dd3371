"""Command line: `mxemu demo` / `python -m emu_inductor demo`."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mxemu", description="emu_inductor: fast microscaling MoE emulation")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="quantize, run and compile the embedded default MoE layer")
    d.add_argument("--scheme", default="nvfp4_w4a4", help="emulation scheme (default nvfp4_w4a4)")
    d.add_argument("--tokens", type=int, default=8)
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    d.add_argument("--no-compile", action="store_true", help="eager emulation only")
    d.add_argument("--json", action="store_true", help="also print the result as JSON")
    sub.add_parser("schemes", help="list the emulation schemes")
    args = p.parse_args(argv)

    if args.cmd == "schemes":
        from .reference import SCHEMES

        for name, s in SCHEMES.items():
            act = "-" if s.act is None else (s.act.fmt.name if s.act.fmt else s.act.kind)
            print(f"{name:30s} weights {s.weight_fmt.name:11s} activations {act}")
        return 0

    import os

    import torch

    from .demo import DemoConfig, run_demo

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        # Run the generated Triton kernels on the CPU through Triton's interpreter.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        cfg = DemoConfig(scheme=args.scheme, tokens=args.tokens, device=device, compile=not args.no_compile)
        result = run_demo(cfg)
    except ValueError as e:
        print(f"mxemu demo: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
