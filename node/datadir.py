"""A node's data directory: an exclusive lock, private files, the node and server owner keys.

Two daemons must never share a data dir (SO_REUSEPORT would even let them share a port), so
the first thing a node does is take an flock that the kernel drops when the process dies.

Everything in it is private: the dir is 0700 and every file 0600 (the journal and snapshots
hold every process's arguments and output, the keys are keys). Files the node writes are
created with those modes; a data dir left more open (by an older version, or by hand) is
tightened when it is opened, with a log line saying what changed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
from pathlib import Path

from protocol.errors import BadRequest
from protocol.identity import PrivateKey

log = logging.getLogger("colonies.node")

LOCK_FILE = "colonyd.lock"
DIR_MODE = 0o700
FILE_MODE = 0o600
NODE_KEY_FILE = "node.key"
SERVER_KEY_FILE = "server.key"
ADDR_FILE = "node.addr"


class DataDirLocked(BadRequest):
    """Another colonyd holds this data dir."""


class DataDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_fd: int | None = None

    def open(self) -> DataDir:
        try:
            self.path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        except OSError as e:
            raise BadRequest(f"cannot create data dir {self.path}: {e.strerror}") from None
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirLocked(
                f"data dir {self.path} is in use by another colonyd (lock {LOCK_FILE})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        tighten(self.path)
        return self

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def node_key(self) -> PrivateKey:
        """The libp2p host key, created on first start."""
        return load_or_create_key(self.path / NODE_KEY_FILE)

    def write_addr(self, addrs: list[str]) -> None:
        write_private(self.path / ADDR_FILE, "\n".join(addrs) + "\n")


def tighten(path: Path) -> None:
    """Make ``path`` 0700 and everything under it private (dirs 0700, files 0600), without
    following symlinks; logs what it changed."""
    dirs = files = 0
    for root, dirnames, filenames in os.walk(path):
        if _restrict(Path(root), DIR_MODE):
            dirs += 1
        for name in filenames:
            if _restrict(Path(root) / name, FILE_MODE):
                files += 1
        dirnames[:] = [d for d in dirnames if not (Path(root) / d).is_symlink()]
    if dirs or files:
        log.warning(
            "data dir %s was readable by others: made %d dir(s) 0700 and %d file(s) 0600",
            path, dirs, files,
        )


def _restrict(path: Path, mode: int) -> bool:
    try:
        st = path.lstat()
    except OSError:
        return False
    if stat.S_ISLNK(st.st_mode) or not st.st_mode & 0o077:
        return False
    os.chmod(path, stat.S_IMODE(st.st_mode) & mode)
    return True


def write_private(path: Path, data: str | bytes, *, sync: bool = False) -> None:
    """Write ``path`` whole, mode 0600 from its first byte, through a temp file moved into
    place (a reader never sees a partial file); with ``sync`` it is on disk on return."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # an old .tmp left with another mode
        os.write(fd, data.encode() if isinstance(data, str) else data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    if sync:
        sync_dir(path.parent)


def sync_dir(path: Path) -> None:
    """fsync a directory, so that a rename or a new file in it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_key(path: Path) -> PrivateKey:
    try:
        text = path.read_text().strip()
    except OSError as e:
        raise BadRequest(f"cannot read key file {path}: {e.strerror}") from None
    return PrivateKey.from_hex(text)


def write_key(path: Path, key: PrivateKey) -> None:
    write_private(path, key.hex + "\n", sync=True)


def load_or_create_key(path: Path) -> PrivateKey:
    if path.exists():
        _restrict(path, FILE_MODE)  # a key left readable by others (outside a data dir)
        return read_key(path)
    key = PrivateKey.generate()
    write_key(path, key)
    return key
