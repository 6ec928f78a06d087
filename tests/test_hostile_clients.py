"""A node under hostile load on 127.0.0.1: connections come and go without using up slots,
limits are concurrent, a connection cannot open streams or buffer bytes without bound, and
memory stays flat (node/libp2p_patches.py, node/rpc_server.py)."""

from __future__ import annotations

import logging
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from libp2p.custom_types import TProtocol
from libp2p.stream_muxer.yamux.yamux import TYPE_DATA, YAMUX_HEADER_FORMAT

from node import rpc_server
from node.client import Client
from node.daemon import ColonyNode, NodeConfig
from node.libp2p_patches import MAX_WINDOW_BYTES, ConnectionLimits
from node.p2p import connect, running_host
from node.rpc_server import RPC_PROTOCOL_ID
from protocol.framing import MAX_FRAME_BYTES
from protocol.identity import PrivateKey
from tests.conftest import vector_key
from tests.raft_harness import wait_until


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@asynccontextmanager
async def a_node(tmp_path: Path, **config: object) -> AsyncIterator[ColonyNode]:
    node = ColonyNode(
        NodeConfig(data_dir=tmp_path / "n", server_prvkey=vector_key("server").hex, **config)
    )
    async with trio.open_nursery() as n:
        await n.start(node.run)
        yield node
        node.stop()


async def still_serves(node: ColonyNode) -> None:
    async with Client.connect(node.addrs[0], vector_key("server"), timeout=5) as c:
        assert (await c.server_info_fresh())["peerid"] == node.peer_id


async def test_hundreds_of_connections_come_and_go_without_using_up_slots(tmp_path) -> None:
    """py-libp2p 0.8.1 kept a slot per inbound connection until the swarm stopped: a node
    refused everyone after about 250 connections in its lifetime."""
    async with a_node(tmp_path) as node:
        done = 0

        async def churn(cycles: int) -> None:
            nonlocal done
            async with running_host(PrivateKey.generate(), []) as host:
                for _ in range(cycles):
                    with trio.fail_after(10):
                        peer = await connect(host, node.addrs[0])
                        await host.get_network().close_peer(peer)
                    done += 1

        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, node.limits.clients)
                await trio.sleep(0.01)

        async with trio.open_nursery() as n:
            n.start_soon(watch)
            async with trio.open_nursery() as churners:
                for _ in range(15):
                    churners.start_soon(churn, 20)
            n.cancel_scope.cancel()
        assert done == 300 and peak > 0  # each held a client slot while it lived
        await wait_until(lambda: node.limits.clients == 0, 10, "every client slot back")
        assert node.limits.refused["clients"] == node.limits.refused["handshakes"] == 0
        await still_serves(node)


async def test_the_client_limit_is_concurrent_and_spares_members(tmp_path) -> None:
    member = PrivateKey.generate()
    async with a_node(tmp_path, max_client_connections=3) as node:
        member_id = (await _peer_of(member))
        node.limits.is_member = lambda peer: peer == member_id
        async with running_host(PrivateKey.generate(), []) as a, running_host(
            PrivateKey.generate(), []
        ) as b, running_host(PrivateKey.generate(), []) as c, running_host(
            PrivateKey.generate(), []
        ) as d, running_host(member, []) as m:
            for host in (a, b, c):
                await connect(host, node.addrs[0])
            await wait_until(lambda: node.limits.clients == 3, 5, "three clients")
            await connect(d, node.addrs[0])  # the handshake succeeds, then it is closed
            await wait_until(lambda: node.limits.refused["clients"] == 1, 5, "a refusal")
            await connect(m, node.addrs[0])  # a member always gets in
            await wait_until(lambda: node.limits.members == 1, 5, "the member")
            await a.get_network().close_peer(a.get_network().connections and
                                             next(iter(a.get_network().connections)))
            await wait_until(lambda: node.limits.clients == 2, 5, "a freed slot")
        await still_serves(node)  # a slot freed by a closed connection is usable again


async def _peer_of(key: PrivateKey) -> str:
    from node.p2p import peer_id_of

    return peer_id_of(key).to_string()


async def test_a_connection_cannot_open_streams_or_hold_frames_without_bound(
    tmp_path, monkeypatch, caplog
) -> None:
    """The issue's flood: one unauthenticated connection opening 150 streams, each starting a
    3 MB frame. Frames over the limit are refused on their header, streams past the cap are
    reset, partial frames count against the node's budget and time out, memory stays flat."""
    monkeypatch.setattr(rpc_server, "FRAME_TIMEOUT_S", 2.0)
    caplog.set_level(logging.ERROR)
    async with a_node(tmp_path) as node:
        assert node.rpc is not None
        node.rpc.budget.limit = 8 * 1024 * 1024
        before = rss_mb()
        async with running_host(PrivateKey.generate(), []) as host:
            peer = await connect(host, node.addrs[0])
            opened, refused = [], 0
            for i in range(150):
                try:
                    with trio.fail_after(5):
                        s = await host.new_stream(peer, [TProtocol(RPC_PROTOCOL_ID)])
                        size = 3_000_000 if i % 2 else MAX_FRAME_BYTES - 10
                        await s.write(struct.pack(">I", size) + b"x" * 200_000)
                    opened.append(s)
                except Exception:
                    refused += 1
            await trio.sleep(0.5)
            limits = node.limits
            assert limits.refused["streams"] > 0 or refused > 0
            assert node.rpc.budget.used <= node.rpc.budget.limit + 16 * 65536
            # Partial frames time out and give the budget back.
            await wait_until(lambda: node.rpc.budget.used == 0, 10, "the budget back")
            assert node.rpc.budget.timed_out_frames > 0
            for s in opened:
                with trio.move_on_after(0.2):
                    try:
                        await s.reset()
                    except Exception:
                        pass
        assert rss_mb() - before < 60, f"RSS grew by {rss_mb() - before:.0f} MB"
        await still_serves(node)


async def test_a_spent_budget_refuses_new_streams(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(rpc_server, "FRAME_TIMEOUT_S", 1.0)
    async with a_node(tmp_path) as node:
        assert node.rpc is not None
        node.rpc.budget.limit = 1  # spent by the first partial frame
        async with running_host(PrivateKey.generate(), []) as host:
            peer = await connect(host, node.addrs[0])
            s = await host.new_stream(peer, [TProtocol(RPC_PROTOCOL_ID)])
            await s.write(struct.pack(">I", 1000) + b"x" * 10)
            await wait_until(lambda: node.rpc.budget.spent, 5, "a spent budget")
            try:
                late = await host.new_stream(peer, [TProtocol(RPC_PROTOCOL_ID)])
                await late.write(b"\x00\x00\x00\x01\xc0")
            except Exception:
                pass  # reset by the node: what is tested
            await wait_until(lambda: node.rpc.budget.refused_streams == 1, 5, "a refusal")
            await s.reset()
        # A stream waiting for room reads nothing, so it learns of the reset at its frame's
        # deadline at the latest.
        await wait_until(lambda: not node.rpc.budget.spent, 5, "the budget back")
        await still_serves(node)


async def test_a_peer_that_ignores_the_yamux_window_is_cut_off(tmp_path, caplog) -> None:
    """libp2p's yamux buffered whatever a peer sent past its window; now the connection is
    closed, as go-yamux does."""
    caplog.set_level(logging.CRITICAL)
    async with running_host(PrivateKey.generate(), ["/ip4/127.0.0.1/tcp/0"]) as server:
        held = trio.Event()

        async def never_reads(stream: object) -> None:
            await held.wait()

        server.set_stream_handler(TProtocol("/test/stall/1"), never_reads)
        addr = f"{server.get_addrs()[0]}/p2p/{server.get_id().to_string()}"
        async with running_host(PrivateKey.generate(), []) as client:
            peer = await connect(client, addr)
            stream = await client.new_stream(peer, [TProtocol("/test/stall/1")])
            muxed = stream.muxed_conn
            sid = stream.muxed_stream.stream_id
            chunk = b"z" * 65536
            header = struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_DATA, 0, sid, len(chunk))
            try:
                for _ in range(MAX_WINDOW_BYTES // len(chunk) + 4):  # past any window
                    await muxed.secured_conn.write(header + chunk)
            except Exception:
                pass  # cut off while still sending
            await wait_until(lambda: muxed.is_closed, 5, "the connection closed")
            assert muxed.is_closed
        limits: ConnectionLimits = server.get_network()._colonies_limits
        assert limits.refused["window"] + limits.refused["buffered"] >= 1
        assert limits.buffered == 0
        held.set()


class _Stream:
    async def reset(self) -> None:
        pass


async def test_refused_raft_streams_log_by_time_not_by_claimed_identity(caplog) -> None:
    """Each stranger used to get its own log line and an entry in a table that never shrank."""
    from node.memory_transport import MemoryNetwork

    transport = MemoryNetwork().transport("member-a", {})
    caplog.set_level(logging.WARNING, "colonies.raft.transport")
    for i in range(1000):
        await transport._accept(f"stranger-{i}", _Stream())  # type: ignore[arg-type]
    refusals = [r for r in caplog.records if "non-member" in r.getMessage()]
    assert len(refusals) == 1 and transport.counters["inbound_refused"] == 1000
    assert len(transport._warn._last) <= 1 and len(transport._warn._skipped) <= 1
    transport._warn._last["refused"] -= transport._warn.period  # the period has passed
    await transport._accept("stranger-x", _Stream())  # type: ignore[arg-type]
    assert "and 999 more like it" in caplog.records[-1].getMessage()
