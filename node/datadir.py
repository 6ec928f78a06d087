"""A node's data directory: an exclusive lock, the node key, and the server owner key.

Two daemons must never share a data dir (SO_REUSEPORT would even let them share a port), so
the first thing a node does is take an flock that the kernel drops when the process dies.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from protocol.errors import BadRequest
from protocol.identity import PrivateKey

LOCK_FILE = "colonyd.lock"
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
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise BadRequest(f"cannot create data dir {self.path}: {e.strerror}") from None
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
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
        return self

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def node_key(self) -> PrivateKey:
        """The libp2p host key, created on first start."""
        return load_or_create_key(self.path / NODE_KEY_FILE)

    def write_addr(self, addrs: list[str]) -> None:
        tmp = self.path / (ADDR_FILE + ".tmp")
        tmp.write_text("\n".join(addrs) + "\n")
        tmp.replace(self.path / ADDR_FILE)


def read_key(path: Path) -> PrivateKey:
    try:
        text = path.read_text().strip()
    except OSError as e:
        raise BadRequest(f"cannot read key file {path}: {e.strerror}") from None
    return PrivateKey.from_hex(text)


def write_key(path: Path, key: PrivateKey) -> None:
    """Written with mode 0600 from the first byte, then moved into place."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex + "\n")
    tmp.replace(path)


def load_or_create_key(path: Path) -> PrivateKey:
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            os.chmod(path, 0o600)  # tighten a key left readable by others
        return read_key(path)
    key = PrivateKey.generate()
    write_key(path, key)
    return key
