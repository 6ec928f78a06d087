"""Fault injection for chaos runs, as a wrapper around a Raft stream layer.

``FaultyStreamLayer`` wraps the layer a ``RaftTransport`` gets its streams from and obeys the
plan of a ``FaultFile`` (``colonyd --fault-file``, see ``node/faults.py``):

* a partition (``block``): dials to and streams from blocked peers are refused, and streams
  already open with a peer that becomes blocked are cut;
* lost messages (``drop``): each frame a writer sends is lost with the plan's probability, but
  never a heartbeat (the session would only look hung); snapshot chunks are lost too, and
  sent again (node/snapshot_transfer.py);
* a slow link (``delay_ms``): each read waits that long before delivery, in order (latency,
  and a cap on throughput as a congested link has).

Without a fault file the transport gets the bare layer and no fault code runs.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from node.faults import FaultFile, FaultPlan
from node.raft_codec import HEARTBEAT, RAFT_MAX_FRAME_BYTES
from node.raft_transport import AcceptStream, RaftStream, StreamLayer
from protocol.framing import FrameDecoder, encode_frame

log = logging.getLogger("colonies.faults")


class FaultyStream:
    """A stream to ``peer`` that loses, delays and cuts what the plan says."""

    def __init__(self, layer: FaultyStreamLayer, peer: str, inner: RaftStream) -> None:
        self.peer = peer
        self._layer = layer
        self._inner = inner
        self._decoder = FrameDecoder(RAFT_MAX_FRAME_BYTES)
        self._reading = trio.CancelScope()
        self.cut = False

    async def read(self, n: int = 65536) -> bytes:
        self._check()
        data = b""
        self._reading = trio.CancelScope()
        with self._reading:
            data = await self._inner.read(n)
        self._check()
        delay = self._layer.faults.delay_s
        if data and delay > 0:
            await trio.sleep(delay)
        return data

    async def write(self, data: bytes) -> None:
        self._check()
        kept = [
            encode_frame(body)
            for body in self._decoder.feed(data)
            if not self._layer.loses(body)
        ]
        if kept:
            await self._inner.write(b"".join(kept))
        else:
            await trio.lowlevel.checkpoint()

    async def reset(self) -> None:
        self._layer.forget_stream(self)
        await self._inner.reset()

    def cut_off(self) -> None:
        """The peer became blocked: the next (or a waiting) read or write fails."""
        self.cut = True
        self._reading.cancel()

    def _check(self) -> None:
        if self.cut:
            raise ConnectionResetError(f"raft stream to {self.peer} cut by the fault plan")


class FaultyStreamLayer:
    def __init__(self, inner: StreamLayer, faults: FaultFile) -> None:
        self.inner = inner
        self.faults = faults
        self._streams: set[FaultyStream] = set()
        self.counters = {"fault_refused": 0, "fault_dropped": 0, "fault_cut": 0}
        faults.listeners.append(self._on_plan)

    def loses(self, body: bytes) -> bool:
        if body == HEARTBEAT or not self.faults.drops():
            return False
        self.counters["fault_dropped"] += 1
        return True

    def check_addr(self, peer: str, addr: str) -> str | None:
        return self.inner.check_addr(peer, addr)

    def listen(self, accept: AcceptStream) -> None:
        async def accept_unless_blocked(peer: str, stream: RaftStream) -> None:
            if self.faults.blocks(peer):
                self.counters["fault_refused"] += 1
                try:
                    await stream.reset()
                except Exception:
                    pass
                return
            await accept(peer, self._wrap(peer, stream))

        self.inner.listen(accept_unless_blocked)

    def stop_listening(self) -> None:
        self.inner.stop_listening()

    async def open_stream(self, peer: str, addr: str) -> RaftStream:
        if self.faults.blocks(peer):
            self.counters["fault_refused"] += 1
            raise ConnectionRefusedError(f"{peer} is cut off by the fault plan")
        return self._wrap(peer, await self.inner.open_stream(peer, addr))

    async def forget_connection(self, peer: str) -> None:
        await self.inner.forget_connection(peer)

    def stats(self) -> dict[str, int]:
        return {**self.inner.stats(), **self.counters}

    def forget_stream(self, stream: FaultyStream) -> None:
        self._streams.discard(stream)

    def _wrap(self, peer: str, stream: Any) -> FaultyStream:
        wrapped = FaultyStream(self, peer, stream)
        self._streams.add(wrapped)
        return wrapped

    def _on_plan(self, plan: FaultPlan) -> None:
        for stream in list(self._streams):
            if stream.peer in plan.block and not stream.cut:
                self.counters["fault_cut"] += 1
                stream.cut_off()
