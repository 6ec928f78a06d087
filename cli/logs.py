"""Logging for the daemon and the CLI: rich on a terminal, plain lines otherwise."""

from __future__ import annotations

import logging
import sys

from rich.logging import RichHandler

# PySyncObj logs benign CRITICAL lines in no-batch mode (see notes/stack-probe.md §2.2 #8).
_NOISY = ("truncating already-applied log entries",)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in _NOISY)


def setup_logging(level: str = "info") -> None:
    lvl = getattr(logging, level.upper(), None)
    if not isinstance(lvl, int):
        raise SystemExit(f"unknown log level {level!r}; use debug, info, warning or error")
    if sys.stderr.isatty():
        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    handler.addFilter(_DropNoise())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
    logging.getLogger("pysyncobj").addFilter(_DropNoise())
