"""Snapshots of the live state (PySyncObj's log compaction), written without stopping the node.

PySyncObj compacts its log by serializing the state at the last applied entry into the dump
(``fullDumpFile``) and then dropping the journal up to that entry. Done inline in the node's
event loop, that stops everything: measured at 100k live processes on 2 cores, building the
snapshot takes 2.5 s and packing it 1.4 s. A worker thread cannot help, because it needs a
consistent copy of the state and taking the copy is the cost. A fork can: the child sees the
state frozen at the fork and the node goes on (Redis's BGSAVE); the fork itself took 11 ms.

``SnapshotStore`` takes the place of PySyncObj's Serializer (``ReplicatedColony`` installs it):

* ``serialize`` freezes the garbage collector's view of the old objects (so the node's
  collections do not copy every page the child shares), forks, and starts a thread that makes
  the archive durable (a WAL checkpoint: the journal is about to lose the entries that built
  it). The child packs the machine's snapshot with the Raft part, writes it beside the dump,
  syncs it and exits; it touches nothing else of the process (no trio, no sockets, no SQLite,
  no logging) and leaves with ``os._exit``.
* ``checkSerializing``, called by PySyncObj every tick, reports SERIALIZING until the child
  has exited and the archive is synced, then moves the new dump into place and reports SUCCESS,
  and PySyncObj cuts its journal at the snapshot's index.
* ``deserialize`` loads the dump when the node starts (before it serves), or hands over a state
  a follower prepared from a snapshot the leader sent (node/snapshot_transfer.py).
* A leader's PySyncObj asks ``getTransmissionData`` for a snapshot to send a follower that is
  behind its log; the transfer (node/snapshot_transfer.py) does that on its own streams, so
  this only tells it which follower needs one.

The dump's format is node/raft_dump.py's.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pysyncobj.config import SERIALIZER_STATE
from pysyncobj.node import Node

from node import gc_control
from node.datadir import FILE_MODE, sync_dir
from node.raft_dump import decode_dump, encode_dump

log = logging.getLogger("colonies.raft")

_Entry = tuple[bytes, int, int]  # a PySyncObj log entry: (command, index, term)


def entry(e: Any) -> _Entry:  # noqa: ANN401 - a decoded list
    """PySyncObj compares entries as tuples: a list never equals one."""
    return (e[0], e[1], e[2])


class _Job:
    """A snapshot being written: the child process, and a thread that syncs the archive."""

    def __init__(self, index: int, pid: int, machine: Any) -> None:  # noqa: ANN401
        self.index = index
        self.pid = pid
        self.started = time.monotonic()
        self.child_ok = False
        self.sync_error: BaseException | None = None
        self.sync = threading.Thread(
            target=self._sync_history, args=(machine,), name="archive-sync", daemon=True
        )

    def _sync_history(self, machine: Any) -> None:  # noqa: ANN401
        try:
            machine.sync_history()
        except BaseException as e:  # reported by checkSerializing
            self.sync_error = e


class SnapshotStore:
    """PySyncObj's Serializer (see the module doc); everything runs in the node's thread."""

    def __init__(
        self,
        path: Path,
        machine: Callable[[], Any],
        install: Callable[[Any, int], None],
        failed: Callable[[str], None],
        needed: Callable[[Node], None],
        members: Callable[[set[Node]], list[str]],
    ) -> None:
        """``machine()`` is the replica's current state machine; ``install(machine, index)``
        makes a restored machine the replica's; ``failed(why)`` when a dump cannot be loaded
        (PySyncObj would log it and go on with a log that starts after the snapshot);
        ``needed(node)`` when a follower is behind the log and needs a snapshot;
        ``members(cluster)``: the member ids to record of PySyncObj's view."""
        self.path = path
        self._failed = failed
        self.tmp = path.with_name(path.name + ".tmp")
        self._machine = machine
        self._install = install
        self._job: _Job | None = None
        self._prepared: tuple[Any, dict[str, Any]] | None = None
        self.snapshot_index = 0  # the index of the dump on disk
        self.dumps = 0
        self.last_seconds = 0.0  # how long the last snapshot took, start to moved in place
        self._needed = needed
        self._members = members

    # --- writing -------------------------------------------------------------------------------

    def serialize(self, data: tuple[Any, ...], index: int) -> None:
        """PySyncObj: write the snapshot at ``index``; data = (None, last, prev, members)."""
        if self._job is not None:
            return
        _none, last, prev, cluster = data
        members = self._members(cluster)
        machine = self._machine()
        gc_control.pause()  # until the child is done (node/gc_control.py)
        try:
            pid = os.fork()
        except OSError as e:
            gc_control.resume()
            log.error("cannot fork to write the raft snapshot at %d: %s", index, e)
            return
        if pid == 0:
            _child(machine, last, prev, members, self.tmp)  # never returns
        job = _Job(index, pid, machine)
        job.sync.start()
        self._job = job

    def checkSerializing(self) -> tuple[int, int | None]:  # noqa: N802 - PySyncObj's name
        job = self._job
        if job is None:
            return SERIALIZER_STATE.NOT_SERIALIZING, None
        if job.pid:
            try:
                done, status = os.waitpid(job.pid, os.WNOHANG)
            except ChildProcessError:
                done, status = job.pid, -1
            if done == 0:
                return SERIALIZER_STATE.SERIALIZING, job.index
            job.pid = 0
            job.child_ok = status == 0
            gc_control.resume()
        if job.sync.is_alive():
            return SERIALIZER_STATE.SERIALIZING, job.index
        self._job = None
        if not job.child_ok or job.sync_error is not None:
            why = "the snapshot writer failed" if not job.child_ok else str(job.sync_error)
            log.error("raft snapshot at %d not written (the journal is kept): %s", job.index, why)
            return SERIALIZER_STATE.FAILED, job.index
        try:
            os.replace(self.tmp, self.path)
            sync_dir(self.path.parent)
        except OSError as e:
            log.error("raft snapshot at %d not moved into place (journal kept): %s", job.index, e)
            return SERIALIZER_STATE.FAILED, job.index
        self.snapshot_index = job.index
        self.dumps += 1
        self.last_seconds = time.monotonic() - job.started
        return SERIALIZER_STATE.SUCCESS, job.index

    @property
    def writing(self) -> bool:
        return self._job is not None

    # --- loading -------------------------------------------------------------------------------

    def prepare(self, machine: Any, data: dict[str, Any]) -> None:  # noqa: ANN401
        """A state restored elsewhere (a snapshot from the leader): the next ``deserialize``
        hands it over instead of reading the dump."""
        self._prepared = (machine, data)

    def deserialize(self) -> tuple[Any, _Entry, _Entry, set[Node]]:
        """PySyncObj: the state of the dump, as (None, last entry, the one before, members)."""
        if self._prepared is not None:
            machine, data = self._prepared
            self._prepared = None
        else:
            try:
                with open(self.path, "rb") as f, gc_control.bulk_load():
                    data = decode_dump(f.read())
                    machine = self._machine().restored(data["machine"], data["last"][1])
            except Exception as e:
                self._failed(f"cannot load raft dump {self.path}: {e}")
                raise
        self._install(machine, data["last"][1])
        self.snapshot_index = data["last"][1]
        return (
            None,
            entry(data["last"]),
            entry(data["prev"]),
            {Node(i) for i in data["members"]},
        )

    # --- sending (the leader's side) -----------------------------------------------------------

    def getTransmissionData(self, node: Node) -> None:  # noqa: N802 - PySyncObj's name
        """PySyncObj: a chunk of the snapshot for ``node``. Snapshots travel on our own
        messages (node/snapshot_transfer.py): only say which follower needs one."""
        self._needed(node)

    def setTransmissionData(self, data: Any) -> bool:  # noqa: N802, ANN401 - PySyncObj's name
        return False  # PySyncObj's own chunks never come: the transport refuses them

    def cancelTransmisstion(self, node: Node) -> None:  # noqa: N802 - PySyncObj's (misspelt) name
        pass  # a transfer to a follower that went away times out in node/snapshot_transfer.py

    def close(self) -> None:
        """Wait for a snapshot being written (the node is stopping)."""
        job = self._job
        if job is not None and job.pid:
            try:
                os.waitpid(job.pid, 0)
            except ChildProcessError:
                pass
            gc_control.resume()
        if job is not None:
            job.sync.join()
        self._job = None


def _child(machine: Any, last: Any, prev: Any, members: list[str], path: Path) -> None:  # noqa: ANN401
    """The forked writer: pack, write, sync, and leave without running anything else."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)  # the node's signal pipe is not ours to write to
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        gc.disable()
        blob = encode_dump(machine.snapshot(), last, prev, members)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        code = 0
    finally:
        os._exit(code)

