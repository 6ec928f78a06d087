"""A three-node cluster of real `colonyd` processes on 127.0.0.1: writes through followers,
long-poll wake-ups across nodes, kill -9 of a follower and of the leader, a paused leader, a
full stop and start, and a member added and removed.

One cluster serves the whole module (starting three nodes costs a few seconds); the tests run
in file order and each starts by restarting any node a previous test left down. Every write a
client saw acknowledged is remembered (`Shared.acked`), and the checks after each failure, and
after the full restart, require every one of them on every node. A partitioned minority is
covered in one process by tests/test_raft_cluster_memory.py.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from node.client import Client
from node.p2p import peer_id_of
from node.raft_replica import GROUP_TIMEOUTS
from protocol.errors import BadRequest, ColoniesError, NotFound
from protocol.identity import PrivateKey
from protocol.messages import SUCCESS
from tests.cluster_harness import (
    ClusterColony,
    ClusterError,
    LocalCluster,
    NodeProc,
    add_test_colony,
    free_port,
    submit,
    vector_key,
    wait_for,
)

# Bounds, generous for a loaded 2-core machine; the measured values are printed (pytest -s).
FAILOVER_BOUND_S = 8.0  # from a kill to the next acknowledged write (measured ~1 s)
CONVERGE_S = 15.0
WRITER_CALL_TIMEOUT_S = 2.0
WRITER_PACE_S = 0.03
UNUSED_TYPE = "nobody-runs-this"  # processes that stay WAITING (no executor of that type)


@dataclass
class Shared:
    cluster: LocalCluster
    acked: dict[str, set[str]] = field(default_factory=dict)  # colony -> acknowledged ids
    colonies: dict[str, ClusterColony] = field(default_factory=dict)
    removed: set[str] = field(default_factory=set)  # node names that left for good

    def ack(self, colony: ClusterColony, pid: str) -> None:
        self.acked.setdefault(colony.name, set()).add(pid)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    workdir: Path = tmp_path_factory.mktemp("cluster")
    with LocalCluster(workdir, vector_key("server")) as cluster:
        trio.run(cluster.start, 3)
        yield Shared(cluster)


async def healthy(s: Shared) -> NodeProc:
    """Restarts any node a previous test left down; the leader once all have caught up."""
    c = s.cluster
    for n in c.nodes:
        n.signal(signal.SIGCONT)
        if not n.running and n.name not in s.removed:
            n.start()
    for n in c.nodes:
        if n.name not in s.removed:
            await n.wait_ready()
    await c.wait_caught_up()
    return await c.wait_leader()


async def new_colony(s: Shared, via: NodeProc, name: str) -> ClusterColony:
    async with s.cluster.client_on(via) as admin:
        colony = await add_test_colony(admin, name)
    s.colonies[name] = colony
    return colony


def followers(c: LocalCluster, leader: NodeProc) -> list[NodeProc]:
    return [n for n in c.running if n is not leader]


async def replica_view(c: LocalCluster, node: NodeProc, colony: ClusterColony) -> tuple:
    """What this node's own replica says about the colony (local reads)."""
    async with c.client_on(node, colony.executor) as client:
        procs = await client.processes(colony.name, count=100)
        stats = await client.colony_stats(colony.name)
    return (sorted((p["processid"], p["state"]) for p in procs), stats)


async def assert_converged(s: Shared, colonies: list[ClusterColony] | None = None,
                           nodes: list[NodeProc] | None = None) -> None:
    """Every node shows the same processes and statistics, including every acknowledged id
    (and the same server-wide statistics)."""
    c = s.cluster
    nodes = nodes if nodes is not None else c.running
    colonies = colonies if colonies is not None else list(s.colonies.values())
    last: list = []

    async def same() -> bool:
        nonlocal last
        views = []
        for n in nodes:
            per_colony = [await replica_view(c, n, col) for col in colonies]
            async with c.client_on(n) as admin:
                stats = await admin.statistics()
            views.append((per_colony, stats))
        last = views
        if any(v != views[0] for v in views):
            return False
        for col, (procs, _stats) in zip(colonies, views[0][0], strict=True):
            if not s.acked.get(col.name, set()) <= {pid for pid, _ in procs}:
                return False
        return True

    try:
        await wait_for(same, CONVERGE_S, "every node to show the same state")
    except ClusterError:
        for n, v in zip(nodes, last, strict=False):
            print(f"{n.name}: {v}")
        for col in colonies:
            print(f"acked in {col.name}: {sorted(s.acked.get(col.name, set()))}")
        raise


class Writer:
    """Submits processes one after another through `addrs` until stopped, retrying through
    errors; remembers every acknowledged id and when it was acknowledged."""

    def __init__(self, s: Shared, addrs: list[str], colony: ClusterColony) -> None:
        self.s = s
        self.addrs = addrs
        self.colony = colony
        self.acks: list[float] = []  # time.monotonic() of each acknowledgement
        self.errors: list[str] = []
        self._stop = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with Client.connect(self.addrs, self.colony.executor, timeout=3) as client:
            client.timeout = WRITER_CALL_TIMEOUT_S
            task_status.started()
            i = 0
            while not self._stop.is_set():
                i += 1
                try:
                    pid = await submit(client, self.colony, i, UNUSED_TYPE)
                except ColoniesError as e:
                    self.errors.append(f"{type(e).__name__}: {e}")
                    await trio.sleep(0.05)
                    continue
                self.s.ack(self.colony, pid)
                self.acks.append(time.monotonic())
                await trio.sleep(WRITER_PACE_S)

    def stop(self) -> None:
        self._stop.set()

    async def next_ack_after(self, t: float, timeout: float) -> float:
        """Seconds from `t` to the first acknowledgement after it."""
        async def acked() -> float | None:
            later = [a for a in self.acks if a > t]
            return later[0] - t if later else None

        return await wait_for(acked, timeout, "a write acknowledged after the failure", every=0.02)


async def test_three_nodes_form_a_cluster_and_a_write_through_a_follower_shows_on_all(
    shared: Shared,
) -> None:
    c = shared.cluster
    with c.logs_on_failure():
        leader = await healthy(shared)
        peers = {n.peer_id for n in c.nodes}
        for n in c.nodes:
            info = await c.info(n)
            assert info is not None, f"{n.name} does not answer"
            assert set(info["members"]) == peers, f"{n.name}'s member book: {info['members']}"
            assert set(info["raft"]["members"]) == peers, f"{n.name}'s raft group"
            assert info["raft"]["leader"] == leader.peer_id

        follower = followers(c, leader)[0]
        colony = await new_colony(shared, follower, "formed")  # writes through a follower
        async with c.client_on(follower, colony.executor) as client:
            pid = await submit(client, colony, 1)
        shared.ack(colony, pid)
        for n in c.nodes:
            async def visible(n: NodeProc = n) -> bool:
                async with c.client_on(n, colony.executor) as client:
                    return (await client.process(pid))["processid"] == pid

            await wait_for(visible, 5, f"process {pid[:8]} on {n.name}")
        await assert_converged(shared)


async def test_a_long_poll_on_a_follower_wakes_for_a_submit_through_another_node(
    shared: Shared,
) -> None:
    c = shared.cluster
    with c.logs_on_failure():
        leader = await healthy(shared)
        waiting_on, submit_on = followers(c, leader)[0], followers(c, leader)[1]
        colony = await new_colony(shared, leader, "longpoll")
        got: dict = {}

        async with c.client_on(waiting_on, colony.executor) as executor:
            async def long_poll() -> None:
                t = time.monotonic()
                got["process"] = await executor.assign(colony.name, timeout=10)
                got["at"] = time.monotonic()
                got["waited"] = got["at"] - t

            async with trio.open_nursery() as n:
                n.start_soon(long_poll)
                await trio.sleep(0.5)  # the assign is parked on the follower by now
                assert "process" not in got, "assign returned before anything was submitted"
                async with c.client_on(submit_on, colony.executor) as submitter:
                    t_submit = time.monotonic()
                    pid = await submit(submitter, colony, 7)
                shared.ack(colony, pid)
                with trio.fail_after(5):
                    while "process" not in got:
                        await trio.sleep(0.01)
            assert got["process"]["processid"] == pid
            woke = got["at"] - t_submit
            print(f"long poll on {waiting_on.name} woke {woke * 1000:.1f} ms after the submit "
                  f"through {submit_on.name}")
            assert woke < 3.0
            await executor.close(got["process"], ["done"])
        async with c.client_on(submit_on, colony.executor) as client:
            p = await client.wait(pid, timeout=5)
        assert p["state"] == SUCCESS
        await assert_converged(shared)


async def test_kill_a_follower_writes_go_on_and_it_catches_up_when_restarted(
    shared: Shared,
) -> None:
    c = shared.cluster
    with c.logs_on_failure():
        leader = await healthy(shared)
        victim, survivor = followers(c, leader)
        colony = await new_colony(shared, leader, "followerkill")
        writer = Writer(shared, [survivor.addr, leader.addr], colony)
        async with trio.open_nursery() as n:
            await n.start(writer.run)
            await trio.sleep(0.3)
            victim.kill()
            t_kill = time.monotonic()
            gap = await writer.next_ack_after(t_kill, FAILOVER_BOUND_S)
            await trio.sleep(0.5)  # more writes while it is down
            writer.stop()
        print(f"follower killed: next write acknowledged after {gap * 1000:.0f} ms; "
              f"{len(writer.acks)} acknowledged, {len(writer.errors)} errors")
        assert len([a for a in writer.acks if a > t_kill]) >= 3, writer.errors[:5]
        await c.wait_leader()

        victim.start()
        await victim.wait_ready()
        await c.wait_caught_up()
        await assert_converged(shared)


async def test_kill_the_leader_another_is_elected_and_no_acknowledged_write_is_lost(
    shared: Shared,
) -> None:
    c = shared.cluster
    with c.logs_on_failure():
        leader = await healthy(shared)
        rest = followers(c, leader)
        colony = await new_colony(shared, leader, "leaderkill")
        writer = Writer(shared, [n.addr for n in rest], colony)  # never the leader's address
        async with trio.open_nursery() as n:
            await n.start(writer.run)
            await trio.sleep(0.5)
            before = len(writer.acks)
            leader.kill()
            t_kill = time.monotonic()
            gap = await writer.next_ack_after(t_kill, FAILOVER_BOUND_S)
            await trio.sleep(0.3)
            writer.stop()
        print(f"leader {leader.name} killed: next write acknowledged after {gap * 1000:.0f} ms; "
              f"{before} acknowledged before the kill, {len(writer.acks)} in all; "
              f"errors: {writer.errors[:3]}")
        assert before >= 3
        new_leader = await c.wait_leader()
        assert new_leader is not leader and new_leader in rest
        await assert_converged(shared)  # on the two survivors

        leader.start()
        await leader.wait_ready()
        await c.wait_caught_up()
        await assert_converged(shared)  # and on the restarted node


async def test_a_paused_leader_is_replaced_and_follows_when_it_resumes(shared: Shared) -> None:
    c = shared.cluster
    with c.logs_on_failure():
        leader = await healthy(shared)
        rest = followers(c, leader)
        colony = await new_colony(shared, leader, "paused")
        writer = Writer(shared, [n.addr for n in rest], colony)
        try:
            async with trio.open_nursery() as n:
                await n.start(writer.run)
                await trio.sleep(0.3)
                leader.signal(signal.SIGSTOP)
                t_stop = time.monotonic()
                gap = await writer.next_ack_after(t_stop, FAILOVER_BOUND_S)
                new_leader = await c.wait_leader(among=rest)
                leader.signal(signal.SIGCONT)  # it resumes believing it leads, with old term
                await trio.sleep(0.5)
                writer.stop()
        finally:
            leader.signal(signal.SIGCONT)
        print(f"leader {leader.name} paused: next write acknowledged after {gap * 1000:.0f} ms; "
              f"{new_leader.name} took over")
        await c.wait_caught_up()  # all three, the resumed one following
        await assert_converged(shared)


async def test_a_paused_follower_does_not_depose_the_leader_when_it_resumes(
    shared: Shared,
) -> None:
    """PreVote (node/raft_elections.py): the resumed follower's election timer has long run
    out, but the others still hear the leader and refuse its pre-vote; no election."""
    c = shared.cluster
    with c.logs_on_failure():
        leader = await healthy(shared)
        term = (await c.info(leader) or {})["raft"]["term"]
        victim = followers(c, leader)[0]
        victim.signal(signal.SIGSTOP)
        try:
            # Past its election timeout and the sessions' silence limit (3 s) alike.
            await trio.sleep(GROUP_TIMEOUTS.max_timeout * 3)
        finally:
            victim.signal(signal.SIGCONT)
        await c.wait_caught_up()
        for n in c.running:
            raft = (await c.info(n) or {})["raft"]
            assert raft["term"] == term, f"{n.name} moved to term {raft['term']} from {term}"
        assert await c.wait_leader() is leader


async def test_adding_an_unreachable_member_fails_and_changes_nothing(shared: Shared) -> None:
    c = shared.cluster
    with c.logs_on_failure():
        leader = await healthy(shared)
        nobody = peer_id_of(PrivateKey.generate()).to_string()
        addr = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{nobody}"
        async with c.client_on(followers(c, leader)[0]) as admin:
            book = (await admin.server_info_fresh())["members"]
            with pytest.raises(BadRequest, match="cannot reach the new member"):
                await admin.add_member(nobody, addr, wait=5)
            assert (await admin.server_info_fresh())["members"] == book


async def test_stop_all_and_start_again_keeps_every_acknowledged_write(shared: Shared) -> None:
    c = shared.cluster
    with c.logs_on_failure():
        leader = await healthy(shared)
        colony = await new_colony(shared, leader, "restart")
        async with c.client_on(followers(c, leader)[0], colony.executor) as client:
            for i in range(10):
                shared.ack(colony, await submit(client, colony, i, UNUSED_TYPE))
        before = {col.name: await replica_view(c, leader, col) for col in shared.colonies.values()}

        for n in c.nodes:
            n.signal(signal.SIGTERM)
        for n in c.nodes:
            code = await n.wait_exit(15)
            assert code == 0, f"{n.name} exited with {code} on SIGTERM:\n{n.tail()}"
        for n in c.nodes:
            n.start()  # no --join: each remembers its partners
        for n in c.nodes:
            await n.wait_ready()
        await c.wait_leader()
        await c.wait_caught_up()
        await assert_converged(shared)
        after = {col.name: await replica_view(c, c.nodes[0], col) for col in shared.colonies.values()}
        assert after == before


async def test_a_fourth_node_joins_and_a_removed_member_stops_for_good(shared: Shared) -> None:
    c = shared.cluster
    with c.logs_on_failure():
        leader = await healthy(shared)
        n4 = c.add_node()
        n4.start(join=followers(c, leader)[0].addr)
        await n4.wait_ready()
        everyone = {n.peer_id for n in c.nodes if n.name not in shared.removed}

        async def four_members() -> bool:
            for n in c.nodes:
                info = await c.info(n)
                if info is None or set(info["raft"]["members"]) != everyone:
                    return False
            return True

        await wait_for(four_members, CONVERGE_S, "four members in every node's raft group")
        # It got the log as a learner first, and was made a voter once it had caught up.
        assert "this node is a voter" in n4.log_text(), n4.tail()
        colony = await new_colony(shared, n4, "joined")  # writes through the new node
        async with c.client_on(n4, colony.executor) as client:
            shared.ack(colony, await submit(client, colony, 1, UNUSED_TYPE))
        await c.wait_caught_up()
        await assert_converged(shared)

        # Remove one of the original followers; the other three carry on.
        victim = next(n for n in followers(c, leader) if n is not n4)
        stayers = [n for n in c.nodes if n is not victim]
        async with c.client_on(leader) as admin:
            await admin.call("removemembermsg", {"peerid": victim.peer_id})
        code = await victim.wait_exit(20)  # it stops serving by itself
        shared.removed.add(victim.name)
        print(f"{victim.name} left the cluster and exited with {code}")
        remaining = {n.peer_id for n in stayers}

        async def three_members() -> bool:
            for n in stayers:
                info = await c.info(n)
                if info is None or set(info["raft"]["members"]) != remaining:
                    return False
                if set(info["members"]) != remaining:
                    return False
            return True

        await wait_for(three_members, CONVERGE_S, "the victim gone from every raft group")
        async with c.client_on(n4, colony.executor) as client:
            shared.ack(colony, await submit(client, colony, 2, UNUSED_TYPE))
        await c.wait_caught_up(stayers)
        await assert_converged(shared, nodes=stayers)

        # Its data dir remembers: a restart refuses to serve the cluster it left.
        victim.start()
        code = await victim.wait_exit(20)
        last_start = victim.log_text().rsplit("===== start #", 1)[1]
        assert code != 0, f"the removed node restarted and ran:\n{victim.tail()}"
        assert "removed" in last_start, last_start

        with pytest.raises(NotFound):
            async with c.client_on(leader) as admin:
                await admin.call("removemembermsg", {"peerid": victim.peer_id})


async def test_a_member_removed_while_it_was_down_stops_when_restarted(shared: Shared) -> None:
    c = shared.cluster
    with c.logs_on_failure():
        leader = await healthy(shared)
        live = [n for n in c.nodes if n.name not in shared.removed]
        assert len(live) == 3, [n.name for n in live]
        victim = next(n for n in followers(c, leader) if n in live)
        stayers = [n for n in live if n is not victim]
        assert victim.stop() == 0
        async with c.client_on(leader) as admin:
            await admin.call("removemembermsg", {"peerid": victim.peer_id})
        shared.removed.add(victim.name)
        remaining = {n.peer_id for n in stayers}

        async def removed_everywhere() -> bool:
            for n in stayers:
                info = await c.info(n)
                if info is None or set(info["raft"]["members"]) != remaining:
                    return False
            return True

        await wait_for(removed_everywhere, CONVERGE_S, "the victim gone from the raft group")
        # Nobody talks to it any more: it must learn from the members that it was removed.
        victim.start()
        code = await victim.wait_exit(30)
        last_start = victim.log_text().rsplit("===== start #", 1)[1]
        assert code != 0, f"the removed node kept running:\n{victim.tail()}"
        assert "removed from its cluster while it was down" in last_start, last_start
