"""The colony state machine behind PySyncObj 0.3.17, with no pickle for application state.

PySyncObj is used as a Raft log and nothing more:

* Log commands are our own bytes, ``_COMMAND_TYPE.REGULAR`` + a msgpack batch
  ``{"now": ns, "cmds": [...]}``. They are proposed with ``_applyCommand`` (not ``@replicated``,
  which would pickle ``(funcID, args, kwargs)``) and applied by overriding the name-mangled
  ``_SyncObj__doApplyCommand``: ``SyncObj.__applyLogEntries`` calls
  ``self.__doApplyCommand(...)``, which Python compiles to ``self._SyncObj__doApplyCommand``,
  so the attribute lookup finds this subclass's method, for live commits and for journal
  replay after a restart alike (it is the only call site). NO_OP, MEMBERSHIP and VERSION
  entries still go to PySyncObj's own implementation.
* Snapshots (``fullDumpFile``) are written by a custom ``serializer``: one msgpack map holding
  the machine's ``snapshot()``, its digest, and the Raft part PySyncObj hands over (the last
  two applied entries and the member ids). PySyncObj's own format is a gzip-pickled
  ``__dict__``; with a custom serializer it passes ``data=None`` for the object part and never
  reads ``__dict__``. The dump file is also what a leader streams to a lagging follower, so
  followers install snapshots without unpickling either.
* Both ``journalFile`` and ``fullDumpFile`` are on: a journal alone is unrecoverable once
  compaction has cut its prefix, a dump alone loses what came after it (stack-probe §1.3).

Everything here is synchronous and runs in whatever thread calls ``doTick`` (the trio thread,
see ``node/replicator.py``). Hooks and callbacks run inside ``doTick``: they must not block,
and must not raise, because PySyncObj re-applies an entry whose apply step raised (state
divergence), so every call out of this module into user code is wrapped.

PySyncObj's remaining pickle paths are its own: MEMBERSHIP and VERSION commands, and the
chunked transfer of a single entry >= ``appendEntriesBatchSizeBytes``. The last one is kept
unreachable for our batches by ``MAX_ENTRY_BYTES`` (``propose`` refuses anything bigger), and
the Raft codec (``node/raft_codec.py``) refuses any received message that carries a
``transmission`` chunk. The first two never reach ``pickle.loads`` here: MEMBERSHIP commands
go through ``_SyncObj__parseChangeClusterRequest`` (overridden: a restricted unpickler that
knows ``pysyncobj.node.Node`` and nothing else, then a shape check), VERSION commands are
checked the same way (``node/pickle_guard.py``) and ignored (we have no ``@replicated`` methods, so no code versions).
A cluster member can still propose whatever log entries it likes (Raft trusts its members),
but it cannot make another node run code.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgpack
import trio
from pysyncobj import SyncObj, SyncObjConf
from pysyncobj.monotonic import monotonic
from pysyncobj.node import Node
from pysyncobj.syncobj import _COMMAND_TYPE, _RAFT_STATE
from pysyncobj.transport import Transport

from consensus.archive import ArchiveError
from node import gc_control
from node.datadir import DataDir
from node.pickle_guard import parse_membership_command, parse_version_command
from node.raft_dump import decode_dump
from node.raft_elections import ElectionRules
from node.raft_journal import DurableJournal, SyncPolicy
from node.raft_snapshots import SnapshotStore

log = logging.getLogger("colonies.raft")

ALWAYS_SYNC = SyncPolicy()
JOURNAL_FILE = "raft.journal"
META_FILE = "raft.meta"
# The journal's entries are kept in memory as well: past this size, compact the log whatever
# the entry count or time.
MAX_JOURNAL_BYTES = 64 * 1024 * 1024
# Entries between snapshots (colonyd --compact-after).
DEFAULT_COMPACT_AFTER = 5000
DUMP_FILE = "raft.dump"

# A single log entry at or above PySyncObj's appendEntriesBatchSizeBytes is sent to followers
# as pickle.dumps(entry) in chunks, and unpickled there. Entries must stay below it; the wire
# frame limit of the transport must allow about twice this (a batch of entries plus one more).
MAX_ENTRY_BYTES = 2 * 1024 * 1024

_REGULAR = bytes([_COMMAND_TYPE.REGULAR])
_MEMBERSHIP = bytes([_COMMAND_TYPE.MEMBERSHIP])
_VERSION = bytes([_COMMAND_TYPE.VERSION])
_STATE_NAMES = {
    _RAFT_STATE.FOLLOWER: "follower",
    _RAFT_STATE.CANDIDATE: "candidate",
    _RAFT_STATE.LEADER: "leader",
}


class StateMachine(Protocol):
    """What the adapter needs from ``consensus.machine.ColonyMachine``."""

    def apply_batch(self, batch: bytes, index: int | None = None) -> list[list[Any]]: ...

    def snapshot(self) -> dict[str, Any]: ...

    def restored(self, data: dict[str, Any], index: int) -> StateMachine:
        """A machine like this one, with the state of snapshot ``data`` (taken at log
        ``index``), over the same history."""

    def digest(self) -> str: ...

    def sync_history(self) -> None:
        """Make the history written so far durable (before a snapshot lets the journal go)."""

    def collect_history(self, upto: int) -> int:
        """Drop removed history that the snapshot at ``upto`` covers; how many rows went."""

    def backup_history(self, target: Path) -> None:
        """A consistent copy of the history in ``target`` (for a follower; a worker thread)."""

    def close_history(self) -> None:
        """Let go of the history's files (a snapshot install replaces them)."""

    def reopen_history(self) -> None:
        """Open the history's files again, as they now are."""


# What the parser hands PySyncObj for a refused MEMBERSHIP command: not None (PySyncObj would
# then take the command for a regular one), and a request type that __doChangeCluster refuses
# without side effects, so the leader answers REQUEST_DENIED and the other nodes ignore it.
REFUSED_CHANGE = ("refused", "")

def _unused_serializer(*args: Any) -> None:  # noqa: ANN401
    raise AssertionError("PySyncObj's Serializer is replaced by node/raft_snapshots.py")


# How many ticks a new commit index may wait for the next entry (_flush_append_entries).
MAX_COMMIT_HOLD_TICKS = 3


@dataclass(frozen=True)
class RaftTimeouts:
    """Seconds. PySyncObj asserts ``min_timeout > 3 * append_entries_period`` (a bare assert,
    skipped under ``python -O``, so it is checked again here)."""

    append_entries_period: float
    min_timeout: float
    max_timeout: float

    @property
    def leader_fallback(self) -> float:
        """A leader that has heard from no majority for this long steps down (PySyncObj's
        default, 30 s, lets a cut-off leader claim the role, and take writes that can only
        time out, long after the rest elected another)."""
        return 3 * self.max_timeout

    def __post_init__(self) -> None:
        if not 0 < 3 * self.append_entries_period < self.min_timeout < self.max_timeout:
            raise ValueError(
                f"raft timeouts need 0 < 3*append_entries_period < min < max, got {self}"
            )


# Nobody else can lead a one-node group, so it may elect itself almost at once (its first
# election waits min..max after construction); this is what makes a solo node start fast.
SOLO_TIMEOUTS = RaftTimeouts(append_entries_period=0.01, min_timeout=0.04, max_timeout=0.06)
# PySyncObj's defaults: failover in about 0.5-0.7 s. Tighter values (0.15/0.3) churned leaders
# under load on a 2-core box (stack-probe §2.4).
GROUP_TIMEOUTS = RaftTimeouts(append_entries_period=0.1, min_timeout=0.4, max_timeout=1.4)


class NullTransport(Transport):
    """The transport of a one-node group: always ready, no peers, every send fails.

    ``ready`` must be True from the start: with ``autoTick=False`` the SyncObj constructor
    busy-loops on ``tryGetReady()`` until it is.
    """

    def __init__(self) -> None:
        super().__init__(None, None, [])

    def tryGetReady(self) -> None:
        pass

    @property
    def ready(self) -> bool:
        return True

    def waitReady(self) -> None:
        pass

    def addNode(self, node: Node) -> None:
        log.warning("raft member %s added, but this node has no transport to reach it", node)

    def dropNode(self, node: Node) -> None:
        pass

    def send(self, node: Node, message: Any) -> bool:
        return False

    def destroy(self) -> None:
        pass


def _error_results(batch: bytes, message: str) -> list[list[Any]]:
    """One [500, message] per command of a batch, for an apply that raised."""
    try:
        count = len(msgpack.unpackb(batch, raw=False, strict_map_key=False)["cmds"])
    except Exception:
        count = 0
    return [[500, message] for _ in range(count)]


class ReplicatedColony(ElectionRules, SyncObj):
    """One replica of the colony state: a PySyncObj node whose log carries msgpack batches.

    Never ticks by itself (``autoTick=False``): the owner calls ``doTick(0)``. Read the state
    through ``machine`` every time, since loading a snapshot replaces the object.

    ``joining=True`` is for the first start of a node that joins a running group: it starts
    with the current members as partners, as a learner (node/raft_elections.py) that never
    stands for election, until the leader makes it a voter.
    """

    def __init__(
        self,
        self_id: str,
        partner_ids: Sequence[str],
        data_dir: str | os.PathLike[str] | DataDir,
        machine: StateMachine | None = None,
        *,
        transport: Transport | None = None,
        on_applied: Callable[[], None] | None = None,
        timeouts: RaftTimeouts | None = None,
        log_compaction_min_entries: int = DEFAULT_COMPACT_AFTER,
        log_compaction_min_time: float = 300.0,
        joining: bool = False,
        sync_policy: SyncPolicy = ALWAYS_SYNC,
    ) -> None:
        partners = [p for p in dict.fromkeys(partner_ids) if p != self_id]
        if transport is None:
            if partners:
                # PySyncObj's default TCPTransport speaks unauthenticated pickle.
                raise ValueError("a raft group with partners needs a transport")
            transport = NullTransport()
        if machine is None:
            from consensus.machine import ColonyMachine

            machine = ColonyMachine()
        if timeouts is None:
            timeouts = GROUP_TIMEOUTS if partners else SOLO_TIMEOUTS

        # One lock per data dir (colonyd.lock): the daemon hands over the DataDir it opened;
        # a replica given a bare path (tests, tools) takes the lock itself.
        if isinstance(data_dir, DataDir):
            self._own_dir = None
            directory = data_dir.path
        else:
            self._own_dir = DataDir(Path(data_dir)).open()
            directory = self._own_dir.path
        # Helpers go before super().__init__() (the notes' state-capture rule): nothing of the
        # application lives in what PySyncObj would snapshot, and the serializer callbacks below
        # need them as soon as PySyncObj exists.
        self._machine: StateMachine = machine
        self._on_applied = on_applied
        # Called with (entry batch, its results) after every applied batch: how a node learns
        # the results of the commands it relayed to the leader (node/replicator.py).
        self.on_results: Callable[[bytes, list[list[Any]]], None] | None = None
        self.on_snapshot: Callable[[], None] | None = None  # after a snapshot replaced the state
        self._self_id = self_id
        self._fatal_error: str | None = None
        self._closed = False
        self._refused_commands = 0
        self._installing = False
        self._timeouts = timeouts
        self._ae_sent = (0, 0)  # (log end, commit index) the last append-entries carried
        self._commit_held = 0  # ticks a new commit index has waited for an entry to carry it
        # Whether the proposer has a batch about to go in (then a bare commit index waits).
        self.proposal_due: Callable[[], bool] = lambda: False
        self._data_dir = directory
        # Our journal, not PySyncObj's (node/raft_journal.py): PySyncObj starts on an empty
        # in-memory one and gets this one right after its constructor, below.
        self.sync_policy = sync_policy
        # ``on_snapshot_needed(peer)``: a follower is behind the log (node/snapshot_transfer.py).
        self.on_snapshot_needed: Callable[[str], None] | None = None
        self._snapshots = SnapshotStore(
            directory / DUMP_FILE,
            lambda: self._machine,
            self._install_machine,
            self._fail,
            self._snapshot_needed,
            self._snapshot_members,
        )
        try:
            self._journal = DurableJournal(directory / JOURNAL_FILE, directory / META_FILE)
        except BaseException:
            self._release_dir()
            raise
        self._init_elections(transport, learner=joining)

        conf = SyncObjConf(
            autoTick=False,
            # Append-entries go out once per tick (see _flush_append_entries), not once per
            # added entry and again per commit.
            appendEntriesUseBatch=True,
            useFork=False,  # snapshots fork in node/raft_snapshots.py, not in PySyncObj
            dynamicMembershipChange=True,
            journalFile=None,
            fullDumpFile=str(directory / DUMP_FILE),
            connectionRetryTime=0.5,
            appendEntriesPeriod=timeouts.append_entries_period,
            raftMinTimeout=timeouts.min_timeout,
            raftMaxTimeout=timeouts.max_timeout,
            leaderFallbackTimeout=timeouts.leader_fallback,
            appendEntriesBatchSizeBytes=MAX_ENTRY_BYTES,
            logCompactionMinEntries=log_compaction_min_entries,
            logCompactionMinTime=log_compaction_min_time,
            # Our SnapshotStore replaces PySyncObj's Serializer below; with a serializer set,
            # PySyncObj hands it no copy of our attributes.
            serializer=_unused_serializer,
            deserializer=_unused_serializer,
        )
        try:
            super().__init__(
                Node(self_id),
                [Node(p) for p in partners],
                conf,
                # Ids are libp2p peer ids, not host:port, so never TCPNode (which parses them).
                nodeClass=Node,
                transport=transport,
            )
        except BaseException:
            self._release_dir()
            raise
        self._use_journal(self._journal)
        self._SyncObj__serializer = self._snapshots
        if hasattr(transport, "set_ack_gate"):
            # A follower acknowledges entries only once they are on disk (policy always).
            transport.set_ack_gate(self.make_durable, self.make_durable_async)

    def _use_journal(self, journal: DurableJournal) -> None:
        """What SyncObj.__init__ does with the journal it creates, done with ours: a first
        NO_OP entry in an empty log, and Raft's persistent state read back."""
        self._SyncObj__raftLog = journal
        if len(journal) == 0:
            journal.add(bytes([_COMMAND_TYPE.NO_OP]), 1, 0)
            journal.sync()
        self._SyncObj__raftCurrentTerm = max(journal.getCurrentTerm(), journal[-1][2])
        self._SyncObj__votedForNodeId = journal.getVotedForNodeId()
        self._SyncObj__raftCommitIndex = journal.getRaftCommitIndex()

    # --- durability --------------------------------------------------------------------------

    @property
    def journal(self) -> DurableJournal:
        return self._journal

    def make_durable(self) -> None:
        """Before this node counts or acknowledges entries: with the ``always`` policy, every
        entry in its journal is on disk (one fdatasync for all appended since the last).
        The replicator and the transport call ``make_durable_async`` first where they can
        wait, which leaves this one nothing to do."""
        if self.sync_policy.always and self._journal.dirty and self._fatal_error is None:
            try:
                self._journal.sync()
            except OSError as e:
                self._journal_failed(e)

    async def make_durable_async(self) -> None:
        if self.sync_policy.always and self._journal.dirty and self._fatal_error is None:
            # Let the tasks that are ready run first: commands they queue go in the next entry.
            await trio.lowlevel.checkpoint()
            try:
                self._journal.sync()
            except OSError as e:
                self._journal_failed(e)

    def _journal_failed(self, e: OSError) -> None:
        # Nothing appended since the last sync can be acknowledged any more; the replicator
        # stops the node (CorruptRaftState) rather than run on a journal whose tail may never
        # reach the disk.
        self._fatal_error = f"cannot sync the raft journal {self._journal.path}: {e}"
        log.critical(self._fatal_error)

    # --- the state ---------------------------------------------------------------------------

    @property
    def machine(self) -> StateMachine:
        """The current machine; replaced when a snapshot is loaded, so never cache it."""
        return self._machine

    @property
    def on_applied(self) -> Callable[[], None] | None:
        return self._on_applied

    @on_applied.setter
    def on_applied(self, hook: Callable[[], None] | None) -> None:
        self._on_applied = hook

    @property
    def fatal_error(self) -> str | None:
        """Set when the state cannot be trusted any more (a dump failed to load)."""
        return self._fatal_error

    # --- status (these properties are also read by SyncObj.__init__'s dir() scan, so they
    # --- may only touch attributes PySyncObj sets early; getStatus() is not one of them) ------

    @property
    def self_id(self) -> str:
        return self._self_id

    @property
    def is_leader(self) -> bool:
        return bool(self._isLeader())

    @property
    def leader_id(self) -> str | None:
        leader = self._getLeader()
        return None if leader is None else str(leader.id)

    @property
    def term(self) -> int:
        return int(self.raftCurrentTerm)

    @property
    def commit_index(self) -> int:
        return int(self.raftCommitIndex)

    @property
    def last_applied(self) -> int:
        return int(self.raftLastApplied)

    @property
    def member_ids(self) -> list[str]:
        """The voting members (this node too, unless it is a learner)."""
        voters = [n.id for n in self.otherNodes]
        if not getattr(self, "_learner", False):
            voters.append(self.selfNode.id)
        return sorted(voters)

    @property
    def log_end_index(self) -> int:
        """The index of the last entry in this replica's log (committed or not)."""
        return int(self._SyncObj__getCurrentLogIndex())

    @property
    def snapshot_index(self) -> int:
        """The log index of the last snapshot on disk (0: none yet)."""
        return self._snapshots.snapshot_index

    @property
    def snapshots(self) -> SnapshotStore:
        return self._snapshots

    @property
    def append_entries_held(self) -> bool:
        """A commit index the followers have not heard of waits for the next tick."""
        return self._commit_held > 0

    # --- append-entries coalescing -----------------------------------------------------------

    def _onTick(self, timeToWait: float = 0.0) -> None:
        if self._installing:
            return
        if self._journal.byte_size > MAX_JOURNAL_BYTES and not self._snapshots.writing:
            self.forceLogCompaction()  # the entries are in memory too: compact by size as well
        # A leader counts itself toward the commit of every entry in its log, in this tick:
        # what it appended since the last tick must be on disk first.
        self.make_durable()
        super()._onTick(timeToWait)
        self._flush_append_entries()

    def _SyncObj__sendAppendEntries(self) -> None:
        # Every send, PySyncObj's own (heartbeats, a new leader's first) included, goes here.
        SyncObj._SyncObj__sendAppendEntries(self)
        self._ae_sent = (self.log_end_index, self.commit_index)
        self._commit_held = 0

    def _flush_append_entries(self) -> None:
        """With appendEntriesUseBatch PySyncObj only sends heartbeats; the leader sends here,
        at the end of a tick, when new entries or a new commit index are waiting. A commit
        index alone is held while the proposer has commands queued (a few ticks at most: the
        ticker and the proposer are separate trio tasks, run in either order): it proposes
        them as soon as the previous entry commits, and that entry then carries the commit
        index, so under load a follower gets one append-entries (and answers once) per entry
        instead of two. Without a backlog the commit index goes out at once."""
        if self._SyncObj__raftState != _RAFT_STATE.LEADER:
            self._commit_held = 0
            return
        end, commit = self.log_end_index, self.commit_index
        sent_end, sent_commit = self._ae_sent
        if end > sent_end:
            self._SyncObj__sendAppendEntries()
        elif commit > sent_commit:
            if self._commit_held >= MAX_COMMIT_HOLD_TICKS or not self.proposal_due():
                self._SyncObj__sendAppendEntries()
            else:
                self._commit_held += 1

    def set_timeouts(self, timeouts: RaftTimeouts) -> None:
        """PySyncObj reads these on every tick and election, so a group that grows from one
        member can leave the one-member timings behind without a restart."""
        conf = self._SyncObj__conf
        conf.appendEntriesPeriod = timeouts.append_entries_period
        conf.raftMinTimeout = timeouts.min_timeout
        conf.raftMaxTimeout = timeouts.max_timeout
        conf.leaderFallbackTimeout = timeouts.leader_fallback
        self._timeouts = timeouts

    @property
    def caught_up(self) -> bool:
        """A leader is known and this replica has applied what that leader had committed
        when it first heard from it (PySyncObj's isReady)."""
        return self._getLeader() is not None and bool(self.isReady())

    def status(self) -> dict[str, Any]:
        """A msgpack-able view of PySyncObj's getStatus()."""
        s = self.getStatus()
        return {
            "self": self._self_id,
            "state": _STATE_NAMES.get(s["state"], str(s["state"])),
            "leader": self.leader_id,
            "term": s["raft_term"],
            "commit_index": s["commit_idx"],
            "last_applied": s["last_applied"],
            "log_len": s["log_len"],
            "snapshot_index": self.snapshot_index,
            "snapshots": self._snapshots.dumps,
            "snapshot_s": round(self._snapshots.last_seconds, 3),
            "leader_commit_index": s["leader_commit_idx"],
            "has_quorum": s["has_quorum"],
            "members": self.member_ids,
            "learner": self._learner,
            "prevotes": dict(self.prevotes),
            "connected": sorted(
                n.id for n in self.otherNodes if s.get(f"partner_node_status_server_{n.id}") == 2
            ),
            "caught_up": self.caught_up,
        }

    # --- proposals ---------------------------------------------------------------------------

    def propose(self, batch: bytes, callback: Callable[[Any, int], None]) -> None:
        """Queue a msgpack batch for the log. ``callback(results, FAIL_REASON)`` runs later
        inside ``doTick`` on this node, or at once on QUEUE_FULL. It is wrapped so that it
        cannot raise into PySyncObj."""
        if len(batch) + 1 >= MAX_ENTRY_BYTES:
            raise ValueError(f"raft batch of {len(batch)} bytes exceeds {MAX_ENTRY_BYTES}")

        def guarded(result: Any, error: int) -> None:
            try:
                callback(result, error)
            except Exception:
                log.exception("raft proposal callback raised (ignored)")

        try:
            self._applyCommand(batch, guarded, _COMMAND_TYPE.REGULAR)
        except BlockingIOError:
            # The command is already queued; only PySyncObj's wake-up pipe for its own poller
            # was full, and our ticker does not rely on that pipe.
            pass

    # --- apply (the override PySyncObj calls for every committed entry) -----------------------

    def _SyncObj__doApplyCommand(self, command: bytes) -> Any:
        kind = command[:1]
        if kind != _REGULAR:
            if not kind:
                return None  # PySyncObj would raise on ord(b""), every tick, forever
            if kind == _VERSION:
                # We have no @replicated methods, hence no code versions to switch; PySyncObj's
                # own handling would pickle.loads the payload and, for a version above ours,
                # leave raftLastApplied one behind (the next entry is then applied twice).
                version = parse_version_command(bytes(command[1:]))
                self._refused_commands += 1
                log.warning("ignoring a raft VERSION command (version %r)", version)
                return None
            # NO_OP, MEMBERSHIP (parsed by the override below) and unknown types.
            return SyncObj._SyncObj__doApplyCommand(self, command)
        batch = bytes(command[1:])
        try:
            # PySyncObj counts this entry applied once it returns: its index is the next.
            results = self._machine.apply_batch(batch, self.last_applied + 1)
        except ArchiveError as e:
            # The history could not be written: this replica is behind its own log, and must
            # stop (it replays from its last snapshot when it starts again).
            self._fatal_error = f"cannot write the archive: {e}"
            log.critical(self._fatal_error)
            raise
        except Exception:
            # The machine promises never to raise. If it does anyway, answer every command with
            # 500 rather than let PySyncObj re-apply the entry (a partial apply twice).
            log.critical("state machine raised applying a batch; answering 500", exc_info=True)
            results = _error_results(batch, "internal error while applying the command")
        if self.on_results is not None:
            try:
                self.on_results(batch, results)
            except Exception:
                log.exception("on_results hook raised (ignored)")
        self._notify_applied()
        return results

    # --- PySyncObj internals overridden for safety -------------------------------------------

    def _SyncObj__parseChangeClusterRequest(self, command: bytes) -> Any:
        """PySyncObj parses every MEMBERSHIP command with ``pickle.loads``: on the leader for
        a command a follower forwarded (``apply_command``), on followers for the entries they
        receive, and on every node when applying or replaying the log. Name-mangled like
        ``__doApplyCommand``, so this override serves all those call sites."""
        if command[:1] != _MEMBERSHIP:
            return None
        request = parse_membership_command(bytes(command[1:]))
        if request is None:
            self._refused_commands += 1
            log.error("refused a malformed raft MEMBERSHIP command (%d bytes)", len(command))
            return list(REFUSED_CHANGE)
        return request

    @property
    def refused_commands(self) -> int:
        """MEMBERSHIP/VERSION commands refused or ignored (malformed or not allowed)."""
        return self._refused_commands

    def _notify_applied(self) -> None:
        hook = self._on_applied
        if hook is None:
            return
        try:
            hook()
        except Exception:
            log.exception("on_applied hook raised (ignored)")

    # --- snapshots (node/raft_snapshots.py) --------------------------------------------------

    def _install_machine(self, machine: StateMachine, index: int) -> None:
        """A snapshot replaced the state (a restart, or one the leader sent)."""
        self._machine = machine
        if self.on_snapshot is not None:
            try:
                self.on_snapshot()
            except Exception:
                log.exception("on_snapshot hook raised (ignored)")
        self._notify_applied()

    def _fail(self, why: str) -> None:
        self._fatal_error = why
        log.critical(why)

    def _snapshot_needed(self, node: Node) -> None:
        """PySyncObj (as leader) found ``node`` behind its log. Its send loop would ask again
        and again, sending an empty message each time, until the loop's time is up: moving
        the follower's next index past the log ends the loop, and the next heartbeat's
        refusal moves it back, so the follower keeps hearing from us (no election) until
        our transfer has installed the snapshot and it acknowledges the snapshot's index."""
        self._SyncObj__raftNextIndex[node] = self._SyncObj__getCurrentLogIndex() + 1
        if self.on_snapshot_needed is not None:
            self.on_snapshot_needed(str(node.id))

    # --- installing a snapshot from the leader (node/snapshot_transfer.py) --------------------

    @property
    def installing(self) -> bool:
        """A snapshot from the leader is being installed: no tick, no Raft message, no read."""
        return self._installing

    def backup_history(self, target: Path) -> None:
        self._machine.backup_history(target)

    def begin_install(self) -> None:
        self._installing = True
        self._machine.close_history()

    def load_installed(self) -> tuple[StateMachine, dict[str, Any]]:
        """The state the received snapshot holds, over the received history: decoded and
        built in a worker thread while the event loop goes on (nothing else touches the
        machine while installing)."""
        self._machine.reopen_history()
        with open(self._data_dir / DUMP_FILE, "rb") as f, gc_control.bulk_load():
            data = decode_dump(f.read())
            return self._machine.restored(data["machine"], data["last"][1]), data

    def finish_install(self, machine: StateMachine, data: dict[str, Any], leader: str) -> None:
        """Take the state over as PySyncObj takes a snapshot it received: the journal starts
        at the snapshot, and the leader learns where this log now ends."""
        self._snapshots.prepare(machine, data)
        self._SyncObj__loadDumpFile(clearJournal=True)
        self._loaded_members(data["members"])
        self.make_durable()
        self._installing = False
        # Ticks were off: do not stand for election on a timer that ran meanwhile.
        self._SyncObj__raftElectionDeadline = monotonic() + self._timeouts.max_timeout
        self._SyncObj__sendNextNodeIdx(Node(leader), success=True)

    def abort_install(self, why: str) -> None:
        self._fail(why)  # the node stops; a restart finishes the install (complete_install)

    def _SyncObj__onMessageReceived(self, node: Node, message: Any) -> None:  # noqa: ANN401
        if self._installing:
            return  # resent once this node has told the leader where its log ends
        if message["type"] == "append_entries" and message["term"] >= self.term:
            self._heard_leader()  # PySyncObj takes it as from the leader (PreVote)
        SyncObj._SyncObj__onMessageReceived(self, node, message)

    # --- shutdown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Flush and close the journal, release the data dir. Idempotent; no tick after it."""
        if self._closed:
            return
        self._closed = True
        try:
            # PySyncObj stores the commit index once a second; store it now so a restart can
            # apply the whole journal before it hears from a leader.
            self._SyncObj__raftLog.onOneSecondTimer()
        except Exception:
            log.exception("storing the raft journal meta failed")
        try:
            self._snapshots.close()
            self.destroy()  # autoTick=False: transport.destroy() + journal sync and close
        finally:
            self._close_wakeup_pipe()
            self._release_dir()

    def _release_dir(self) -> None:
        if self._own_dir is not None:
            self._own_dir.close()
            self._own_dir = None

    def _close_wakeup_pipe(self) -> None:
        # PySyncObj never closes the pipe it creates in nobatch mode: 2 fds per instance.
        notifier = getattr(self, "_SyncObj__pipeNotifier", None)
        for name in ("_PipeNotifier__pipeR", "_PipeNotifier__pipeW"):
            fd = getattr(notifier, name, None)
            if isinstance(fd, int):
                try:
                    self._poller.unsubscribe(fd)
                    os.close(fd)
                except OSError:
                    pass
