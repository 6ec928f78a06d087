"""Snapshots between real `colonyd` processes: a follower that was down while the leader
compacted its journal past it gets the live state and the archive streamed over, and ends
with the same digests as the others; restarted afterwards, it loads what it installed.

The nodes compact after 30 entries (`--compact-after 30`) so that a few hundred writes cut
the journal several times.
"""

from __future__ import annotations

from typing import Any

from protocol.messages import SUCCESS
from tests.cluster_harness import (
    ClusterColony,
    LocalCluster,
    NodeProc,
    add_test_colony,
    submit,
    vector_key,
    wait_for,
)

COMPACT_AFTER = 30
CONVERGE_S = 30.0


async def run_processes(c: LocalCluster, via: NodeProc, colony: ClusterColony, n: int) -> list[str]:
    """Submits, assigns and closes `n` processes (three entries each); their ids. A closed
    process moves to the archive."""
    ids = []
    async with c.client_on(via, colony.executor) as ex:
        for i in range(n):
            pid = await submit(ex, colony, i)
            p = await ex.assign(colony.name, timeout=5)
            await ex.add_log(p["processid"], f"log line {i}")
            await ex.close(p, [i])
            ids.append(pid)
    return ids


async def digests(c: LocalCluster, node: NodeProc) -> dict[str, Any]:
    async with c.client_on(node) as admin:
        return await admin.state_digest()


async def wait_same_digests(c: LocalCluster) -> dict[str, Any]:
    """Every running node reports the same live digest, archive digest and applied index."""
    last: list[dict[str, Any]] = []

    async def same() -> dict[str, Any] | None:
        nonlocal last
        last = [await digests(c, n) for n in c.running]
        return last[0] if all(d == last[0] for d in last) else None

    try:
        return await wait_for(same, CONVERGE_S, "every node to report the same digests")
    except AssertionError:
        for n, d in zip(c.running, last, strict=False):
            print(f"{n.name}: {d}")
        raise


async def test_a_follower_behind_the_compacted_journal_installs_state_and_archive(
    tmp_path: Any,
) -> None:
    with LocalCluster(tmp_path, vector_key("server"), ["--compact-after", str(COMPACT_AFTER)]) as c:
        with c.logs_on_failure():
            await c.start(3)
            leader = await c.wait_leader()
            victim = next(n for n in c.running if n is not leader)
            async with c.client_on(leader) as admin:
                colony = await add_test_colony(admin, "snapshots")
            before = await run_processes(c, leader, colony, 10)
            await c.wait_caught_up()
            victim_applied = (await c.info(victim) or {})["raft"]["last_applied"]

            victim.kill()
            missed = await run_processes(c, leader, colony, 60)
            async with c.client_on(leader, colony.executor) as ex:
                waiting = [await submit(ex, colony, i, executortype="nobody") for i in range(5)]
            leader_raft = (await c.info(leader) or {})["raft"]
            # The journal no longer holds what the victim needs next: only a snapshot helps.
            assert leader_raft["snapshot_index"] > victim_applied + 1, leader_raft

            victim.start()
            await victim.wait_ready()
            await c.wait_caught_up()
            raft = (await c.info(victim) or {})["raft"]
            assert raft["snapshot_transfers"]["installed"] >= 1, raft
            # The leader kept the follower hearing from it during the transfer: no election.
            assert raft["term"] == leader_raft["term"], (raft["term"], leader_raft["term"])
            first = await wait_same_digests(c)
            assert first["archive"]["applied"] > 0

            # Its replica answers from what it installed: archived processes with their logs
            # (from the archive file that came over) and the live queue (from the snapshot).
            async with c.client_on(victim, colony.executor) as ex:
                for pid, out in ((before[0], 0), (missed[0], 0), (missed[-1], 59)):
                    p = await ex.process(pid)
                    assert (p["state"], p["out"]) == (SUCCESS, [out]), p
                logs = await ex.logs(missed[-1])
                assert [entry["message"] for entry in logs] == ["log line 59"]
                assert sorted(p["processid"] for p in await ex.waiting(colony.name)) == sorted(
                    waiting
                )

            # A restart loads the installed snapshot and archive, then replays what followed.
            victim.stop()
            victim.start()
            await victim.wait_ready()
            await c.wait_caught_up()
            again = await wait_same_digests(c)
            assert again["digest"] == first["digest"]
            assert again["archive"]["digest"] == first["archive"]["digest"]
