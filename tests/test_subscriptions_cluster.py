"""Subscriptions on a three-node cluster of real `colonyd` processes: a wait and a follow
parked on followers wake when the writes, made through another node, are applied there."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from protocol.messages import SUCCESS
from tests.cluster_harness import LocalCluster, NodeProc, add_test_colony, vector_key

WAKE_BOUND_S = 3.0  # generous for a loaded 2-core machine; measured values are printed


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    workdir: Path = tmp_path_factory.mktemp("subscriptions")
    with LocalCluster(workdir, vector_key("server")) as c:
        trio.run(c.start, 3)
        yield c


async def test_waiters_on_followers_wake_for_writes_through_another_node(
    cluster: LocalCluster,
) -> None:
    c = cluster
    with c.logs_on_failure():
        leader = await c.wait_leader()
        await c.wait_caught_up()
        f1, f2 = [n for n in c.running if n is not leader]
        async with c.client_on(leader) as admin:
            colony = await add_test_colony(admin, "subs")
        await c.wait_caught_up()
        name, etype = colony.name, colony.executortype
        got: dict[str, float] = {}
        seen: list[dict] = []

        async def wait_on(node: NodeProc, pid: str) -> None:
            async with c.client_on(node, colony.executor) as client:
                p = await client.wait_for_process(pid, SUCCESS, timeout=20)
                assert p["out"] == ["ok"]
                got["wait"] = time.monotonic()

        async def follow_on(node: NodeProc) -> None:
            async with c.client_on(node, colony.executor) as client:
                async for p in client.follow_processes(name, etype, wait=10):
                    seen.append(p)
                    got["follow"] = time.monotonic()
                    return

        async with c.client_on(leader, colony.executor) as writer:
            p = await writer.submit("echo", colonyname=name, executortype=etype)
            await c.wait_caught_up()
            async with trio.open_nursery() as n:
                n.start_soon(wait_on, f1, p["processid"])
                n.start_soon(follow_on, f2)
                await trio.sleep(0.5)  # both are parked on their followers by now
                assert got == {}
                t_submit = time.monotonic()
                new = await writer.submit("second", colonyname=name, executortype=etype)
                a = await writer.assign(name, timeout=5)
                assert a["processid"] == p["processid"]
                t_close = time.monotonic()
                await writer.close(a, ["ok"])
        assert [x["processid"] for x in seen] == [new["processid"]]
        woke_wait, woke_follow = got["wait"] - t_close, got["follow"] - t_submit
        print(f"wait on {f1.name} woke {woke_wait * 1000:.1f} ms after the close; follow on "
              f"{f2.name} {woke_follow * 1000:.1f} ms after the submit")
        assert woke_wait < WAKE_BOUND_S and woke_follow < WAKE_BOUND_S
