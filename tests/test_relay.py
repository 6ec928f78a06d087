"""Followers relay their write batches to the leader, which packs the whole cluster's writes
into its own log entries (node/replicator.py, "Relays")."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
import trio
from pysyncobj import FAIL_REASON

from node.raft_codec import RaftMessageRefused, decode_raft_message
from node.raft_replica import RaftTimeouts
from node.replicator import (
    MAX_RELAYS_IN_FLIGHT,
    RELAY_RESEND_S,
    batch_sources,
    failure_error,
    pack_batch,
)
from protocol.errors import Unavailable
from tests.raft_harness import converged, wait_until
from tests.test_raft_cluster_memory import cluster


def _relay(**fields: Any) -> bytes:
    return msgpack.packb({"type": "relay", **fields}, use_bin_type=True)


def test_relay_messages_are_validated() -> None:
    ok = decode_raft_message(_relay(cmds=[b"\x80"], tokens=[7], ttl_ms=1000))
    assert ok == {"type": "relay", "cmds": [b"\x80"], "tokens": [7], "ttl_ms": 1000}
    bad = [
        _relay(cmds=[b"\x80", b"\x80"], tokens=[7], ttl_ms=1000),  # a token per command
        _relay(cmds=["text"], tokens=[7], ttl_ms=1000),
        _relay(cmds=[], tokens=[], ttl_ms=1000),
        _relay(cmds=[b"\x80"], tokens=[-1], ttl_ms=1000),
        _relay(cmds=[b"\x80"], tokens=[7]),
        msgpack.packb({"type": "relay_refused", "tokens": [7]}),
    ]
    for body in bad:
        with pytest.raises(RaftMessageRefused):
            decode_raft_message(body)


def test_sources_ride_along_in_the_entry() -> None:
    cmds = [msgpack.packb({"n": 1}), msgpack.packb({"n": 2})]
    plain = pack_batch(5, cmds)
    assert plain == msgpack.packb({"now": 5, "cmds": [{"n": 1}, {"n": 2}]})
    assert batch_sources(plain) == []
    tagged = pack_batch(5, cmds, [None, ["n2", 9]])
    assert msgpack.unpackb(tagged)["cmds"] == [{"n": 1}, {"n": 2}]
    assert batch_sources(tagged) == [None, ["n2", 9]]
    assert batch_sources(b"\xc1") == []


async def test_follower_writes_go_to_the_leader_as_relays(tmp_path) -> None:
    async with cluster(tmp_path) as c:
        leader = await c.leader()
        followers = [n for n in c.live() if n is not leader]
        sent: list[str] = []
        for f in followers:
            send = f.transport.send

            def spy(node: Any, message: Any, send: Any = send) -> bool:
                sent.append(message["type"])
                return send(node, message)

            f.transport.send = spy  # type: ignore[method-assign]
        results: dict[int, list[Any]] = {}

        async def put(i: int) -> None:
            results[i] = await followers[i % 2].put(i)

        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(put, i)
        assert all(results[i] == [200, {"n": i, "seq": results[i][1]["seq"]}] for i in range(40))
        assert sorted(r[1]["seq"] for r in results.values()) == list(range(1, 41))
        # No PySyncObj forwarding (an entry per forwarded batch): the leader packed them.
        assert "apply_command" not in sent
        assert leader.colony.log_end_index < 40
        await wait_until(lambda: converged(c.live(), 40), 5, "replicas to converge")
        assert all(f.replicator.status()["relayed"] == 0 for f in followers)


async def test_a_relay_to_a_follower_is_refused(tmp_path) -> None:
    async with cluster(tmp_path) as c:
        leader = await c.leader()
        a, b = [n for n in c.live() if n is not leader]
        got: list[tuple[str, dict[str, Any]]] = []
        a.transport.set_relay_handler(lambda peer, msg: got.append((peer, msg)))
        cmd = msgpack.packb({"n": "x"})
        assert a.transport.send_to(b.id, {"type": "relay", "cmds": [cmd], "tokens": [7],
                                              "ttl_ms": 1000})
        await wait_until(lambda: bool(got), 5, "the refusal")
        assert got == [(b.id, {"type": "relay_refused", "tokens": [7],
                               "reason": FAIL_REASON.NOT_LEADER})]
        assert "x" not in leader.machine.values()


async def test_relays_outstanding_when_the_leader_changes_fail_with_503(tmp_path) -> None:
    async with cluster(tmp_path) as c:
        old = await c.leader()
        follower = next(n for n in c.live() if n is not old)
        # The relay vanishes with the old leader; the follower learns of the new one.
        c.network.isolate(old.id, silent=True)
        with trio.fail_after(4):
            with pytest.raises(Unavailable, match="may or may not be applied"):
                await follower.put("lost?", timeout=8)
        c.network.heal()


async def test_one_append_entries_per_entry_not_two(tmp_path) -> None:
    """Under load the leader holds a bare commit index for one tick so that the next entry
    carries it (node/raft_replica.py, _flush_append_entries)."""
    async with cluster(tmp_path) as c:
        leader = await c.leader()
        follower = next(n for n in c.live() if n is not leader)
        sent = 0
        send = leader.transport.send

        def spy(node: Any, message: Any) -> bool:
            nonlocal sent
            if message["type"] == "append_entries" and node.id == follower.id:
                sent += 1
            return send(node, message)

        leader.transport.send = spy  # type: ignore[method-assign]
        first = leader.colony.log_end_index

        c.network.set_faults(delay=(0.005, 0.005))  # commits take a while: writes queue up

        async def writer(k: int) -> None:
            await trio.sleep(k * 0.002)  # staggered: some write while others' entry commits
            for i in range(5):
                assert (await leader.put(k * 100 + i))[0] == 200

        async with trio.open_nursery() as nursery:
            for k in range(10):
                nursery.start_soon(writer, k)
        entries = leader.colony.log_end_index - first
        assert entries >= 5
        # Two per entry (one with it, one with its commit) without the coalescing.
        assert sent < 2 * entries, (sent, entries)


async def test_a_follower_keeps_several_relays_outstanding(tmp_path) -> None:
    """Its relays resolve only when the commit index of their entry arrives with the next
    append-entries; meanwhile it sends the writes queued since (up to the bound)."""
    async with cluster(tmp_path) as c:
        leader = await c.leader()
        follower = next(n for n in c.live() if n is not leader)
        outstanding: list[int] = []
        send_to = follower.transport.send_to

        def spy(peer: str, message: dict[str, Any]) -> bool:
            if message["type"] == "relay":
                outstanding.append(follower.replicator.status()["in_flight"])
            return send_to(peer, message)

        follower.transport.send_to = spy  # type: ignore[method-assign]
        c.network.set_faults(delay=(0.01, 0.01))

        async def writer(k: int) -> None:
            for i in range(4):
                await trio.sleep(0.003 * k)
                assert (await follower.put(k * 10 + i))[0] == 200

        async with trio.open_nursery() as nursery:
            for k in range(8):
                nursery.start_soon(writer, k)
        assert 1 < max(outstanding) <= MAX_RELAYS_IN_FLIGHT, outstanding
        c.network.set_faults()
        await wait_until(lambda: converged(c.live(), 32), 5, "replicas to converge")


async def test_a_lost_relay_is_sent_again_and_a_copy_is_applied_once(tmp_path) -> None:
    async with cluster(tmp_path) as c:
        leader = await c.leader()
        follower = next(n for n in c.live() if n is not leader)
        send_to = follower.transport.send_to
        calls = 0

        def lossy_then_doubled(peer: str, message: dict[str, Any]) -> bool:
            nonlocal calls
            calls += 1
            if calls == 1:
                return True  # lost on the way
            send_to(peer, message)
            return send_to(peer, message)  # and then delivered twice

        follower.transport.send_to = lossy_then_doubled  # type: ignore[method-assign]
        with trio.fail_after(RELAY_RESEND_S + 3):
            assert (await follower.put("once"))[0] == 200
        assert (await follower.put("twice?"))[0] == 200
        await wait_until(lambda: converged(c.live(), 2), 5, "replicas to converge")
        assert leader.machine.values() == ["once", "twice?"]


async def test_relays_are_sent_again_as_soon_as_a_new_session_is_up(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay lost with its session goes again when the session is back, not after the
    resend period (made far too long here to be what brings the write through)."""
    monkeypatch.setattr("node.replicator.RELAY_RESEND_S", 60.0)
    async with cluster(tmp_path) as c:
        leader = await c.leader()
        follower = next(n for n in c.live() if n is not leader)
        # No election while the follower redials (0.3-0.5 s): that would fail the relay
        # with "outcome unknown" instead, which is another test's subject.
        for node in c.live():
            node.colony.set_timeouts(RaftTimeouts(0.05, 5.0, 6.0))
        await trio.sleep(0.3)  # heartbeats carry the new election deadlines to the followers
        send_to = follower.transport.send_to
        lost: list[str] = []

        def lose_the_first(peer: str, message: dict[str, Any]) -> bool:
            if message["type"] == "relay" and not lost:
                lost.append(peer)
                return True  # as if queued on a session that then broke
            return send_to(peer, message)

        follower.transport.send_to = lose_the_first  # type: ignore[method-assign]

        async def blip() -> None:
            await wait_until(lambda: bool(lost), 5, "the relay")
            c.network.isolate(follower.id)  # its sessions break
            await trio.sleep(0.05)
            c.network.heal()

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(blip)
                assert (await follower.put("after the blip", timeout=10))[0] == 200
        assert lost == [leader.id]
        await wait_until(lambda: converged(c.live(), 1), 5, "replicas to converge")
        assert leader.machine.values() == ["after the blip"]


async def test_a_relay_with_a_malformed_command_is_refused_whole(tmp_path) -> None:
    async with cluster(tmp_path) as c:
        leader = await c.leader()
        follower = next(n for n in c.live() if n is not leader)
        got: list[dict[str, Any]] = []
        follower.transport.set_relay_handler(lambda peer, msg: got.append(msg))
        good = msgpack.packb({"n": "good"})
        for bad in (b"\x92", good + good, msgpack.packb([1, 2])):
            got.clear()
            follower.transport.send_to(
                leader.id, {"type": "relay", "cmds": [good, bad], "tokens": [1, 2], "ttl_ms": 500}
            )
            await wait_until(lambda: bool(got), 5, "the refusal")
            assert got == [{"type": "relay_refused", "tokens": [1, 2],
                            "reason": FAIL_REASON.REQUEST_DENIED}]
        assert "good" not in leader.machine.values()


def test_failures_say_whether_the_write_may_have_been_applied() -> None:
    for reason in (FAIL_REASON.LEADER_CHANGED, FAIL_REASON.UNKNOWN_OUTCOME):
        assert "may or may not be applied" in failure_error(reason).message
    for reason in (FAIL_REASON.QUEUE_FULL, FAIL_REASON.NOT_LEADER, FAIL_REASON.DISCARDED,
                   FAIL_REASON.MISSING_LEADER, FAIL_REASON.REQUEST_DENIED):
        assert "not applied" in failure_error(reason).message
        assert "may" not in failure_error(reason).message
