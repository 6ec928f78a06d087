"""The executor helper and the synchronous client against a real node."""

from __future__ import annotations

import pytest
import trio

from node.client import Client, SyncClient
from node.connection import ConnectionLost
from node.executor import Executor, as_output
from protocol.errors import Forbidden, NotFound, Unavailable
from protocol.identity import PrivateKey
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


class FailoverClient:
    """A stand-in client: its first function registration and its first assigns fail as
    during a leader failover (503, then a lost connection), then one process comes, then
    nothing."""

    def __init__(self) -> None:
        self.errors: list[Exception] = [Unavailable("the raft group has no leader"),
                                        ConnectionLost("/ip4/127.0.0.1/tcp/1", sent=True)]
        self.process = {"processid": "p1", "attempt": 1, "spec": {"funcname": "hello"}}
        self.handed = False
        self.closed: list[tuple[str, bool]] = []
        self.registered = 0

    def with_key(self, key: object) -> FailoverClient:
        return self

    async def heartbeat(self, colonyname: str) -> dict:
        return {"staleafter": 0}

    async def add_function(self, *args: object, **kw: object) -> dict:
        self.registered += 1
        if self.registered == 1:
            raise Unavailable("the command's outcome is unknown (raft leader changed)")
        return {}

    async def assign(self, colonyname: str, timeout: int = 10) -> dict:
        if self.errors:
            raise self.errors.pop(0)
        if not self.handed:
            self.handed = True
            return self.process
        await trio.sleep(0.01)
        raise NotFound("no process")

    async def close_and_assign(self, process: dict, colonyname: str, *, successful: bool,
                               **kw: object) -> dict | None:
        self.closed.append((process["processid"], successful))
        return None


async def test_executor_survives_a_failover_during_assign(monkeypatch: pytest.MonkeyPatch) -> None:
    # Regression (chaos runs): a 503 or a lost connection from assign, or a 503 while it
    # registered its functions on (re)start, ended Executor.run.
    monkeypatch.setattr("node.executor.RECONNECT_DELAY_S", 0.01)
    ex = Executor("/ip4/127.0.0.1/tcp/1", PrivateKey.generate(), colonyname="dev",
                  executortype="t", poll_timeout=1, executorname="w")
    ex.function(lambda: "hi", name="hello")
    fake = FailoverClient()
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(ex.run, fake)
            while not fake.closed:
                await trio.sleep(0.01)
            ex.stop()
    assert fake.closed == [("p1", True)] and not fake.errors and fake.registered == 2


async def test_sync_client_iterates_the_streaming_calls(colony: Colony) -> None:
    """export_processes, follow_processes and follow_logs are async iterators on Client;
    SyncClient hands them back as plain iterators."""
    t = colony.executortype

    def work() -> tuple[list[str], list[str], list[str], str]:
        with SyncClient(colony.addr, colony.executor.hex) as c:
            p = c.submit("echo", colonyname="dev", executortype=t, args=[1])
            got = c.assign("dev", timeout=-1)
            c.add_log(got["processid"], "one")
            c.add_log(got["processid"], "two")
            c.close(got, [1])
            exported = [x["processid"] for x in c.export_processes("dev")]
            lines = [x["message"] for x in c.follow_logs(p["processid"])]
            follow = c.follow_processes("dev", t, afterseq=0, wait=1)
            followed = [next(follow)["processid"]]
            follow.close()  # stops the stream; the client goes on
            return exported, lines, followed, c.process(p["processid"])["processid"]

    exported, lines, followed, pid = await trio.to_thread.run_sync(work)
    assert pid in exported and lines == ["one", "two"] and followed == [pid]
