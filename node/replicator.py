"""The trio side of Raft: the ticker that drives PySyncObj, group commit, and apply wake-ups.

Everything runs in the trio thread, with no worker threads: ``doTick(0)`` is a cheap
synchronous call (a few microseconds when idle), and PySyncObj runs proposal callbacks and the
apply hook inside it, so they can set trio events directly. Never call PySyncObj with
``sync=True`` from here: it would block the event loop.

Group commit: ``submit`` only queues a command; a committer task packs every command queued
when it runs (up to ``max_batch``) into one log entry ``{"now": ns, "cmds": [...]}``, stamped
with this node's clock, and proposes it. Up to ``max_in_flight`` entries are in the log at
once, so a slow commit does not stall the queue behind it, and one commit costs the cluster
about a dozen Raft messages whatever the number of commands in it.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio
from pysyncobj import FAIL_REASON

from consensus.raft import MAX_ENTRY_BYTES, CorruptRaftState, ReplicatedColony, StateMachine
from protocol.errors import (
    BadRequest,
    ColoniesError,
    InternalError,
    RequestTimeout,
    Unavailable,
)

log = logging.getLogger("colonies.replicator")

IDLE_TICK_S = 0.03  # Raft timers need tens of ms; a busier idle loop costs CPU (notes §2.2.7)
MAX_BATCH_COMMANDS = 512
MAX_IN_FLIGHT = 4
# A batch is at most this big (unless one command alone is), so that a log entry stays below
# MAX_ENTRY_BYTES, where PySyncObj would switch to its pickled chunk transfer.
MAX_BATCH_BYTES = 1024 * 1024
MAX_COMMAND_BYTES = MAX_BATCH_BYTES
_BATCH_HEADER_BYTES = 64  # generous bound of the msgpack map/array headers around the commands
assert MAX_BATCH_BYTES + _BATCH_HEADER_BYTES < MAX_ENTRY_BYTES

_FAILURES: dict[int, str] = {
    FAIL_REASON.QUEUE_FULL: "the raft command queue is full",
    FAIL_REASON.MISSING_LEADER: "the raft group has no leader (election in progress or no quorum)",
    FAIL_REASON.DISCARDED: "a new raft leader replaced the command before it was committed",
    FAIL_REASON.NOT_LEADER: "the node forwarded to is no longer the raft leader",
    FAIL_REASON.LEADER_CHANGED: "the raft leader changed before the command was committed",
    FAIL_REASON.REQUEST_DENIED: "the raft leader refused the command",
    FAIL_REASON.UNKNOWN_OUTCOME: "the command's outcome is unknown (raft leader changed)",
}


def failure_error(reason: int) -> Unavailable:
    """A PySyncObj FAIL_REASON other than SUCCESS, as the 503 a client can act on: retry."""
    what = _FAILURES.get(reason, f"raft failure reason {reason}")
    return Unavailable(f"write not committed: {what}; retry")


def pack_batch(now: int, packed_cmds: list[bytes]) -> bytes:
    """msgpack ``{"now": now, "cmds": [...]}`` from commands packed one by one at submit time.

    Byte for byte what ``msgpack.packb({"now": now, "cmds": cmds}, use_bin_type=True)`` gives,
    without packing the commands again, and a command that cannot be encoded fails only its
    own submit instead of its whole batch.
    """
    packer = msgpack.Packer(use_bin_type=True)
    return b"".join(
        [
            packer.pack_map_header(2),
            packer.pack("now"),
            packer.pack(now),
            packer.pack("cmds"),
            packer.pack_array_header(len(packed_cmds)),
            *packed_cmds,
        ]
    )


@dataclass(eq=False)
class _Pending:
    """One submitted command, from its submit to its result."""

    packed: bytes
    timeout: float
    deadline: float  # trio clock
    done: trio.Event = field(default_factory=trio.Event)
    result: list[Any] | None = None
    error: ColoniesError | None = None
    proposed: bool = False
    abandoned: bool = False  # its submit gave up before it was proposed: never propose it

    def timed_out(self) -> RequestTimeout:
        if self.proposed:
            return RequestTimeout(
                f"write not confirmed within {self.timeout:g}s; it may still be applied"
            )
        return RequestTimeout(
            f"write not proposed within {self.timeout:g}s (raft backlog); it was not applied"
        )

    def finish(self, result: list[Any] | None, error: ColoniesError | None) -> None:
        if self.done.is_set():
            return
        self.result, self.error = result, error
        self.done.set()


@dataclass(eq=False)
class _Batch:
    seq: int
    commands: list[_Pending]
    deadline: float  # the last of its commands' deadlines: nobody waits for it after that


class Replicator:
    """Drives a ``ReplicatedColony`` from trio and turns it into ``await submit(cmd)``.

    Start ``run`` in the node's nursery (``await nursery.start(replicator.run)`` returns once a
    leader is known and this replica has caught up); cancelling it or ``await close()`` fails
    pending submits with 503 and closes the journal.
    """

    def __init__(
        self,
        colony: ReplicatedColony,
        *,
        idle_tick: float = IDLE_TICK_S,
        max_batch: int = MAX_BATCH_COMMANDS,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be at least 1")
        self._colony = colony
        self._idle_tick = idle_tick
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight

        self._kicked = trio.Event()
        self._ready = trio.Event()
        self._stopped = trio.Event()
        self._running = False
        self._closed = False
        self._cancel_scope: trio.CancelScope | None = None
        self._tick_again = False
        self._last_tick_error = -math.inf

        self._queue: deque[_Pending] = deque()
        self._in_flight: dict[int, _Batch] = {}
        self._batch_seq = 0
        self._last_now = 0
        self._work = trio.lowlevel.ParkingLot()  # the committer waits here for commands
        self._slot_freed = trio.lowlevel.ParkingLot()  # ... and here for a free in-flight slot

        self._generation = 0
        self._applied = trio.lowlevel.ParkingLot()
        self._leader: str | None = None
        self.leader_changes = 0
        colony.on_applied = self._on_applied

    # --- what the node reads -----------------------------------------------------------------

    @property
    def colony(self) -> ReplicatedColony:
        return self._colony

    @property
    def machine(self) -> StateMachine:
        """The current state; read it through here every time (a snapshot replaces it)."""
        return self._colony.machine

    @property
    def is_leader(self) -> bool:
        return self._colony.is_leader

    @property
    def applied_generation(self) -> int:
        """Bumped once per applied batch and per loaded snapshot; see ``wait_applied``."""
        return self._generation

    def status(self) -> dict[str, Any]:
        status = self._colony.status()
        status.update(
            queued=len(self._queue),
            in_flight=len(self._in_flight),
            applied_generation=self._generation,
            leader_changes=self.leader_changes,
        )
        return status

    # --- ticker ------------------------------------------------------------------------------

    def kick(self) -> None:
        """Wake the ticker now (a proposal, or a Raft message delivered by the transport)."""
        self._kicked.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._running or self._closed:
            raise RuntimeError("a Replicator runs once")
        self._running = True
        try:
            async with trio.open_nursery() as nursery:
                self._cancel_scope = nursery.cancel_scope
                nursery.start_soon(self._commit_loop)
                await self._tick_loop(task_status)
        finally:
            self._shutdown()
            self._stopped.set()

    async def _tick_loop(self, task_status: trio.TaskStatus[None]) -> None:
        while True:
            # A fresh event before the tick: kicks from inside doTick (callbacks, hooks) and
            # from tasks that run while we wait both count.
            self._kicked = trio.Event()
            self._tick()
            self._note_leader()
            if not self._ready.is_set() and self._colony.caught_up:
                self._ready.set()
                task_status.started()
            with trio.move_on_after(self._idle_tick):
                await self._kicked.wait()  # checkpoints even when already set

    def _note_leader(self) -> None:
        leader = self._colony.leader_id
        if leader == self._leader:
            return
        self._leader = leader
        self.leader_changes += 1
        if leader is None:
            log.warning("raft leader lost (term %d)", self._colony.term)
        elif leader == self._colony.self_id:
            log.info("this node is the raft leader (term %d)", self._colony.term)
        else:
            log.info(
                "raft leader is %s (term %d)", leader, self._colony.term, extra={"peer": leader}
            )

    def _tick(self) -> None:
        try:
            self._colony.doTick(0)
            if self._tick_again:
                # The tick that moves proposals into the log cannot also commit them (the
                # commit index is computed earlier in the tick); a one-node group would
                # otherwise wait a whole idle period per commit.
                self._tick_again = False
                self._colony.doTick(0)
        except Exception:
            # PySyncObj's own tick thread logs and carries on, too; our hooks and callbacks
            # cannot raise, so this is a PySyncObj fault. Log at most once a second.
            now = time.monotonic()
            if now - self._last_tick_error > 1.0:
                self._last_tick_error = now
                log.exception("raft tick failed")
        if self._colony.fatal_error is not None:
            raise CorruptRaftState(self._colony.fatal_error)

    async def wait_ready(self, timeout: float) -> None:
        """Until a leader is known and this replica caught up, or Unavailable after timeout."""
        with trio.move_on_after(timeout):
            await self._ready.wait()
            return
        raise Unavailable(
            f"no raft leader after {timeout:g}s (members: {', '.join(self._colony.member_ids)})"
        )

    # --- apply notifications -----------------------------------------------------------------

    def _on_applied(self) -> None:
        # Runs inside doTick: just bump and wake, waiters re-check the state themselves.
        self._generation += 1
        self._applied.unpark_all()

    async def wait_applied(self, seen: int, deadline: float) -> int:
        """Returns the current generation as soon as it differs from ``seen``, or at
        ``deadline`` (trio clock) if nothing was applied. Level-triggered: pass the value read
        *before* checking the state, then re-check after waking."""
        if self._generation == seen:
            with trio.move_on_at(deadline):
                while self._generation == seen:
                    await self._applied.park()
        else:
            await trio.lowlevel.checkpoint()
        return self._generation

    # --- group commit ------------------------------------------------------------------------

    async def submit(self, cmd: dict[str, Any], timeout: float = 10.0) -> list[Any]:
        """Replicate one command; returns its ``[status, value]`` from the state machine.

        Raises Unavailable (503) when Raft did not commit it (no leader, leader change, ...),
        RequestTimeout (408) when no answer came in ``timeout``.
        """
        if self._closed:
            raise Unavailable("this node's raft replicator is stopped")
        try:
            packed = msgpack.packb(cmd, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as e:
            raise InternalError(f"command cannot be encoded for the raft log: {e}") from None
        if len(packed) > MAX_COMMAND_BYTES:
            raise BadRequest(
                f"command of {len(packed)} bytes exceeds the {MAX_COMMAND_BYTES}-byte limit"
            )
        pending = _Pending(packed, timeout, trio.current_time() + timeout)
        self._queue.append(pending)
        self._work.unpark_all()
        try:
            with trio.move_on_at(pending.deadline):
                await pending.done.wait()
        finally:
            if not pending.done.is_set() and not pending.proposed:
                pending.abandoned = True  # cancelled or timed out in the queue: never propose
        if not pending.done.is_set():
            raise pending.timed_out()
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    async def _commit_loop(self) -> None:
        while True:
            while self._queue and self._queue[0].abandoned:
                self._queue.popleft()
            if not self._queue:
                await self._work.park()
            elif len(self._in_flight) >= self._max_in_flight:
                await self._wait_for_slot()
            else:
                self._propose_batch()
                # Let waiters and the ticker run between batches.
                await trio.lowlevel.checkpoint()

    async def _wait_for_slot(self) -> None:
        # A batch whose callback never comes (its entry lost with a leader) must not hold its
        # slot forever: once all its submitters have given up, the slot is free again.
        expires = min(b.deadline for b in self._in_flight.values())
        with trio.move_on_at(expires):
            await self._slot_freed.park()
        now = trio.current_time()
        for seq in [s for s, b in self._in_flight.items() if b.deadline <= now]:
            batch = self._in_flight.pop(seq)
            for pending in batch.commands:
                pending.finish(None, pending.timed_out())

    def _propose_batch(self) -> None:
        commands: list[_Pending] = []
        size = 0
        while self._queue and len(commands) < self._max_batch:
            pending = self._queue[0]
            if pending.abandoned:
                self._queue.popleft()
                continue
            if commands and size + len(pending.packed) > MAX_BATCH_BYTES:
                break
            self._queue.popleft()
            commands.append(pending)
            size += len(pending.packed)
        if not commands:
            return
        for pending in commands:
            pending.proposed = True
        # Replicas apply the leader's stamp, never their own clock; keep it from going back
        # when this host's clock steps back between two batches.
        self._last_now = now = max(self._last_now, time.time_ns())
        self._batch_seq += 1
        batch = _Batch(self._batch_seq, commands, max(p.deadline for p in commands))
        self._in_flight[batch.seq] = batch
        try:
            self._colony.propose(
                pack_batch(now, [p.packed for p in commands]),
                lambda result, reason: self._on_batch_done(batch, result, reason),
            )
        except Exception as e:
            log.exception("raft propose failed")
            self._in_flight.pop(batch.seq, None)
            for pending in commands:
                pending.finish(None, Unavailable(f"write not proposed: {e}"))
            return
        self._tick_again = True
        self.kick()

    def _on_batch_done(self, batch: _Batch, result: Any, reason: int) -> None:
        # Runs inside doTick (or inside propose, for QUEUE_FULL); must not raise.
        if self._in_flight.pop(batch.seq, None) is None:
            return  # expired in _wait_for_slot; its submitters are gone
        self._slot_freed.unpark_all()
        if reason != FAIL_REASON.SUCCESS:
            error = failure_error(reason)
            for pending in batch.commands:
                pending.finish(None, error)
            return
        results = result if isinstance(result, list) else []
        for i, pending in enumerate(batch.commands):
            item = results[i] if i < len(results) else None
            if isinstance(item, list) and len(item) == 2:
                pending.finish(item, None)
            else:
                pending.finish(None, InternalError("the state machine returned no result"))

    # --- shutdown ----------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop ``run`` (if running), fail what is pending with 503, and close the journal.
        Safe to call more than once and after ``run`` was cancelled."""
        if self._cancel_scope is not None and not self._stopped.is_set():
            self._cancel_scope.cancel()
            await self._stopped.wait()
        self._shutdown()

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        stopping = Unavailable("the node is shutting down; the write may or may not be applied")
        for batch in self._in_flight.values():
            for pending in batch.commands:
                pending.finish(None, stopping)
        self._in_flight.clear()
        for pending in self._queue:
            pending.finish(None, Unavailable("the node is shutting down; the write was not applied"))
        self._queue.clear()
        self._colony.on_applied = None
        self._colony.close()
        self._applied.unpark_all()
