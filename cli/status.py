"""`colonies status`: the cluster at a glance, once or live (`--watch`).

One round probes every member of the member book at once, each on its own short-timeout
connection (cli/cluster.py), then reads the statistics the configured keys may see from a
reachable member (the leader first): server statistics with the server owner key, and with a
colony and a member key the colony's counts, its executors and its oldest waiting process.

What the CLI derives itself, from what nodes report:
* a member's lag: the leader's commit index minus the member's applied index;
* executors online or stale: when the colony has a stale-after (consensus/liveness.py), the
  colony's own rule from the replicated state (heard from, and not marked stale); when its
  staleness is off, an approved executor counts as online if the colony heard from it
  within `stale_after` seconds, by this machine's clock;
* the oldest waiting process's age, by this machine's clock;
* assigns per second: from two samples of the colony's started processes (running +
  successful + failed). That is assigns net of requeues; a sample in which processes were
  removed shows no rate (None) rather than a negative one.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
from rich.console import Group, RenderableType
from rich.live import Live
from rich.text import Text

from cli import json_text
from cli.cluster import ClusterView, describe, node_rows
from node.client import Client
from protocol.errors import ColoniesError
from protocol.identity import PrivateKey
from protocol.messages import APPROVED, PENDING, REJECTED, WAITING

STALE_AFTER_S = 60.0
MIN_RATE_WINDOW_S = 0.1

# Colony statistics keys -> the state names the view uses.
PROCESS_STATES = (
    ("waiting", "waitingprocesses"),
    ("running", "runningprocesses"),
    ("successful", "successfulprocesses"),
    ("failed", "failedprocesses"),
    ("cancelled", "cancelledprocesses"),
)
STARTED = ("runningprocesses", "successfulprocesses", "failedprocesses")


@dataclass
class StatusOptions:
    seed: str  # a member's full multiaddr
    key: PrivateKey  # asks for server info (any key may)
    timeout: float  # per member probe and per statistics call
    server_key: PrivateKey | None = None
    member_key: PrivateKey | None = None
    colony: str | None = None
    stale_after: float = STALE_AFTER_S


def executor_counts(
    executors: list[dict[str, Any]], now_ns: int, stale_after: float, colony_stale_after: int = 0
) -> dict:
    approved = [e for e in executors if e.get("state") == APPROVED]
    if colony_stale_after:
        rule = "colony"
        stale_after = colony_stale_after
        online = sum(1 for e in approved if e.get("lastheardfromtime") and not e.get("stale"))
    else:
        rule = "age"
        fresh_since = now_ns - int(stale_after * 1e9)
        online = sum(1 for e in approved if int(e.get("lastheardfromtime") or 0) >= fresh_since)
    return {
        "approved": len(approved),
        "online": online,
        "stale": len(approved) - online,
        "pending": sum(1 for e in executors if e.get("state") == PENDING),
        "rejected": sum(1 for e in executors if e.get("state") == REJECTED),
        "stale_after_s": stale_after,
        "stale_rule": rule,  # colony: the replicated rule; age: this clock (staleness off)
    }


def started_count(stats: dict[str, Any]) -> int:
    return sum(int(stats.get(k) or 0) for k in STARTED)


class StatusReader:
    """Reads status rounds; keeps its connections (and the last rate sample) between them."""

    def __init__(self, nursery: trio.Nursery, opts: StatusOptions) -> None:
        self.opts = opts
        self._nursery = nursery
        self.cluster = ClusterView(nursery, opts.seed, opts.key, opts.timeout)
        self._client: Client | None = None  # for statistics: any reachable member
        self._sample: tuple[float, int] | None = None  # (monotonic time, started processes)
        self._last_rate: float | None = None

    @classmethod
    @asynccontextmanager
    async def open(cls, opts: StatusOptions) -> AsyncIterator[StatusReader]:
        async with trio.open_nursery() as nursery:
            reader = cls(nursery, opts)
            try:
                yield reader
            finally:
                with trio.CancelScope(shield=True):
                    await reader.aclose()
                nursery.cancel_scope.cancel()

    async def aclose(self) -> None:
        await self._drop_client()
        await self.cluster.aclose()

    async def round(self) -> dict[str, Any]:
        """One status snapshot (the JSON that `status -o json` prints)."""
        cluster = self.cluster
        probes = await cluster.refresh()
        nodes = node_rows(probes, cluster.leader)
        info = cluster.first_info() or {}
        status: dict[str, Any] = {
            "clusterid": info.get("clusterid"),
            "serverid": info.get("serverid"),
            "leader": cluster.leader,
            "term": cluster.term,
            "members": len(nodes),
            "reachable": sum(1 for n in nodes if n["reachable"]),
            "nodes": nodes,
            "server": cluster.first_info(),  # the node answering for the cluster, in full
        }
        notes: list[str] = []
        await self._statistics(status, notes)
        if notes:
            status["notes"] = notes
        return status

    async def sample_rate(self, status: dict[str, Any], window: float) -> None:
        """Another sample of the colony's counts `window` seconds after the round's, to fill
        in assigns_per_s (one-shot mode; --watch gets it from round to round)."""
        view = status.get("colonyview")
        if view is None or self._sample is None or self.opts.member_key is None:
            return
        assert self.opts.colony is not None
        await trio.sleep_until(trio.current_time() + self._sample[0] + window - time.monotonic())
        try:
            client = await self._stats_client()
            if client is None:
                return
            with trio.fail_after(self.opts.timeout):
                stats = await client.with_key(self.opts.member_key).colony_stats(self.opts.colony)
        except Exception:  # no rate this time; the round's view stands
            await self._drop_client()
            return
        view["assigns_per_s"] = self._rate(stats)

    async def _statistics(self, status: dict[str, Any], notes: list[str]) -> None:
        opts = self.opts
        if opts.server_key is None and (opts.colony is None or opts.member_key is None):
            return
        try:
            client = await self._stats_client()
        except Exception as e:  # a member that just answered went away: a note, no failure
            await self._drop_client()
            notes.append(f"statistics: no member answered ({_reason(e)})")
            return
        if client is None:
            notes.append("statistics: no member is reachable")
            return
        if opts.server_key is not None:
            try:
                with trio.fail_after(opts.timeout):
                    status["statistics"] = await client.with_key(opts.server_key).statistics()
            except Exception as e:  # a note; the status still shows
                notes.append(f"server statistics: {_reason(e)}")
        if opts.colony is not None and opts.member_key is not None:
            status["colonyname"] = opts.colony
            try:
                with trio.fail_after(opts.timeout):
                    await self._colony(client.with_key(opts.member_key), status)
            except Exception as e:  # a note; the status still shows
                notes.append(f"colony {opts.colony}: {_reason(e)}")
        if client.conn is None or client.conn.broken:
            await self._drop_client()

    async def _colony(self, client: Client, status: dict[str, Any]) -> None:
        colony = self.opts.colony
        assert colony is not None
        stats = await client.colony_stats(colony)
        status["colony"] = stats  # the node's counts as they are (as before)
        executors = await client.executors(colony)
        settings = await client.pause_status(colony)
        oldest = await client.processes(colony, WAITING, 1)
        now_ns = time.time_ns()
        view: dict[str, Any] = {
            "paused": settings["ispaused"],
            "executors": executor_counts(
                executors, now_ns, self.opts.stale_after, settings["staleafter"]
            ),
            "processes": {name: int(stats.get(key) or 0) for name, key in PROCESS_STATES},
            "oldest_waiting_s": None,
            "oldest_waiting_processid": None,
            "assigns_per_s": self._rate(stats),
        }
        if oldest:
            submitted = int(oldest[0].get("submissiontime") or 0)
            if submitted > 0:
                view["oldest_waiting_s"] = round(max(0, now_ns - submitted) / 1e9, 3)
            view["oldest_waiting_processid"] = oldest[0].get("processid")
        status["colonyview"] = view

    def _rate(self, stats: dict[str, Any]) -> float | None:
        """Assigns per second since the previous sample. A sample too soon after the previous
        one (a slow round followed by a quick one) keeps that one as the baseline and the last
        rate; a drop in the count (processes removed) starts afresh with no rate."""
        now, count = time.monotonic(), started_count(stats)
        prev = self._sample
        if prev is None or count < prev[1]:
            self._sample, self._last_rate = (now, count), None
        elif now - prev[0] >= MIN_RATE_WINDOW_S:
            self._sample = (now, count)
            self._last_rate = round((count - prev[1]) / (now - prev[0]), 2)
        return self._last_rate

    async def _stats_client(self) -> Client | None:
        if self._client is not None and self._client.conn is not None and not self._client.conn.broken:
            return self._client
        await self._drop_client()
        addrs = self.cluster.reachable_addrs()
        if not addrs:
            return None
        key = self.opts.member_key or self.opts.server_key or self.opts.key
        with trio.fail_after(self.opts.timeout * 2):
            self._client = await Client.open(self._nursery, addrs, key, self.opts.timeout)
        self._client.timeout = self.opts.timeout
        return self._client

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with trio.move_on_after(2) as scope:
                scope.shield = True
                await client.aclose()


def _reason(e: BaseException) -> str:
    if isinstance(e, ColoniesError):
        status = getattr(type(e), "status", None)
        return f"{e.message} ({status})" if status and type(e) is not ColoniesError else e.message
    if isinstance(e, trio.TooSlowError):
        return "timed out"
    return describe(e, "")


async def until_interrupted(body: Callable[[], Any]) -> None:
    """Run `body()` until it returns or Ctrl-C (or SIGTERM) arrives; the signal ends it
    quietly. Off the main thread (tests) there are no signals to catch."""
    if threading.current_thread() is not threading.main_thread():
        await body()
        return
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as n:

            async def on_signal() -> None:
                async for _ in signals:
                    n.cancel_scope.cancel()
                    return

            n.start_soon(on_signal)
            await body()
            n.cancel_scope.cancel()


async def watch(
    reader: StatusReader,
    interval: float,
    json_out: bool,
    frame: Callable[[dict[str, Any]], list[RenderableType]],
    console_factory: Callable[[], Any],
) -> None:
    """Re-read and re-render every `interval` seconds until Ctrl-C. On a terminal the view is
    redrawn in place (rich Live); piped, each round is printed in turn (tables), or as one
    JSON document per line (-o json)."""
    console = console_factory()
    live_mode = not json_out and console.is_terminal

    def parts(status: dict[str, Any]) -> list[RenderableType]:
        notes = [Text(f"note: {n}", style="yellow") for n in status.get("notes", [])]
        return [*frame(status), *notes]

    async def loop(show: Callable[[dict[str, Any]], None]) -> None:
        while True:
            deadline = trio.current_time() + interval
            show(await reader.round())
            await trio.sleep_until(deadline)

    if json_out:

        def show_json(status: dict[str, Any]) -> None:
            sys.stdout.write(json_text.dumps(status, default=str, separators=(",", ":")) + "\n")
            sys.stdout.flush()

        await until_interrupted(lambda: loop(show_json))
    elif live_mode:
        with Live(console=console, auto_refresh=False, transient=False) as live:

            def show_live(status: dict[str, Any]) -> None:
                live.update(Group(*parts(status), _watch_footer(interval)), refresh=True)

            await until_interrupted(lambda: loop(show_live))
    else:

        def show_print(status: dict[str, Any]) -> None:
            console.rule(time.strftime("%H:%M:%S"))
            for part in parts(status):
                console.print(part)
            console.file.flush()

        await until_interrupted(lambda: loop(show_print))


def _watch_footer(interval: float) -> str:
    return f"[dim]{time.strftime('%H:%M:%S')}  every {interval:g} s  (Ctrl-C to stop)[/dim]"
