"""Generators and crons across a full restart of a single `colonyd` (a real process, its
data dir): the queued arguments come back from disk, the batch timeout still flushes them
once, and a wait-for-previous cron whose previous run was cancelled before the restart runs
again after it."""

from __future__ import annotations

import time
from pathlib import Path

import trio

from node.client import Client
from tests.cluster_harness import add_test_colony
from tests.conftest import vector_key
from tests.test_daemon import colonyd, stop

BATCH_TIMEOUT_S = 6


def spec(etype: str) -> dict:
    return {"nodename": "a", "funcname": "a", "conditions": {"executortype": etype}}


async def test_queued_arguments_and_crons_survive_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "node"
    server = vector_key("server")
    env = {"COLONIES_SERVER_PRVKEY": server.hex}
    t = "nobody-runs-this"  # runs stay WAITING unless cancelled
    with colonyd(data, env=env) as (proc, addr):
        async with Client.connect(addr, server) as admin:
            colony = await add_test_colony(admin, "sched")
        async with Client.connect(addr, colony.executor) as c:
            gen = await c.add_generator("sched", "g", [spec(t)], trigger=3,
                                        timeout=BATCH_TIMEOUT_S)
            gid = gen["generatorid"]
            await c.pack_generator(gid, "a")
            await c.pack_generator(gid, "b")
            packed = time.monotonic()
            cron = await c.add_cron("sched", "c", [spec(t)], interval=3600, wait_for_prev=True)
            cid = cron["cronid"]
            first = (await c.run_cron(cid))["prevprocessgraphid"]
            await c.cancel_process_graph(first)
        code, _, err = await trio.to_thread.run_sync(stop, proc)
        assert code == 0, err

    with colonyd(data, env=env) as (proc, addr):
        async with Client.connect(addr, colony.executor) as c:
            # The queue is back (or, on a slow machine, already flushed once by the timer).
            g = await c.generator(gid)
            assert (g["queuesize"], g["runs"]) in ((2, 0), (0, 1)), g
            with trio.fail_after(20):
                while (await c.generator(gid))["runs"] == 0:
                    await trio.sleep(0.2)
            assert time.monotonic() - packed >= BATCH_TIMEOUT_S
            g = await c.generator(gid)
            assert (g["queuesize"], g["runs"]) == (0, 1)
            runs = await c.process_graphs("sched")
            roots = [await c.process(r["rootprocessids"][0]) for r in runs
                     if r["processgraphid"] != first]
            assert [p["spec"]["args"] for p in roots] == [["a", "b"]]  # flushed once
            # The cancelled previous run does not block the wait-for-previous cron.
            again = await c.run_cron(cid)
            assert again["runs"] == 2 and again["prevprocessgraphid"] != first
        assert (await trio.to_thread.run_sync(stop, proc))[0] == 0
