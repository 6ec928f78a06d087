"""Workflows against a real node: the SDK, an executor whose functions extend their own
workflow, long-pollers woken by children becoming ready, cancel, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from cli import main as cli_main
from node.client import Client
from node.executor import Executor, ProcessContext
from protocol.errors import BadRequest, Forbidden, NotFound
from protocol.messages import CANCELLED, SUCCESS, WAITING
from tests.conftest import Colony


def spec(name: str, etype: str, *deps: str, **fields: object) -> dict:
    s: dict = {
        "nodename": name,
        "funcname": name,
        "conditions": {"executortype": etype, "dependencies": list(deps)},
    }
    s.update(fields)
    return s


async def test_executor_runs_a_workflow_that_grows(colony: Colony) -> None:
    t = colony.executortype
    ex = Executor(colony.addr, colony.executor, colonyname="dev", executortype=t, poll_timeout=1)

    @ex.function
    def split(*args: object, ctx: ProcessContext) -> list:
        # A plain function (run in a worker thread): add_child blocks.
        child = ctx.add_child({"funcname": "double", "args": [21]})
        assert child["parents"] == [ctx.processid] and child["waitforparents"] is True
        return ["split"]

    @ex.function
    async def merge(*args: object, ctx: ProcessContext) -> list:
        # An async function: await add_child. insert=True puts the new process between this
        # one and its children (here: "last").
        await ctx.add_child({"funcname": "tag", "nodename": "tag"}, insert=True)
        return [len(ctx.inputs), *ctx.inputs]

    @ex.function
    def double(x: int) -> int:
        return 2 * x

    @ex.function
    def tag(*, ctx: ProcessContext) -> str:
        return "tagged:" + ",".join(str(v) for v in ctx.inputs)

    @ex.function
    def last(*, ctx: ProcessContext) -> list:
        return ["last", *ctx.inputs]

    async with Client.connect(colony.addr, colony.executor) as c:
        g = await c.submit_workflow(
            "dev",
            [spec("split", t), spec("merge", t, "split"), spec("last", t, "merge")],
        )
        gid = g["processgraphid"]
        assert g["state"] == WAITING and len(g["rootprocessids"]) == 1
        async with trio.open_nursery() as n:
            n.start_soon(ex.run, c)
            done = await c.wait_process_graph(gid, timeout=15)
            ex.stop()
        assert done["state"] == SUCCESS
        assert len(done["processids"]) == 5  # split, merge, last + double + tag
        by_func = {}
        for pid in done["processids"]:
            p = await c.process(pid)
            by_func[p["spec"]["funcname"]] = p
        assert by_func["double"]["out"] == [42] and by_func["double"]["in"] == ["split"]
        assert by_func["merge"]["out"] == [1, "split"]
        assert by_func["tag"]["in"] == [1, "split"]
        assert by_func["last"]["parents"] == [by_func["tag"]["processid"]]
        assert by_func["last"]["out"] == ["last", "tagged:1,split"]
        assert all(p["state"] == SUCCESS for p in by_func.values())
        listed = await c.process_graphs("dev", SUCCESS)
        assert [x["processgraphid"] for x in listed] == [gid]
        stats = await c.colony_stats("dev")
        assert stats["successfulworkflows"] == 1 and stats["successfulprocesses"] == 5
        # A finished graph can be removed, and its processes go with it.
        await c.remove_process_graph(gid)
        with pytest.raises(NotFound):
            await c.process(by_func["double"]["processid"])


async def test_a_ready_child_wakes_a_long_polling_executor(colony: Colony) -> None:
    t = colony.executortype
    async with Client.connect(colony.addr, colony.executor) as c:
        g = await c.submit_workflow("dev", [spec("a", t), spec("b", t, "a")])
        a = await c.assign("dev", timeout=-1)
        assert a["processid"] == g["rootprocessids"][0]
        got: dict = {}

        async def poll() -> None:
            got["process"] = await c.assign("dev", timeout=10)
            got["at"] = trio.current_time()

        async with trio.open_nursery() as n:
            n.start_soon(poll)
            await trio.sleep(0.3)  # the poller is parked: b waits for a
            assert "process" not in got
            closed_at = trio.current_time()
            await c.close(a, ["from-a"])
        assert got["process"]["processid"] == g["processids"][1]
        assert got["process"]["in"] == ["from-a"]
        assert got["at"] - closed_at < 2.0  # woken by the apply, not by the poll timeout


async def test_cancel_through_the_client(colony: Colony) -> None:
    t = colony.executortype
    async with Client.connect(colony.addr, colony.executor) as c:
        g = await c.submit_workflow("dev", [spec("a", t), spec("b", t, "a")])
        a = await c.assign("dev", timeout=-1)
        with pytest.raises(BadRequest, match="cancel the workflow instead"):
            await c.cancel_process(a["processid"])
        with pytest.raises(BadRequest, match="running and cannot be removed"):
            await c.remove_process_graph(g["processgraphid"])
        await c.cancel_process_graph(g["processgraphid"])
        with pytest.raises(BadRequest, match="was cancelled"):
            await c.close(a)
        graph = await c.process_graph(g["processgraphid"])
        assert graph["state"] == CANCELLED
        assert [n["state"] for n in graph["nodes"]] == [CANCELLED, CANCELLED]
        single = await c.submit("echo", colonyname="dev", executortype=t)
        await c.cancel_process(single["processid"])
        assert (await c.wait(single["processid"], timeout=5))["state"] == CANCELLED
        cancelled = await c.cancelled("dev")  # finished work lists newest end first
        assert [p["processid"] for p in cancelled][0] == single["processid"]
        assert {p["processid"] for p in cancelled} == {*g["processids"], single["processid"]}
        with pytest.raises(Forbidden):  # the colony owner's call
            await c.remove_all_process_graphs("dev")
        owner = c.with_key(colony.owner)
        await owner.remove_all_process_graphs("dev")
        assert await c.process_graphs("dev") == []


def run_cli(colony: Colony, *argv: str) -> int:
    return cli_main.main(
        [*argv, "--addr", colony.addr, "--colony", "dev", "--prvkey", colony.executor.hex,
         "--colony-prvkey", colony.owner.hex]
    )


async def test_cli_workflow_commands(colony: Colony, tmp_path: Path, capsys) -> None:
    t = colony.executortype
    wf = tmp_path / "wf.json"
    # A list of function specs; the colony comes from --colony.
    wf.write_text(json.dumps([spec("a", t), spec("b", t, "a")]))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"functionspecs": [spec("a", t, "nosuch")]}))

    def cli(*argv: str) -> tuple[int, str, str]:
        rc = run_cli(colony, *argv)
        out, err = capsys.readouterr()
        return rc, out, err

    rc, out, _ = await trio.to_thread.run_sync(cli, "workflow", "submit", "--spec", str(wf))
    assert rc == 0
    gid = out.strip()
    rc, out, _ = await trio.to_thread.run_sync(cli, "workflow", "ls", "-o", "json")
    assert rc == 0 and [g["processgraphid"] for g in json.loads(out)] == [gid]
    rc, out, _ = await trio.to_thread.run_sync(cli, "workflow", "get", gid)
    assert rc == 0 and "Depends on" in out and "waiting (for parents)" in out
    rc, out, _ = await trio.to_thread.run_sync(cli, "workflow", "get", gid, "-o", "json")
    assert json.loads(out)["nodes"][1]["nodename"] == "b"
    rc, _, err = await trio.to_thread.run_sync(cli, "workflow", "submit", "--spec", str(bad))
    assert rc == 1 and "depends on 'nosuch'" in err and "(400)" in err
    rc, _, err = await trio.to_thread.run_sync(
        cli, "workflow", "submit", "--spec", str(tmp_path / "missing.json")
    )
    assert rc == 2 and "cannot read workflow spec file" in err

    async with Client.connect(colony.addr, colony.executor) as c:
        a = await c.assign("dev", timeout=-1)
        assert a["processgraphid"] == gid
        rc, _, err = await trio.to_thread.run_sync(cli, "workflow", "remove", gid)
        assert rc == 1 and "running and cannot be removed" in err
        await c.fail(a, ["broke"])
    rc, out, _ = await trio.to_thread.run_sync(cli, "workflow", "ls", "--state", "failed")
    assert rc == 0 and gid in out and "failed" in out
    rc, out, _ = await trio.to_thread.run_sync(cli, "workflow", "cancel", gid)
    assert rc == 1
    rc, out, _ = await trio.to_thread.run_sync(cli, "workflow", "remove", gid)
    assert rc == 0 and "removed" in out

    # --wait reports a failed workflow with the member that failed.
    async def fail_root() -> None:
        async with Client.connect(colony.addr, colony.executor) as c:
            a = await c.assign("dev", timeout=10)
            await c.fail(a, ["it broke"])

    async with trio.open_nursery() as n:
        n.start_soon(fail_root)
        rc, out, err = await trio.to_thread.run_sync(
            cli, "workflow", "submit", "--spec", str(wf), "--wait", "--timeout", "10"
        )
    assert rc == 1 and "failed" in err and "a: it broke" in err and "Workflow" in out

    # process cancel, and the cancelled listing.
    async with Client.connect(colony.addr, colony.executor) as c:
        p = await c.submit("echo", colonyname="dev", executortype=t)
    rc, out, _ = await trio.to_thread.run_sync(cli, "process", "cancel", p["processid"])
    assert rc == 0 and "cancelled" in out
    rc, out, _ = await trio.to_thread.run_sync(cli, "process", "psc", "-o", "json")
    assert [x["processid"] for x in json.loads(out)] == [p["processid"]]
    assert json.loads(out)[0]["state"] == CANCELLED
    rc, _, err = await trio.to_thread.run_sync(cli, "process", "cancel", p["processid"])
    assert rc == 1 and "cannot be cancelled" in err
    rc, out, _ = await trio.to_thread.run_sync(cli, "workflow", "removeall")
    assert rc == 0
