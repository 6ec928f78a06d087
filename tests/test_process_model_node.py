"""Logs, functions, pause and executor liveness against a real node: the SDK, the executor
helper (ctx.log, function registration, heartbeats), followers and long-pollers woken by
applies, and a stale executor's process going back to the queue in real time."""

from __future__ import annotations

import pytest
import trio

from node.client import Client
from node.executor import Executor, ProcessContext
from protocol.errors import BadRequest, Forbidden
from protocol.identity import PrivateKey
from protocol.messages import RUNNING, SUCCESS, WAITING
from tests.conftest import Colony


async def test_executor_logs_and_registers_functions_and_followers_see_lines(colony: Colony):
    t = colony.executortype
    ex = Executor(colony.addr, colony.executor, colonyname="dev", executortype=t, poll_timeout=1)
    go = trio.Event()

    @ex.function
    def work(n: int, *, ctx: ProcessContext) -> str:
        """Logs n lines, waiting for the test between the first and the rest."""
        ctx.log("started")
        trio.from_thread.run(go.wait)
        for i in range(n):
            ctx.log(f"step {i}")
        return "done"

    @ex.function
    async def quiet() -> None:
        return None

    async with Client.connect(colony.addr, colony.executor) as c:
        async with trio.open_nursery() as n:
            n.start_soon(ex.run, c)
            p = await c.submit("work", colonyname="dev", executortype=t, args=[3])
            seen: list[dict] = []

            async def follow() -> None:
                async for line in c.follow_logs(p["processid"], wait=5):
                    seen.append(line)

            n.start_soon(follow)
            # The follower gets the first line while the function still runs...
            with trio.fail_after(10):
                while not seen:
                    await trio.sleep(0.02)
            assert seen[0]["message"] == "started" and seen[0]["executorname"] == "worker-1"
            assert (await c.process(p["processid"]))["state"] == RUNNING
            go.set()
            done = await c.wait(p["processid"], timeout=10)
            ex.stop()
        # ... and every line once, in order, ending when the process finished.
        assert done["state"] == SUCCESS and done["out"] == ["done"]
        assert [ln["message"] for ln in seen] == ["started", "step 0", "step 1", "step 2"]
        assert [ln["seq"] for ln in seen] == [1, 2, 3, 4]
        assert [ln["seq"] for ln in await c.logs(p["processid"], latest=True, count=2)] == [3, 4]
        # The helper registered its functions when it started.
        funcs = await c.functions("dev")
        assert [(f["funcname"], f["executorname"]) for f in funcs] == [
            ("quiet", "worker-1"),
            ("work", "worker-1"),
        ]
        assert funcs[1]["description"].startswith("Logs n lines")
        # Closed: no more lines; another key may not write to it at all.
        with pytest.raises(BadRequest, match="only while it runs"):
            await c.add_log(p["processid"], "late")
        with pytest.raises(Forbidden):
            await c.with_key(colony.owner).add_log(p["processid"], "not mine")


async def test_a_follower_is_woken_by_the_apply_not_a_poll(colony: Colony):
    async with Client.connect(colony.addr, colony.executor) as c:
        p = await c.submit("f", colonyname="dev", executortype=colony.executortype)
        await c.assign("dev", timeout=-1)
        got: list[list[dict]] = []

        async def wait_for_line() -> None:
            got.append(await c.logs(p["processid"], timeout=20))

        async with trio.open_nursery() as n:
            n.start_soon(wait_for_line)
            await trio.sleep(0.3)
            assert got == []  # nothing yet: the read waits
            started = trio.current_time()
            await c.add_log(p["processid"], "hello")
            with trio.fail_after(3):
                while not got:
                    await trio.sleep(0.01)
        assert trio.current_time() - started < 2  # far below the 20 s timeout
        assert [ln["message"] for ln in got[0]] == ["hello"]


async def test_pause_holds_long_pollers_and_resume_wakes_them(colony: Colony):
    async with Client.connect(colony.addr, colony.executor) as c:
        owner = c.with_key(colony.owner)
        await owner.pause_assignments("dev")
        assert (await c.pause_status("dev"))["ispaused"] is True
        p = await c.submit("f", colonyname="dev", executortype=colony.executortype)
        assert (await c.process(p["processid"]))["state"] == WAITING  # submits still queue
        assigned: list[dict] = []

        async def poll() -> None:
            assigned.append(await c.assign("dev", timeout=20))

        async with trio.open_nursery() as n:
            n.start_soon(poll)
            await trio.sleep(0.5)
            assert assigned == []  # paused: the long-poll keeps waiting
            started = trio.current_time()
            await owner.resume_assignments("dev")
            with trio.fail_after(5):
                while not assigned:
                    await trio.sleep(0.01)
        assert trio.current_time() - started < 3
        assert assigned[0]["processid"] == p["processid"]
        with pytest.raises(Forbidden):
            await c.pause_assignments("dev")  # an executor is not the colony owner


async def test_a_silent_executors_process_returns_to_the_queue(colony: Colony):
    """Real time: stale-after 5 s, the leader's ticker fires the stale timer."""
    silent = PrivateKey.generate()
    async with Client.connect(colony.addr, colony.executor) as c:
        owner = c.with_key(colony.owner)
        await owner.add_executor(silent.id, "silent", colony.executortype, "dev")
        await owner.approve_executor("dev", "silent")
        assert (await owner.set_stale_after("dev", 5))["staleafter"] == 5
        p = await c.submit("f", colonyname="dev", executortype=colony.executortype)
        mine = c.with_key(silent)
        got = await mine.assign("dev", timeout=-1)
        assert got["processid"] == p["processid"]
        # The other executor keeps calling in; the silent one does not.
        with trio.fail_after(15):
            while (await c.process(p["processid"]))["state"] != WAITING:
                await c.heartbeat("dev")
                await trio.sleep(0.5)
        back = await c.process(p["processid"])
        assert back["retries"] == 1 and back["isassigned"] is False
        by_name = {e["executorname"]: e for e in await c.executors("dev")}
        assert by_name["silent"]["stale"] is True and by_name["worker-1"]["stale"] is False
        await owner.set_stale_after("dev", 0)
