"""The RPC service: long-lived libp2p streams carrying frames of signed envelopes.

Per stream, a reader decodes frames and starts one task per request (bounded), and a writer
drains every queued reply into one frame and one write, since each libp2p write costs far
more than the bytes in it. Nothing a peer sends can end the node: every request ends in a
reply, typed errors included, and a stream that breaks the framing is answered and closed.
"""

from __future__ import annotations

import logging
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
# Long enough for the longest long-poll plus commit; the dispatcher bounds calls itself.
REPLY_QUEUE = 1024

Handler = Callable[[Request], Awaitable[Any]]


class RpcServer:
    def __init__(self, handler: Handler, audience: Callable[[], str]) -> None:
        self.handler = handler
        self.audience = audience
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
        while True:
            try:
                data = await stream.read(READ_SIZE)
            except Exception as e:
                log.debug("read ended: %r", e)
                return  # EOF or reset: the peer is gone
            if not data:
                return
            try:
                frames = decoder.feed(data)
            except FrameTooLarge as e:
                await replies.send((0, e.status, e.message))
                return
            except MalformedFrame as e:
                await replies.send((0, e.status, e.message))
                return
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
                    nursery.start_soon(self._serve, request_id, envelope, replies, limiter, token)

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
