"""`colonies colony pause|resume|stats|stale-after`, and executors' liveness for the tables.

    colonies colony pause                   (colony owner key: assign hands out nothing)
    colonies colony resume                  (colony owner key)
    colonies colony stats                   (member or colony owner key)
    colonies colony stale-after 60          (colony owner key; 0 turns staleness off)

While a colony is paused, submits still queue and waiting executors keep waiting; they get
work again on resume. With stale-after S, an executor that does not call in for S seconds
goes stale and its running processes return to the queue (consensus/liveness.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from cli import render
from protocol.messages import MAX_STALE_AFTER_S, MIN_STALE_AFTER_S

if TYPE_CHECKING:
    from cli.main import Context

Handler = Callable[["Context"], Awaitable[int]]
Leaf = Callable[..., argparse.ArgumentParser]


def liveness(executor: dict[str, Any], staleafter: int) -> str:
    """What `executor ls` shows, from the replicated state: stale (the colony's rule fired),
    never (it never called in), online (heard from, staleness on), or unchecked (off)."""
    if executor.get("stale"):
        return "stale"
    if not executor.get("lastheardfromtime"):
        return "never"
    return "online" if staleafter else "unchecked"


def _pause(verb: str) -> Handler:
    async def run(ctx: Context) -> int:
        colony = ctx.cfg.colony_name()
        key = ctx.cfg.key("colony_prvkey")
        async with ctx.client(key) as c:
            if verb == "pause":
                await c.pause_assignments(colony)
            else:
                await c.resume_assignments(colony)
            status = await c.pause_status(colony)
        what = "paused" if status["ispaused"] else "resumed"
        ctx.say(f"assignments in colony {colony} {what}", status)
        return 0

    return run


async def cmd_stats(ctx: Context) -> int:
    colony = ctx.cfg.colony_name()
    key = ctx.cfg.key("prvkey") if ctx.cfg.has("prvkey") else ctx.cfg.key("colony_prvkey")
    async with ctx.client(key) as c:
        stats = await c.colony_stats(colony)
    ctx.show(stats, lambda s: render.stats_table(f"Colony {colony}", s, ("colonies",)))
    return 0


async def cmd_stale_after(ctx: Context) -> int:
    seconds = ctx.args.seconds  # the node validates it (and says why it refuses)
    colony = ctx.cfg.colony_name()
    key = ctx.cfg.key("colony_prvkey")
    async with ctx.client(key) as c:
        reply = await c.set_stale_after(colony, seconds)
    text = (f"executors of colony {colony} go stale after {seconds} s without calling in"
            if seconds else f"executor staleness is off in colony {colony}")
    ctx.say(text, reply)
    return 0


def add_leaves(g: argparse._SubParsersAction, leaf: Leaf) -> None:
    """Add these verbs to cli.main's `colony` group."""
    leaf(g, "pause", _pause("pause"),
         "pause assignment in the colony; submits still queue (colony owner key)")
    leaf(g, "resume", _pause("resume"), "resume assignment in the colony (colony owner key)")
    leaf(g, "stats", cmd_stats, "the colony's process and workflow counts per state")
    p = leaf(g, "stale-after", cmd_stale_after,
             "executors not calling in for S seconds go stale; their running processes "
             "return to the queue (colony owner key)")
    p.add_argument("seconds", type=int, metavar="S",
                   help=f"{MIN_STALE_AFTER_S}-{MAX_STALE_AFTER_S}, or 0 to turn it off")
