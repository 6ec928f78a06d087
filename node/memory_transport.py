"""The in-memory twin of the libp2p Raft transport, for tests: several in-process nodes on one
``MemoryNetwork`` that can drop, delay and partition on demand.

``network.transport(...)`` is a ``node.raft_transport.RaftTransport`` (sessions, framing,
allow-list, heartbeats, PySyncObj callbacks: the production code) over a ``MemoryStreamLayer``
of in-memory byte pipes instead of libp2p streams. Messages are msgpack-encoded and framed exactly as on the wire, so
what a test sees PySyncObj receive is what it would receive from libp2p.

Faults act on whole frames (the pipe re-frames what a writer writes):

* ``partition(*groups)``: nodes in different groups cannot reach each other (a node in no
  group is alone). By default the pipes between them break (both ends see a reset, as when a
  connection drops) and new connections are refused. With ``silent=True`` they stay up but
  every frame is lost, new connections hang, and an end that resets its pipe tells nobody
  (the other end learns it when traffic passes again, like a TCP RST): a hung peer, which
  only the transport's heartbeat timeout notices. ``heal()`` ends the partition.
* ``set_faults(drop=p, delay=(lo, hi))``: each Raft frame but heartbeats is lost with
  probability ``p`` and delivered ``lo..hi`` seconds later, in order per direction (a stream
  never reorders).

Addresses: a member's address is only "known" (any string, e.g. ``network.address(peer)``)
or None (unknown: that peer must dial us), as with libp2p multiaddrs.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import trio

from node.faults import FaultFile
from node.raft_codec import HEARTBEAT, RAFT_MAX_FRAME_BYTES
from node.raft_faults import FaultyStreamLayer
from node.raft_transport import AcceptStream, RaftStream, RaftTransport, StreamLayer
from protocol.framing import FrameDecoder, encode_frame


class MemoryStreamReset(ConnectionResetError):
    """The pipe broke (reset by either end, or cut by a partition)."""


class _Endpoint:
    """One end of a pipe, with the read/write/reset of a libp2p stream."""

    def __init__(self, pipe: _Pipe, side: int) -> None:
        self._pipe = pipe
        self._side = side
        self._buffer = bytearray()
        self._readable = trio.Event()

    def _feed(self, frame: bytes) -> None:
        self._buffer += frame
        self._readable.set()

    def _wake(self) -> None:
        self._readable.set()

    def _check(self) -> None:
        if self._pipe.broken or self._pipe.closed[self._side]:
            raise MemoryStreamReset("memory stream reset")

    async def read(self, n: int = 65536) -> bytes:
        while not self._buffer:
            self._check()
            self._readable = trio.Event()
            await self._readable.wait()
        await trio.lowlevel.checkpoint()
        self._check()
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def write(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self._check()
        self._pipe.transmit(self._side, bytes(data))

    async def reset(self) -> None:
        self._pipe.close_end(self._side)

    async def close(self) -> None:
        self._pipe.close_end(self._side)


class _Pipe:
    def __init__(self, network: MemoryNetwork, dialer: str, acceptor: str) -> None:
        self.network = network
        self.ids = (dialer, acceptor)
        self.ends = (_Endpoint(self, 0), _Endpoint(self, 1))
        self.broken = False
        self.closed = [False, False]  # one end reset while the other could not hear it
        self._decoders = (FrameDecoder(RAFT_MAX_FRAME_BYTES), FrameDecoder(RAFT_MAX_FRAME_BYTES))
        self._queues: tuple[deque[tuple[float, bytes]], deque[tuple[float, bytes]]] = (
            deque(),
            deque(),
        )
        self._last_at = [0.0, 0.0]
        self._pumping = [False, False]
        self._pump_wakeup = [trio.Event(), trio.Event()]

    def close_end(self, side: int) -> None:
        if self.network.reachable(*self.ids):
            self.break_()
        else:
            self.closed[side] = True
            self.ends[side]._wake()

    def transmit(self, side: int, data: bytes) -> None:
        src, dst = self.ids[side], self.ids[1 - side]
        if self.closed[1 - side]:
            if self.network.reachable(src, dst):
                self.break_()  # the other end is gone: this is the RST
            return
        queue = self._queues[side]
        now = trio.current_time()
        for body in self._decoders[side].feed(data):
            if not self.network._passes(src, dst, body):
                continue
            at = max(self._last_at[side], now + self.network._latency())
            self._last_at[side] = at
            if at <= now and not queue:
                self.ends[1 - side]._feed(encode_frame(body))
            else:
                queue.append((at, encode_frame(body)))
        if queue:
            if not self._pumping[side]:
                self._pumping[side] = True
                self.network._spawn(self._pump, side)
            self._pump_wakeup[side].set()

    async def _pump(self, side: int) -> None:
        queue, dst = self._queues[side], self.ends[1 - side]
        while not self.broken:
            if not queue:
                self._pump_wakeup[side] = trio.Event()
                await self._pump_wakeup[side].wait()
                continue
            at, frame = queue[0]
            if at > trio.current_time():
                await trio.sleep_until(at)
                continue
            queue.popleft()
            if not self.closed[1 - side]:
                dst._feed(frame)

    def break_(self) -> None:
        if self.broken:
            return
        self.broken = True
        self.network._pipes.discard(self)
        for end in self.ends:
            end._wake()
        for wakeup in self._pump_wakeup:
            wakeup.set()


class MemoryNetwork:
    """Connects ``MemoryRaftTransport``s in one process. Run ``run`` in a nursery first
    (``await nursery.start(network.run)``): delayed deliveries and inbound sessions live in
    its nursery, as inbound streams live in the libp2p host's."""

    def __init__(self, seed: int = 0) -> None:
        self.random = random.Random(seed)
        self.drop_rate = 0.0
        self.delay = (0.0, 0.0)
        self.frames_dropped = 0
        self.connections_refused = 0
        self._hosts: dict[str, MemoryStreamLayer] = {}
        self._pipes: set[_Pipe] = set()
        self._groups: list[frozenset[str]] | None = None
        self._silent = False
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            for pipe in list(self._pipes):
                pipe.break_()

    @staticmethod
    def address(peer_id: str) -> str:
        return f"/memory/{peer_id}"

    def transport(
        self,
        self_id: str,
        members: Mapping[str, str | None],
        *,
        faults: FaultFile | None = None,
        **kwargs: Any,
    ) -> RaftTransport:
        """A Raft transport for ``self_id`` on this network (with fault injection from
        ``faults`` on top, as ``colonyd --fault-file`` does)."""
        layer: StreamLayer = MemoryStreamLayer(self, self_id)
        if faults is not None:
            layer = FaultyStreamLayer(layer, faults)
        return RaftTransport(self_id, members, layer, **kwargs)

    # --- faults ----------------------------------------------------------------------------------

    def partition(self, *groups: Iterable[str], silent: bool = False) -> None:
        self._groups = [frozenset(g) for g in groups]
        self._silent = silent
        if not silent:
            for pipe in list(self._pipes):
                if not self.reachable(*pipe.ids):
                    pipe.break_()

    def isolate(self, peer_id: str, silent: bool = False) -> None:
        """Cut one node off from all others."""
        others = [p for p in self._hosts if p != peer_id]
        self.partition([peer_id], others, silent=silent)

    def heal(self) -> None:
        self._groups = None
        self._silent = False

    def set_faults(self, drop: float = 0.0, delay: tuple[float, float] = (0.0, 0.0)) -> None:
        if not 0.0 <= drop < 1.0 or not 0.0 <= delay[0] <= delay[1]:
            raise ValueError("need 0 <= drop < 1 and 0 <= delay[0] <= delay[1]")
        self.drop_rate = drop
        self.delay = delay

    def reachable(self, a: str, b: str) -> bool:
        if self._groups is None:
            return True
        return self._group_of(a) == self._group_of(b)

    def _group_of(self, peer: str) -> object:
        for i, group in enumerate(self._groups or ()):
            if peer in group:
                return i
        return ("alone", peer)

    # --- plumbing --------------------------------------------------------------------------------

    def _passes(self, src: str, dst: str, body: bytes) -> bool:
        if not self.reachable(src, dst):
            return False  # a silent partition: the pipe is up, nothing gets through
        if self.drop_rate and body != HEARTBEAT and self.random.random() < self.drop_rate:
            self.frames_dropped += 1
            return False
        return True

    def _latency(self) -> float:
        lo, hi = self.delay
        return lo if lo == hi else self.random.uniform(lo, hi)

    def _spawn(self, fn: Any, *args: Any) -> None:
        if self._nursery is None:
            raise RuntimeError("MemoryNetwork.run is not running")
        self._nursery.start_soon(fn, *args)

    async def _connect(self, src: str, dst: str) -> _Endpoint:
        await trio.lowlevel.checkpoint()
        if not self.reachable(src, dst):
            if self._silent:
                await trio.sleep_forever()  # the dialer's own timeout ends this
            self.connections_refused += 1
            raise ConnectionRefusedError(f"{dst} is unreachable from {src}")
        target = self._hosts.get(dst)
        if target is None:
            self.connections_refused += 1
            raise ConnectionRefusedError(f"{dst} is not listening")
        pipe = _Pipe(self, src, dst)
        self._pipes.add(pipe)
        self._spawn(target.deliver, src, pipe.ends[1])
        return pipe.ends[0]


class MemoryStreamLayer:
    """The stream layer of one node on a ``MemoryNetwork``."""

    def __init__(self, network: MemoryNetwork, self_id: str) -> None:
        self._network = network
        self._self_id = self_id
        self._accept: AcceptStream | None = None

    def check_addr(self, peer: str, addr: str) -> str | None:
        return addr

    def listen(self, accept: AcceptStream) -> None:
        self._accept = accept
        self._network._hosts[self._self_id] = self

    def stop_listening(self) -> None:
        if self._network._hosts.get(self._self_id) is self:
            del self._network._hosts[self._self_id]
        self._accept = None

    async def deliver(self, src: str, stream: _Endpoint) -> None:
        if self._accept is None:
            await stream.reset()
            return
        await self._accept(src, stream)

    async def open_stream(self, peer: str, addr: str) -> RaftStream:
        return await self._network._connect(self._self_id, peer)

    async def forget_connection(self, peer: str) -> None:
        """Pipes are per stream here: there is no shared connection to drop."""

    def stats(self) -> dict[str, int]:
        return {}
