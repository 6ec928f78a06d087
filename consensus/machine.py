"""ColonyMachine: the deterministic colony state machine that Raft replicates.

Every replica applies the same log entries (batches of commands stamped with the leader's
time) in the same order and gets the same state and the same results. Hence, in this package:
no clock reads, no randomness, no iteration over unordered containers; time comes only from
the entry's `now`, and never runs backwards (now = max(now, last applied now)).

Command formats (what the log holds):
  client write: {"op": msgtype, "caller": 64-hex id, "nonce": bytes, "expiry": unix ms,
                 "body": body, "gen": 64-hex id drawn by the proposing node}
  internal:     {"op": "bootstrap", "serverid": 64-hex, "clusterid": 64-hex}
                {"op": "tick"}   (apply every exec/wait deadline <= now)

Nonces: a client write whose (caller, nonce) was seen within its expiry window is refused
(ReplayedEnvelope), one whose expiry has passed likewise (ExpiredEnvelope). A write that passes
the nonce check, body validation and its role rule consumes its nonce whatever its handler
decides (so a replayed assign that found nothing, or a replayed duplicate, is refused as a
replay). A write refused before that changes nothing at all, in keeping with "bad input
changes nothing": its nonce stays unrecorded, so a replay gets the same refusal as long as the
state that refused it holds. That is no weaker than what the node's pre-check already implies:
writes refused by the pre-check never reach the log, so they are never recorded either.
"""

from __future__ import annotations

from typing import Any

import msgpack

from consensus import canonical, history, liveness, retention, roles, snapshot
from consensus.archive import Archive, ArchiveError
from consensus.commands import INTERNAL, WRITES
from consensus.queries import READS
from consensus.request import Request
from consensus.state import ColonyState
from protocol.errors import BadRequest, ColoniesError, UnknownMessageType
from protocol.messages import APPROVED, message_type, validate_body
from protocol.schema import HEX64

MAX_NONCE_BYTES = 64
MAX_ERROR_CHARS = 500
_INT64_MAX = 2**63 - 1


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class ColonyMachine:
    def __init__(self, archive: Archive | None = None) -> None:
        self._st = ColonyState(archive)

    # Identity of the cluster (fixed by the bootstrap command).

    @property
    def server_id(self) -> str:
        return self._st.server_id

    @property
    def cluster_id(self) -> str:
        return self._st.cluster_id

    @property
    def applied_changes(self) -> int:
        """Bumped by every applied change that could make a process assignable (or change
        who may be assigned): the node wakes its long-pollers when it moves."""
        return self._st.applied_changes

    def statistics(self) -> dict[str, int]:
        """Cluster-wide counts (for metrics and status; no role check, the node decides)."""
        return self._st.statistics()

    def colony_statistics(self, colonyname: str) -> dict[str, int] | None:
        if colonyname not in self._st.colonies:
            return None
        return self._st.colony_statistics(colonyname)

    @property
    def members(self) -> dict[str, str]:
        """The cluster's members: peer id -> full multiaddr."""
        return dict(self._st.members)

    def colony_names(self) -> list[str]:
        return sorted(self._st.colonies)

    # Applying the log.

    @property
    def archive(self) -> Archive:
        return self._st.archive

    def apply_batch(self, batch: bytes, index: int | None = None) -> list[list]:
        """Apply one log entry (at log ``index``, which the archive records); one [status,
        value] per command. Never raises, but for the archive failing (ArchiveError: the
        replica cannot go on, see node/raft_replica.py)."""
        try:
            decoded = msgpack.unpackb(batch, raw=False)
        except Exception:
            return []
        if not isinstance(decoded, dict) or not isinstance(decoded.get("cmds"), list):
            return []
        cmds: list = decoded["cmds"]
        now = decoded.get("now")
        if not _is_int(now) or not 0 <= now <= _INT64_MAX:
            return [[500, "malformed batch: 'now' must be an int64 of unix ns"] for _ in cmds]
        archive = self._st.archive
        if index is not None:
            archive.begin(index)
        try:
            return [self._apply_one(cmd, now) for cmd in cmds]
        finally:
            if index is not None:
                archive.end()

    def _apply_one(self, cmd: Any, now: int) -> list:
        try:
            return [200, self.apply(cmd, now)]
        except ColoniesError as e:
            return [e.status, e.message]
        except ArchiveError:
            raise
        except Exception as e:
            # A bug, not input. Every replica hits it at the same point (determinism), so the
            # replicas still agree; handlers check before they mutate, so nothing is half done.
            return [500, f"internal error: {type(e).__name__}: {e}"[:MAX_ERROR_CHARS]]

    def apply(self, cmd: dict, now: int) -> object:
        """Apply one command at leader time `now` (ns). Raises ColoniesError on refusal.

        A command refused before its handler runs (malformed, replayed, expired, invalid
        body, refused by the role rule) changes nothing at all, not even the clock or the
        nonce book. Past that point its nonce is consumed whatever the handler decides.
        """
        st = self._st
        if not isinstance(cmd, dict):
            raise BadRequest("a command must be a map")
        if not _is_int(now) or not 0 <= now <= _INT64_MAX:
            raise BadRequest("the command time must be an int64 of unix ns")
        now = max(now, st.last_now)
        op = cmd.get("op")
        if isinstance(op, str) and op in INTERNAL:
            try:
                result = INTERNAL[op](st, cmd, now)
            finally:
                self._settle(now)
            st.last_now = now
            return result
        handler = WRITES.get(op) if isinstance(op, str) else None
        if handler is None:
            shown = op[:64] if isinstance(op, str) else type(op).__name__
            raise BadRequest(f"unknown command op: {shown}")
        caller, nonce, expiry = cmd.get("caller"), cmd.get("nonce"), cmd.get("expiry")
        if not isinstance(caller, str) or not HEX64.match(caller):
            raise BadRequest("command caller must be a 64-hex id")
        if not isinstance(nonce, bytes) or not 1 <= len(nonce) <= MAX_NONCE_BYTES:
            raise BadRequest(f"command nonce must be 1-{MAX_NONCE_BYTES} bytes")
        if not _is_int(expiry) or not 0 <= expiry <= _INT64_MAX:
            raise BadRequest("command expiry must be an int64 of unix ms")
        now_ms = now // 1_000_000
        st.nonces.check(caller, nonce, expiry, now_ms)
        body = validate_body(op, cmd.get("body"))
        roles.authorize(st, op, caller, body)
        # The commit point: from here the command takes effect, even if its handler refuses.
        st.last_now = now
        st.nonces.prune(now_ms)
        st.nonces.remember(caller, nonce, expiry)
        liveness.heard_from(st, caller, now)  # an executor's write says it is alive
        gen = cmd.get("gen")
        try:
            return handler(st, Request(caller, body, gen if isinstance(gen, str) else ""), now)
        finally:
            self._settle(now)

    def _settle(self, now: int) -> None:
        """What the command finished goes to the archive, and retention learns of it."""
        for colony, ended in history.settle(self._st).items():
            retention.after_archiving(self._st, colony, ended, now)

    # Reads and pre-checks (never change the state).

    def read(self, msgtype: str, caller: str, body: dict, now: int) -> object:
        mt = message_type(msgtype)
        query = READS.get(msgtype)
        if query is None:
            if mt.write:
                raise BadRequest(f"{msgtype} is a write: it goes through the log")
            raise UnknownMessageType(f"{msgtype} is not answered by the state machine")
        body = validate_body(msgtype, body)
        roles.authorize(self._st, msgtype, caller, body)
        return query(self._st, Request(caller, body))

    def authorize(self, msgtype: str, caller: str, body: dict) -> None:
        """Pre-check of a message's role rule against the current state (the node calls it
        before proposing a write; apply checks again). `body` must already be validated
        (protocol.envelope.open_envelope does it), so it is not validated again here."""
        message_type(msgtype)
        roles.authorize(self._st, msgtype, caller, body)

    def assignable(self, colonyname: str, executor_id: str) -> int:
        """How many processes an assign by this executor could pick right now (0: none).
        O(1); processes of the pool are counted for every executor of their type."""
        ex = self._st.executors.get(executor_id)
        if ex is None or ex.colonyname != colonyname or ex.state != APPROVED:
            return 0
        if colonyname in self._st.paused:  # long-pollers wait for the resume
            return 0
        return self._st.queue.count(ex.colonyname, ex.executortype, ex.executorname)

    def next_deadline(self) -> int | None:
        """The earliest pending process deadline or timer (unix ns), or None."""
        due = [t for t in (self._st.deadlines.next(), self._st.timers.next()) if t is not None]
        return min(due) if due else None

    # Snapshots.

    def snapshot(self) -> dict:
        """The whole state as plain msgpack-able data. Shares immutable parts (specs, outputs)
        with the live state: encode it before handing it anywhere that might mutate it."""
        return snapshot.to_snapshot(self._st)

    @classmethod
    def restore(
        cls, data: dict, archive: Archive | None = None, index: int | None = None
    ) -> ColonyMachine:
        """The machine a snapshot holds, over ``archive``; ``index`` is the snapshot's log
        index (finished records in an older snapshot are archived at it)."""
        m = cls(archive)
        m._st = snapshot.from_snapshot(data, m._st.archive)
        if m._st.settling_processes or m._st.settling_graphs:
            if index is not None:
                m._st.archive.begin(index)
            try:
                m._settle(m._st.last_now)
            finally:
                if index is not None:
                    m._st.archive.end()
        return m

    def restored(self, data: dict, index: int) -> ColonyMachine:
        """A machine with the state of snapshot ``data`` (taken at log ``index``) over this
        one's archive (the replica loading a snapshot)."""
        return type(self).restore(data, self._st.archive, index)

    # The archive's files, for the node (a snapshot's history, node/snapshot_transfer.py).

    def sync_history(self) -> None:
        self._st.archive.sync()

    def collect_history(self, upto: int) -> int:
        return self._st.archive.collect(upto)

    def backup_history(self, target: Any) -> None:  # noqa: ANN401 - a path
        self._st.archive.backup(target)

    def close_history(self) -> None:
        self._st.archive.close()

    def reopen_history(self) -> None:
        self._st.archive.reopen()

    def digest(self) -> str:
        """sha3-256 hex of the canonical encoding of snapshot(): equal on converged replicas."""
        return canonical.digest(self.snapshot())
