"""Generators and crons across a leader failover, with three real `colonyd` processes: queued
arguments survive the kill, the new leader's ticker flushes the batch exactly once, and the
cron keeps running; every node ends with the same generators, crons and runs."""

from __future__ import annotations

import time
from pathlib import Path

from protocol.identity import PrivateKey
from tests.cluster_harness import LocalCluster, NodeProc, add_test_colony, vector_key, wait_for

BATCH_TIMEOUT_S = 6


def spec(etype: str) -> dict:
    return {"nodename": "a", "funcname": "a", "conditions": {"executortype": etype}}


async def view(c: LocalCluster, node: NodeProc, key: PrivateKey) -> tuple:
    """The node's own replica: its generators, crons and the colony's workflow runs."""
    async with c.client_on(node, key) as client:
        return (
            await client.generators("sched"),
            await client.crons("sched"),
            await client.process_graphs("sched"),
        )


async def test_queued_arguments_and_crons_survive_a_leader_kill(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, vector_key("server")) as c, c.logs_on_failure():
        await c.start(3)
        leader = await c.wait_leader()
        async with c.client_on(leader) as admin:
            colony = await add_test_colony(admin, "sched")
        key = colony.executor
        t = "nobody-runs-this"  # runs stay WAITING, so each one is counted once
        async with c.client_on(leader, key) as client:
            gen = await client.add_generator(
                "sched", "g", [spec(t)], trigger=3, timeout=BATCH_TIMEOUT_S
            )
            await client.pack_generator(gen["generatorid"], "a")
            await client.pack_generator(gen["generatorid"], "b")
            packed = time.monotonic()
            await client.add_cron("sched", "c", [spec(t)], interval=1)
        await c.wait_caught_up()
        leader.kill()
        rest = [n for n in c.running if n is not leader]
        new_leader = await c.wait_leader(among=rest)
        failover = time.monotonic() - packed
        if failover < BATCH_TIMEOUT_S - 1:  # else the batch may have run already
            for n in rest:
                gens, _crons, _runs = await view(c, n, key)
                assert gens[0]["queuesize"] == 2, n.name

        async def flushed_and_cron_ran_again() -> bool:
            gens, crons, runs = await view(c, new_leader, key)
            return gens[0]["runs"] == 1 and crons[0]["runs"] >= 3

        await wait_for(flushed_and_cron_ran_again, 20, "the batch's flush and more cron runs")
        flush_after = time.monotonic() - packed
        print(f"new leader after {failover:.1f} s; batch ran by {flush_after:.1f} s after the "
              f"packs (timeout {BATCH_TIMEOUT_S} s)")
        leader.start()
        await leader.wait_ready()
        await c.wait_caught_up()

        async def same_everywhere() -> bool:
            views = [await view(c, n, key) for n in c.running]
            return all(v == views[0] for v in views)

        await wait_for(same_everywhere, 15, "every node to show the same generators and crons")
        gens, crons, runs = await view(c, new_leader, key)
        assert (gens[0]["queuesize"], gens[0]["runs"]) == (0, 1)
        async with c.client_on(new_leader, key) as client:
            roots = [await client.process(g["rootprocessids"][0]) for g in runs]
        assert [p["spec"]["args"] for p in roots].count(["a", "b"]) == 1  # ran exactly once
        assert len(runs) == 1 + crons[0]["runs"]  # one graph per run, none twice
        assert flush_after >= BATCH_TIMEOUT_S
