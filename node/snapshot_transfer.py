"""Sending a snapshot to a follower that is behind the leader's log, and installing it there.

A follower whose next entry the leader no longer has (its log was compacted) needs the state
at the leader's last snapshot: the live state (the dump, node/raft_snapshots.py) and the
history (the archive, node/archive_sqlite.py). PySyncObj would push its dump in chunks inside
its tick, all at once, with no flow control, and the follower would load it inside its own;
neither loop may stall like that. Here it is our own exchange on the Raft streams:

* The leader's PySyncObj asks for a snapshot for a follower (``ReplicatedColony.on_snapshot_needed``). The
  sender takes the dump at hand (a hard link, so a newer snapshot replacing it does not
  matter) and a copy of the archive (SQLite's backup, in a worker thread, on a connection of
  its own), and streams both as ``snap_chunk`` messages of ``CHUNK_BYTES``, with at most
  ``WINDOW_BYTES`` not yet acknowledged per transfer; a follower acknowledges (``snap_ack``)
  the offset it wants next, so a lost or refused chunk is sent again from there after
  ``RESEND_S``. A transfer that hears nothing for ``ABORT_S`` gives up; PySyncObj asks again.
* The follower writes the chunks in order into ``install/`` in its data dir. With both parts
  whole, it syncs them and writes ``install/READY``, then installs: the replica stops applying
  (``begin_install``), the old archive is closed, the files move into place, the new state is
  decoded and built in a worker thread (the event loop goes on serving meanwhile), and the
  replica takes it over (``finish_install``) and tells the leader where its log now ends.
  A node killed after READY and before the move finishes it when it starts
  (``complete_install``), so the dump and the archive always come from one snapshot.

The archive the follower gets may be ahead of the dump (the backup is taken later); it then
replays the entries in between without writing them twice (consensus/archive.py).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio

from node.datadir import DIR_MODE, FILE_MODE, sync_dir, write_private
from node.raft_codec import MAX_SNAPSHOT_CHUNK, SNAPSHOT_PARTS, SNAPSHOT_TYPES

log = logging.getLogger("colonies.raft")

CHUNK_BYTES = 256 * 1024
WINDOW_BYTES = 2 * 1024 * 1024
RESEND_S = 2.0
ABORT_S = 30.0
# After a transfer to a follower, PySyncObj asks again until the follower's answer reaches it:
# not a second transfer for this long.
AGAIN_AFTER_S = 10.0
INSTALL_DIR = "install"
OUTBOX_DIR = "outbox"
READY = "READY"
# The files of a snapshot, by part, in the data dir.
PART_FILES = {"dump": "raft.dump", "archive": "archive.db"}
assert CHUNK_BYTES <= MAX_SNAPSHOT_CHUNK


class Link(Protocol):
    def send_to(self, peer: str, message: Any) -> bool: ...  # noqa: ANN401

    def set_handler(self, types: Any, handler: Any) -> None: ...  # noqa: ANN401


class Replica(Protocol):
    """What the transfer needs of ``node.raft_replica.ReplicatedColony``."""

    @property
    def leader_id(self) -> str | None: ...

    @property
    def snapshot_index(self) -> int: ...

    @property
    def last_applied(self) -> int: ...

    def backup_history(self, target: Path) -> None: ...

    def begin_install(self) -> None: ...

    def load_installed(self) -> tuple[Any, dict[str, Any]]: ...  # noqa: ANN401

    def finish_install(self, machine: Any, data: dict[str, Any], leader: str) -> None: ...  # noqa: ANN401

    def abort_install(self, why: str) -> None: ...


def complete_install(data_dir: Path) -> bool:
    """Move a received snapshot into place if one is whole (``install/READY``); True if it did.
    Also what a node killed in the middle of an install does when it starts again."""
    inbox = data_dir / INSTALL_DIR
    if not (inbox / READY).exists():
        if inbox.exists():
            shutil.rmtree(inbox)  # a transfer that never finished: nothing of it is used
        return False
    for suffix in ("-wal", "-shm"):
        (data_dir / (PART_FILES["archive"] + suffix)).unlink(missing_ok=True)
    for part, name in PART_FILES.items():
        src = inbox / part
        if src.exists():
            os.replace(src, data_dir / name)
    sync_dir(data_dir)
    shutil.rmtree(inbox)
    return True


@dataclass
class _Outgoing:
    peer: str
    sid: int
    index: int
    files: dict[str, Path]
    sizes: dict[str, int] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)
    acked: dict[str, int] = field(default_factory=dict)
    progress: trio.Event = field(default_factory=trio.Event)

    def done(self) -> bool:
        return all(self.acked.get(p, 0) >= self.sizes[p] for p in self.sizes)


@dataclass
class _Incoming:
    sid: int
    leader: str
    sizes: dict[str, int] = field(default_factory=dict)
    have: dict[str, int] = field(default_factory=dict)
    installing: bool = False


class SnapshotTransfer:
    """Both sides, in one object per node: it sends as a leader and receives as a follower.
    Start ``run`` in the node's nursery."""

    def __init__(self, data_dir: Path, replica: Replica, link: Link) -> None:
        self.data_dir = data_dir
        self.replica = replica
        self.link = link
        self._nursery: trio.Nursery | None = None
        self._out: dict[str, _Outgoing] = {}
        self._finished: dict[str, float] = {}  # peer -> when the last transfer to it ended
        self._pinned: dict[int, int] = {}  # sid -> the index of the dump a transfer took
        self._in: _Incoming | None = None
        self._installed: int | None = None  # the last transfer installed here
        self.counters = dict.fromkeys(
            ("sent", "installed", "chunks_sent", "chunks_resent", "aborted", "refused"), 0
        )
        link.set_handler(SNAPSHOT_TYPES, self._on_message)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        (self.data_dir / OUTBOX_DIR).mkdir(mode=DIR_MODE, exist_ok=True)
        await trio.to_thread.run_sync(self._remove_leftovers)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self.link.set_handler(SNAPSHOT_TYPES, None)

    def _remove_leftovers(self) -> None:
        """What a run that stopped left: copies it was sending, parts it had given up on."""
        for old in (self.data_dir / OUTBOX_DIR).iterdir():
            old.unlink()
        for trash in self.data_dir.glob(f"{INSTALL_DIR}.old-*"):
            shutil.rmtree(trash, ignore_errors=True)

    # --- the leader's side ---------------------------------------------------------------------

    def needed(self, peer: str) -> None:
        """PySyncObj found ``peer`` behind its log (called inside a tick: must not block)."""
        if peer in self._out or self._nursery is None:
            return
        if trio.current_time() - self._finished.get(peer, -AGAIN_AFTER_S) < AGAIN_AFTER_S:
            return
        sid = secrets.randbits(62)
        outbox = self.data_dir / OUTBOX_DIR
        out = _Outgoing(peer, sid, self.replica.snapshot_index, {
            "dump": outbox / f"{sid}.dump", "archive": outbox / f"{sid}.archive",
        })
        try:
            # The dump and the index it holds, in one step (no await between); until the
            # archive is copied, no history that a replay from that index reads may go.
            os.link(self.data_dir / PART_FILES["dump"], out.files["dump"])
        except OSError as e:
            log.warning("cannot send a snapshot to %s: %s", peer, e, extra={"peer": peer})
            return
        self._pinned[sid] = out.index
        self._out[peer] = out
        self._nursery.start_soon(self._send, out)

    def cancel(self, peer: str) -> None:
        """Nothing to do at once: a transfer to a peer that is gone aborts by itself."""

    def pinned(self) -> list[int]:
        """Snapshot indexes whose history a transfer is still copying (node/archive_upkeep.py
        removes nothing they cover)."""
        return list(self._pinned.values())

    async def _send(self, out: _Outgoing) -> None:
        try:
            try:
                await trio.to_thread.run_sync(self.replica.backup_history, out.files["archive"])
            finally:
                self._pinned.pop(out.sid, None)
            out.sizes = {p: f.stat().st_size for p, f in out.files.items()}
            log.info("sending a snapshot to %s (%d + %d bytes)", out.peer,
                     out.sizes["dump"], out.sizes["archive"], extra={"peer": out.peer})
            if await self._stream(out):
                self.counters["sent"] += 1
            else:
                self.counters["aborted"] += 1
                log.warning("snapshot to %s given up: no answer for %gs", out.peer, ABORT_S,
                            extra={"peer": out.peer})
        except (OSError, RuntimeError) as e:
            self.counters["aborted"] += 1
            log.warning("cannot send a snapshot to %s: %s", out.peer, e, extra={"peer": out.peer})
        finally:
            self._pinned.pop(out.sid, None)
            self._out.pop(out.peer, None)
            self._finished[out.peer] = trio.current_time()
            # Freeing a copy of the archive (GBs) takes the file system a while: not on the
            # event loop's thread.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_unlink_all, list(out.files.values()))

    async def _stream(self, out: _Outgoing) -> bool:
        """Chunks within the window until every part is acknowledged whole."""
        for part in SNAPSHOT_PARTS:
            out.sent[part] = out.acked[part] = 0
        handles = {p: open(f, "rb") for p, f in out.files.items()}  # noqa: SIM115 - closed below
        try:
            last_progress = trio.current_time()
            while not out.done():
                now = trio.current_time()
                if now - last_progress > ABORT_S:
                    return False
                for part in SNAPSHOT_PARTS:
                    self._fill_window(out, part, handles[part])
                out.progress = trio.Event()
                with trio.move_on_after(RESEND_S) as waited:
                    await out.progress.wait()
                if waited.cancelled_caught:
                    # Nothing acknowledged for a while: send again from what was.
                    for part in SNAPSHOT_PARTS:
                        if out.sent[part] > out.acked[part]:
                            self.counters["chunks_resent"] += 1
                        out.sent[part] = out.acked[part]
                else:
                    last_progress = trio.current_time()
                await trio.sleep(0)
            return True
        finally:
            for h in handles.values():
                h.close()

    def _fill_window(self, out: _Outgoing, part: str, handle: Any) -> None:  # noqa: ANN401
        size = out.sizes[part]
        in_flight = sum(out.sent[p] - out.acked[p] for p in SNAPSHOT_PARTS)
        while out.sent[part] < size and in_flight < WINDOW_BYTES:
            handle.seek(out.sent[part])
            data = handle.read(CHUNK_BYTES)
            message = {"type": "snap_chunk", "sid": out.sid, "index": out.index, "part": part,
                       "offset": out.sent[part], "size": size, "data": data}
            if not self.link.send_to(out.peer, message):
                return  # no session now: the resend timer tries again
            out.sent[part] += len(data)
            in_flight += len(data)
            self.counters["chunks_sent"] += 1

    def _on_ack(self, peer: str, message: dict[str, Any]) -> None:
        out = self._out.get(peer)
        if out is None or message["sid"] != out.sid:
            return
        part = message["part"]
        offset = min(message["offset"], out.sizes.get(part, 0))
        if offset > out.acked[part]:
            out.acked[part] = offset
            out.sent[part] = max(out.sent[part], offset)
            out.progress.set()
        elif offset < out.acked[part]:
            # The follower has less than it said before: it restarted and starts over. It is
            # the one that knows what it holds; send on from there.
            out.acked[part] = out.sent[part] = offset
            out.progress.set()

    # --- the follower's side -------------------------------------------------------------------

    def _on_message(self, peer: str, message: dict[str, Any]) -> None:
        if message["type"] == "snap_ack":
            self._on_ack(peer, message)
        else:
            self._on_chunk(peer, message)

    def _on_chunk(self, peer: str, message: dict[str, Any]) -> None:
        if peer != self.replica.leader_id:
            self.counters["refused"] += 1
            return  # only the leader installs state here
        sid, part = message["sid"], message["part"]
        if sid == self._installed or message["index"] <= self.replica.last_applied:
            # A chunk sent again after the install (its acknowledgement was lost), or a
            # snapshot this node is past already: say it is all there.
            self.link.send_to(peer, {"type": "snap_ack", "sid": sid, "part": part,
                                     "offset": message["size"]})
            return
        inc = self._in
        if inc is None or inc.sid != sid:
            if inc is not None and inc.installing:
                return
            inc = self._in = self._start_incoming(sid, peer)
        if inc.installing:
            return
        size, offset, data = message["size"], message["offset"], message["data"]
        have = inc.have.get(part, 0)
        inc.sizes[part] = size
        if offset == have and offset + len(data) <= size:
            with open(self.data_dir / INSTALL_DIR / part, "r+b" if have else "wb") as f:
                f.seek(offset)
                f.write(data)
            inc.have[part] = have + len(data)
        self.link.send_to(peer, {"type": "snap_ack", "sid": sid, "part": part,
                                 "offset": inc.have.get(part, 0)})
        if all(p in inc.sizes and inc.have.get(p, 0) >= inc.sizes[p] for p in SNAPSHOT_PARTS):
            inc.installing = True
            if self._nursery is not None:
                self._nursery.start_soon(self._install, inc)

    def _start_incoming(self, sid: int, leader: str) -> _Incoming:
        inbox = self.data_dir / INSTALL_DIR
        if inbox.exists():
            # The parts of another transfer: deleted in a worker thread (they can be GBs).
            trash = self.data_dir / f"{INSTALL_DIR}.old-{secrets.token_hex(4)}"
            inbox.rename(trash)
            if self._nursery is not None:
                self._nursery.start_soon(trio.to_thread.run_sync, shutil.rmtree, trash)
        inbox.mkdir(mode=DIR_MODE)
        return _Incoming(sid, leader)

    async def _install(self, inc: _Incoming) -> None:
        inbox = self.data_dir / INSTALL_DIR
        try:
            for part in SNAPSHOT_PARTS:
                path = inbox / part
                if not path.exists():
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE))
                await trio.to_thread.run_sync(_fsync, path)
            write_private(inbox / READY, json.dumps({"sid": inc.sid, "leader": inc.leader}),
                          sync=True)
            self.replica.begin_install()
            # Moving the parts over the old files frees those (GBs): in a worker thread too.
            await trio.to_thread.run_sync(complete_install, self.data_dir)
            machine, data = await trio.to_thread.run_sync(self.replica.load_installed)
            self.replica.finish_install(machine, data, inc.leader)
            self._installed = inc.sid
            self.counters["installed"] += 1
            log.info("installed a snapshot from %s at index %d", inc.leader, data["last"][1],
                     extra={"peer": inc.leader})
        except Exception as e:
            log.exception("installing the snapshot from %s failed", inc.leader)
            self.replica.abort_install(f"installing a snapshot failed: {e}")
        finally:
            self._in = None


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

