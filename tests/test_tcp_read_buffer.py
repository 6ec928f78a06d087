"""node/tcp_read_buffer.py keeps libp2p's TrioTCPStream.read contract on the pinned libp2p."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.io.trio import TrioTCPStream

import node.p2p  # noqa: F401  (installs the buffer, as every node and client does)
from node.tcp_read_buffer import buffered_read


class FakeSocketStream:
    """Hands out scripted chunks; each receive_some checkpoints like a socket read."""

    def __init__(self, chunks: list[bytes | type[Exception]]) -> None:
        self.chunks = chunks
        self.asked: list[int | None] = []

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self.asked.append(max_bytes)
        await trio.lowlevel.checkpoint()
        item = self.chunks.pop(0) if self.chunks else b""
        if isinstance(item, type):
            raise item("socket gone")
        return item


def stream(*chunks: bytes | type[Exception]) -> tuple[TrioTCPStream, FakeSocketStream]:
    fake = FakeSocketStream(list(chunks))
    return TrioTCPStream(fake), fake  # type: ignore[arg-type]


def test_installed_on_libp2p() -> None:
    assert TrioTCPStream.read is buffered_read


async def test_small_reads_are_served_from_one_socket_read_in_order() -> None:
    s, fake = stream(b"\x00\x05hello\x00\x02hi", b"tail")
    assert await s.read(2) == b"\x00\x05"
    assert await s.read(5) == b"hello"
    assert await s.read(2) == b"\x00\x02"
    assert await s.read(10) == b"hi"  # up to n: what is buffered, not another socket read
    assert len(fake.asked) == 1
    assert await s.read(None) == b"tail"
    assert await s.read(3) == b""  # EOF
    assert await s.read(0) == b""


async def test_read_none_returns_everything_buffered() -> None:
    s, _ = stream(b"abcdef")
    assert await s.read(1) == b"a"
    assert await s.read() == b"bcdef"


async def test_a_reset_raises_connection_closed_and_a_local_close_is_eof() -> None:
    s, _ = stream(trio.BrokenResourceError)
    with pytest.raises(ConnectionClosedError):
        await s.read(4)
    s, _ = stream(trio.ClosedResourceError)
    assert await s.read(4) == b""


async def test_concurrent_readers_get_the_bytes_in_order() -> None:
    s, _ = stream(b"0123456789", b"abcdef")
    got: list[bytes] = []

    async def reader() -> None:
        for _ in range(8):
            piece = await s.read(2)
            if not piece:
                return
            got.append(piece)

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        n.start_soon(reader)
    assert b"".join(got) == b"0123456789abcdef"
