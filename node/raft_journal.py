"""The Raft journal on disk: append-only, checksummed, and durable before anything is
acknowledged.

PySyncObj's own journal writes into an mmap and never flushes it while running, so an
acknowledged write could sit only in the page cache: a power loss or kernel crash of every
node at once could lose it. This journal implements PySyncObj's ``Journal`` interface with
plain appends and an explicit ``sync()`` (fdatasync), which the replica calls before this node
counts or acknowledges an entry (``node/raft_replica.py``): once per Raft tick on a leader,
once per batch of received append-entries on a follower, so one sync covers a whole group
commit. The sync blocks the event loop (about 0.1 ms here): a worker thread would let the loop
go on meanwhile, but trio's thread hand-off costs more CPU than the sync itself (measured:
113 us against 36 us), and on a busy node CPU is what is short. ``SyncPolicy`` makes that an
operator setting: ``always`` (the default) or every
``interval`` seconds, which acknowledges before the sync and can lose what was acknowledged
within the last interval if every member loses power at once.

File format (``raft.journal``)::

    MAGIC (16 bytes)
    record*  where record = u32 body length | u32 crc32(body) | body
                   body   = u64 index | u64 term | command bytes

Opening stops at the first record that is cut off or fails its checksum (a crash in the middle
of a write) and truncates the file there: everything before it is whole. The file is allocated
ahead (``ALLOCATE_BYTES``); the zeros after the last record are not a record. Raft's persistent
state (current term, vote, commit index, whether this node is a learner) lives beside it in
``raft.meta`` (JSON); term and vote are synced before PySyncObj sends a message that depends on
them.

The entries are also kept in memory, as PySyncObj's own journal does; log compaction bounds
them (``node/raft_replica.py`` compacts by size as well as by count). A journal written by
PySyncObj's ``FileJournal`` (earlier versions of this project) is converted on open.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pysyncobj.journal import Journal

from node.datadir import FILE_MODE, sync_dir, write_private
from node.pickle_guard import restricted_loads

log = logging.getLogger("colonies.raft")

MAGIC = b"COLONIES-RAFTJ1\n"
_HEAD = struct.Struct("<II")  # body length, crc32 of the body
_ENTRY = struct.Struct("<QQ")  # index, term
MAX_RECORD_BYTES = 64 * 1024 * 1024  # far above any entry; a larger length means garbage
# The file is allocated ahead in steps of this size, so an fdatasync after an append writes
# the appended data only, not the file's size as well (measured here: 0.10 ms instead of
# 0.17 ms per sync, half the CPU). The unused tail reads as zeros, which end the scan.
ALLOCATE_BYTES = 16 * 1024 * 1024

Entry = tuple[bytes, int, int]  # (command, index, term), as PySyncObj keeps them


class JournalError(RuntimeError):
    """The journal cannot be read (not a journal, or a header that is not ours)."""


@dataclass(frozen=True)
class SyncPolicy:
    """``always``: an entry is on disk before this node counts or acknowledges it.
    ``interval``: synced every ``interval_s`` seconds instead (faster on slow disks; a power
    loss of every member at once can lose what was acknowledged in the last interval)."""

    mode: str = "always"
    interval_s: float = 0.0

    @classmethod
    def parse(cls, text: str) -> SyncPolicy:
        """``always``, or a duration such as ``50ms``, ``0.2s`` or ``1`` (seconds)."""
        text = text.strip().lower()
        if text == "always":
            return cls()
        scale = 1.0
        if text.endswith("ms"):
            text, scale = text[:-2], 0.001
        elif text.endswith("s"):
            text = text[:-1]
        try:
            seconds = float(text) * scale
        except ValueError:
            raise ValueError("the journal sync policy is 'always' or an interval like 50ms") from None
        if not 0.001 <= seconds <= 10:
            raise ValueError("a journal sync interval must be between 1ms and 10s")
        return cls("interval", seconds)

    @property
    def always(self) -> bool:
        return self.mode == "always"

    def __str__(self) -> str:
        return "always" if self.always else f"every {self.interval_s * 1000:g} ms"


def _record(command: bytes, idx: int, term: int) -> bytes:
    body = _ENTRY.pack(idx, term) + command
    return _HEAD.pack(len(body), zlib.crc32(body)) + body


def _scan(data: bytes) -> tuple[list[Entry], list[int], int]:
    """Entries, their offsets, and where the whole records end."""
    entries: list[Entry] = []
    offsets: list[int] = []
    pos = len(MAGIC)
    while pos + _HEAD.size <= len(data):
        length, crc = _HEAD.unpack_from(data, pos)
        if length == 0 and crc == 0:
            break  # the allocated, never written tail
        start = pos + _HEAD.size
        if not _ENTRY.size <= length <= MAX_RECORD_BYTES or start + length > len(data):
            break
        body = data[start : start + length]
        if zlib.crc32(body) != crc:
            break
        idx, term = _ENTRY.unpack_from(body)
        entries.append((bytes(body[_ENTRY.size :]), idx, term))
        offsets.append(pos)
        pos = start + length
    return entries, offsets, pos


class DurableJournal(Journal):
    """PySyncObj's Journal, on disk. Everything runs in the thread that ticks PySyncObj."""

    def __init__(self, path: Path, meta_path: Path) -> None:
        self.path = path
        self.meta_path = meta_path
        self._entries: list[Entry] = []
        self._offsets: list[int] = []  # file offset of each entry's record
        self._meta: dict[str, Any] = {}
        self._meta_dirty = False
        self._synced_end = 0  # file offset up to which everything is on disk
        self.synced_index = 0  # the index of the last entry on disk
        self.syncs = 0
        self.sync_seconds = 0.0
        self._open()

    # --- opening -------------------------------------------------------------------------------

    def _open(self) -> None:
        self._meta = self._read_meta()
        data = self.path.read_bytes() if self.path.exists() else b""
        if data and not data.startswith(MAGIC):
            if data.startswith(b"PYSYNCOBJ"):
                self._convert(data)
                return
            raise JournalError(f"{self.path} is not a raft journal")
        entries, offsets, end = _scan(data) if data else ([], [], len(MAGIC))
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        if not data:
            os.write(fd, MAGIC)
            os.fsync(fd)
            sync_dir(self.path.parent)
        elif data.count(0, end) < len(data) - end:  # not just the allocated tail
            log.warning(
                "raft journal %s ends with %d bytes of a record cut off or corrupt (a crash "
                "while it was written); dropped, %d whole entries kept",
                self.path, len(data.rstrip(b"\0")) - end, len(entries),
            )
            os.ftruncate(fd, end)
            os.fsync(fd)
        self._fd = fd
        self._allocated = os.fstat(fd).st_size
        self._end = self._synced_end = end
        self._entries, self._offsets = entries, offsets
        self.synced_index = entries[-1][1] if entries else 0

    def _read_meta(self) -> dict[str, Any]:
        if not self.meta_path.exists():
            return {}
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, ValueError) as e:
            raise JournalError(f"cannot read {self.meta_path}: {e}") from None
        if not isinstance(meta, dict):
            raise JournalError(f"{self.meta_path} is not a JSON object")
        return meta

    def _convert(self, data: bytes) -> None:
        """A journal written by PySyncObj's FileJournal: same entries, our format."""
        entries = list(_pysyncobj_entries(data))
        old_meta = Path(str(self.path) + ".meta")
        if old_meta.exists() and not self._meta:
            try:
                meta = restricted_loads(old_meta.read_bytes())  # a dict of ints and a str
            except Exception:
                meta = {}
            if isinstance(meta, dict):
                self._meta = {
                    k: meta[k]
                    for k in ("currentTerm", "votedForNodeId", "raftCommitIndex")
                    if k in meta and isinstance(meta[k], int | str | None)
                }
        tmp = self.path.with_name(self.path.name + ".tmp")
        write_private(tmp, MAGIC + b"".join(_record(*e) for e in entries), sync=True)
        tmp.replace(self.path)
        self._store_meta()
        old_meta.unlink(missing_ok=True)
        sync_dir(self.path.parent)
        log.warning("converted raft journal %s from PySyncObj's format (%d entries)",
                    self.path, len(entries))
        self._open()

    # --- durability ----------------------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        return self._synced_end < self._end

    def sync(self) -> None:
        """Everything appended so far is on disk when this returns (one fdatasync)."""
        if not self.dirty:
            return
        end, index = self._end, self._last_index()
        start = time.perf_counter()
        os.fdatasync(self._fd)
        self._synced(end, index, time.perf_counter() - start)

    def _synced(self, end: int, index: int, seconds: float) -> None:
        self._synced_end = max(self._synced_end, end)
        self.synced_index = max(self.synced_index, index)
        self.syncs += 1
        self.sync_seconds += seconds

    def _last_index(self) -> int:
        return self._entries[-1][1] if self._entries else 0

    def _append(self, data: bytes) -> None:
        if self._end + len(data) > self._allocated:
            self._allocate(self._end + len(data))
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, self._end)
            self._end += n
            view = view[n:]

    # --- PySyncObj's Journal interface ---------------------------------------------------------

    def add(self, command: bytes, idx: int, term: int) -> None:
        command = bytes(command)
        self._offsets.append(self._end)
        self._append(_record(command, idx, term))
        self._entries.append((command, idx, term))

    def clear(self) -> None:
        self._entries, self._offsets = [], []
        self._truncate(len(MAGIC))

    def deleteEntriesFrom(self, entryFrom: int) -> None:  # noqa: N802 - PySyncObj's name
        """Drop the entries from position ``entryFrom`` on (a conflicting suffix)."""
        if entryFrom >= len(self._entries):
            return
        end = self._offsets[entryFrom] if entryFrom >= 0 else len(MAGIC)
        del self._entries[entryFrom:], self._offsets[entryFrom:]
        self._truncate(end)

    def deleteEntriesTo(self, entryTo: int) -> None:  # noqa: N802 - PySyncObj's name
        """Drop the entries before position ``entryTo`` (log compaction): the rest is
        written to a new file that replaces the journal, on disk before it does."""
        kept = self._entries[entryTo:]
        tmp = self.path.with_name(self.path.name + ".tmp")
        write_private(tmp, MAGIC + b"".join(_record(*e) for e in kept), sync=True)
        tmp.replace(self.path)
        sync_dir(self.path.parent)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_RDWR, FILE_MODE)
        self._allocated = os.fstat(self._fd).st_size
        self._entries, self._offsets = [], []
        self._end = len(MAGIC)
        for command, idx, term in kept:
            self._offsets.append(self._end)
            self._end += _HEAD.size + _ENTRY.size + len(command)
            self._entries.append((command, idx, term))
        self._synced_end = self._end
        self.synced_index = self._last_index()

    def _allocate(self, needed: int) -> None:
        size = max(needed, self._allocated + ALLOCATE_BYTES)
        try:
            os.posix_fallocate(self._fd, self._allocated, size - self._allocated)
        except OSError:
            return  # a file system without it: appends extend the file as they go
        self._allocated = size

    def _truncate(self, end: int) -> None:
        os.ftruncate(self._fd, end)
        self._allocated = end
        self._end = end
        # The size change itself must reach the disk: ask for a sync even when nothing is
        # appended after it.
        self._synced_end = min(self._synced_end, end - 1)
        self.synced_index = min(self.synced_index, self._last_index())

    def __getitem__(self, item: Any) -> Any:
        return self._entries[item]

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def byte_size(self) -> int:
        return self._end

    def _destroy(self) -> None:
        self.sync()
        if self._meta_dirty:
            self._store_meta()
        os.close(self._fd)

    def flush(self) -> None:
        self.sync()

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:  # noqa: N802, N803
        if self._meta.get("raftCommitIndex") != raftCommitIndex:
            self._meta["raftCommitIndex"] = raftCommitIndex
            self._meta_dirty = True

    def getRaftCommitIndex(self) -> int:  # noqa: N802
        return int(self._meta.get("raftCommitIndex", 1))

    def setCurrentTerm(self, term: int, votedForNodeId: str | None) -> None:  # noqa: N802, N803
        # Raft: term and vote are on disk before any message that reflects them is sent.
        self._meta["currentTerm"] = term
        self._meta["votedForNodeId"] = votedForNodeId
        self._store_meta()

    def getCurrentTerm(self) -> int:  # noqa: N802
        return int(self._meta.get("currentTerm", 0))

    def getVotedForNodeId(self) -> str | None:  # noqa: N802
        vote = self._meta.get("votedForNodeId")
        return vote if isinstance(vote, str) else None

    @property
    def learner(self) -> bool:
        """This node does not vote yet (node/raft_elections.py)."""
        return self._meta.get("learner") is True

    def set_learner(self, learner: bool) -> None:
        self._meta["learner"] = learner
        self._store_meta()

    def onOneSecondTimer(self) -> None:  # noqa: N802
        """The commit index is a hint for a restart (apply the journal before a leader is
        heard from): stored once a second at most, without a sync of its own."""
        if self._meta_dirty:
            self._store_meta(sync=False)

    def _store_meta(self, sync: bool = True) -> None:
        write_private(self.meta_path, json.dumps(self._meta, sort_keys=True) + "\n", sync=sync)
        self._meta_dirty = False


def _pysyncobj_entries(data: bytes) -> Iterator[Entry]:
    """The records of a PySyncObj 0.3.17 FileJournal: a 40-byte header whose last 4 bytes
    are where the records end, then records of u32 size | u64 idx | u64 term | command |
    u32 size."""
    (end,) = struct.unpack_from("<I", data, 36)
    pos = 40
    end = min(end, len(data))
    while pos + 4 <= end:
        (size,) = struct.unpack_from("<I", data, pos)
        body = data[pos + 4 : pos + 4 + size]
        if len(body) < size or size < 16:
            break
        idx, term = struct.unpack_from("<QQ", body)
        yield bytes(body[16:]), idx, term
        pos += size + 8
