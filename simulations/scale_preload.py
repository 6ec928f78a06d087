"""Fill a node's data dir with history through the real apply path, fast.

`make bench-scale` needs a node with a million finished processes. Through the network that
takes hours, so this opens the data dir of a stopped, bootstrapped `colonyd` the way the
daemon does (``ReplicatedColony`` over ``ColonyMachine`` over ``SqliteArchive``) and proposes
large batches of the same commands the node would propose for its clients: submit, assign,
add a log line, close. They go through the Raft journal, the state machine, the archive,
snapshots and journal compaction exactly as a node's own do; only the network, signatures and
the batching of concurrent clients are skipped. The callers are the ids of real keys, so the
bench can then act as those identities against the node.

    preload = Preloader(data_dir, peer_id, ids)
    preload.run_finished(1_000_000)
    preload.submit_waiting(100_000)
    preload.close()

or, for a running `colonyd` (simulations/benchkit.py ClusterMember), ``fill_member``: it
registers the colony and executor, stops the node, fills its dir; the caller starts it again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import trio
from pysyncobj import FAIL_REASON

from consensus.machine import ColonyMachine
from node.archive_sqlite import ARCHIVE_FILE, SqliteArchive
from node.client import Client
from node.raft_replica import SOLO_TIMEOUTS, ReplicatedColony
from protocol.identity import PrivateKey

BATCH = 500  # processes per log entry (an entry stays far below MAX_ENTRY_BYTES)
TICK_TIMEOUT_S = 300.0  # a snapshot of the whole state at the end
CHECKPOINT_EVERY_S = 5.0
EXPIRY_MS = 5_000


@dataclass
class Identities:
    """Who does what: ids of real keys (the bench signs with them later)."""

    server: str
    colony: str
    colony_owner: str
    executor: str
    executortype: str


@dataclass
class PreloadStats:
    finished: int = 0
    waiting: int = 0
    entries: int = 0
    seconds: float = 0.0
    sample_ids: list[str] = field(default_factory=list)  # finished ids, for the bench's gets


class Preloader:
    def __init__(self, data_dir: Path, peer_id: str, ids: Identities) -> None:
        self.ids = ids
        self.archive = SqliteArchive(data_dir / ARCHIVE_FILE)
        self.colony = ReplicatedColony(
            peer_id, [], data_dir, ColonyMachine(self.archive), timeouts=SOLO_TIMEOUTS
        )
        self.stats = PreloadStats()
        self._nonce = int.from_bytes(os.urandom(8), "big")
        self._checkpointed = time.monotonic()
        self._tick_until(lambda: self.colony.is_leader and self.colony.caught_up)

    def close(self) -> None:
        """Ends with a snapshot, as a node that has run for a while has one: a restart then
        loads it and replays only what came after (at most --compact-after entries)."""
        try:
            before = self.colony.snapshots.dumps
            self.colony.forceLogCompaction()
            self._tick_until(lambda: self.colony.snapshots.dumps > before)
            self.archive.checkpoint()
        finally:
            self.colony.close()
            self.archive.close()

    # --- commands ------------------------------------------------------------------------------

    def _cmd(self, op: str, caller: str, body: dict[str, Any]) -> dict[str, Any]:
        self._nonce += 1
        nonce = self._nonce.to_bytes(16, "big")
        return {
            "op": op,
            "caller": caller,
            "nonce": nonce,
            # A node keeps a command's nonce until it expires; the node's own commands carry
            # 60 s (node/dispatch.py), which at the preload's rate would leave hundreds of
            # thousands of nonces in the snapshot. History, not replay protection, is what the
            # preload is for.
            "expiry": time.time_ns() // 1_000_000 + EXPIRY_MS,
            "body": body,
            "gen": nonce.hex() * 2,
        }

    def _spec(self, i: int) -> dict[str, Any]:
        return {
            "funcname": "echo",
            "args": [f"arg-{i}", i],
            "maxexectime": -1,
            "maxwaittime": -1,
            "conditions": {"colonyname": self.ids.colony, "executortype": self.ids.executortype},
        }

    def _apply(self, cmds: list[dict[str, Any]]) -> list[Any]:
        """One log entry; the value of every command (all must succeed)."""
        batch = msgpack.packb({"now": time.time_ns(), "cmds": cmds}, use_bin_type=True)
        done: list[tuple[Any, int]] = []
        self.colony.propose(batch, lambda results, err: done.append((results, err)))
        self._tick_until(lambda: bool(done))
        results, err = done[0]
        if err != FAIL_REASON.SUCCESS:
            raise RuntimeError(f"the log refused a preload entry (reason {err})")
        self.stats.entries += 1
        values = []
        for status, value in results:
            if status != 200:
                raise RuntimeError(f"a preload command failed: {status} {value}")
            values.append(value)
        if time.monotonic() - self._checkpointed > CHECKPOINT_EVERY_S:
            self.archive.checkpoint()  # as node/archive_upkeep.py does every 5 s
            self._checkpointed = time.monotonic()
        return values

    def _tick_until(self, cond: Callable[[], bool]) -> None:
        deadline = time.monotonic() + TICK_TIMEOUT_S
        while not cond():
            if self.colony.fatal_error:
                raise RuntimeError(self.colony.fatal_error)
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not get there within the preload timeout")
            self.colony.doTick(0)

    # --- what the bench asks for ---------------------------------------------------------------

    def run_finished(self, n: int, progress: Callable[[int], None] | None = None) -> None:
        """`n` processes submitted, assigned, logged and closed successfully (they move to
        the archive). Three log entries per batch of processes, as their order requires."""
        start = time.monotonic()
        ids, ex = self.ids, self.ids.executor
        for first in _batches(n, BATCH):
            count = len(first)
            self._apply([self._cmd("submitfuncspecmsg", ex, {"spec": self._spec(i)}) for i in first])
            assigned = self._apply(
                [self._cmd("assignprocessmsg", ex, {"colonyname": ids.colony, "timeout": -1})
                 for _ in range(count)]
            )
            closes: list[dict[str, Any]] = []
            for i, p in zip(first, assigned, strict=True):
                pid = p["processid"]
                closes.append(self._cmd("addlogmsg", ex, {"processid": pid, "message": f"line {i}"}))
                closes.append(self._cmd(
                    "closesuccessfulmsg", ex,
                    {"processid": pid, "attempt": p["attempt"], "out": [f"out-{i}", i]},
                ))
                if len(self.stats.sample_ids) < 1000 and i % max(1, n // 1000) == 0:
                    self.stats.sample_ids.append(pid)
            self._apply(closes)
            self.stats.finished += count
            if progress is not None:
                progress(self.stats.finished)
        self.stats.seconds += time.monotonic() - start

    def submit_waiting(self, n: int) -> None:
        """`n` processes left waiting (the executor can take them)."""
        start = time.monotonic()
        ex = self.ids.executor
        for first in _batches(n, BATCH):
            self._apply([self._cmd("submitfuncspecmsg", ex, {"spec": self._spec(i)}) for i in first])
            self.stats.waiting += len(first)
        self.stats.seconds += time.monotonic() - start


def _batches(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


async def fill_member(
    member: Any,  # noqa: ANN401 - simulations.benchkit.ClusterMember, running and ready
    server: PrivateKey,
    owner: PrivateKey,
    executor: PrivateKey,
    colony: str,
    executortype: str,
    finished: int,
    waiting: int,
    progress: Callable[[int], None] | None = None,
) -> PreloadStats:
    """Registers `colony` (owned by `owner`) and an approved `executor` through the node,
    stops it, and fills its data dir. The caller starts it again."""
    async with Client.connect(member.addr, server) as c:
        await c.add_colony(owner.id, colony)
        as_owner = c.with_key(owner)
        await as_owner.add_executor(executor.id, "worker", executortype, colony)
        await as_owner.approve_executor(colony, "worker")
    member.stop()
    ids = Identities(server.id, colony, owner.id, executor.id, executortype)

    def fill() -> PreloadStats:
        pre = Preloader(member.data_dir, member.peer_id, ids)
        try:
            pre.run_finished(finished, progress)
            pre.submit_waiting(waiting)
        finally:
            pre.close()
        return pre.stats

    return await trio.to_thread.run_sync(fill)
