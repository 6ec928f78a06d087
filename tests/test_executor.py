"""The executor helper and the synchronous client against a real node."""

from __future__ import annotations

import pytest
import trio

from node.client import Client, SyncClient
from node.executor import Executor, as_output
from protocol.errors import Forbidden
from protocol.messages import FAILED, SUCCESS
from tests.conftest import Colony


def test_as_output() -> None:
    assert as_output(None) == []
    assert as_output((1, 2)) == [1, 2]
    assert as_output("x") == ["x"]
    assert as_output({"a": 1}) == [{"a": 1}]


async def test_executor_runs_functions_and_reports_errors(colony: Colony) -> None:
    ex = Executor(
        colony.addr, colony.executor, colonyname="dev", executortype=colony.executortype, poll_timeout=1
    )

    @ex.function
    def echo(*args: object) -> list:
        return list(args)

    @ex.function(name="divide")
    async def div(a: int, b: int) -> float:
        return a / b

    async with Client.connect(colony.addr, colony.executor) as c:
        ok = await c.submit("echo", args=["hello", 2], colonyname="dev", executortype=colony.executortype)
        kw = await c.submit("divide", kwargs={"a": 6, "b": 3}, colonyname="dev", executortype=colony.executortype)
        bad = await c.submit("divide", args=[1, 0], colonyname="dev", executortype=colony.executortype)
        missing = await c.submit("nosuch", colonyname="dev", executortype=colony.executortype)
        async with trio.open_nursery() as n:
            n.start_soon(ex.run, c)
            done = [await c.wait(p["processid"], timeout=10) for p in (ok, kw, bad, missing)]
            ex.stop()
        assert done[0]["state"] == SUCCESS and done[0]["out"] == ["hello", 2]
        assert done[1]["state"] == SUCCESS and done[1]["out"] == [2.0]
        assert done[2]["state"] == FAILED and "ZeroDivisionError" in done[2]["errors"][0]
        assert done[3]["state"] == FAILED and "nosuch" in done[3]["errors"][0]
        assert ex.processed == 4


async def test_executor_reconnects_with_its_own_connection(colony: Colony) -> None:
    ex = Executor(colony.addr, colony.executor, colonyname="dev", executortype=colony.executortype, poll_timeout=1)
    ex.function(lambda: "hi", name="hello")
    async with Client.connect(colony.addr, colony.executor) as c:
        p = await c.submit("hello", colonyname="dev", executortype=colony.executortype)
        async with trio.open_nursery() as n:
            n.start_soon(ex.run)  # opens its own connection
            done = await c.wait(p["processid"], timeout=10)
            ex.stop()
    assert done["out"] == ["hi"]


async def test_sync_client(colony: Colony) -> None:
    def work() -> tuple[dict, dict]:
        with SyncClient(colony.addr, colony.executor.hex) as c:
            p = c.submit("echo", colonyname="dev", executortype=colony.executortype, args=[1])
            got = c.assign("dev", timeout=-1)
            c.close(got, [1])
            with pytest.raises(Forbidden):
                c.add_colony(colony.executor.id, "nope")
            return p, c.process(p["processid"])

    submitted, final = await trio.to_thread.run_sync(work)
    assert final["processid"] == submitted["processid"] and final["state"] == SUCCESS


async def test_errors_from_the_client_block_are_not_wrapped(colony: Colony) -> None:
    from protocol.errors import NotFound

    with pytest.raises(NotFound):
        async with Client.connect(colony.addr, colony.executor) as c:
            await c.process("ab" * 32)
