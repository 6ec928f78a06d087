"""Generators and crons against a real node, in real time: the leader's ticker fires their
timers, the executor helper runs what they start, and the CLI drives them."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from cli import main as cli_main
from node.client import Client
from node.executor import Executor, ProcessContext
from protocol.errors import BadRequest
from protocol.messages import SUCCESS
from tests.conftest import Colony


def spec(name: str, etype: str, *deps: str) -> dict:
    return {
        "nodename": name,
        "funcname": name,
        "conditions": {"executortype": etype, "dependencies": list(deps)},
    }


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float) -> None:
    with trio.fail_after(timeout):
        while not await check():
            await trio.sleep(0.05)


def oldest_first(graphs: list[dict]) -> list[dict]:
    """Finished graphs list newest first."""
    return sorted(graphs, key=lambda g: g["submissiontime"])


async def test_interval_cron_runs_chain_their_output(colony: Colony) -> None:
    t = colony.executortype
    ex = Executor(colony.addr, colony.executor, colonyname="dev", executortype=t, poll_timeout=1)

    @ex.function
    def count(*, ctx: ProcessContext) -> int:
        return (ctx.inputs[0] if ctx.inputs else 0) + 1

    async with Client.connect(colony.addr, colony.executor) as c:
        with pytest.raises(BadRequest, match="expected 6 fields"):
            await c.add_cron("dev", "bad", [spec("count", t)], cron_expression="* * * * *")
        started = trio.current_time()
        cron = await c.add_cron("dev", "counter", [spec("count", t)], interval=1,
                                wait_for_prev=True)
        async with trio.open_nursery() as n:
            n.start_soon(ex.run, c)

            async def three_done() -> bool:
                done = await c.process_graphs("dev", state=SUCCESS)
                return len(done) >= 3

            await wait_for(three_done, 15)
            ex.stop()
        elapsed = trio.current_time() - started
        await c.remove_cron(cron["cronid"])
        graphs = oldest_first(await c.process_graphs("dev", state=SUCCESS))
        outs = [(await c.process(g["rootprocessids"][0]))["out"] for g in graphs[:3]]
        assert outs == [[1], [2], [3]]  # each run's input was the previous run's output
        assert await c.crons("dev") == []
    # Runs at about 1, 2 and 3 s after the add (the ticker wakes within a second).
    print(f"3 runs of a 1 s interval cron done {elapsed:.2f} s after its add")
    assert 2.5 < elapsed < 10, elapsed


async def test_generator_runs_full_batches_at_once_and_flushes_on_timeout(
    colony: Colony,
) -> None:
    t = colony.executortype
    ex = Executor(colony.addr, colony.executor, colonyname="dev", executortype=t, poll_timeout=1)

    @ex.function
    def total(*args: int) -> int:
        return sum(args)

    async with Client.connect(colony.addr, colony.executor) as c:
        g = await c.add_generator("dev", "sums", [spec("total", t)], trigger=2, timeout=1)
        gid = g["generatorid"]
        first = await c.pack_generator(gid, 1)
        full = await c.pack_generator(gid, 2)
        assert first == {"queuesize": 1, "processgraphid": ""}
        assert full["queuesize"] == 0 and full["processgraphid"]
        packed = trio.current_time()
        assert (await c.pack_generator(gid, 40))["queuesize"] == 1
        async with trio.open_nursery() as n:
            n.start_soon(ex.run, c)

            async def two_done() -> bool:
                return len(await c.process_graphs("dev", state=SUCCESS)) == 2

            await wait_for(two_done, 10)
            ex.stop()
        flushed = trio.current_time() - packed
        graphs = oldest_first(await c.process_graphs("dev", state=SUCCESS))
        roots = [await c.process(x["rootprocessids"][0]) for x in graphs]
        assert [(p["spec"]["args"], p["out"]) for p in roots] == [([1, 2], [3]), ([40], [40])]
        assert (await c.generator(gid))["queuesize"] == 0
        print(f"a partial batch (timeout 1 s) ran and finished {flushed:.2f} s after its pack")
        assert 0.9 < flushed < 5, flushed


def run_cli(colony: Colony, *argv: str) -> int:
    return cli_main.main(
        [*argv, "--addr", colony.addr, "--colony", "dev", "--prvkey", colony.executor.hex]
    )


async def test_cli_generator_and_cron_commands(colony: Colony, tmp_path: Path, capsys) -> None:
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps([spec("a", colony.executortype)]))

    def cli(*argv: str) -> tuple[int, str, str]:
        rc = run_cli(colony, *argv)
        out, err = capsys.readouterr()
        return rc, out, err

    async def run(*argv: str) -> tuple[int, str, str]:
        return await trio.to_thread.run_sync(lambda: cli(*argv))

    rc, out, _ = await run("generator", "add", "--name", "g", "--spec", str(wf), "--trigger", "2")
    assert rc == 0
    gid = out.strip()
    rc, out, _ = await run("generator", "pack", gid, "--arg", '{"n": 1}', "--json")
    assert rc == 0 and "1 argument(s) waiting" in out
    rc, out, _ = await run("generator", "pack", gid, "--arg", "x", "-o", "json")
    assert rc == 0 and json.loads(out)["processgraphid"]
    rc, out, _ = await run("generator", "ls", "-o", "json")
    assert [x["generatorid"] for x in json.loads(out)] == [gid]
    assert json.loads(out)[0]["runs"] == 1
    rc, out, _ = await run("generator", "get", gid)
    assert rc == 0 and "Generator" in out and "trigger" in out
    rc, _, err = await run("generator", "pack", gid, "--arg", "{", "--json")
    assert rc == 2 and "not valid JSON" in err and len(err.strip().splitlines()) == 1
    rc, out, _ = await run("generator", "remove", gid)
    assert rc == 0 and "removed" in out
    rc, _, err = await run("generator", "get", gid)
    assert rc == 1 and "not found" in err and "(404)" in err

    rc, out, _ = await run("cron", "add", "--name", "c", "--spec", str(wf), "--cron",
                           "0 0 3 * * *", "--wait-for-prev")
    assert rc == 0
    cid = out.strip()
    rc, _, err = await run("cron", "add", "--name", "d", "--spec", str(wf), "--cron", "* * *")
    assert rc == 1 and "invalid cron expression" in err and "(400)" in err
    assert len(err.strip().splitlines()) == 1
    rc, _, err = await run("cron", "add", "--name", "d", "--spec", str(wf))
    assert rc == 2 and "--cron" in err
    rc, out, _ = await run("cron", "run", cid)
    assert rc == 0 and "started workflow" in out
    rc, _, err = await run("cron", "run", cid)  # it waits for the previous run
    assert rc == 1 and "waits for its previous run" in err
    rc, out, _ = await run("cron", "ls")
    assert rc == 0 and "0 0 3 * * *" in out and "yes" in out
    rc, out, _ = await run("cron", "get", cid, "-o", "json")
    assert rc == 0 and json.loads(out)["runs"] == 1
    rc, out, _ = await run("cron", "remove", cid)
    assert rc == 0 and "removed" in out
