"""Raft clusters over the in-memory twin of the libp2p transport (node/memory_transport.py):
partitions, lossy and slow links, and membership changes, all in one trio loop."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from pysyncobj import FAIL_REASON
from pysyncobj.node import Node

from node.memory_transport import MemoryNetwork
from node.raft_replica import RaftTimeouts
from protocol.errors import ColoniesError, RequestTimeout, Unavailable
from tests.raft_harness import (
    RaftNode,
    build_node,
    converged,
    leader_of,
    serve_node,
    wait_until,
)

# Tighter than GROUP_TIMEOUTS: the whole cluster shares one loop and the network is memory.
TIMEOUTS = RaftTimeouts(append_entries_period=0.05, min_timeout=0.3, max_timeout=0.6)
IDS = ["n1", "n2", "n3"]


class Cluster:
    def __init__(self, nursery: trio.Nursery, network: MemoryNetwork, root: Path) -> None:
        self.nursery = nursery
        self.network = network
        self.root = root
        self.nodes: dict[str, RaftNode] = {}

    async def start(
        self,
        node_id: str,
        members: list[str],
        *,
        joining: bool = False,
        known: bool = True,
    ) -> RaftNode:
        """Starts ``node_id`` with ``members`` as partners; ``known=False`` gives it no
        addresses (it must be dialed)."""
        others = {
            p: (self.network.address(p) if known else None) for p in members if p != node_id
        }
        transport = self.network.transport(node_id, others)
        node = build_node(
            node_id, self.root / node_id, transport, others, TIMEOUTS, joining=joining
        )
        await self.nursery.start(serve_node, node)
        self.nodes[node_id] = node
        return node

    def live(self) -> list[RaftNode]:
        return [n for n in self.nodes.values() if not n.stopped.is_set()]

    async def leader(self, among: list[RaftNode] | None = None, timeout: float = 10) -> RaftNode:
        group = among if among is not None else self.live()
        await wait_until(lambda: leader_of(group) is not None, timeout, "a leader")
        leader = leader_of(group)
        assert leader is not None
        return leader


@asynccontextmanager
async def cluster(tmp_path: Path, ids: list[str] = IDS, seed: int = 1) -> AsyncIterator[Cluster]:
    network = MemoryNetwork(seed=seed)
    async with trio.open_nursery() as nursery:
        await nursery.start(network.run)
        c = Cluster(nursery, network, tmp_path)
        for node_id in ids:
            await c.start(node_id, ids)
        await wait_until(
            lambda: all(len(n.transport.connected) == len(ids) - 1 for n in c.live()),
            5,
            "every session",
        )
        try:
            yield c
        finally:
            for node in c.nodes.values():
                await node.kill()
            nursery.cancel_scope.cancel()


async def test_three_nodes_elect_commit_and_forward_writes(tmp_path):
    async with cluster(tmp_path) as c:
        leader = await c.leader()
        followers = [n for n in c.live() if n is not leader]
        for i in range(10):
            assert (await leader.put(i))[0] == 200
        for i in range(10, 20):
            # Forwarded by PySyncObj to the leader; the result comes back to the follower.
            status, value = await followers[i % 2].put(i)
            assert status == 200 and value["n"] == i
        await wait_until(lambda: converged(c.live(), 20), 5, "replicas to converge")
        assert leader.machine.values() == list(range(20))
        for node in c.live():
            assert sorted(node.transport.connected) == sorted(p for p in IDS if p != node.id)
            assert node.transport.counters["messages_refused"] == 0


async def test_isolated_leader_cannot_commit_and_catches_up_after_heal(tmp_path):
    async with cluster(tmp_path) as c:
        old = await c.leader()
        for i in range(5):
            await old.put(i)
        majority = [n for n in c.live() if n is not old]

        c.network.isolate(old.id)
        # The old leader keeps its role for a while (leaderFallbackTimeout) but cannot commit.
        with pytest.raises((RequestTimeout, Unavailable)):
            await old.put("lost", timeout=1.0)
        new = await c.leader(majority)
        assert new is not old
        for i in range(5, 15):
            assert (await majority[i % 2].put(i))[0] == 200
        assert old.machine.values() == list(range(5))
        # ... until leader_fallback (3 x max_timeout) passes without a majority: it steps down.
        await wait_until(
            lambda: not old.colony.is_leader, TIMEOUTS.leader_fallback + 1.0, "it to step down"
        )

        c.network.heal()
        await wait_until(lambda: leader_of(c.live()) is new, 10, "the old leader to follow")
        await wait_until(lambda: converged(c.live(), 15), 10, "the old leader to catch up")
        assert old.machine.values() == list(range(15))  # its uncommitted write is gone


async def test_silently_cut_follower_refuses_writes_and_catches_up(tmp_path):
    async with cluster(tmp_path) as c:
        leader = await c.leader()
        cut = next(n for n in c.live() if n is not leader)
        await leader.put(0)

        # Frames vanish and connections hang: only the heartbeat timeout ends the sessions.
        c.network.isolate(cut.id, silent=True)
        with pytest.raises((RequestTimeout, Unavailable)):
            await cut.put("lost", timeout=1.0)
        for i in range(1, 10):
            assert (await leader.put(i))[0] == 200
        await wait_until(
            lambda: not cut.transport.connected and cut.id not in leader.transport.connected,
            10,
            "the heartbeat timeouts",
        )
        assert cut.transport.counters["peers_silent"] == 2

        c.network.heal()
        await wait_until(lambda: converged(c.live(), 10), 10, "the cut follower to catch up")
        assert cut.machine.values() == list(range(10))


async def test_random_drops_and_delays_still_converge(tmp_path):
    async with cluster(tmp_path, seed=7) as c:
        await c.leader()
        c.network.set_faults(drop=0.15, delay=(0.0, 0.02))
        acked: list[str] = []
        counter = itertools.count()

        async def writer(node: RaftNode, stop_at: float) -> None:
            while trio.current_time() < stop_at:
                attempt = f"{node.id}-{next(counter)}"  # unique per attempt, retried or not
                try:
                    status, _ = await node.put(attempt, timeout=1.0)
                    if status == 200:
                        acked.append(attempt)
                except ColoniesError:
                    await trio.sleep(0.05)

        stop_at = trio.current_time() + 3.0
        async with trio.open_nursery() as n:
            for node in c.live():
                n.start_soon(writer, node, stop_at)
        assert c.network.frames_dropped > 0

        c.network.set_faults()
        live = c.live()
        await wait_until(lambda: leader_of(live) is not None, 10, "a leader after the faults")
        leader = leader_of(live)
        assert leader is not None
        await leader.put("final")
        await wait_until(lambda: converged(live), 10, "replicas to converge after the faults")
        assert len(acked) > 20
        values = leader.machine.values()
        assert set(acked) <= set(values), "an acknowledged write was lost"
        assert len(values) == len(set(values)), "an entry was applied twice"


async def test_add_a_fourth_node_then_remove_one(tmp_path):
    async with cluster(tmp_path) as c:
        leader = await c.leader()
        for i in range(5):
            await leader.put(i)

        # n4 joins: it knows the members' addresses, they do not know its (so n4 must dial,
        # although its id is the larger one), and it waits for the leader instead of
        # standing for election.
        n4 = await c.start("n4", [*IDS, "n4"], joining=True)
        await trio.sleep(0.5)
        assert n4.colony.learner and n4.transport.connected == []
        assert leader_of(c.live()[:3]) is leader  # n4's attempts disturbed nobody

        done: list[int] = []
        leader.colony.addNodeToCluster(Node("n4"), callback=lambda _r, err: done.append(err))
        leader.replicator.kick()
        await wait_until(lambda: bool(done), 5, "addNodeToCluster")
        assert done == [FAIL_REASON.SUCCESS]
        await wait_until(lambda: converged(c.live(), 5), 10, "n4 to catch up")
        assert not n4.colony.learner
        assert leader_of(c.live()) is leader
        assert sorted(leader.colony.member_ids) == ["n1", "n2", "n3", "n4"]
        assert "n4" in leader.transport.members and leader.transport.members["n4"] is None
        status, value = await n4.put(5)  # forwarded from the new member
        assert status == 200
        await wait_until(lambda: converged(c.live(), 6), 5, "the write from n4")

        # Remove a follower. It is not told (PySyncObj), but nobody talks to it any more.
        gone = next(n for n in c.live() if n is not leader and n is not n4)
        done.clear()
        leader.colony.removeNodeFromCluster(Node(gone.id), callback=lambda _r, e: done.append(e))
        leader.replicator.kick()
        await wait_until(lambda: bool(done), 5, "removeNodeFromCluster")
        assert done == [FAIL_REASON.SUCCESS]
        rest = [n for n in c.live() if n is not gone]
        await wait_until(
            lambda: all(gone.id not in n.transport.members for n in rest), 5, "the drop"
        )
        await wait_until(lambda: not gone.transport.connected, 5, "its sessions to end")
        for i in range(6, 12):
            assert (await rest[i % 3].put(i))[0] == 200
        await wait_until(lambda: converged(rest, 12), 5, "the remaining members")
        assert len(gone.machine.applied) < 12
        assert sorted(leader.colony.member_ids) == sorted(n.id for n in rest)
        await trio.sleep(1.0)  # its redials are refused by everyone
        assert sum(n.transport.counters["inbound_refused"] for n in rest) > 0
        assert not gone.transport.connected


async def test_simultaneous_dials_settle_on_the_session_the_smaller_id_opened():
    """Both ends dial at once (no answer delay): each end keeps the session "a" initiated, and
    PySyncObj sees one steady connection. Then the member lists change under the sessions."""
    network = MemoryNetwork()
    events: list[tuple[str, str, str]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(network.run)
        ends = {}
        for me, other in (("a", "b"), ("b", "a")):
            t = network.transport(me, {other: network.address(other)}, answer_delay=0)
            t.setOnNodeConnectedCallback(lambda n, me=me: events.append((me, "up", n.id)))
            t.setOnNodeDisconnectedCallback(lambda n, me=me: events.append((me, "down", n.id)))
            ends[me] = t
        # Start both before either runs: both dial in the same instant.
        nursery.start_soon(ends["a"].run)
        nursery.start_soon(ends["b"].run)
        await wait_until(
            lambda: ends["a"].connected == ["b"] and ends["b"].connected == ["a"], 5, "a session"
        )
        await trio.sleep(1.0)  # any churn would show here
        assert ends["a"]._sessions["b"].initiator == ends["b"]._sessions["a"].initiator == "a"
        assert ends["a"].connected == ["b"] and ends["b"].connected == ["a"]
        assert events.count(("a", "up", "b")) == 1 and events.count(("b", "up", "a")) == 1
        assert not [e for e in events if e[1] == "down"]

        # "b" leaves a's member list: the session ends on both ends, b's redials are refused.
        ends["a"].set_members({})
        await wait_until(lambda: not ends["b"].connected, 5, "b to see the session end")
        assert ("a", "down", "b") in events and ends["a"].members == {}
        await trio.sleep(0.8)
        assert ends["a"].counters["inbound_refused"] >= 1 and not ends["a"].connected
        # Back on the list, without an address: b (which knows a's) dials again.
        ends["a"].add_member("b")
        await wait_until(lambda: ends["a"].connected == ["b"], 5, "the session to come back")
        assert ends["a"]._sessions["b"].initiator == "b"
        for t in ends.values():
            t.destroy()
        nursery.cancel_scope.cancel()


async def test_a_follower_behind_the_compacted_log_installs_a_snapshot(tmp_path):
    """The leader compacted its log past what a follower has: the follower gets the state
    by the snapshot transfer (node/snapshot_transfer.py), through lost chunks, and the
    cluster goes on from there."""
    async with cluster(tmp_path) as c:
        leader = await c.leader()
        behind = next(n for n in c.live() if n is not leader)
        await behind.kill()
        for i in range(40):
            assert (await leader.put(i))[0] == 200
        for n in c.live():
            n.colony.forceLogCompaction()
        await wait_until(
            lambda: all(n.colony.snapshot_index >= 40 for n in c.live()), 10, "compactions"
        )
        c.network.set_faults(drop=0.2)  # chunks and acks get lost: sent again
        back = await c.start(behind.id, IDS)
        await wait_until(lambda: back.snapshots.counters["installed"] == 1, 20, "the install")
        c.network.set_faults()
        assert (await leader.put("after"))[0] == 200
        await wait_until(lambda: converged(c.live()), 10, "convergence")
        assert back.machine.values()[-1] == "after" and len(back.machine.values()) == 41
        await wait_until(lambda: leader.snapshots.counters["sent"] == 1, 10, "the last acks")
        assert back.snapshots.counters["installed"] == 1
        assert not (back.data_dir / "install").exists()
        assert not list((leader.data_dir / "outbox").iterdir())  # its copies are gone


async def test_a_learner_gets_the_log_without_a_vote_until_it_is_promoted(tmp_path):
    async with cluster(tmp_path) as c:
        leader = await c.leader()
        for i in range(5):
            assert (await leader.put(i))[0] == 200

        def let_in(nodes):  # what node/membership.py does for a member book entry
            for n in nodes:
                n.transport.set_learners({"n4": c.network.address("n4")})

        let_in(c.live())
        n4 = await c.start("n4", [*IDS, "n4"], joining=True)
        await wait_until(lambda: converged(c.live(), 5), 10, "the learner to get the log")
        assert n4.colony.learner and "n4" not in leader.colony.member_ids
        await wait_until(
            lambda: leader.colony.learner_match_index("n4") == leader.colony.commit_index,
            5,
            "the leader to hear the learner's acknowledgement",
        )

        # What a learner may send is limited: a vote request is dropped unread.
        refused = leader.transport.counters["messages_refused"]
        bump = {"type": "request_vote", "term": 99, "last_log_index": 99, "last_log_term": 99}
        assert n4.transport.send_to(leader.id, bump)
        await wait_until(
            lambda: leader.transport.counters["messages_refused"] == refused + 1, 5, "the refusal"
        )
        assert leader.colony.is_leader and leader.colony.term < 99

        # It does not count toward a majority: with it and one voter down, two of the three
        # voters still commit (as a fourth voter it would have left 2 of 4: no majority).
        follower = next(n for n in c.live() if n not in (leader, n4))
        await n4.kill()
        await follower.kill()
        assert (await leader.put(5))[0] == 200

        follower = await c.start(follower.id, IDS)
        let_in([follower])
        n4 = await c.start("n4", [*IDS, "n4"])
        assert n4.colony.learner  # it remembers (raft.meta)
        await wait_until(lambda: converged(c.live(), 6), 10, "both to catch up")
        assert n4.transport.counters["messages_refused"] == 0
        refused_before = sum(n.transport.counters["messages_refused"] for n in c.live())

        done: list[int] = []
        leader.colony.addNodeToCluster(Node("n4"), callback=lambda _r, err: done.append(err))
        leader.replicator.kick()
        await wait_until(lambda: bool(done), 5, "the promotion")
        assert done == [FAIL_REASON.SUCCESS]
        await wait_until(lambda: not n4.colony.learner, 5, "n4 to learn it votes")
        assert sorted(leader.colony.member_ids) == ["n1", "n2", "n3", "n4"]
        assert all(n.transport.learners == {} for n in c.live())
        assert (await n4.put(6))[0] == 200
        await wait_until(lambda: converged(c.live(), 7), 5, "the write through n4")
        # Its messages count as a voter's now (a learner's votes would have been refused).
        assert sum(n.transport.counters["messages_refused"] for n in c.live()) == refused_before


async def test_a_follower_cut_off_for_a_while_does_not_depose_the_leader(tmp_path):
    """PreVote: the cut follower's election timer runs out again and again, but the others
    still hear the leader and refuse; its term never rises, so its return changes nothing."""
    async with cluster(tmp_path) as c:
        leader = await c.leader()
        term = leader.colony.term
        cut = next(n for n in c.live() if n is not leader)
        before = dict(cut.colony.prevotes)  # the first election had pre-votes too
        # Silent: the sessions stay up until their heartbeat timeout, so the follower, which
        # hears nothing, asks for pre-votes (PySyncObj never campaigns connected to no one).
        c.network.isolate(cut.id, silent=True)
        for i in range(5):
            assert (await leader.put(i))[0] == 200
        await trio.sleep(TIMEOUTS.max_timeout * 4)
        asked = cut.colony.prevotes["asked"]
        assert asked > before["asked"] and cut.colony.prevotes["won"] == before["won"]
        assert cut.colony.term == term

        c.network.heal()
        await wait_until(lambda: converged(c.live(), 5), 10, "the follower to catch up")
        # Some pre-votes were asked over the healed network and refused by a member that
        # hears the leader.
        await wait_until(
            lambda: sum(n.colony.prevotes["refused"] for n in c.live()) > 0
            or cut.colony.prevotes["asked"] == asked,
            5,
            "the pre-votes after the heal",
        )
        assert leader_of(c.live()) is leader and leader.colony.term == term
        assert all(n.colony.term == term for n in c.live())
