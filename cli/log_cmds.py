"""`colonies log add|get`: a process's log lines.

    colonies log add --processid ID --message "50% done"     (the assigned executor's key)
    colonies log get --processid ID [--count N] [--latest]
    colonies log get --processid ID --follow                  (until the process finishes)

`get` prints one line per log line (time, executor, message); -o json prints the lines as a
JSON list, or with --follow one JSON object per line as they come.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from cli import json_text, render
from protocol.messages import MAX_LOG_COUNT

if TYPE_CHECKING:
    from cli.main import Context

Handler = Callable[["Context"], Awaitable[int]]
Group = Callable[[str, str], argparse._SubParsersAction]
Leaf = Callable[..., argparse.ArgumentParser]

FOLLOW_WAIT_S = 10  # each long-poll; the node answers sooner when a line is applied


def line_text(line: dict[str, Any]) -> str:
    return f"{render.fmt_time(line.get('timestamp'))}  {line.get('executorname', '')}  " \
           f"{line.get('message', '')}"


def _print(ctx: Context, line: dict[str, Any]) -> None:
    if ctx.json:
        sys.stdout.write(json_text.dumps(line, separators=(",", ":")) + "\n")
    else:
        sys.stdout.write(line_text(line) + "\n")
    sys.stdout.flush()


async def cmd_add(ctx: Context) -> int:
    key = ctx.cfg.key("prvkey")
    async with ctx.client(key) as c:
        line = await c.add_log(ctx.args.processid, ctx.args.message)
    ctx.say(f"log line {line['seq']} added", line)
    return 0


async def cmd_get(ctx: Context) -> int:
    a = ctx.args
    key = ctx.cfg.key("prvkey")
    async with ctx.client(key) as c:
        if a.follow:
            async for line in c.follow_logs(a.processid, afterseq=a.afterseq,
                                            wait=FOLLOW_WAIT_S):
                _print(ctx, line)
            return 0
        lines = await c.logs(a.processid, count=a.count, afterseq=a.afterseq, latest=a.latest)
    if ctx.json:
        render.print_json(lines)
    else:
        for line in lines:
            _print(ctx, line)
    return 0


def count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if not 1 <= v <= MAX_LOG_COUNT:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_LOG_COUNT}, got {v}")
    return v


def non_negative(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {v}")
    return v


def add_parser(group: Group, leaf: Leaf) -> None:
    """Register `colonies log` with cli.main's `group` and `leaf` builders."""
    g = group("log", "process logs: lines written by the executor running a process")
    p = leaf(g, "add", cmd_add, "append a line to a running process's log (assigned executor)")
    p.add_argument("--processid", required=True)
    p.add_argument("--message", required=True, help="the line (at most 4096 bytes)")
    p = leaf(g, "get", cmd_get, "show a process's log lines, oldest first")
    p.add_argument("--processid", required=True)
    p.add_argument("--count", type=count, default=MAX_LOG_COUNT,
                   help=f"at most this many (1-{MAX_LOG_COUNT})")
    p.add_argument("--afterseq", type=non_negative, default=0, metavar="N",
                   help="only lines after sequence number N")
    p.add_argument("--latest", action="store_true", help="the newest --count lines")
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep printing new lines until the process finishes")
