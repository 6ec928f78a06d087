"""The Raft dump (PySyncObj's ``fullDumpFile``): the machine's snapshot plus the Raft part.

PySyncObj's own format is a gzip-pickled ``__dict__``; with a custom serializer it hands over
only the last two applied entries and the member ids, and we write one msgpack map with the
machine's snapshot beside them. The dump is also what a leader sends a lagging follower, so
followers install snapshots without unpickling anything.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import msgpack

DUMP_FORMAT = 1


class CorruptRaftState(RuntimeError):
    """The dump on disk (or one sent by the leader) cannot be loaded. PySyncObj only logs
    this and carries on with a log that starts after the snapshot, i.e. stuck or diverged,
    so the replicator stops the node instead."""


def encode_dump(
    machine_snapshot: dict[str, Any],
    last: Sequence[Any],
    prev: Sequence[Any],
    member_ids: Sequence[str],
) -> bytes:
    """The msgpack dump: the machine plus the Raft part PySyncObj needs back on load.

    The machine goes in as its own packed bytes with their sha3 beside them: a checksum that
    costs one hash of bytes we pack anyway (a canonical digest walk took most of a dump's
    time, and a dump runs inline in the node's event loop)."""
    machine = msgpack.packb(machine_snapshot, use_bin_type=True)
    return msgpack.packb(
        {
            "format": DUMP_FORMAT,
            "last": list(last),
            "prev": list(prev),
            "members": sorted(member_ids),
            "digest": hashlib.sha3_256(machine).hexdigest(),
            "machine": machine,
        },
        use_bin_type=True,
    )


def decode_dump(blob: bytes) -> dict[str, Any]:
    """Parses and checks the shape of a dump; raises CorruptRaftState on anything else."""
    try:
        # strict_map_key=False: the machine's snapshot may use int keys.
        data = msgpack.unpackb(blob, raw=False, strict_map_key=False)
    except Exception as e:
        raise CorruptRaftState(f"raft dump is not msgpack: {e}") from e
    if not isinstance(data, dict) or data.get("format") != DUMP_FORMAT:
        raise CorruptRaftState("raft dump has an unknown format")
    for key in ("last", "prev"):
        entry = data.get(key)
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], bytes)
            and isinstance(entry[1], int)
            and isinstance(entry[2], int)
        ):
            raise CorruptRaftState(f"raft dump has a malformed {key!r} entry")
    members = data.get("members")
    if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
        raise CorruptRaftState("raft dump has malformed members")
    machine = data.get("machine")
    if not isinstance(machine, bytes) or not isinstance(data.get("digest"), str):
        raise CorruptRaftState("raft dump has no machine snapshot")
    if hashlib.sha3_256(machine).hexdigest() != data["digest"]:
        raise CorruptRaftState("raft dump checksum does not match its machine snapshot")
    try:
        data["machine"] = _unpack_map_by_item(machine)
    except Exception as e:
        raise CorruptRaftState(f"raft dump machine snapshot is not a msgpack map: {e}") from e
    return data


LAZY_MIN_ITEMS = 1024  # arrays this long are decoded as they are iterated (LazyItems)


def _unpack_map_by_item(blob: bytes) -> dict[Any, Any]:
    """``msgpack.unpackb`` of a map, but its arrays one item at a time, and its long arrays
    only when they are iterated (``LazyItems``).

    One unpackb of the whole snapshot holds the GIL for as long as it takes (0.8 s for 45 MB),
    and a follower decodes it in a worker thread while its event loop should go on; between
    items Python can switch threads, so the loop waits at most a few milliseconds. And the
    decoded tree of 100,000 processes takes 220 MB that Python's allocator keeps once freed:
    built item by item while the state is rebuilt from it, it never exists whole."""
    unpacker = _unpacker(memoryview(blob))
    out: dict[Any, Any] = {}
    for _ in range(unpacker.read_map_header()):
        key = unpacker.unpack()
        try:
            count = unpacker.read_array_header()
        except ValueError:  # not an array (nothing was consumed)
            out[key] = unpacker.unpack()
            continue
        if count < LAZY_MIN_ITEMS:
            out[key] = [unpacker.unpack() for _ in range(count)]
            continue
        start = unpacker.tell()
        for _ in range(count):
            unpacker.skip()  # checks the item's encoding without building it
        out[key] = LazyItems(blob, start, unpacker.tell(), count)
    if unpacker.tell() != len(blob):
        raise ValueError("bytes after the map")
    return out


class LazyItems:
    """The items of a long array in a decoded snapshot, decoded each time it is iterated.
    Consumers iterate (and may ask ``len``); equal to a list with the same items."""

    def __init__(self, blob: bytes, start: int, end: int, count: int) -> None:
        self._view = memoryview(blob)[start:end]
        self._count = count

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Any]:
        unpacker = _unpacker(self._view)
        for _ in range(self._count):
            yield unpacker.unpack()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LazyItems | list):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


class _ViewReader:
    """A file-like reader over a memoryview: the unpacker reads a chunk at a time instead of
    copying the whole blob into its buffer."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n < 0 else min(len(self._view), self._pos + n)
        chunk = bytes(self._view[self._pos:end])
        self._pos = end
        return chunk


def _unpacker(view: memoryview) -> msgpack.Unpacker:
    return msgpack.Unpacker(
        _ViewReader(view), raw=False, strict_map_key=False, read_size=1024 * 1024,
        max_buffer_size=max(len(view), 1024 * 1024),
    )
