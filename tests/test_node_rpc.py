"""A real node on 127.0.0.1 driven through the SDK: lifecycle, roles, long-poll, timeouts."""

from __future__ import annotations

import time

import pytest
import trio

from node.client import Client
from protocol.errors import BadRequest, Forbidden, NotFound
from protocol.identity import PrivateKey
from protocol.messages import FAILED, RUNNING, SUCCESS, WAITING
from tests.conftest import Colony


async def test_submit_assign_close(colony: Colony) -> None:
    async with Client.connect(colony.addr, colony.executor) as c:
        p = await c.submit("echo", args=["hello"], colonyname="dev", executortype=colony.executortype)
        assert p["state"] == WAITING
        assert p["initiatorid"] == colony.executor.id
        got = await c.assign("dev", timeout=-1)
        assert got["processid"] == p["processid"]
        assert got["state"] == RUNNING and got["attempt"] == 1
        await c.close(got, ["hello"])
        done = await c.process(p["processid"])
        assert done["state"] == SUCCESS and done["out"] == ["hello"]
        assert [x["processid"] for x in await c.successful("dev")] == [p["processid"]]


async def test_fail_records_errors(colony: Colony) -> None:
    async with Client.connect(colony.addr, colony.executor) as c:
        p = await c.submit("boom", colonyname="dev", executortype=colony.executortype)
        got = await c.assign("dev", timeout=-1)
        await c.fail(got, ["it broke"])
        done = await c.process(p["processid"])
        assert done["state"] == FAILED and done["errors"] == ["it broke"]


async def test_long_poll_assign_is_woken_by_submit(colony: Colony) -> None:
    async with Client.connect(colony.addr, colony.executor) as c:
        result: dict = {}

        async def waiter() -> None:
            result["p"] = await c.assign("dev", timeout=5)

        async with trio.open_nursery() as n:
            n.start_soon(waiter)
            await trio.sleep(0.3)
            assert "p" not in result
            started = trio.current_time()
            p = await c.submit("echo", colonyname="dev", executortype=colony.executortype)
        assert result["p"]["processid"] == p["processid"]
        assert trio.current_time() - started < 2


async def test_long_polls_outlive_the_signature_lifetime(colony: Colony) -> None:
    """A request's TTL is checked when it arrives: an assign (and a fused close-and-assign)
    that waits past it still gets its process (the envelope here lives 1 s, the wait 3 s)."""
    async with Client.connect(colony.addr, colony.executor) as c:
        c.ttl_ms = 1000
        result: dict = {}

        async def waiter() -> None:
            result["p"] = await c.assign("dev", timeout=10)

        async with trio.open_nursery() as n:
            n.start_soon(waiter)
            await trio.sleep(3)
            assert "p" not in result
            p = await c.submit("echo", colonyname="dev", executortype=colony.executortype)
        assert result["p"]["processid"] == p["processid"]

        async def fused() -> None:
            result["next"] = await c.close_and_assign(
                p_running, "dev", successful=True, out=[1], timeout=10
            )

        p_running = result["p"]
        async with trio.open_nursery() as n:
            n.start_soon(fused)
            await trio.sleep(3)
            assert "next" not in result
            q = await c.submit("echo", colonyname="dev", executortype=colony.executortype)
        assert result["next"]["processid"] == q["processid"]
        assert (await c.process(p["processid"]))["state"] == SUCCESS


async def test_assign_times_out_with_not_found(colony: Colony) -> None:
    async with Client.connect(colony.addr, colony.executor) as c:
        with pytest.raises(NotFound):
            await c.assign("dev", timeout=1)


async def test_close_and_assign_next(colony: Colony) -> None:
    async with Client.connect(colony.addr, colony.executor) as c:
        a = await c.submit("echo", args=[1], colonyname="dev", executortype=colony.executortype)
        b = await c.submit("echo", args=[2], colonyname="dev", executortype=colony.executortype)
        first = await c.assign("dev", timeout=-1)
        assert first["processid"] == a["processid"]
        second = await c.close_and_assign(first, "dev", successful=True, out=[1], timeout=-1)
        assert second is not None and second["processid"] == b["processid"]
        none = await c.close_and_assign(second, "dev", successful=True, out=[2], timeout=-1)
        assert none is None
        assert (await c.process(b["processid"]))["state"] == SUCCESS


async def test_exec_timeout_requeues_then_fails(colony: Colony) -> None:
    async with Client.connect(colony.addr, colony.executor) as c:
        p = await c.submit(
            "slow", colonyname="dev", executortype=colony.executortype, maxexectime=1, maxretries=1
        )
        first = await c.assign("dev", timeout=-1)
        # The leader's ticker requeues it after its deadline; a long-poll picks it up again.
        second = await c.assign("dev", timeout=5)
        assert second["processid"] == p["processid"] and second["attempt"] == 2
        with pytest.raises((BadRequest, Forbidden)):
            await c.close(first, ["late"])  # the expired attempt may not close it
        with trio.fail_after(5):
            while (await c.process(p["processid"]))["state"] != FAILED:
                await trio.sleep(0.1)
        done = await c.process(p["processid"])
        assert done["retries"] == 1
        assert "Maximum execution time" in done["errors"][0]


async def test_roles_are_enforced(colony: Colony) -> None:
    stranger = PrivateKey.generate()
    async with Client.connect(colony.addr, stranger) as c:
        with pytest.raises(Forbidden):
            await c.submit("echo", colonyname="dev", executortype=colony.executortype)
        with pytest.raises(Forbidden):
            await c.add_colony(stranger.id, "mine")
        with pytest.raises(Forbidden):
            await c.add_executor(stranger.id, "sneaky", "t", "dev")
        owner = c.with_key(colony.owner)
        # The colony owner manages executors but is not a member: it cannot submit.
        with pytest.raises(Forbidden):
            await owner.submit("echo", colonyname="dev", executortype=colony.executortype)
        ex = c.with_key(colony.executor)
        p = await ex.submit("echo", colonyname="dev", executortype=colony.executortype)
        got = await ex.assign("dev", timeout=-1)
        # A pending executor of the same colony may not close someone else's process.
        other = PrivateKey.generate()
        await owner.add_executor(other.id, "other", colony.executortype, "dev")
        with pytest.raises(Forbidden):
            await c.with_key(other).close(got, [])
        await ex.close(got, [])
        assert (await ex.process(p["processid"]))["state"] == SUCCESS


async def test_remove_executor_requeues_its_processes(colony: Colony) -> None:
    async with Client.connect(colony.addr, colony.executor) as c:
        p = await c.submit("echo", colonyname="dev", executortype=colony.executortype)
        await c.assign("dev", timeout=-1)
        await c.with_key(colony.owner).remove_executor("dev", colony.executorname)
        with pytest.raises(Forbidden):
            await c.process(p["processid"])  # no longer a member
    async with Client.connect(colony.addr, colony.owner) as owner:
        stats = await owner.colony_stats("dev")
        assert stats["waitingprocesses"] == 1 and stats["runningprocesses"] == 0


async def test_attributes(colony: Colony) -> None:
    async with Client.connect(colony.addr, colony.executor) as c:
        p = await c.submit("echo", colonyname="dev", executortype=colony.executortype, env={"A": "1"})
        got = await c.assign("dev", timeout=-1)
        attr = await c.add_attribute(got["processid"], "result", "42")
        assert (await c.attribute(attr["attributeid"]))["value"] == "42"
        full = await c.process(p["processid"])
        assert {(a["key"], a["value"]) for a in full["attributes"]} >= {("A", "1"), ("result", "42")}
        with pytest.raises(BadRequest):
            await c.add_attribute(got["processid"], "result", "43")  # same key and type twice


async def test_metrics_endpoint(tmp_path) -> None:
    from node.daemon import ColonyNode, NodeConfig
    from tests.conftest import vector_key

    node = ColonyNode(
        NodeConfig(data_dir=tmp_path / "m", server_prvkey=vector_key("server").hex, metrics_addr="127.0.0.1:0")
    )
    async with trio.open_nursery() as n:
        await n.start(node.run)
        async with Client.connect(node.addrs[0], vector_key("server")) as c:
            await c.add_colony(vector_key("colony").id, "metrics")
            # A task that holds the loop (as a slow apply would): the stall meter sees it.
            time.sleep(0.3)
            await trio.sleep(0.1)
            raft = (await c.server_info_fresh())["raft"]
            assert 250 <= raft["loop_lag_max_1m_ms"] < 2000 and raft["loop_stalls"] >= 1
        stream = await trio.open_tcp_stream("127.0.0.1", node.metrics_port)
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        body = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                body += chunk
        await stream.aclose()
        text = body.decode()
        assert text.startswith("HTTP/1.1 200")
        assert "colonies_server_colonies 1.0" in text
        assert "colonies_raft_has_leader 1.0" in text
        assert 'colonies_rpc_seconds_count{msgtype="addcolonymsg",status="200"} 1.0' in text
        lag = next(line for line in text.splitlines()
                   if line.startswith("colonies_event_loop_lag_max_seconds "))
        assert 0.25 <= float(lag.split()[1]) < 2
        assert 'colonies_event_loop_lag_seconds_bucket{le="0.25"}' in text
        stalls = next(line for line in text.splitlines()
                      if line.startswith("colonies_event_loop_stalls_total "))
        assert float(stalls.split()[1]) >= 1
        node.stop()


async def test_consistent_read_goes_through_the_log(colony: Colony) -> None:
    async with Client.connect(colony.addr, colony.executor) as c:
        p = await c.submit("echo", colonyname="dev", executortype=colony.executortype)
        assert colony.node.replicator is not None
        before = colony.node.replicator.status()["commit_index"]
        c.consistent_reads = True
        assert (await c.process(p["processid"]))["processid"] == p["processid"]
        assert colony.node.replicator.status()["commit_index"] > before


async def test_connect_skips_a_dead_address_to_the_next_one(colony: Colony) -> None:
    from tests.raft_harness import free_port

    peer = colony.addr.rsplit("/p2p/", 1)[1]
    dead = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{peer}"
    async with Client.connect([dead, colony.addr], colony.executor, timeout=3) as c:
        assert c.addr == colony.addr
        assert (await c.server_info_fresh())["peerid"] == peer
