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
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

__all__ = ["log", "get_logger", "progress", "progress_to"]

log = logging.getLogger("emu_inductor")


def get_logger(suffix: str | None = None) -> logging.Logger:
    """``emu_inductor`` logger, or its child ``emu_inductor.<suffix>``."""
    return log if not suffix else log.getChild(suffix)


# --------------------------------------------------------------------------------------
# progress of long steps (pattern-rule building, kernel generation, autotuning)
# --------------------------------------------------------------------------------------

_streams: list[TextIO] = []
_streams_lock = threading.Lock()


@contextmanager
def progress_to(stream: TextIO) -> Iterator[None]:
    """Also print ``progress()`` lines to ``stream`` while the block runs (the demo and
    explain() use sys.stderr)."""
    with _streams_lock:
        _streams.append(stream)
    try:
        yield
    finally:
        with _streams_lock:
            _streams.remove(stream)


def progress(msg: str, *args: Any) -> None:
    """A long step starts or ends: an INFO line on the ``emu_inductor`` logger, and one
    line ``mxemu: ...`` on each stream of an active ``progress_to``."""
    log.info(msg, *args)
    with _streams_lock:
        streams = list(_streams)
    if streams:
        line = "mxemu: " + (msg % args if args else msg)
        for s in streams:
            print(line, file=s, flush=True)
