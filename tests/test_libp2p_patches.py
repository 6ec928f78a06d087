"""node/libp2p_patches.py keeps libp2p's contracts on the pinned libp2p: TrioTCPStream.read
with a buffer, and yamux flow control with credit given back per half window. The limits
are tested against a node under hostile load in tests/test_hostile_clients.py."""

from __future__ import annotations

import hashlib
import inspect
from importlib.metadata import version
from typing import Any

import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.io.trio import TrioTCPStream
from libp2p.network.auto_connector import AutoConnector
from libp2p.network.connection.swarm_connection import SwarmConn
from libp2p.network.swarm import Swarm
from libp2p.stream_muxer.yamux.yamux import DEFAULT_WINDOW_SIZE, Yamux, YamuxStream

from node.libp2p_patches import (
    _ORIGINAL,
    _bounded_yamux_init,
    buffered_read,
    connect_below_low_watermark,
    release_in_halves,
    serve_inbound,
    serve_stream,
)
from node.p2p import connect, running_host  # importing node.p2p installs the fixes
from protocol.identity import PrivateKey


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
    assert YamuxStream._auto_tune_and_send_window_update is release_in_halves
    assert Swarm._handle_inbound_connection is serve_inbound
    assert SwarmConn._handle_muxed_stream is serve_stream
    assert AutoConnector.maybe_connect is connect_below_low_watermark
    assert Yamux.__init__ is _bounded_yamux_init


def test_upstream_still_has_what_the_patches_fix() -> None:
    """Fails when a libp2p upgrade changes code a patch replaces: then re-check the patch
    (and drop it if upstream fixed the bug)."""
    assert version("libp2p") == "0.8.1"
    inbound = inspect.getsource(Swarm._do_handle_inbound_connection)
    assert "self.manager.wait_finished()" in inbound  # the slot lives as long as the swarm
    assert "max_streams_per_connection" not in inspect.getsource(_ORIGINAL["serve_stream"])
    incoming = inspect.getsource(Yamux.handle_incoming)
    assert "peer exceeded" in incoming and "extend(data)" in incoming  # buffered anyway
    assert "(low_watermark + high_watermark) / 2" in inspect.getsource(_ORIGINAL["auto_connect"])


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


async def test_yamux_gives_credit_back_per_half_window_and_moves_every_byte(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Many small messages: no window update at all. 3 MB in 64 KB writes, more than ten
    windows, against a reader that takes its time: every byte arrives, in order, with about
    one update per half window (the writer would stall forever without them)."""
    updates: list[int] = []
    send_update = YamuxStream.send_window_update

    async def counted(self: Any, increment: int, skip_lock: bool = False) -> None:
        updates.append(increment)
        await send_update(self, increment, skip_lock)

    monkeypatch.setattr(YamuxStream, "send_window_update", counted)
    proto = TProtocol("/colonies-test/sink/1.0.0")
    received: dict[str, Any] = {}
    done = trio.Event()

    async def sink(stream: Any) -> None:
        digest, size = hashlib.sha256(), 0
        while size < received["expect"]:
            chunk = await stream.read(65536)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
            if size % (512 * 1024) < len(chunk):
                await trio.sleep(0.01)  # a slow reader: the window does fill up
        received.update(size=size, sha=digest.hexdigest())
        done.set()

    small = [bytes([i % 256]) * 100 for i in range(200)]
    big = [bytes([i % 251]) * 65536 for i in range(48)]
    with trio.fail_after(30):
        async with running_host(PrivateKey.generate(), ["/ip4/127.0.0.1/tcp/0"]) as server, \
                running_host(PrivateKey.generate(), ["/ip4/127.0.0.1/tcp/0"]) as client:
            server.set_stream_handler(proto, sink)
            addr = f"{server.get_addrs()[0]}"
            if "/p2p/" not in addr:
                addr += f"/p2p/{server.get_id().to_string()}"
            await connect(client, addr)
            for payload in (small, big):
                received.clear()
                received["expect"] = sum(map(len, payload))
                done = trio.Event()
                updates.clear()
                stream = await client.new_stream(server.get_id(), [proto])
                for piece in payload:
                    await stream.write(piece)
                await done.wait()
                assert received["size"] == received["expect"]
                assert received["sha"] == hashlib.sha256(b"".join(payload)).hexdigest()
                if payload is small:
                    assert updates == []  # 20 KB never reaches half a window
                else:
                    half_windows = received["expect"] // (DEFAULT_WINDOW_SIZE // 2)
                    assert 1 <= len(updates) <= half_windows + 1
                await stream.close()
