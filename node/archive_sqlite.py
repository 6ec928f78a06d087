"""The archive on disk: SQLite (the standard library's) in WAL mode, in the data dir.

Implements ``consensus.archive.Archive`` (read that module's doc first): the state machine
writes it while it applies the log, in the node's event loop, one transaction per log entry;
the entry's index is stored in the same transaction, so after a crash the archive is whole at
some index, and the journal replays what came after. Reads are SQL queries over indexes, a
page at a time; the history is never loaded into memory.

Durability: the archive is written with ``synchronous=NORMAL``: a commit reaches the WAL but
is synced only at checkpoints. That is enough because the Raft journal, which is synced
before anything is acknowledged (node/raft_journal.py), can replay it: the replica makes the
archive durable (``sync``) before a snapshot lets the journal drop the entries that built it.
SQLite's automatic checkpoints are off (they would run, and sync, inside a commit in the
event loop); ``checkpoint`` runs them on a separate connection in a worker thread.

Memory: SQLite's page cache is bounded (``CACHE_KIB``); no memory-mapped I/O.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgpack

from consensus.archive import (
    GRAPH,
    PROCESS,
    Archived,
    ArchivedLog,
    ArchiveError,
    Key,
    Query,
    VersionedArchive,
    rows_digest,
)
from consensus.process_log import LogLine
from node.datadir import FILE_MODE

log = logging.getLogger("colonies.archive")

ARCHIVE_FILE = "archive.db"
SCHEMA_VERSION = 1
CACHE_KIB = 16 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rows (
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    colony TEXT NOT NULL,
    gen INTEGER NOT NULL,
    state INTEGER NOT NULL,
    graphid TEXT NOT NULL,
    executortype TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ended INTEGER NOT NULL,
    added INTEGER NOT NULL,
    removed INTEGER NOT NULL DEFAULT 0,
    record BLOB NOT NULL,
    PRIMARY KEY (kind, id)
);
CREATE INDEX IF NOT EXISTS rows_by_end ON rows (colony, gen, kind, ended, id);
CREATE INDEX IF NOT EXISTS rows_by_state ON rows (colony, gen, kind, state, ended, id);
CREATE INDEX IF NOT EXISTS rows_by_seq ON rows (colony, gen, kind, seq);
CREATE INDEX IF NOT EXISTS rows_by_graph ON rows (graphid) WHERE graphid != '';
CREATE INDEX IF NOT EXISTS rows_removed ON rows (removed) WHERE removed != 0;
CREATE TABLE IF NOT EXISTS logs (
    processid TEXT NOT NULL,
    colony TEXT NOT NULL,
    lines BLOB NOT NULL,
    PRIMARY KEY (processid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS attributes (
    attributeid TEXT PRIMARY KEY,
    processid TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS attributes_by_process ON attributes (processid);
"""

_COLUMNS = "kind, id, colony, gen, state, graphid, executortype, seq, ended, record"


def _pack(value: Any) -> bytes:  # noqa: ANN401 - a record, a list of lines
    return msgpack.packb(value, use_bin_type=True)


def _unpack(blob: bytes) -> Any:  # noqa: ANN401
    return msgpack.unpackb(blob, raw=False, strict_map_key=False)


def _row(r: tuple[Any, ...]) -> Archived:
    kind, rowid, colony, gen, state, graphid, etype, seq, ended, record = r
    return Archived(kind, rowid, colony, gen, state, graphid, etype, seq, ended, _unpack(record))


def open_connection(path: Path, readonly: bool = False) -> sqlite3.Connection:
    uri = f"file:{path}{'?mode=ro' if readonly else ''}"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
    conn.execute("PRAGMA mmap_size = 0")
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


class SqliteArchive(VersionedArchive):
    """The archive in ``<data dir>/archive.db`` (its -wal and -shm beside it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(self._open())

    def _open(self) -> int:
        """Opens (creating) the file; returns the index it holds."""
        path = self.path
        if not path.exists():
            # Created private before SQLite opens it (its -wal/-shm take the same mode).
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE))
        try:
            self._db = open_connection(path)
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.execute("PRAGMA wal_autocheckpoint = 0")
            self._db.executescript(_SCHEMA)
            version = self._meta("schema")
            if version is None:
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            elif version != SCHEMA_VERSION:
                raise ArchiveError(f"{path} has archive schema {version}, not {SCHEMA_VERSION}")
            return self._meta("applied") or 0
        except sqlite3.Error as e:
            raise ArchiveError(f"cannot open the archive {path}: {e}") from None

    def _meta(self, key: str) -> int | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else int(row[0])

    def close(self) -> None:
        self._db.close()

    def reopen(self) -> None:
        self._applied = self._open()

    def backup(self, target: Any) -> None:  # noqa: ANN401 - a path
        """SQLite's online backup into ``target``, in one step on a read-only connection of
        its own (one consistent read, whatever the event loop writes meanwhile)."""
        target = Path(target)
        src = open_connection(self.path, readonly=True)
        try:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE))
            dst = sqlite3.connect(target)
            try:
                src.backup(dst)
            finally:
                dst.close()
        except sqlite3.Error as e:
            raise ArchiveError(f"cannot copy the archive {self.path}: {e}") from None
        finally:
            src.close()

    # --- storage -------------------------------------------------------------------------------

    def _store(
        self, index: int, added: list[Archived], logs: list[ArchivedLog], removed: list[Key]
    ) -> None:
        """One transaction: the entry's rows, logs, removals, and its index."""
        db = self._db
        try:
            db.execute("BEGIN")
            try:
                self._insert(index, added, logs)
                for kind, rowid in removed:
                    db.execute(
                        "UPDATE rows SET removed = ? WHERE kind = ? AND id = ? AND removed = 0",
                        (index, kind, rowid),
                    )
                    if kind == GRAPH:
                        db.execute(
                            "UPDATE rows SET removed = ? WHERE graphid = ? AND removed = 0",
                            (index, rowid),
                        )
                db.execute("INSERT OR REPLACE INTO meta VALUES ('applied', ?)", (index,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise ArchiveError(f"cannot write to the archive {self.path}: {e}") from None

    def _insert(self, index: int, rows: list[Archived], logs: list[ArchivedLog]) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO rows "
            f"({_COLUMNS}, added, removed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
            [
                (r.kind, r.id, r.colony, r.gen, r.state, r.graphid, r.executortype, r.seq,
                 r.ended, _pack(r.record), index)
                for r in rows
            ],
        )
        attributes = [
            (a["attributeid"], r.id)
            for r in rows
            if r.kind == PROCESS
            for a in r.record.get("attributes", ())
        ]
        if attributes:
            self._db.executemany("INSERT OR REPLACE INTO attributes VALUES (?, ?)", attributes)
        if logs:
            self._db.executemany(
                "INSERT OR REPLACE INTO logs VALUES (?, ?, ?)",
                [
                    (lg.processid, lg.colonyname,
                     _pack([[ln.seq, ln.timestamp, ln.executorname, ln.message] for ln in lg.lines]))
                    for lg in logs
                ],
            )

    def collect(self, upto: int, limit: int = 500) -> int:
        """Drop up to ``limit`` rows removed at or before ``upto`` (a snapshot on disk covers
        that index, so no replay reads them again), with their logs and attributes; returns
        how many went. Runs between entries, in a small transaction."""
        db = self._db
        try:
            doomed = db.execute(
                "SELECT rowid, id FROM rows WHERE removed != 0 AND removed <= ? LIMIT ?",
                (upto, limit),
            ).fetchall()
            if not doomed:
                return 0
            db.execute("BEGIN")
            try:
                ids = [(pid,) for _rowid, pid in doomed]
                db.executemany("DELETE FROM logs WHERE processid = ?", ids)
                db.executemany("DELETE FROM attributes WHERE processid = ?", ids)
                db.executemany("DELETE FROM rows WHERE rowid = ?", [(r,) for r, _ in doomed])
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return len(doomed)
        except sqlite3.Error as e:
            raise ArchiveError(f"cannot clean the archive {self.path}: {e}") from None

    # --- reads ---------------------------------------------------------------------------------

    def _select(
        self, where: str, params: Sequence[Any], at: int | None, tail: str = ""
    ) -> list[Archived]:
        if at is None:
            vis, vparams = "removed = 0", ()
        else:
            vis, vparams = "added < ? AND (removed = 0 OR removed >= ?)", (at, at)
        sql = f"SELECT {_COLUMNS} FROM rows WHERE {where} AND {vis} {tail}"
        try:
            return [_row(r) for r in self._db.execute(sql, (*params, *vparams))]
        except sqlite3.Error as e:
            raise ArchiveError(f"cannot read the archive {self.path}: {e}") from None

    def _fetch_get(self, kind: str, rowid: str, at: int | None) -> Archived | None:
        found = self._select("kind = ? AND id = ?", (kind, rowid), at)
        return found[0] if found else None

    def _fetch_members(self, graphid: str, at: int | None) -> list[Archived]:
        return self._select("graphid = ? AND kind = 'process'", (graphid,), at)

    def _fetch(self, q: Query, limit: int, at: int | None) -> list[Archived]:
        where, params = ["colony = ? AND gen = ? AND kind = ?"], [q.colony, q.gen, q.kind]
        if q.standalone:
            where.append("graphid = ''")
        if q.states is not None:
            where.append(f"state IN ({','.join('?' * len(q.states))})")
            params += list(q.states)
        if q.executortype:
            where.append("executortype = ?")
            params.append(q.executortype)
        if q.ended_at_most is not None:
            where.append("ended <= ?")
            params.append(q.ended_at_most)
        if q.ended_at_least:
            where.append("ended >= ?")
            params.append(q.ended_at_least)
        if q.added_at_most is not None:
            where.append("added <= ?")
            params.append(q.added_at_most)
        if q.before is not None:
            where.append("(ended < ? OR (ended = ? AND id < ?))")
            params += [q.before[0], q.before[0], q.before[1]]
        if q.order == "seq":
            where.append("seq > ?")
            params.append(q.after)
            order = "seq"
        else:
            order = "ended DESC, id DESC" if q.order == "newest" else "ended, id"
        return self._select(" AND ".join(where), params, at, f"ORDER BY {order} LIMIT {int(limit)}")

    def _fetch_log(self, processid: str) -> ArchivedLog | None:
        try:
            found = self._db.execute(
                "SELECT colony, lines FROM logs WHERE processid = ?", (processid,)
            ).fetchone()
        except sqlite3.Error as e:
            raise ArchiveError(f"cannot read the archive {self.path}: {e}") from None
        if found is None:
            return None
        lines = tuple(LogLine(s, t, e, m) for s, t, e, m in _unpack(found[1]))
        return ArchivedLog(processid, found[0], lines)

    def _fetch_attribute_owner(self, attributeid: str) -> str | None:
        try:
            found = self._db.execute(
                "SELECT processid FROM attributes WHERE attributeid = ?", (attributeid,)
            ).fetchone()
        except sqlite3.Error as e:
            raise ArchiveError(f"cannot read the archive {self.path}: {e}") from None
        return None if found is None else str(found[0])

    def digest(self) -> str:
        return archive_digest(self._db)[0]

    # --- durability ----------------------------------------------------------------------------

    def sync(self) -> None:
        self.checkpoint()

    def checkpoint(self) -> None:
        """Copy the WAL into the database file and sync both (SQLite syncs the WAL first),
        on a connection of its own: safe in a worker thread while the loop writes."""
        conn = open_connection(self.path)
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as e:
            raise ArchiveError(f"cannot checkpoint the archive {self.path}: {e}") from None
        finally:
            conn.close()


def _visible_rows(db: sqlite3.Connection) -> Iterator[tuple[Archived, ArchivedLog | None]]:
    logs = db.execute(
        "SELECT processid, colony, lines FROM logs ORDER BY processid"
    )
    pending = next(logs, None)
    for r in db.execute(f"SELECT {_COLUMNS} FROM rows WHERE removed = 0 ORDER BY kind, id"):
        row = _row(r)
        lg = None
        if row.kind == PROCESS:
            while pending is not None and pending[0] < row.id:
                pending = next(logs, None)
            if pending is not None and pending[0] == row.id:
                lines = tuple(LogLine(s, t, e, m) for s, t, e, m in _unpack(pending[2]))
                lg = ArchivedLog(row.id, pending[1], lines)
        yield row, lg


def archive_digest(db: sqlite3.Connection) -> tuple[str, int]:
    """(digest of the visible history, the index it reflects), in one read transaction; for
    a worker thread on a connection of its own (``open_connection(path, readonly=True)``)."""
    own = not db.in_transaction
    if own:
        db.execute("BEGIN")
    try:
        found = db.execute("SELECT value FROM meta WHERE key = 'applied'").fetchone()
        digest = rows_digest(_visible_rows(db))
    finally:
        if own:
            db.execute("COMMIT")
    return digest, int(found[0]) if found else 0


def file_digest(path: Path) -> tuple[str, int]:
    """``archive_digest`` of the archive at ``path`` on a read-only connection of its own:
    for a worker thread, while the event loop writes."""
    conn = open_connection(path, readonly=True)
    try:
        return archive_digest(conn)
    except sqlite3.Error as e:
        raise ArchiveError(f"cannot read the archive {path}: {e}") from None
    finally:
        conn.close()
