"""The archive: finished history on disk, written only by applying the log.

Replicated memory holds only what scheduling needs now (consensus/state.py). A standalone
process that finishes, and a workflow that finishes with all its members, move at the end of
the command that finished them into the archive, with their log lines. Reads of history (get,
list, logs, export, retention) go to the archive a page at a time.

Every replica applies the same log, so every replica's archive holds the same rows at the same
index. The archive records the last log index it stored (etcd's "consistent index"), so after a
restart, when the replica replays the journal from its last snapshot, the entries the archive
already holds change nothing in it. Rows are never updated: an entry adds rows, and removing a
row marks it removed at that entry's index; removed rows go for good once a snapshot covers
that index (``collect``).

Each log entry is applied in the same way, first time or replay: its writes are kept in memory
(the entry's overlay) and its reads see the archive as it was when the entry began, plus the
overlay; when the entry ends the overlay is stored, unless the archive holds that entry
already. So a replay reads exactly what the first apply read (a row a later entry removed is
still there for it), and the replicas stay equal. Reads between entries see the latest rows.

``VersionedArchive`` holds that logic over a few storage operations; ``MemoryArchive`` is the
in-memory twin (tests, tools), and the node's archive is SQLite in WAL mode
(node/archive_sqlite.py), handed to the state machine as hashicorp/raft plugs in its stores.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from consensus import canonical
from consensus.process_log import LogLine

PROCESS = "process"
GRAPH = "graph"
# A listing cursor: (end time ns, id) of the last row seen; rows come newest end first.
Cursor = tuple[int, str]
Key = tuple[str, str]  # (kind, id)


class ArchiveError(RuntimeError):
    """The archive cannot be written or read (a full disk, an I/O error). Not a refusal of
    one command: the replica's state is behind its log and it must stop."""


@dataclass(frozen=True, slots=True)
class Archived:
    """One archived process or graph, as stored."""

    kind: str  # PROCESS or GRAPH
    id: str
    colony: str
    gen: int  # the colony's generation when it was archived (a removed colony's rows go)
    state: int
    graphid: str  # a process's workflow ("" when standalone; "" for a graph)
    executortype: str  # "" for a graph
    seq: int  # the submission sequence number
    ended: int  # end time, ns
    record: dict[str, Any]  # Process.to_snapshot() or ProcessGraph.to_snapshot()

    @property
    def key(self) -> Key:
        return (self.kind, self.id)


@dataclass(frozen=True, slots=True)
class ArchivedLog:
    """The log lines of an archived process (its last MAX_LOG_LINES)."""

    processid: str
    colonyname: str
    lines: tuple[LogLine, ...]


@dataclass(frozen=True)
class Query:
    """What the listing reads select; ``order`` is "oldest" (end ascending), "newest" (end
    descending, after ``before``) or "seq" (submission order, after ``after``)."""

    colony: str
    gen: int
    kind: str
    order: str
    limit: int
    standalone: bool = False  # processes only: leave workflow members out
    states: tuple[int, ...] | None = None
    executortype: str = ""
    ended_at_most: int | None = None
    ended_at_least: int = 0
    added_at_most: int | None = None  # rows stored at or before this entry
    before: Cursor | None = None
    after: int = -1

    def matches(self, row: Archived) -> bool:
        return (
            row.kind == self.kind
            and row.colony == self.colony
            and row.gen == self.gen
            and not (self.standalone and row.graphid)
            and (self.states is None or row.state in self.states)
            and (not self.executortype or row.executortype == self.executortype)
            and (self.ended_at_most is None or row.ended <= self.ended_at_most)
            and row.ended >= self.ended_at_least
            and (self.before is None or (row.ended, row.id) < self.before)
            and row.seq > self.after
        )

    def sort_key(self) -> Callable[[Archived], Any]:
        if self.order == "seq":
            return lambda r: r.seq
        return lambda r: (r.ended, r.id)


@dataclass
class _Overlay:
    """The writes of the entry being applied."""

    added: dict[Key, Archived] = field(default_factory=dict)
    logs: dict[str, ArchivedLog] = field(default_factory=dict)
    removed: set[Key] = field(default_factory=set)

    def hides(self, row: Archived) -> bool:
        return row.key in self.removed or (
            row.kind == PROCESS and bool(row.graphid) and (GRAPH, row.graphid) in self.removed
        )


class VersionedArchive(ABC):
    """The archive's entry logic (see the module doc) over storage operations: ``_store``
    writes an entry's overlay; the ``_fetch_*`` reads return stored rows as they were when
    entry ``at`` began (rows added before it and not removed before it), or the latest ones
    when ``at`` is None."""

    def __init__(self, applied: int = 0) -> None:
        self._applied = applied
        self._current: int | None = None
        self._overlay = _Overlay()
        self.stored_entries = 0

    # --- entries -------------------------------------------------------------------------------

    @property
    def applied_index(self) -> int:
        """The last entry whose writes are stored."""
        return self._applied

    @property
    def index(self) -> int:
        """The index of the entry being applied (outside one, the last applied)."""
        return self._applied if self._current is None else self._current

    def begin(self, index: int) -> None:
        self._current = index
        self._overlay = _Overlay()

    def end(self) -> None:
        index, overlay = self._current, self._overlay
        self._current, self._overlay = None, _Overlay()
        if index is None or index <= self._applied:
            return  # a replay: the archive holds this entry already
        if overlay.added or overlay.removed or overlay.logs:
            self._store(index, list(overlay.added.values()), list(overlay.logs.values()),
                        sorted(overlay.removed))
            self._applied = index
            self.stored_entries += 1

    def _writing(self) -> bool:
        """Whether a write happens outside an entry (tools, tests): then it is one."""
        if self._current is None:
            self.begin(self._applied + 1)
            return True
        return False

    # --- writes --------------------------------------------------------------------------------

    def add(self, rows: Sequence[Archived], logs: Sequence[ArchivedLog]) -> None:
        alone = self._writing()
        for row in rows:
            self._overlay.added[row.key] = row
            self._overlay.removed.discard(row.key)
        for lg in logs:
            self._overlay.logs[lg.processid] = lg
        if alone:
            self.end()

    def remove(self, kind: str, ids: Sequence[str]) -> None:
        """Mark rows removed; a graph's member rows go with it, and a process's log."""
        alone = self._writing()
        for rowid in ids:
            self._overlay.removed.add((kind, rowid))
        if alone:
            self.end()

    # --- reads ---------------------------------------------------------------------------------

    def get(self, kind: str, rowid: str) -> Archived | None:
        ov = self._overlay
        row = ov.added.get((kind, rowid))
        if row is None:
            row = self._fetch_get(kind, rowid, self._current)
        return None if row is None or ov.hides(row) else row

    def members(self, graphid: str) -> list[Archived]:
        rows = self._fetch_members(graphid, self._current)
        rows += [r for r in self._overlay.added.values() if r.kind == PROCESS and r.graphid == graphid]
        return sorted(self._merge(rows), key=lambda r: r.seq)

    def select(self, q: Query) -> list[Archived]:
        """The rows a listing asks for, at most ``q.limit``."""
        if q.limit <= 0:
            return []
        ov = self._overlay
        if q.added_at_most is not None and q.added_at_most < (self._current or self._applied + 1):
            extra = []  # the overlay's rows are added by this entry, after the bound
        else:
            extra = [r for r in ov.added.values() if q.matches(r)]
        # Ask for more than the limit: rows this entry removed are dropped below.
        stored = self._fetch(q, len(ov.removed) + q.limit, self._current)
        rows = self._merge(stored + extra)
        rows.sort(key=q.sort_key(), reverse=q.order == "newest")
        return rows[: q.limit]

    def _merge(self, rows: Iterable[Archived]) -> list[Archived]:
        ov = self._overlay
        seen: dict[Key, Archived] = {}
        for r in rows:
            if not ov.hides(r):
                seen[r.key] = ov.added.get(r.key, r)
        return list(seen.values())

    def oldest(
        self,
        colony: str,
        gen: int,
        kind: str,
        limit: int,
        *,
        standalone: bool = True,
        ended_at_most: int | None = None,
        states: Sequence[int] | None = None,
        added_at_most: int | None = None,
    ) -> list[Archived]:
        """Rows of a colony, oldest end first (retention, purges). For processes,
        ``standalone`` leaves workflow members out (they go with their graph)."""
        return self.select(Query(
            colony, gen, kind, "oldest", limit,
            standalone=standalone and kind == PROCESS,
            states=None if states is None else tuple(states),
            ended_at_most=ended_at_most,
            added_at_most=added_at_most,
        ))

    def newest(
        self,
        colony: str,
        gen: int,
        kind: str,
        states: Sequence[int],
        executortype: str,
        limit: int,
        before: Cursor | None = None,
    ) -> list[Archived]:
        """Rows of a colony in ``states``, newest end first, after ``before``."""
        return self.select(Query(
            colony, gen, kind, "newest", limit,
            states=tuple(states), executortype=executortype, before=before,
        ))

    def after_seq(
        self,
        colony: str,
        gen: int,
        executortype: str,
        after: int,
        limit: int,
        ended_at_least: int = 0,
    ) -> list[Archived]:
        """Processes of a colony submitted after sequence ``after``, in submission order."""
        return self.select(Query(
            colony, gen, PROCESS, "seq", limit,
            executortype=executortype, after=after, ended_at_least=ended_at_least,
        ))

    def log(self, processid: str) -> ArchivedLog | None:
        if self.get(PROCESS, processid) is None:
            return None
        found = self._overlay.logs.get(processid)
        return found if found is not None else self._fetch_log(processid)

    def attribute_owner(self, attributeid: str) -> str | None:
        """The archived process an attribute id belongs to."""
        for row in self._overlay.added.values():
            if row.kind == PROCESS and any(
                a["attributeid"] == attributeid for a in row.record.get("attributes", ())
            ):
                return row.id
        pid = self._fetch_attribute_owner(attributeid)
        return pid if pid is not None and self.get(PROCESS, pid) is not None else None

    # --- storage -------------------------------------------------------------------------------

    @abstractmethod
    def _store(
        self, index: int, added: list[Archived], logs: list[ArchivedLog], removed: list[Key]
    ) -> None: ...

    @abstractmethod
    def _fetch_get(self, kind: str, rowid: str, at: int | None) -> Archived | None: ...

    @abstractmethod
    def _fetch_members(self, graphid: str, at: int | None) -> list[Archived]: ...

    @abstractmethod
    def _fetch(self, q: Query, limit: int, at: int | None) -> list[Archived]: ...

    @abstractmethod
    def _fetch_log(self, processid: str) -> ArchivedLog | None: ...

    @abstractmethod
    def _fetch_attribute_owner(self, attributeid: str) -> str | None: ...

    @abstractmethod
    def collect(self, upto: int) -> int:
        """Drop rows removed at or before ``upto`` (a snapshot covers that index); how many."""

    @abstractmethod
    def digest(self) -> str:
        """sha3-256 hex of every stored visible row and log in a canonical order
        (``rows_digest``): equal on replicas whose archives hold the same history."""

    # Files (what a node does with its archive besides applying the log).

    @abstractmethod
    def sync(self) -> None:
        """Make everything stored durable."""

    @abstractmethod
    def backup(self, target: Any) -> None:  # noqa: ANN401 - a path
        """A consistent copy in ``target``, for a follower that installs a snapshot."""

    @abstractmethod
    def close(self) -> None:
        """Let go of the files (they are about to be replaced)."""

    @abstractmethod
    def reopen(self) -> None:
        """Open the files again, as they now are."""


# The archive as the state machine sees it.
Archive = VersionedArchive


@dataclass
class _Row:
    row: Archived
    added: int
    removed: int = 0

    def visible(self, at: int | None) -> bool:
        if at is None:
            return self.removed == 0
        return self.added < at and (self.removed == 0 or self.removed >= at)


class MemoryArchive(VersionedArchive):
    """The archive in dicts, for tests and tools."""

    def __init__(self) -> None:
        super().__init__()
        self._rows: dict[Key, _Row] = {}
        self._logs: dict[str, ArchivedLog] = {}
        self._attributes: dict[str, str] = {}

    def _store(
        self, index: int, added: list[Archived], logs: list[ArchivedLog], removed: list[Key]
    ) -> None:
        for row in added:
            self._rows[row.key] = _Row(row, index)
            for a in row.record.get("attributes", ()) if row.kind == PROCESS else ():
                self._attributes[a["attributeid"]] = row.id
        for lg in logs:
            self._logs[lg.processid] = lg
        doomed = set(removed)
        for key, r in self._rows.items():
            if r.removed == 0 and (
                key in doomed or (r.row.kind == PROCESS and (GRAPH, r.row.graphid) in doomed)
            ):
                r.removed = index

    def _fetch_get(self, kind: str, rowid: str, at: int | None) -> Archived | None:
        r = self._rows.get((kind, rowid))
        return r.row if r is not None and r.visible(at) else None

    def _fetch_members(self, graphid: str, at: int | None) -> list[Archived]:
        return [r.row for r in self._rows.values()
                if r.row.kind == PROCESS and r.row.graphid == graphid and r.visible(at)]

    def _fetch(self, q: Query, limit: int, at: int | None) -> list[Archived]:
        rows = [r.row for r in self._rows.values()
                if r.visible(at) and q.matches(r.row)
                and (q.added_at_most is None or r.added <= q.added_at_most)]
        rows.sort(key=q.sort_key(), reverse=q.order == "newest")
        return rows[:limit]

    def _fetch_log(self, processid: str) -> ArchivedLog | None:
        return self._logs.get(processid)

    def _fetch_attribute_owner(self, attributeid: str) -> str | None:
        return self._attributes.get(attributeid)

    def collect(self, upto: int) -> int:
        gone = [k for k, r in self._rows.items() if r.removed and r.removed <= upto]
        for key in gone:
            row = self._rows.pop(key).row
            self._logs.pop(row.id, None)
            for a in row.record.get("attributes", ()) if row.kind == PROCESS else ():
                self._attributes.pop(a["attributeid"], None)
        return len(gone)

    def digest(self) -> str:
        rows = sorted((r.row for r in self._rows.values() if r.removed == 0), key=lambda r: r.key)
        return rows_digest((row, self._logs.get(row.id)) for row in rows)

    # Nothing on disk: durable, closed and reopened as it is.

    def sync(self) -> None:
        pass

    def backup(self, target: Any) -> None:  # noqa: ANN401
        raise NotImplementedError("an in-memory archive has no files to copy")

    def close(self) -> None:
        pass

    def reopen(self) -> None:
        pass


def rows_digest(rows: Iterable[tuple[Archived, ArchivedLog | None]]) -> str:
    """The archive digest of (row, its log) pairs given in (kind, id) order: the same for
    every archive implementation holding the same history."""
    h = hashlib.sha3_256()
    for row, log in rows:
        lines = [[ln.seq, ln.timestamp, ln.executorname, ln.message] for ln in log.lines] if log else []
        h.update(canonical.encode([row.kind, row.id, row.colony, row.gen, row.record, lines]))
    return h.hexdigest()
