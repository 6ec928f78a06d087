"""Logging for the daemon and the CLI: rich on a terminal, plain lines otherwise, or JSON
lines (``--log-format json``) for log shippers.

Every record carries the node's peer id once it is known (``node.log_context.set_log_node``); records about a
peer or a process pass ``extra={"peer": ..., "processid": ...}`` (LogRecord.process is the OS pid) and the JSON lines carry them
as fields, so a cluster's logs can be joined on them.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from rich.logging import RichHandler

from node.log_context import NODE_FIELD

# PySyncObj logs benign CRITICAL lines in no-batch mode (see notes/stack-probe.md §2.2 #8).
_NOISY = ("truncating already-applied log entries",)
LOG_FORMATS = ("text", "json")
_FIELDS = ("peer", "processid")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in _NOISY)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        node = getattr(record, "node", "")
        if node:
            out["node"] = node
        for name in _FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    lvl = getattr(logging, level.upper(), None)
    if not isinstance(lvl, int):
        raise SystemExit(f"unknown log level {level!r}; use debug, info, warning or error")
    if fmt not in LOG_FORMATS:
        raise SystemExit(f"unknown log format {fmt!r}; use {' or '.join(LOG_FORMATS)}")
    handler: logging.Handler
    if fmt == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    elif sys.stderr.isatty():
        handler = RichHandler(show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    handler.addFilter(_DropNoise())
    handler.addFilter(NODE_FIELD)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
    logging.getLogger("pysyncobj").addFilter(_DropNoise())
