"""`colonies process wait|follow|export` and `colonies colony retention`.

    colonies process wait ID --state successful --timeout 60
    colonies process follow --type echo               (Ctrl-C to stop; -o json: JSON lines)
    colonies process export --since 2026-11-01T00:00:00Z > history.jsonl
    colonies colony retention                         (show; the default keeps 30 days)
    colonies colony retention --seconds 604800        (colony owner key)
    colonies colony retention --count 100000 | --keep-everything | --default

`wait` and `follow` are pushed by the node when it applies a change (long-polls woken by
applies, answered by any node). Finished processes and workflows are kept in the archive on
disk for the colony's retention: export what you want to keep before the window ends.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import trio

from cli import json_text, render
from cli.errors import UsageError
from protocol.messages import MAX_RETENTION_COUNT, MAX_RETENTION_S, STATE_NAMES

if TYPE_CHECKING:
    from cli.main import Context

Handler = Callable[["Context"], Awaitable[int]]
Leaf = Callable[..., argparse.ArgumentParser]

WAIT_STATES = {**{name: state for state, name in STATE_NAMES.items()}, "finished": -1}


def parse_since(text: str) -> int:
    """Unix seconds, or an ISO 8601 time (UTC unless it says otherwise) -> unix ns."""
    try:
        return _ns(float(text))
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected unix seconds or an ISO 8601 time, got {text!r}"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.now().astimezone().tzinfo).astimezone()
    return _ns(t.timestamp())


def _ns(seconds: float) -> int:
    # Clamped to what the node accepts (int64 ns: until the year 2262).
    return max(0, min(int(seconds * 1e9), 2**63 - 1))


def _json_line(value: Any, out: IO[str]) -> None:  # noqa: ANN401 - any process dict
    out.write(json_text.dumps(value, default=render.fmt_value, separators=(",", ":")) + "\n")


async def cmd_wait(ctx: Context) -> int:
    a = ctx.args
    key = ctx.cfg.key("prvkey")
    timeout = a.timeout if a.timeout > 0 else math.inf
    async with ctx.client(key) as c:
        process = await c.wait_for_process(a.processid, WAIT_STATES[a.state], timeout)
    ctx.show(process, render.process_tables)
    return 0


async def cmd_follow(ctx: Context) -> int:
    a = ctx.args
    colony = ctx.cfg.colony_name()
    key = ctx.cfg.key("prvkey")
    seen = 0
    async with ctx.client(key) as c:  # connected first: --timeout counts from then
        with trio.move_on_after(a.timeout if a.timeout > 0 else math.inf):
            follow = c.follow_processes(colony, a.type or "", afterseq=0 if a.from_start else -1)
            async for p in follow:
                if ctx.json:
                    _json_line(p, sys.stdout)
                else:
                    state = render.state_name(p["state"])
                    print(f"{p['processid']}  {p['spec']['funcname']}  {state}")
                sys.stdout.flush()
                seen += 1
                if a.count and seen >= a.count:
                    break
    return 0


async def cmd_export(ctx: Context) -> int:
    a = ctx.args
    colony = ctx.cfg.colony_name()
    key = ctx.cfg.key("prvkey") if ctx.cfg.has("prvkey") else ctx.cfg.key("colony_prvkey")
    out: IO[str] = sys.stdout
    if a.file and a.file != "-":
        try:
            out = Path(a.file).open("w")  # noqa: SIM115 - closed below
        except OSError as e:
            raise UsageError(f"cannot write {a.file}: {e.strerror}") from None
    n = 0
    try:
        async with ctx.client(key) as c:
            async for p in c.export_processes(colony, since=a.since or 0):
                _json_line(p, out)
                n += 1
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"exported {n} finished processes of colony {colony}", file=sys.stderr)
    return 0


async def cmd_retention(ctx: Context) -> int:
    colony = ctx.cfg.colony_name()
    a = ctx.args
    setting = a.seconds is not None or a.count is not None or a.keep_everything or a.default
    if a.keep_everything and (a.seconds or a.count or a.default):
        raise UsageError("--keep-everything goes alone (it is --seconds 0 --count 0)")
    if a.default and (a.seconds is not None or a.count is not None):
        raise UsageError("--default goes alone")
    if not setting:
        key = ctx.cfg.key("prvkey") if ctx.cfg.has("prvkey") else ctx.cfg.key("colony_prvkey")
        async with ctx.client(key) as c:
            policy = await c.retention(colony)
    else:
        async with ctx.client(ctx.cfg.key("colony_prvkey")) as c:
            policy = await c.set_retention(
                colony, a.seconds or 0, a.count or 0, default=bool(a.default)
            )
    ctx.say(f"colony {colony}: {describe_retention(policy)}", policy)
    return 0


def describe_retention(policy: dict) -> str:
    seconds, count = policy["seconds"], policy["count"]
    if not seconds and not count:
        return "finished processes and workflows are kept (no retention)"
    parts = []
    if seconds:
        parts.append(f"{seconds} s after they end")
    if count:
        parts.append(f"beyond the newest {count} of each kind")
    where = " (the default)" if policy.get("default") else ""
    return "finished processes and workflows are removed " + " and ".join(parts) + where


def retention_seconds(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if not 0 <= v <= MAX_RETENTION_S:
        raise argparse.ArgumentTypeError(f"must be between 0 (no limit) and {MAX_RETENTION_S}")
    return v


def retention_count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if not 0 <= v <= MAX_RETENTION_COUNT:
        raise argparse.ArgumentTypeError(f"must be between 0 (no limit) and {MAX_RETENTION_COUNT}")
    return v


def non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {v}")
    return v


def add_process_leaves(g: argparse._SubParsersAction, leaf: Leaf) -> None:
    """Register wait, follow and export under `colonies process`."""
    p = leaf(g, "wait", cmd_wait, "wait until a process is in a state (pushed, not polled)")
    p.add_argument("processid", metavar="ID")
    p.add_argument("--state", choices=list(WAIT_STATES), default="successful",
                   help="the state to wait for (finished: any of successful, failed, "
                   "cancelled; default successful). Exit 1 at once if it cannot get there")
    p.add_argument("--timeout", type=float, default=0, metavar="S",
                   help="give up after S seconds (default: no limit)")
    p = leaf(g, "follow", cmd_follow,
             "print processes as they are submitted (-o json: one JSON object a line)")
    p.add_argument("--type", help="only this executor type")
    p.add_argument("--from-start", action="store_true",
                   help="begin with the processes already in the colony")
    p.add_argument("--count", type=non_negative_int, default=0, metavar="N",
                   help="stop after N processes (default 0: no limit)")
    p.add_argument("--timeout", type=float, default=0, metavar="S",
                   help="stop after S seconds (default: until Ctrl-C)")
    p = leaf(g, "export", cmd_export,
             "write the colony's finished processes as JSON lines (keep them before "
             "retention removes them)")
    p.add_argument("--since", type=parse_since, metavar="TIME",
                   help="only those that ended at or after TIME (unix seconds or ISO 8601)")
    p.add_argument("--file", metavar="PATH", help="write to PATH instead of stdout")


def add_colony_leaves(g: argparse._SubParsersAction, leaf: Leaf) -> None:
    """Register `colonies colony retention`."""
    p = leaf(g, "retention", cmd_retention,
             "show, or set (colony owner key), how long finished processes are kept")
    p.add_argument("--seconds", type=retention_seconds, metavar="S",
                   help="remove finished processes and workflows S seconds after they end "
                   "(0: no age limit; the default keeps them 30 days)")
    p.add_argument("--count", type=retention_count, metavar="N",
                   help="keep only the newest N finished processes and N workflows "
                   "(0: no count limit)")
    p.add_argument("--keep-everything", action="store_true",
                   help="never remove finished work (it stays in the archive on disk)")
    p.add_argument("--default", action="store_true",
                   help="go back to the cluster's default (30 days)")


# `colonies process run` flags for the optional spec fields.


def backoff_flag(text: str) -> dict[str, float]:
    """INITIAL[,MULTIPLIER[,MAX[,JITTER]]] in seconds -> the spec's backoff object."""
    names = ("initial", "multiplier", "max", "jitter")
    parts = text.split(",")
    if len(parts) > len(names):
        raise argparse.ArgumentTypeError("expected INITIAL[,MULTIPLIER[,MAX[,JITTER]]]")
    try:
        values = [float(v) for v in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers, got {text!r}") from None
    return {n: int(v) if v.is_integer() else v for n, v in zip(names, values, strict=False)}


def add_spec_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backoff", type=backoff_flag, metavar="INITIAL[,MULT[,MAX[,JITTER]]]",
                   help="retry after a timeout or a failed close, waiting INITIAL * MULT^retry "
                   "seconds (at most MAX, less up to JITTER of it); --maxretries bounds it")
    p.add_argument("--idempotency-key", metavar="KEY",
                   help="a second submit with KEY within 24 h returns the first process")
    p.add_argument("--concurrency-key", metavar="KEY",
                   help="at most --concurrency-limit processes with KEY run at once")
    p.add_argument("--concurrency-limit", type=int, metavar="N",
                   help="with --concurrency-key (default 1)")


def spec_extras(a: argparse.Namespace) -> dict[str, Any]:
    """The optional spec fields the flags ask for (none when no flag is given)."""
    extras = {
        "backoff": getattr(a, "backoff", None),
        "idempotencykey": getattr(a, "idempotency_key", None),
        "concurrencykey": getattr(a, "concurrency_key", None),
        "concurrencylimit": getattr(a, "concurrency_limit", None),
    }
    return {k: v for k, v in extras.items() if v is not None}
