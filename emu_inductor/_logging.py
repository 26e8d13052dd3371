"""The package logger.

Everything in emu_inductor logs to ``logging.getLogger("emu_inductor")`` (or a child of
it). torch's logging front end treats any importable module name as a log target, so

    TORCH_LOGS="+emu_inductor" python my_script.py      # DEBUG
    TORCH_LOGS="emu_inductor" python my_script.py       # INFO

turns it on with torch's formatter (read when torch is imported; verified on 2.13).
From Python: ``torch._logging.set_logs(modules={"emu_inductor": logging.DEBUG})``, or
plain ``logging.getLogger("emu_inductor").setLevel(logging.DEBUG)`` plus a handler.

What is logged at DEBUG: each run of the mxemu pass (graph, node count, pass uuid),
each candidate subgraph fused or left alone (with the reason), pattern-family init.
Internal errors inside a pattern family are logged at WARNING (the compile goes on).
"""

from __future__ import annotations

import logging

__all__ = ["log", "get_logger"]

log = logging.getLogger("emu_inductor")


def get_logger(suffix: str | None = None) -> logging.Logger:
    """``emu_inductor`` logger, or its child ``emu_inductor.<suffix>``."""
    return log if not suffix else log.getChild(suffix)
