"""Our fixes to py-libp2p 0.8.1 (pinned), installed before any host is built.

libp2p builds its TCP streams, yamux connections and swarm connections itself, with no hook to
supply our own classes, so ``install()`` replaces methods on libp2p's classes. Each fix keeps
the library's contract; tests/test_libp2p_patches.py checks each one on the pinned version and
fails if upstream changes what it replaces.

Speed (measured with ``simulations/bench.py --only lifecycle --nodes 3 --executors 8``, 2
cores, 6 paired runs):

1. **Yamux window updates only per half window** (``release_in_halves``). libp2p sends a
   WINDOW_UPDATE after every read by default, and with ``PY_YAMUX_RELEASE_ON_READ=0`` its
   "partial slack" rule still sent one after about every third read: each a Noise message and
   a socket write that the peer must also process (a quarter of all the writes a node made).
   go-yamux gives credit back once half the window has been consumed; this does the same and
   keeps libp2p's window auto-tuning (it replaces the only reader of that variable).
   Throughput +11%, node CPU per request -9%, client CPU -15%.
2. **Buffered TCP reads** (``buffered_read``). libp2p reads its sockets unbuffered: every Noise
   message costs two trio reads (its 2-byte length, then its body), each with a lock, a
   checkpoint and a ``recv`` syscall. Several small messages usually arrive together, so one
   read of up to ``CHUNK_BYTES`` now serves them from memory. Throughput +14%, node CPU per
   request -13%.

Limits (what a peer can make a node hold, see ``ConnectionLimits``):

3. **Inbound connections hold a slot only while they live** (``serve_inbound``). libp2p takes
   a slot of its inbound limiter for every accepted connection and gives it back when the
   swarm stops, not when the connection closes: after about 250 connections in its lifetime a
   node refused every new client, CLI call, executor and Raft dial until restarted. Here a
   connection holds a handshake slot while Noise and yamux are negotiated, then, unless its
   peer is a cluster member, a client slot until it closes.
4. **Streams per connection are capped** (``serve_stream``): libp2p accepts any number of
   inbound streams on one connection, each with its own buffers and tasks.
5. **Yamux receive windows are enforced and buffered bytes budgeted** (``BoundedBuffers``).
   libp2p's yamux logs a warning when a peer sends past the window it was given and buffers
   the data anyway, so a peer that ignores flow control makes the node buffer without bound.
   A stream's unread bytes may not exceed the largest window a stream can be given
   (``MAX_WINDOW_BYTES``, go-yamux closes the session with a protocol error; so does this),
   and the unread bytes of a non-member connection count against a per-connection and a
   node-wide budget; a connection that would pass either is closed.
6. **No dialing beyond what is asked** (``connect_below_low_watermark``). libp2p's
   auto-connector aims at the midpoint of the low and high watermarks, not at the low
   watermark, so it dials every peer in the peerstore whatever the settings; it now dials
   only below the low watermark (go-libp2p's rule), which our hosts set to 0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, SupportsIndex

import trio
from libp2p.abc import IMuxedConn
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.io.trio import TrioTCPStream
from libp2p.network.auto_connector import AutoConnector
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.connection.swarm_connection import SwarmConn
from libp2p.network.swarm import Swarm
from libp2p.stream_muxer.yamux import yamux as yamux_module
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream

log = logging.getLogger("colonies.p2p")

CHUNK_BYTES = 65536  # a Noise message is at most 2 + 65535 bytes
# The largest receive window a yamux stream is ever given (libp2p auto-tunes up to its
# MAX_WINDOW_SIZE, 16 MiB): a lagging reader's unread bytes per stream are bounded by it.
MAX_WINDOW_BYTES = 1024 * 1024


async def buffered_read(self: Any, n: int | None = None) -> bytes:
    """TrioTCPStream.read: up to ``n`` bytes (all that is buffered, or one socket read, when
    ``n`` is None); ``b""`` at EOF; ConnectionClosedError when the peer reset the socket."""
    if n == 0:
        return b""
    if self._colonies_pos < len(self._colonies_buf):
        return _take(self, n)
    async with self.read_lock:
        if self._colonies_pos < len(self._colonies_buf):  # filled while we waited for the lock
            return _take(self, n)
        try:
            data = await self.stream.receive_some(CHUNK_BYTES)
        except trio.BrokenResourceError as error:
            raise ConnectionClosedError(
                f"TCP connection reset by remote peer: {error}", transport="tcp"
            ) from error
        except trio.ClosedResourceError:
            return b""  # closed locally: EOF, as libp2p's own read reports it
        if n is None or n >= len(data):
            return data
        self._colonies_buf = data
        self._colonies_pos = n
        return data[:n]


def _take(stream: Any, n: int | None) -> bytes:
    buf: bytes = stream._colonies_buf
    pos: int = stream._colonies_pos
    end = len(buf) if n is None else min(len(buf), pos + n)
    if end == len(buf):
        stream._colonies_buf, stream._colonies_pos = b"", 0
    else:
        stream._colonies_pos = end
    return buf[pos:end]


async def release_in_halves(self: Any, *, bytes_read: int = 0) -> None:
    """YamuxStream._auto_tune_and_send_window_update: after a read, give the peer its credit
    back once at least half the receive window has been consumed (go-yamux's rule)."""
    async with self.window_lock:
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        consumed = self.target_recv_window - (self.recv_window + buffered)
        if consumed <= 0 or consumed < self._grow_threshold():
            return
        increment = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
    # Never while holding window_lock: an inbound WINDOW_UPDATE needs it (libp2p's own rule).
    await self.send_window_update(increment, skip_lock=True)


# --- limits ---------------------------------------------------------------------------------


@dataclass
class ConnectionLimits:
    """What one node's peers can make it hold, all concurrent (never per lifetime).

    Set on a swarm with ``set_limits``; ``is_member`` tells cluster members (Raft peers,
    authenticated by Noise) from everybody else, whose connections count as clients."""

    max_handshakes: int = 64  # inbound connections negotiating Noise and yamux at once
    max_clients: int = 1024  # established inbound connections from non-members
    max_streams_per_connection: int = 16  # inbound streams open at once on one connection
    max_buffered_per_connection: int = 4 * 1024 * 1024  # a client connection's unread bytes
    max_buffered: int = 128 * 1024 * 1024  # all client connections' unread bytes together
    is_member: Callable[[str], bool] = lambda peer: False
    # What is held now, and what was refused.
    handshakes: int = 0
    clients: int = 0
    members: int = 0
    buffered: int = 0
    refused: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("handshakes", "clients", "streams", "buffered", "window"), 0
        )
    )

    def stats(self) -> dict[str, Any]:
        return {
            "handshakes": self.handshakes,
            "clients": self.clients,
            "members": self.members,
            "buffered_bytes": self.buffered,
            "refused": dict(self.refused),
        }


def set_limits(swarm: Any, limits: ConnectionLimits) -> None:
    swarm._colonies_limits = limits


def limits_of(swarm: Any) -> ConnectionLimits:
    limits = getattr(swarm, "_colonies_limits", None)
    if limits is None:
        limits = swarm._colonies_limits = ConnectionLimits()
    return limits


class FlowControlViolation(ConnectionResetError):
    """A peer sent past its yamux window, or past the node's budget for unread bytes. An
    OSError, so that libp2p's yamux read loop closes the connection (and only it)."""


async def serve_inbound(self: Swarm, conn: Any, maddr: Any) -> None:
    """Swarm._handle_inbound_connection: upgrade an accepted TCP connection and keep it (the
    listener closes the socket when this returns) until it closes, holding a handshake slot
    while it negotiates and then, for a non-member, a client slot."""
    limits = limits_of(self)
    if isinstance(conn, IMuxedConn):  # QUIC and the like: not a transport we listen on
        await _ORIGINAL["serve_inbound"](self, conn, maddr)
        return
    if limits.handshakes >= limits.max_handshakes:
        limits.refused["handshakes"] += 1
        await _close_quietly(conn)
        return
    limits.handshakes += 1
    try:
        # Bounded by libp2p's inbound_upgrade_timeout; it closes the connection on failure.
        muxed = await self.upgrade_inbound_raw_conn(RawConnection(conn, False), maddr)
    except Exception as e:
        log.debug("inbound connection from %s failed to upgrade: %r", maddr, e)
        await _close_quietly(conn)
        return
    finally:
        limits.handshakes -= 1
    member = limits.is_member(muxed.peer_id.to_string())
    if not member and limits.clients >= limits.max_clients:
        limits.refused["clients"] += 1
        await _close_quietly(muxed)
        return
    if member:
        limits.members += 1
    else:
        limits.clients += 1
        # From now on its unread bytes count against the budgets (BoundedBuffers).
        muxed._colonies_budget = limits
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_close_on_violation, muxed)
            await muxed.event_closed.wait()
            nursery.cancel_scope.cancel()
    finally:
        if member:
            limits.members -= 1
        else:
            limits.clients -= 1


async def _close_on_violation(muxed: Any) -> None:
    """libp2p's yamux read loop survives an error on one stream (it drops the data and marks
    the stream closed); a peer that broke flow control loses the whole connection."""
    buffers = getattr(muxed, "stream_buffers", None)
    if isinstance(buffers, BoundedBuffers):
        await buffers.violated.wait()
        await _close_quietly(muxed)


async def serve_stream(self: SwarmConn, muxed_stream: Any) -> None:
    """SwarmConn._handle_muxed_stream: refuse an inbound stream beyond the per-connection cap."""
    limits = limits_of(self.swarm)
    if len(self.streams) >= limits.max_streams_per_connection:
        limits.refused["streams"] += 1
        try:
            await muxed_stream.reset()
        except Exception:
            pass
        return
    await _ORIGINAL["serve_stream"](self, muxed_stream)


async def _close_quietly(conn: Any) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
        try:
            await conn.close()
        except Exception:
            pass


class StreamBuffer(bytearray):
    """One yamux stream's unread bytes, charged to its connection's budget (if any)."""

    def __init__(self, owner: BoundedBuffers) -> None:
        super().__init__()
        self.owner = owner
        self.charged = 0

    def extend(self, data: Any) -> None:
        n = len(data)
        if len(self) + n > MAX_WINDOW_BYTES:
            self.owner.refuse("window", f"{len(self) + n} unread bytes on one stream")
        self.owner.charge(self, n)
        super().extend(data)

    def __delitem__(self, index: SupportsIndex | slice) -> None:
        before = len(self)
        super().__delitem__(index)
        self.owner.release(self, before - len(self))

    def clear(self) -> None:
        self.owner.release(self, len(self))
        super().clear()


class BoundedBuffers(dict[int, bytearray]):
    """Yamux.stream_buffers: every stream's buffer is a StreamBuffer."""

    def __init__(self, conn: Yamux) -> None:
        super().__init__()
        self.conn = conn
        self.charged = 0  # this connection's bytes charged to its budget
        self.violated = trio.Event()

    def __setitem__(self, key: int, value: bytearray) -> None:
        self._drop(self.get(key))
        buf = StreamBuffer(self)
        if value:
            buf.extend(value)
        super().__setitem__(key, buf)

    def __delitem__(self, key: int) -> None:
        self._drop(self.get(key))
        super().__delitem__(key)

    def pop(self, key: int, *default: Any) -> Any:
        self._drop(self.get(key))
        return super().pop(key, *default)

    def clear(self) -> None:
        for buf in self.values():
            self._drop(buf)
        super().clear()

    def _drop(self, buf: bytearray | None) -> None:
        if isinstance(buf, StreamBuffer):
            self.release(buf, buf.charged)

    def refuse(self, what: str, why: str) -> None:
        budget = getattr(self.conn, "_colonies_budget", None)
        if budget is not None:
            budget.refused[what] += 1
        self.violated.set()
        raise FlowControlViolation(f"yamux peer {self.conn.peer_id} exceeded its {why}")

    def charge(self, buf: StreamBuffer, n: int) -> None:
        budget: ConnectionLimits | None = getattr(self.conn, "_colonies_budget", None)
        if budget is None:
            return  # a member, or a connection we dialed: only the window rule holds
        if self.charged + n > budget.max_buffered_per_connection:
            self.refuse("buffered", f"connection budget ({self.charged + n} unread bytes)")
        if budget.buffered + n > budget.max_buffered:
            self.refuse("buffered", f"share of the node's budget ({budget.buffered} unread)")
        buf.charged += n
        self.charged += n
        budget.buffered += n

    def release(self, buf: StreamBuffer, n: int) -> None:
        n = min(n, buf.charged)
        if n <= 0:
            return
        buf.charged -= n
        self.charged -= n
        budget: ConnectionLimits | None = getattr(self.conn, "_colonies_budget", None)
        if budget is not None:
            budget.buffered -= n


async def connect_below_low_watermark(self: AutoConnector) -> None:
    """AutoConnector.maybe_connect: only when below the low watermark."""
    if self.swarm.get_total_connections() >= self.swarm.connection_config.low_watermark:
        return
    await _ORIGINAL["auto_connect"](self)


def _bounded_yamux_init(self: Yamux, *args: Any, **kwargs: Any) -> None:
    _ORIGINAL["yamux_init"](self, *args, **kwargs)
    self.stream_buffers = BoundedBuffers(self)


_ORIGINAL: dict[str, Any] = {}


def install() -> None:
    """Idempotent; node/p2p.py calls it on import, before any host exists."""
    # Class-level defaults: a stream has an empty buffer until its first short read.
    TrioTCPStream._colonies_buf = b""  # type: ignore[attr-defined]
    TrioTCPStream._colonies_pos = 0  # type: ignore[attr-defined]
    TrioTCPStream.read = buffered_read  # type: ignore[method-assign]
    YamuxStream._auto_tune_and_send_window_update = release_in_halves  # type: ignore[method-assign]
    if _ORIGINAL:
        return
    _ORIGINAL["serve_inbound"] = Swarm._handle_inbound_connection
    _ORIGINAL["serve_stream"] = SwarmConn._handle_muxed_stream
    _ORIGINAL["yamux_init"] = Yamux.__init__
    _ORIGINAL["auto_connect"] = AutoConnector.maybe_connect
    AutoConnector.maybe_connect = connect_below_low_watermark  # type: ignore[method-assign]
    Swarm._handle_inbound_connection = serve_inbound  # type: ignore[method-assign]
    SwarmConn._handle_muxed_stream = serve_stream  # type: ignore[method-assign]
    Yamux.__init__ = _bounded_yamux_init  # type: ignore[method-assign]
    # libp2p's auto-tuning grows a stream's window up to this (upstream: 16 MiB).
    yamux_module.MAX_WINDOW_SIZE = MAX_WINDOW_BYTES
