"""A client's long-lived, pipelined RPC stream to one node.

Many callers (several executors in one process, say) share one connection: each call gets a
request id, the writer drains whatever is queued into one frame (up to 16 envelopes, never
waiting to fill one), and the reader matches replies to calls by id.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol

from node.p2p import connect, make_host, quiet_libp2p_logs
from node.rpc_server import READ_SIZE, RPC_PROTOCOL_ID
from protocol.errors import ColoniesError, RequestTimeout, Unavailable, error_from_wire
from protocol.framing import (
    MAX_REPLY_FRAME_BYTES,
    TARGET_ENVELOPES_PER_FRAME,
    TARGET_FRAME_BYTES,
    FrameDecoder,
    decode_replies,
    encode_requests,
)
from protocol.identity import PrivateKey

log = logging.getLogger("colonies.client")


class ConnectionLost(Unavailable):
    """The connection to the node ended; `sent` tells whether the request may have left."""

    def __init__(self, addr: str, sent: bool) -> None:
        super().__init__(f"connection to {addr} lost")
        self.addr = addr
        self.sent = sent


class NoReply(RequestTimeout):
    """The node sent no reply within the caller's bound: it may be hung or paused (SIGSTOP)."""


@dataclass
class _Pending:
    done: trio.Event = field(default_factory=trio.Event)
    status: int = 0
    value: Any = None
    lost: bool = False


class Connection:
    """Open with `await Connection.open(addr)`; use inside the nursery that owns it."""

    def __init__(self, addr: str) -> None:
        self.addr = addr
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._send, self._recv = trio.open_memory_channel[tuple[int, bytes]](4096)
        self._host: IHost | None = None
        self._stream: Any = None
        self._broken = False
        self._cancel = trio.CancelScope()
        self.closed = trio.Event()

    @classmethod
    async def open(cls, nursery: trio.Nursery, addr: str, timeout: float = 10.0) -> Connection:
        conn = cls(addr)
        try:
            await nursery.start(conn._run, timeout)
        except BaseExceptionGroup as group:
            # The libp2p host runs a nursery of its own, so a failed dial arrives wrapped;
            # callers (failover across members) act on the error itself.
            errors = [e for e in leaves(group) if isinstance(e, ColoniesError)]
            if errors:
                raise errors[0] from None
            raise
        return conn

    async def _run(self, timeout: float, task_status: trio.TaskStatus[None]) -> None:
        quiet_libp2p_logs()
        # The transport identity is throwaway: calls are authenticated by their signatures.
        host = make_host(PrivateKey.from_hex(os.urandom(32).hex()))
        self._host = host
        with self._cancel:
            try:
                async with host.run(listen_addrs=[]):
                    peer = await connect(host, self.addr, timeout)
                    try:
                        with trio.fail_after(timeout):
                            self._stream = await host.new_stream(peer, [TProtocol(RPC_PROTOCOL_ID)])
                    except Exception as e:
                        raise Unavailable(f"cannot open an RPC stream to {self.addr}: {e}") from None
                    task_status.started()
                    try:
                        async with trio.open_nursery() as n:
                            n.start_soon(self._writer)
                            await self._reader()
                            n.cancel_scope.cancel()
                    except Exception as e:  # a broken stream fails the pending calls only
                        log.debug("connection to %s ended: %r", self.addr, e)
            finally:
                self._fail_all()
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    try:
                        await host.close()
                    except Exception:
                        pass
                self.closed.set()

    @property
    def broken(self) -> bool:
        return self._broken

    def abandon(self) -> None:
        """Count this connection as broken: the next call through the client's link closes it
        and moves to the next member (calls still in flight on it end when it is closed)."""
        self._broken = True

    def _fail_all(self) -> None:
        self._broken = True
        for p in self._pending.values():
            p.lost = True
            p.done.set()
        self._pending.clear()

    async def _writer(self) -> None:
        async for first in self._recv:
            items = [first]
            size = len(first[1])
            while len(items) < TARGET_ENVELOPES_PER_FRAME and size < TARGET_FRAME_BYTES:
                try:
                    item = self._recv.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                items.append(item)
                size += len(item[1])
            await self._stream.write(encode_requests(items))

    async def _reader(self) -> None:
        decoder = FrameDecoder(MAX_REPLY_FRAME_BYTES)
        while True:
            try:
                data = await self._stream.read(READ_SIZE)
            except Exception:
                return
            if not data:
                return
            for frame in decoder.feed(data):
                for request_id, status, value in decode_replies(frame):
                    p = self._pending.pop(request_id, None)
                    if p is None:
                        if request_id == 0:  # a frame-level refusal from the node
                            log.warning("node refused a frame: %s %s", status, value)
                        continue
                    p.status, p.value = status, value
                    p.done.set()

    async def call(self, envelope: bytes, timeout: float) -> Any:
        if self._broken:
            raise ConnectionLost(self.addr, sent=False)
        request_id = next(self._ids) & 0xFFFFFFFF
        pending = _Pending()
        self._pending[request_id] = pending
        try:
            await self._send.send((request_id, envelope))
            with trio.fail_after(timeout):
                await pending.done.wait()
        except trio.TooSlowError:
            self._pending.pop(request_id, None)
            raise NoReply(f"no reply from {self.addr} within {timeout:g} s") from None
        if pending.lost:
            raise ConnectionLost(self.addr, sent=True)
        if pending.status != 200:
            raise error_from_wire(pending.status, str(pending.value))
        return pending.value

    async def aclose(self) -> None:
        self._cancel.cancel()
        await self.closed.wait()


def leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out
