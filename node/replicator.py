"""The trio side of Raft: the ticker that drives PySyncObj, group commit, and apply wake-ups.

Everything runs in the trio thread, with no worker threads: ``doTick(0)`` is a cheap
synchronous call (a few microseconds when idle), and PySyncObj runs proposal callbacks and the
apply hook inside it, so they can set trio events directly. Never call PySyncObj with
``sync=True`` from here: it would block the event loop.

Group commit: ``submit`` only queues a command; a committer task packs every command queued
when it runs (up to ``max_batch``) into one log entry ``{"now": ns, "cmds": [...]}``, stamped
with this node's clock, and proposes it. Up to ``max_in_flight`` entries are in the log at
once (one: the next entry takes everything queued while the previous one committed), and one
commit costs the cluster about half a dozen Raft messages whatever the number of commands in it.

Relays: on a follower the committer does not propose through PySyncObj (which forwards each
proposal to the leader as a log entry of its own); it sends the batch to the leader as one
``relay`` message over the Raft transport. The leader queues the relayed commands with its own,
so one entry carries the writes of the whole cluster, and tags each with its origin
``[node id, token]`` (the entry's ``src`` list). Every node applies every entry, so the origin
learns its commands' results from its own apply (``on_results``): no reply message. Up to
``max_relays_in_flight`` relays are outstanding at once, since a follower applies an entry
only when the next append-entries brings the commit index. A relay
the receiver cannot take (it is not the leader, its queue is full) is answered with
``relay_refused`` (never applied: safe to retry); relays outstanding when the leader changes
fail with 503 (outcome unknown), as PySyncObj's own forwarding does.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack
import trio
from pysyncobj import FAIL_REASON

from node.raft_codec import MAX_ENTRY_BYTES
from node.raft_dump import CorruptRaftState
from node.raft_replica import ReplicatedColony, StateMachine
from protocol.errors import (
    BadRequest,
    ColoniesError,
    InternalError,
    RequestTimeout,
    Unavailable,
)
from protocol.framing import MAX_COMMAND_BYTES

log = logging.getLogger("colonies.replicator")

IDLE_TICK_S = 0.03  # Raft timers need tens of ms; a busier idle loop costs CPU (notes §2.2.7)
MAX_BATCH_COMMANDS = 512
# One entry in flight on the leader: the next batch then takes everything queued while the
# previous one committed. Measured on 3 nodes, 8 executors: 2 in flight made more entries and
# Raft messages per process and 6% less throughput, 4 made 50% more messages.
MAX_IN_FLIGHT = 1
# Relays outstanding per follower. A relay resolves when the follower applies its commands,
# which is when the append-entries after their entry brings the commit index: with one at a
# time a follower could relay every second round only, and the leader's entries carried half
# the cluster's writes. Measured likewise (4 paired runs each): 1: 299 proc/s, 2: 345,
# 3: 374, 4: 390, 8 and 16: no better than 4; node CPU per request fell with it (1911 us to
# 1553 us), as fuller entries mean fewer of them.
MAX_RELAYS_IN_FLIGHT = 4
# Commands the leader holds queued (its own and relayed) before it refuses relays.
MAX_QUEUED = 20_000
MAX_RELAY_TTL_S = 60.0
# A relay (or its refusal) lost on the way, with the leader unchanged, is sent again after
# this long; the leader drops copies it has already taken (the last SEEN_RELAYS tokens).
RELAY_RESEND_S = 1.0
SEEN_RELAYS = 100_000
# A batch is at most this big (unless one command alone is), so that a log entry stays below
# MAX_ENTRY_BYTES, where PySyncObj would switch to its pickled chunk transfer.
MAX_BATCH_BYTES = MAX_COMMAND_BYTES  # protocol/framing.py: what one request frame can carry
_BATCH_HEADER_BYTES = 64  # generous bound of the msgpack map/array headers around the commands
assert MAX_BATCH_BYTES + _BATCH_HEADER_BYTES < MAX_ENTRY_BYTES

_FAILURES: dict[int, str] = {
    FAIL_REASON.QUEUE_FULL: "the raft command queue is full",
    FAIL_REASON.MISSING_LEADER: "the raft group has no leader (election in progress or no quorum)",
    FAIL_REASON.DISCARDED: "a new raft leader replaced the command before it was committed",
    FAIL_REASON.NOT_LEADER: "the node forwarded to is no longer the raft leader",
    FAIL_REASON.LEADER_CHANGED: "the raft leader changed while the command was on its way",
    FAIL_REASON.REQUEST_DENIED: "the raft leader refused the command",
    FAIL_REASON.UNKNOWN_OUTCOME: "the raft leader changed before the outcome was known",
}
# Reasons after which the command may still be in the log and be applied.
_UNCERTAIN = frozenset({FAIL_REASON.LEADER_CHANGED, FAIL_REASON.UNKNOWN_OUTCOME})


def failure_error(reason: int) -> Unavailable:
    """A PySyncObj FAIL_REASON other than SUCCESS, as the 503 a client can act on."""
    what = _FAILURES.get(reason, f"raft failure reason {reason}")
    if reason in _UNCERTAIN:
        return Unavailable(f"write may or may not be applied: {what}; read before retrying")
    return Unavailable(f"write not applied: {what}; retry")


def pack_batch(
    now: int, packed_cmds: list[bytes], sources: list[list[Any] | None] | None = None
) -> bytes:
    """msgpack ``{"now": now, "cmds": [...]}`` from commands packed one by one at submit time,
    plus ``"src": [...]`` (per command, ``[origin node id, token]`` or nil) when relayed
    commands are in it.

    Byte for byte what ``msgpack.packb({"now": now, "cmds": cmds, ...}, use_bin_type=True)``
    gives, without packing the commands again, and a command that cannot be encoded fails only
    its own submit instead of its whole batch.
    """
    packer = msgpack.Packer(use_bin_type=True)
    parts = [
        packer.pack_map_header(2 if sources is None else 3),
        packer.pack("now"),
        packer.pack(now),
        packer.pack("cmds"),
        packer.pack_array_header(len(packed_cmds)),
        *packed_cmds,
    ]
    if sources is not None:
        parts += [packer.pack("src"), packer.pack(sources)]
    return b"".join(parts)


def batch_sources(batch: bytes) -> list[Any]:
    """The ``src`` list of an applied entry ([] when it has none or is malformed)."""
    try:
        decoded = msgpack.unpackb(batch, raw=False)
    except Exception:
        return []
    src = decoded.get("src") if isinstance(decoded, dict) else None
    return src if isinstance(src, list) else []


def _one_map(packed: bytes) -> bool:
    """Whether ``packed`` is exactly one msgpack map (a command), nothing before or after."""
    try:
        return isinstance(msgpack.unpackb(packed, raw=False), dict)
    except Exception:
        return False


class RelayLink(Protocol):
    """What the replicator needs of the Raft transport to relay batches to the leader."""

    def send_to(self, peer: str, message: Any) -> bool: ...

    def set_relay_handler(self, handler: Callable[[str, dict[str, Any]], None] | None) -> None: ...

    def set_session_handler(self, handler: Callable[[str], None] | None) -> None: ...


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
    # On the leader, a command another node relayed: [its node id, its token]; nobody here
    # waits for it, the origin learns the result from its own apply.
    origin: list[Any] | None = None
    relay: _Batch | None = None  # on the origin, the relay batch it went in ...
    token: int = 0  # ... and its token there

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
    unresolved: int = 0  # a relay batch: commands whose result has not come yet
    leader: str | None = None  # ... the leader it went to
    resend_at: float = math.inf  # ... and when to send its unresolved commands again


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
        max_relays_in_flight: int = MAX_RELAYS_IN_FLIGHT,
        relay: RelayLink | None = None,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1 or max_relays_in_flight < 1:
            raise ValueError("max_batch, max_in_flight and max_relays_in_flight must be at least 1")
        self._colony = colony
        self._idle_tick = idle_tick
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._max_relays_in_flight = max_relays_in_flight

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
        self._apply_listeners: list[Callable[[], None]] = []
        self._leader: str | None = None
        self.leader_changes = 0
        colony.on_applied = self._on_applied
        colony.proposal_due = lambda: bool(self._queue)

        self._relay = relay
        self._relayed: dict[int, _Pending] = {}  # token -> a command relayed to the leader
        self._seen_relays: dict[tuple[str, int], None] = {}  # on the leader, oldest first
        if relay is not None:
            relay.set_relay_handler(self._on_relay_message)
            relay.set_session_handler(self._on_session)
            colony.on_results = self._on_results
            colony.on_snapshot = self._on_snapshot

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
            relayed=len(self._relayed),
            applied_generation=self._generation,
            leader_changes=self.leader_changes,
            journal_syncs=self._colony.journal.syncs,
            journal_sync_s=round(self._colony.journal.sync_seconds, 3),
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
                if not self._colony.sync_policy.always:
                    nursery.start_soon(self._sync_loop, self._colony.sync_policy.interval_s)
                await self._tick_loop(task_status)
        finally:
            self._shutdown()
            self._stopped.set()

    async def _tick_loop(self, task_status: trio.TaskStatus[None]) -> None:
        while True:
            # A fresh event before the tick: kicks from inside doTick (callbacks, hooks) and
            # from tasks that run while we wait both count.
            self._kicked = trio.Event()
            # What the last tick appended (proposals) is on disk before this one counts it
            # toward a commit; the event loop serves other work during the sync.
            await self._colony.make_durable_async()
            self._tick()
            self._note_leader()
            if self._colony.append_entries_held:
                self._kicked.set()  # tick again once the other tasks ran (a proposal, maybe)
            if not self._ready.is_set() and self._colony.caught_up:
                self._ready.set()
                task_status.started()
            with trio.move_on_after(self._idle_tick):
                await self._kicked.wait()  # checkpoints even when already set

    async def _sync_loop(self, interval: float) -> None:
        """The ``interval`` journal policy: entries are acknowledged before they are on disk
        and synced this often (node/raft_journal.py)."""
        while True:
            await trio.sleep(interval)
            try:
                self._colony.journal.sync()
            except OSError as e:
                raise CorruptRaftState(f"cannot sync the raft journal: {e}") from None

    def _note_leader(self) -> None:
        leader = self._colony.leader_id
        if leader == self._leader:
            return
        self._leader = leader
        self.leader_changes += 1
        # Relays to another leader: that one may have logged them or not.
        self._fail_relays(failure_error(FAIL_REASON.UNKNOWN_OUTCOME), unless_to=leader)
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
                # otherwise wait a whole idle period per commit. Tick again at once, after
                # the journal sync (which lets the event loop queue more commands meanwhile).
                self._tick_again = False
                self._kicked.set()
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

    def add_apply_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every applied batch and loaded snapshot, inside the tick:
        it must be quick and must not await (waking a task is fine). Unlike ``wait_applied``
        it costs no task switch when there is nothing to do. Exceptions are logged."""
        self._apply_listeners.append(listener)

    def _on_applied(self) -> None:
        # Runs inside doTick: just bump and wake, waiters re-check the state themselves.
        self._generation += 1
        self._applied.unpark_all()
        for listener in self._apply_listeners:
            try:
                listener()
            except Exception:
                log.exception("apply listener raised (ignored)")

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
                with trio.move_on_at(self._next_resend()):
                    await self._work.park()
                self._resend_due()
            elif len(self._in_flight) >= (
                self._max_relays_in_flight if self._relaying() else self._max_in_flight
            ):
                await self._wait_for_slot()
            else:
                self._propose_batch()
                # Let waiters and the ticker run between batches.
                await trio.lowlevel.checkpoint()

    async def _wait_for_slot(self) -> None:
        # A batch whose callback never comes (its entry lost with a leader) must not hold its
        # slot forever: once all its submitters have given up, the slot is free again.
        expires = min(min(b.deadline, b.resend_at) for b in self._in_flight.values())
        with trio.move_on_at(expires):
            await self._slot_freed.park()
        self._resend_due()
        now = trio.current_time()
        for seq in [s for s, b in self._in_flight.items() if b.deadline <= now]:
            batch = self._in_flight.pop(seq)
            for pending in batch.commands:
                pending.finish(None, pending.timed_out())
                self._forget_relayed(pending)

    def _relaying(self) -> bool:
        """Whether this node's batches go to the leader as relays (see the module doc)."""
        leader = self._colony.leader_id
        return self._relay is not None and leader is not None and leader != self._colony.self_id

    def _propose_batch(self) -> None:
        commands = self._take_batch()
        if not commands:
            return
        for pending in commands:
            pending.proposed = True
        leader = self._colony.leader_id
        relaying = self._relaying()
        if relaying:
            # Commands relayed to this node while it led: tell their origins they were not
            # applied, rather than pass them on under this node's name.
            self._refuse_relayed(commands, FAIL_REASON.NOT_LEADER)
            commands = [p for p in commands if p.origin is None]
            if not commands:
                return
        self._batch_seq += 1
        batch = _Batch(self._batch_seq, commands, max(p.deadline for p in commands))
        self._in_flight[batch.seq] = batch
        if relaying:
            assert leader is not None
            self._send_relay(leader, batch)
        else:
            self._propose(batch)

    def _take_batch(self) -> list[_Pending]:
        commands: list[_Pending] = []
        size = 0
        now = trio.current_time()
        while self._queue and len(commands) < self._max_batch:
            pending = self._queue[0]
            # A relayed command past its deadline: its origin gave up on it.
            if pending.abandoned or (pending.origin is not None and pending.deadline <= now):
                self._queue.popleft()
                continue
            if commands and size + len(pending.packed) > MAX_BATCH_BYTES:
                break
            self._queue.popleft()
            commands.append(pending)
            size += len(pending.packed)
        return commands

    def _propose(self, batch: _Batch) -> None:
        commands = batch.commands
        # Replicas apply the leader's stamp, never their own clock; keep it from going back
        # when this host's clock steps back between two batches.
        self._last_now = now = max(self._last_now, time.time_ns())
        sources = None
        if any(p.origin is not None for p in commands):
            sources = [p.origin for p in commands]
        try:
            self._colony.propose(
                pack_batch(now, [p.packed for p in commands], sources),
                lambda result, reason: self._on_batch_done(batch, result, reason),
            )
        except Exception as e:
            log.exception("raft propose failed")
            self._in_flight.pop(batch.seq, None)
            self._refuse_relayed(commands, FAIL_REASON.REQUEST_DENIED)
            for pending in commands:
                pending.finish(None, Unavailable(f"write not proposed: {e}"))
            return
        # Only a one-node group commits in the tick after (see _tick); with others, their
        # answers bring the commit, and a second tick now would do nothing.
        self._tick_again = not self._colony.otherNodes
        self.kick()

    def _on_batch_done(self, batch: _Batch, result: Any, reason: int) -> None:
        # Runs inside doTick (or inside propose, for QUEUE_FULL); must not raise.
        if self._in_flight.pop(batch.seq, None) is None:
            return  # expired in _wait_for_slot; its submitters are gone
        self._slot_freed.unpark_all()
        if reason != FAIL_REASON.SUCCESS:
            if reason not in _UNCERTAIN:
                # Definitely not in the log. Otherwise the origins learn the outcome from
                # their apply, or fail their relays when they see the new leader.
                self._refuse_relayed(batch.commands, reason)
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

    # --- relays (see the module docstring) ----------------------------------------------------

    def _send_relay(self, leader: str, batch: _Batch) -> None:
        assert self._relay is not None
        for pending in batch.commands:
            token = secrets.randbits(63)  # unique across restarts: the journal replays srcs
            pending.relay, pending.token = batch, token
            self._relayed[token] = pending
        batch.unresolved = len(batch.commands)
        batch.leader = leader
        if not self._transmit(batch, batch.commands, trio.current_time()):
            error = Unavailable("the raft leader is not reachable from this node; not applied")
            for pending in batch.commands:
                self._resolve_relayed(pending.token, None, error)

    def _transmit(self, batch: _Batch, commands: list[_Pending], now: float) -> bool:
        assert self._relay is not None and batch.leader is not None
        batch.resend_at = now + RELAY_RESEND_S
        message = {
            "type": "relay",
            "cmds": [p.packed for p in commands],
            "tokens": [p.token for p in commands],
            "ttl_ms": max(1, int((batch.deadline - now) * 1000)),
        }
        return self._relay.send_to(batch.leader, message)

    def _next_resend(self) -> float:
        return min((b.resend_at for b in self._in_flight.values()), default=math.inf)

    def _resend_due(self) -> None:
        now = trio.current_time()
        for batch in self._in_flight.values():
            if batch.resend_at <= now < batch.deadline:
                waiting = [p for p in batch.commands if not p.done.is_set()]
                if waiting:
                    self._transmit(batch, waiting, now)

    def _on_session(self, peer: str) -> None:
        """A new session with ``peer``: relays to it may have died with the old one, so send
        them again now rather than after RELAY_RESEND_S (the leader drops copies)."""
        now = trio.current_time()
        for batch in self._in_flight.values():
            if batch.leader == peer and batch.unresolved > 0:
                batch.resend_at = now
        self._work.unpark_all()
        self._slot_freed.unpark_all()

    def _on_relay_message(self, peer: str, message: dict[str, Any]) -> None:
        """From the transport (a member peer, a validated message); must not raise."""
        if message["type"] == "relay_refused":
            error = failure_error(message["reason"])
            for token in message["tokens"]:
                self._resolve_relayed(token, None, error)
            return
        tokens, cmds = message["tokens"], message["cmds"]
        reason = None
        if self._closed or not self._colony.is_leader:
            reason = FAIL_REASON.NOT_LEADER
        elif len(self._queue) + len(cmds) > MAX_QUEUED:
            reason = FAIL_REASON.QUEUE_FULL
        elif not all(_one_map(c) for c in cmds):
            # Spliced raw into the entry: one bad command would spoil everyone's batch.
            reason = FAIL_REASON.REQUEST_DENIED
        if reason is not None:
            self._send_refusal(peer, tokens, reason)
            return
        ttl = min(message["ttl_ms"] / 1000, MAX_RELAY_TTL_S)
        deadline = trio.current_time() + ttl
        seen = self._seen_relays
        for token, packed in zip(tokens, cmds, strict=True):
            if (peer, token) in seen:
                continue  # a copy sent again: the first one is queued or in the log
            seen[(peer, token)] = None
            self._queue.append(_Pending(packed, ttl, deadline, origin=[peer, token]))
        while len(seen) > SEEN_RELAYS:
            del seen[next(iter(seen))]
        self._work.unpark_all()

    def _on_results(self, batch: bytes, results: list[list[Any]]) -> None:
        """Every applied entry, inside doTick: finish the commands this node relayed."""
        if not self._relayed:
            return
        me = self._colony.self_id
        for i, src in enumerate(batch_sources(batch)):
            if isinstance(src, list) and len(src) == 2 and src[0] == me:
                item = results[i] if i < len(results) else None
                if isinstance(item, list) and len(item) == 2:
                    self._resolve_relayed(src[1], item, None)
                else:
                    error = InternalError("the state machine returned no result")
                    self._resolve_relayed(src[1], None, error)

    def _resolve_relayed(self, token: Any, result: list[Any] | None, error: Any) -> None:
        pending = self._relayed.pop(token, None) if isinstance(token, int) else None
        if pending is None:
            return
        pending.finish(result, error)
        batch = pending.relay
        if batch is not None:
            batch.unresolved -= 1
            if batch.unresolved <= 0 and self._in_flight.pop(batch.seq, None) is not None:
                self._slot_freed.unpark_all()

    def _forget_relayed(self, pending: _Pending) -> None:
        if pending.relay is not None:
            self._relayed.pop(pending.token, None)

    def _fail_relays(self, error: ColoniesError, unless_to: str | None = None) -> None:
        for token, pending in list(self._relayed.items()):
            if unless_to is None or pending.relay is None or pending.relay.leader != unless_to:
                self._resolve_relayed(token, None, error)

    def _on_snapshot(self) -> None:
        """A snapshot replaced the state: entries it covers were never applied here, so
        relayed commands in them will not be resolved by an apply."""
        self._fail_relays(failure_error(FAIL_REASON.UNKNOWN_OUTCOME))

    def _refuse_relayed(self, commands: list[_Pending], reason: int) -> None:
        """On the leader: tell the origins of relayed commands that will not be applied."""
        by_peer: dict[str, list[int]] = defaultdict(list)
        for pending in commands:
            if pending.origin is not None:
                by_peer[pending.origin[0]].append(pending.origin[1])
        for peer, tokens in by_peer.items():
            self._send_refusal(peer, tokens, reason)

    def _send_refusal(self, peer: str, tokens: list[int], reason: int) -> None:
        if self._relay is not None:
            message = {"type": "relay_refused", "tokens": tokens, "reason": reason}
            self._relay.send_to(peer, message)

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
        self._refuse_relayed(list(self._queue), FAIL_REASON.NOT_LEADER)
        for pending in self._queue:
            pending.finish(None, Unavailable("the node is shutting down; the write was not applied"))
        self._queue.clear()
        self._relayed.clear()
        if self._relay is not None:
            self._relay.set_relay_handler(None)
            self._relay.set_session_handler(None)
            self._colony.on_results = None
        self._colony.on_applied = None
        self._colony.close()
        self._applied.unpark_all()
