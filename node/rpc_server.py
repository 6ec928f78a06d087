"""The RPC service: long-lived libp2p streams carrying frames of signed envelopes.

Per stream, a reader decodes frames and starts one task per request (bounded), and a writer
drains every queued reply into one frame and one write, since each libp2p write costs far
more than the bytes in it. Nothing a peer sends can end the node: every request ends in a
reply, typed errors included, and a stream that breaks the framing is answered and closed.

Bytes that arrive before anything in them is authenticated (the part of a frame received so
far; its envelopes are verified once it is whole) count against one node-wide budget,
``PREAUTH_BUDGET_BYTES``. A stream whose partial frame would take more than what is left
stops reading (yamux flow control then holds the sender back), new streams are refused while
the budget is spent, and a frame must arrive whole within ``FRAME_TIMEOUT_S`` of its first
byte, so a peer that starts frames and never finishes them cannot hold the budget for long.
Connections, streams per connection and libp2p's own buffers have their limits in
``node/libp2p_patches.py``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from protocol.envelope import Request, open_envelope
from protocol.errors import ColoniesError, FrameTooLarge, MalformedFrame, Unavailable
from protocol.framing import (
    MAX_ENVELOPES_PER_FRAME,
    TARGET_FRAME_BYTES,
    FrameDecoder,
    decode_requests,
    encode_replies,
)

log = logging.getLogger("colonies.rpc")

RPC_PROTOCOL_ID = "/colonies/rpc/1.0.0"
MAX_IN_FLIGHT_PER_STREAM = 256
READ_SIZE = 65536
PREAUTH_BUDGET_BYTES = 64 * 1024 * 1024
FRAME_TIMEOUT_S = 30.0
# Long enough for the longest long-poll plus commit; the dispatcher bounds calls itself.
REPLY_QUEUE = 1024

Handler = Callable[[Request], Awaitable[Any]]


class PreAuthBudget:
    """Bytes of partial frames held by all RPC streams of a node (see the module doc)."""

    def __init__(self, limit: int = PREAUTH_BUDGET_BYTES) -> None:
        self.limit = limit
        self.used = 0
        self.refused_streams = 0
        self.timed_out_frames = 0
        self._freed = trio.lowlevel.ParkingLot()

    @property
    def spent(self) -> bool:
        return self.used >= self.limit

    def set_held(self, held: int, now_held: int) -> None:
        """A stream that held ``held`` bytes now holds ``now_held``."""
        self.used += now_held - held
        if now_held < held:
            self._freed.unpark_all()

    async def wait_for_room(self, deadline: float) -> None:
        with trio.move_on_at(deadline):
            while self.spent:
                await self._freed.park()


class RpcServer:
    def __init__(
        self, handler: Handler, audience: Callable[[], str], budget: PreAuthBudget | None = None
    ) -> None:
        self.handler = handler
        self.audience = audience
        self.budget = budget or PreAuthBudget()
        self.stopping = False
        self.in_flight = 0
        self._idle = trio.Event()
        self._idle.set()
        self.requests_total = 0
        self.latency: Callable[[str, int, float], None] | None = None

    async def drain(self, timeout: float) -> None:
        """Refuse new requests and wait (bounded) for the ones in flight to be answered."""
        self.stopping = True
        with trio.move_on_after(timeout):
            await self._idle.wait()

    async def handle_stream(self, stream: Any) -> None:
        if self.budget.spent:
            self.budget.refused_streams += 1
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await stream.reset()
                except Exception:
                    pass
            return
        replies_send, replies_recv = trio.open_memory_channel[tuple[int, int, Any]](REPLY_QUEUE)
        limiter = trio.CapacityLimiter(MAX_IN_FLIGHT_PER_STREAM)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, stream, replies_recv)
                async with replies_send:
                    await self._reader(stream, nursery, replies_send, limiter)
        except Exception as e:  # a broken stream ends that stream, never the node
            log.debug("stream ended: %r", e)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await stream.close()
                except Exception:
                    pass

    async def _reader(
        self,
        stream: Any,
        nursery: trio.Nursery,
        replies: trio.MemorySendChannel[tuple[int, int, Any]],
        limiter: trio.CapacityLimiter,
    ) -> None:
        decoder = FrameDecoder()
        budget = self.budget
        held = 0  # bytes of the partial frame this stream holds in the budget
        frame_deadline = math.inf  # when the partial frame must be whole
        try:
            while True:
                if held and budget.spent:
                    await budget.wait_for_room(frame_deadline)
                with trio.move_on_at(frame_deadline):
                    try:
                        data = await stream.read(READ_SIZE)
                    except Exception as e:
                        log.debug("read ended: %r", e)
                        return  # EOF or reset: the peer is gone
                if trio.current_time() >= frame_deadline:
                    budget.timed_out_frames += 1
                    await replies.send((0, 408, f"a frame did not arrive whole within "
                                                f"{FRAME_TIMEOUT_S:g} s of its first byte"))
                    return
                if not data:
                    return
                try:
                    frames = decoder.feed(data)
                except (FrameTooLarge, MalformedFrame) as e:
                    await replies.send((0, e.status, e.message))
                    return
                budget.set_held(held, decoder.pending)
                if decoder.pending and (frames or not held):
                    frame_deadline = trio.current_time() + FRAME_TIMEOUT_S
                elif not decoder.pending:
                    frame_deadline = math.inf
                held = decoder.pending
                for frame in frames:
                    try:
                        items = decode_requests(frame)
                    except MalformedFrame as e:
                        await replies.send((0, e.status, e.message))
                        continue
                    for request_id, envelope in items:
                        token = object()  # request ids come from the peer and may repeat
                        await limiter.acquire_on_behalf_of(token)
                        self._enter()
                        nursery.start_soon(
                            self._serve, request_id, envelope, replies, limiter, token
                        )
        finally:
            budget.set_held(held, 0)

    def _enter(self) -> None:
        self.in_flight += 1
        if self._idle.is_set():
            self._idle = trio.Event()

    def _leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def _serve(
        self,
        request_id: int,
        envelope: object,
        replies: trio.MemorySendChannel[tuple[int, int, Any]],
        limiter: trio.CapacityLimiter,
        token: object,
    ) -> None:
        started = time.perf_counter()
        msgtype = "invalid"
        try:
            if self.stopping:
                raise Unavailable("node is shutting down; retry on another node")
            req = open_envelope(envelope, self.audience(), time.time_ns() // 1_000_000)
            msgtype = req.msgtype
            result = await self.handler(req)
            reply = (request_id, 200, result)
        except ColoniesError as e:
            reply = (request_id, e.status, e.message)
        except Exception:
            log.exception("internal error serving %s", msgtype)
            reply = (request_id, 500, "internal error")
        finally:
            limiter.release_on_behalf_of(token)
        self.requests_total += 1
        if self.latency is not None:
            self.latency(msgtype, reply[1], time.perf_counter() - started)
        try:
            await replies.send(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the stream closed while we worked
        finally:
            self._leave()

    async def _writer(
        self, stream: Any, replies: trio.MemoryReceiveChannel[tuple[int, int, Any]]
    ) -> None:
        async for first in replies:
            batch = [first]
            size = 0
            while len(batch) < MAX_ENVELOPES_PER_FRAME and size < TARGET_FRAME_BYTES:
                try:
                    batch.append(replies.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                size += 64  # replies are small; this only caps very long bursts
            await stream.write(encode_replies(batch))
