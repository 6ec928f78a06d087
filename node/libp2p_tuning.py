"""Two measured fixes to py-libp2p 0.8.1's hot paths, installed before any host is built.

Every Raft message and RPC frame crosses TCP, Noise and yamux, and a node under load sends
thousands a second, so per-message overheads in libp2p decide how many processes a cluster
runs. Each fix below keeps the library's contract and was measured with
``simulations/bench.py --only lifecycle --nodes 3 --executors 8`` (2 cores, 6 paired runs):

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

libp2p builds its TCP streams and yamux streams itself, with no hook to supply our own
classes, so ``install()`` replaces the two methods on libp2p's classes. libp2p is pinned
(requirements.lock); tests/test_libp2p_tuning.py checks both contracts on that version.
"""

from __future__ import annotations

from typing import Any

import trio
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.io.trio import TrioTCPStream
from libp2p.stream_muxer.yamux.yamux import YamuxStream

CHUNK_BYTES = 65536  # a Noise message is at most 2 + 65535 bytes


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


def install() -> None:
    """Idempotent; node/p2p.py calls it on import, before any host exists."""
    # Class-level defaults: a stream has an empty buffer until its first short read.
    TrioTCPStream._colonies_buf = b""  # type: ignore[attr-defined]
    TrioTCPStream._colonies_pos = 0  # type: ignore[attr-defined]
    TrioTCPStream.read = buffered_read  # type: ignore[method-assign]
    YamuxStream._auto_tune_and_send_window_update = release_in_halves  # type: ignore[method-assign]
