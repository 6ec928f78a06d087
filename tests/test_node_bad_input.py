"""What a hostile or broken peer sends gets a typed error, changes no state, and the node lives."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import trio
from libp2p.custom_types import TProtocol

from node.client import Client
from node.p2p import connect, running_host
from node.rpc_server import RPC_PROTOCOL_ID
from protocol.envelope import seal
from protocol.framing import FrameDecoder, decode_replies, encode_frame, encode_requests
from protocol.identity import PrivateKey
from tests.conftest import Colony


class RawStream:
    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()
        self.replies: list[tuple[int, int, Any]] = []

    async def send(self, data: bytes) -> None:
        await self.stream.write(data)

    async def reply(self, timeout: float = 5) -> tuple[int, int, Any]:
        with trio.fail_after(timeout):
            while not self.replies:
                data = await self.stream.read(65536)
                assert data, "stream closed before a reply"
                for frame in self.decoder.feed(data):
                    self.replies.extend(decode_replies(frame))
        return self.replies.pop(0)

    async def closed(self, timeout: float = 5) -> bool:
        with trio.fail_after(timeout):
            try:
                while await self.stream.read(65536):
                    pass
            except Exception:
                pass
        return True


@asynccontextmanager
async def raw_stream(addr: str) -> AsyncIterator[RawStream]:
    async with running_host(PrivateKey.generate(), []) as host:
        peer = await connect(host, addr)
        stream = await host.new_stream(peer, [TProtocol(RPC_PROTOCOL_ID)])
        yield RawStream(stream)


def forge(key: PrivateKey, msgtype: str, body: object, audience: str) -> bytes:
    """An envelope that seal() would refuse to build, signed correctly."""
    payload = msgpack.packb(
        {"t": msgtype, "n": os.urandom(16), "x": now_ms() + 60_000, "a": audience, "b": body}
    )
    return msgpack.packb({"p": payload, "s": key.sign(payload)})


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def digest(colony: Colony) -> str:
    assert colony.node.replicator is not None
    return colony.node.replicator.machine.digest()


def submit_body(colony: Colony) -> dict:
    return {
        "spec": {
            "funcname": "echo",
            "conditions": {"colonyname": colony.name, "executortype": colony.executortype},
        }
    }


def with_args(colony: Colony, args: list) -> dict:
    body = submit_body(colony)
    body["spec"]["args"] = args
    return body


def with_kwargs(colony: Colony, kwargs: dict) -> dict:
    body = submit_body(colony)
    body["spec"]["kwargs"] = kwargs
    return body


async def cluster_id(colony: Colony) -> str:
    assert colony.node.replicator is not None
    return colony.node.replicator.machine.cluster_id


async def test_bad_envelopes_get_typed_errors_and_change_nothing(colony: Colony) -> None:
    audience = await cluster_id(colony)
    ex = colony.executor
    good = seal(ex, "submitfuncspecmsg", submit_body(colony), audience, now_ms())
    payload = msgpack.unpackb(good)["p"]
    sig = msgpack.unpackb(good)["s"]
    n = 2**256 - 432420386565659656852420866394968145599  # secp256k1 order
    r, s, v = sig[:32], int.from_bytes(sig[32:64], "big"), sig[64]
    high_s = r + (n - s).to_bytes(32, "big") + bytes([v ^ 1])
    tampered = bytearray(payload)
    tampered[-3] ^= 0x01
    cases: list[tuple[str, object, int]] = [
        ("not msgpack", b"\xc1\xc1\xc1", 400),
        ("not bytes", 12345, 400),
        ("wrong shape", msgpack.packb({"x": 1}), 400),
        ("unknown type", forge(ex, "dropdatabasemsg", {}, audience), 400),
        ("missing field", seal(ex, "submitfuncspecmsg", {}, audience, now_ms()), 400),
        ("body not a map", forge(ex, "getprocessmsg", [1, 2], audience), 400),
        (
            "ill-typed field",
            seal(ex, "getprocessmsg", {"processid": 7}, audience, now_ms()),
            400,
        ),
        ("bad signature", msgpack.packb({"p": payload, "s": b"\x00" * 65}), 403),
        ("short signature", msgpack.packb({"p": payload, "s": sig[:10]}), 403),
        ("high-S signature", msgpack.packb({"p": payload, "s": high_s}), 403),
        ("expired", seal(ex, "submitfuncspecmsg", submit_body(colony), audience, now_ms() - 120_000), 403),
        ("wrong audience", seal(ex, "submitfuncspecmsg", submit_body(colony), "ab" * 32, now_ms()), 403),
        ("stranger", seal(PrivateKey.generate(), "submitfuncspecmsg", submit_body(colony), audience, now_ms()), 403),
        ("NaN in args", seal(ex, "submitfuncspecmsg", with_args(colony, [float("nan")]), audience, now_ms()), 400),
        ("Infinity in kwargs", seal(ex, "submitfuncspecmsg", with_kwargs(colony, {"x": [float("inf")]}), audience, now_ms()), 400),
        ("-Infinity in env", seal(ex, "submitfuncspecmsg", with_args(colony, [{"deep": [-float("inf")]}]), audience, now_ms()), 400),
    ]
    before = await digest(colony)
    async with raw_stream(colony.addr) as raw:
        for i, (what, envelope, status) in enumerate(cases, start=1):
            await raw.send(encode_frame(msgpack.packb([[i, envelope]])))
            rid, got, message = await raw.reply()
            assert (rid, got) == (i, status), f"{what}: {got} {message}"
            assert isinstance(message, str) and message, what
            if what.startswith(("NaN", "Infinity", "-Infinity")):
                assert "NaN and Infinity are not allowed" in message, message
        # A tampered payload either fails recovery or yields a stranger: refused either way.
        await raw.send(encode_requests([(99, msgpack.packb({"p": bytes(tampered), "s": sig}))]))
        rid, got, _ = await raw.reply()
        assert rid == 99 and got in (400, 403)
    assert await digest(colony) == before


async def test_replayed_write_is_refused(colony: Colony) -> None:
    audience = await cluster_id(colony)
    envelope = seal(colony.executor, "submitfuncspecmsg", submit_body(colony), audience, now_ms())
    async with raw_stream(colony.addr) as raw:
        await raw.send(encode_requests([(1, envelope)]))
        assert (await raw.reply())[1] == 200
        after_first = await digest(colony)
        await raw.send(encode_requests([(2, envelope)]))
        rid, status, message = await raw.reply()
        assert (rid, status) == (2, 403) and "replay" in message.lower()
    assert await digest(colony) == after_first


async def test_broken_frames(colony: Colony) -> None:
    before = await digest(colony)
    # A frame body that is not a request list: answered, the stream keeps working.
    async with raw_stream(colony.addr) as raw:
        await raw.send(encode_frame(b"\x93\x01\x02"))
        rid, status, _ = await raw.reply()
        assert (rid, status) == (0, 400)
        await raw.send(encode_frame(os.urandom(64)))
        assert (await raw.reply())[1] == 400
        info = seal(colony.executor, "getserverinfomsg", {}, "*", now_ms())
        await raw.send(encode_requests([(5, info)]))
        assert (await raw.reply())[:2] == (5, 200)
    # A declared length over the maximum: refused and the stream is closed.
    async with raw_stream(colony.addr) as raw:
        await raw.send((2**31).to_bytes(4, "big") + b"x" * 16)
        rid, status, _ = await raw.reply()
        assert (rid, status) == (0, 400)
        assert await raw.closed()
    # A truncated frame followed by a hang-up: nothing happens.
    async with raw_stream(colony.addr) as raw:
        await raw.send((100).to_bytes(4, "big") + b"abc")
    assert await digest(colony) == before
    # And the node still serves.
    async with Client.connect(colony.addr, colony.executor) as c:
        p = await c.submit("echo", colonyname="dev", executortype=colony.executortype)
        assert p["processid"]
