"""Subscriptions: wait for a process to reach a state, follow new processes of a type.

The state-machine checks (consensus/subscriptions.py) with the harness; the node's long-poll
(node/subscriptions.py) over a replica that only applies, as a follower does, to show that
applies wake it without any leader round trip; then the SDK and CLI against a real node.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from machine_harness import Harness

from cli import main as cli_main
from consensus.machine import ColonyMachine
from node import subscriptions
from node.client import Client
from protocol.envelope import Request
from protocol.errors import AccessDenied, BadRequest, InvalidField, NotFound, RequestTimeout
from protocol.messages import FAILED, RUNNING, SUCCESS, WAITING, validate_body
from tests.conftest import Colony


@pytest.fixture
def dev(h: Harness) -> dict[str, str]:
    ids = {"co": h.colony("dev"), "w1": h.executor("dev", "w1")}
    ids["co2"] = h.colony("other")
    ids["o1"] = h.executor("other", "o1")
    return ids


def wait_read(h: Harness, caller: str, pid: str, state: int) -> Any:  # noqa: ANN401
    return h.read("waitprocessmsg", caller, {"processid": pid, "state": state, "timeout": 0})


def follow_read(h: Harness, caller: str, after: int, etype: str = "", count: int = 100) -> Any:  # noqa: ANN401
    body = {"colonyname": "dev", "executortype": etype, "afterseq": after, "count": count}
    return h.read("followprocessesmsg", caller, body)


# The state machine.


def test_wait_answers_when_the_state_is_reached(h: Harness, dev) -> None:
    w = dev["w1"]
    p = h.submit(w, "dev")
    pid = p["processid"]
    assert wait_read(h, w, pid, WAITING)["processid"] == pid
    assert wait_read(h, w, pid, SUCCESS) is None
    assert wait_read(h, w, pid, -1) is None
    a = h.assign(w, "dev")
    assert wait_read(h, w, pid, RUNNING)["attempt"] == a["attempt"]
    h.close(w, a, out=[1])
    assert wait_read(h, w, pid, SUCCESS)["out"] == [1]
    assert wait_read(h, dev["co"], pid, -1)["state"] == SUCCESS  # the colony owner may wait


def test_wait_for_a_state_it_can_no_longer_reach_is_refused_at_once(h: Harness, dev) -> None:
    w = dev["w1"]
    p = h.submit(w, "dev")
    h.close(w, h.assign(w, "dev"), ok=False)
    with pytest.raises(BadRequest, match="is failed and will never be successful"):
        wait_read(h, w, p["processid"], SUCCESS)
    with pytest.raises(BadRequest, match="never be running"):
        wait_read(h, w, p["processid"], RUNNING)
    assert wait_read(h, w, p["processid"], FAILED)["state"] == FAILED


def test_wait_refusals(h: Harness, dev) -> None:
    p = h.submit(dev["w1"], "dev")
    with pytest.raises(NotFound):
        wait_read(h, dev["w1"], "0" * 64, SUCCESS)
    with pytest.raises(AccessDenied):
        wait_read(h, dev["o1"], p["processid"], SUCCESS)
    for bad in ({"state": 9}, {"timeout": 601}, {"timeout": -1}, {"processid": "x"}):
        body = {"processid": p["processid"], "state": SUCCESS, "timeout": 1, **bad}
        with pytest.raises(InvalidField):
            h.read("waitprocessmsg", dev["w1"], body)


def test_follow_returns_processes_after_the_cursor_in_submission_order(h: Harness, dev) -> None:
    w = dev["w1"]
    start = follow_read(h, w, -1)
    assert start["processes"] == []
    a = h.submit(w, "dev")
    b = h.submit(w, "dev", "gpu")
    h.submit(dev["o1"], "other")  # another colony: not seen
    c = h.submit(w, "dev")
    h.close(w, h.assign(w, "dev"))  # a finished already: still new to the follower
    page = follow_read(h, w, start["cursor"])
    assert [p["processid"] for p in page["processes"]] == [
        a["processid"], b["processid"], c["processid"]
    ]
    assert page["processes"][0]["state"] == SUCCESS
    assert follow_read(h, w, page["cursor"]) == {"processes": [], "cursor": page["cursor"]}
    typed = follow_read(h, w, start["cursor"], "cli", count=1)
    assert [p["processid"] for p in typed["processes"]] == [a["processid"]]
    typed = follow_read(h, w, typed["cursor"], "cli")
    assert [p["processid"] for p in typed["processes"]] == [c["processid"]]
    with pytest.raises(AccessDenied):
        follow_read(h, dev["o1"], -1)


# The node's long-poll over a replica that only applies (a follower's view).


class ReplicaOnly:
    """What node/subscriptions.py needs from the replicator: the machine, the applied
    generation and its wake-ups. `apply` stands for an entry arriving from the leader."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.applied_generation = 0
        self._lot = trio.lowlevel.ParkingLot()

    @property
    def machine(self) -> ColonyMachine:
        return self.h.m

    def apply(self, op: str, caller: str, body: dict) -> Any:  # noqa: ANN401
        result = self.h.write(op, caller, body)
        self.applied_generation += 1
        self._lot.unpark_all()
        return result

    async def wait_applied(self, seen: int, deadline: float) -> int:
        with trio.move_on_at(deadline):
            while self.applied_generation == seen:
                await self._lot.park()
        return self.applied_generation


def request(msgtype: str, caller: str, body: dict) -> Request:
    return Request(msgtype=msgtype, body=validate_body(msgtype, body), caller=caller,
                   nonce=b"n", expiry_ms=0, audience="*", write=False)


async def test_an_apply_wakes_a_waiter(h: Harness, dev) -> None:
    w = dev["w1"]
    log = ReplicaOnly(h)
    p = h.submit(w, "dev")
    a = h.assign(w, "dev")
    req = request("waitprocessmsg", w, {"processid": p["processid"], "state": SUCCESS,
                                        "timeout": 30})
    got: list[Any] = []
    async with trio.open_nursery() as n:
        async def waiter() -> None:
            got.append(await subscriptions.serve(log, req))
        n.start_soon(waiter)
        await trio.sleep(0.05)
        assert got == []
        log.apply("closesuccessfulmsg", w, {"processid": p["processid"], "attempt": a["attempt"]})
    assert got[0]["state"] == SUCCESS


async def test_a_wait_times_out_with_408_and_a_follow_with_its_cursor(h: Harness, dev) -> None:
    w = dev["w1"]
    log = ReplicaOnly(h)
    p = h.submit(w, "dev")
    with pytest.raises(RequestTimeout):
        await subscriptions.serve(log, request(
            "waitprocessmsg", w, {"processid": p["processid"], "state": SUCCESS, "timeout": 0}))
    page = await subscriptions.serve(log, request(
        "followprocessesmsg", w, {"colonyname": "dev", "timeout": 0}))
    assert page == {"processes": [], "cursor": h.m._st.next_seq - 1}


async def test_an_apply_wakes_a_follower(h: Harness, dev) -> None:
    w = dev["w1"]
    log = ReplicaOnly(h)
    h.submit(w, "dev")  # before the follow: not reported
    req = request("followprocessesmsg", w, {"colonyname": "dev", "executortype": "gpu",
                                            "timeout": 30})
    got: list[Any] = []
    async with trio.open_nursery() as n:
        async def follower() -> None:
            got.append(await subscriptions.serve(log, req))
        n.start_soon(follower)
        await trio.sleep(0.05)
        log.apply("submitfuncspecmsg", w, {"spec": h.spec("dev")})  # another type: sleeps on
        await trio.sleep(0.05)
        assert got == []
        new = log.apply("submitfuncspecmsg", w, {"spec": h.spec("dev", "gpu")})
    assert [p["processid"] for p in got[0]["processes"]] == [new["processid"]]


# Through the client, against a real node.


async def test_wait_for_process_through_the_client(colony: Colony) -> None:
    t = colony.executortype
    async with Client.connect(colony.addr, colony.executor) as c:
        p = await c.submit("echo", colonyname="dev", executortype=t)
        with pytest.raises(RequestTimeout):
            await c.wait_for_process(p["processid"], SUCCESS, timeout=0.5)
        started = trio.current_time()

        async def run_it() -> None:
            await trio.sleep(0.3)
            a = await c.assign("dev", timeout=5)
            await c.close(a, ["done"])

        async with trio.open_nursery() as n:
            n.start_soon(run_it)
            done = await c.wait_for_process(p["processid"], SUCCESS, timeout=10)
        assert done["out"] == ["done"] and trio.current_time() - started < 5
        q = await c.submit("echo", colonyname="dev", executortype=t)
        await c.fail(await c.assign("dev", timeout=5), ["no"])
        with pytest.raises(BadRequest, match="will never be successful"):
            await c.wait_for_process(q["processid"], SUCCESS, timeout=10)
        assert (await c.wait_for_process(q["processid"], -1, timeout=1))["state"] == FAILED
        owner = c.with_key(colony.owner)
        assert (await owner.wait_for_process(q["processid"], FAILED, 1))["errors"] == ["no"]


async def test_follow_processes_through_the_client(colony: Colony) -> None:
    t = colony.executortype
    async with Client.connect(colony.addr, colony.executor) as c:
        await c.submit("before", colonyname="dev", executortype=t)
        seen: list[dict] = []

        async def follow(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            stream = c.follow_processes("dev", t, wait=5)
            task_status.started()
            async for p in stream:
                seen.append(p)
                if len(seen) == 3:
                    return

        with trio.fail_after(15):
            async with trio.open_nursery() as n:
                await n.start(follow)
                await trio.sleep(0.2)  # the follow's cursor is fixed at its first answer
                for i in range(3):
                    await c.submit(f"f{i}", colonyname="dev", executortype=t)
                    await c.submit("other", colonyname="dev", executortype="another-type")
        assert [p["spec"]["funcname"] for p in seen] == ["f0", "f1", "f2"]


async def test_backoff_end_to_end(colony: Colony) -> None:
    """A failed close retries after its backoff: the long-polling assign gets it back only
    when the leader's ticker has fired the backoff timer."""
    t = colony.executortype
    async with Client.connect(colony.addr, colony.executor) as c:
        p = await c.submit("flaky", colonyname="dev", executortype=t, maxretries=1,
                           backoff={"initial": 1, "jitter": 0})
        a1 = await c.assign("dev", timeout=5)
        await c.fail(a1, ["first try"])
        failed_at = trio.current_time()
        q = await c.process(p["processid"])
        assert q["state"] == WAITING and q["retries"] == 1 and q["backoffuntil"] > 0
        a2 = await c.assign("dev", timeout=10)
        waited = trio.current_time() - failed_at
        assert a2["processid"] == p["processid"] and a2["attempt"] == 2
        assert 0.8 < waited < 5, waited
        await c.close(a2, ["second try"])
        done = await c.wait_for_process(p["processid"], SUCCESS, timeout=5)
        assert done["retries"] == 1 and done["out"] == ["second try"]
        # Idempotency and concurrency limits ride on the same submit.
        k1 = await c.submit("once", colonyname="dev", executortype=t, idempotencykey="k-1")
        k2 = await c.submit("once", colonyname="dev", executortype=t, idempotencykey="k-1")
        assert k1["processid"] == k2["processid"]
        with pytest.raises(TypeError):
            await c.submit("x", colonyname="dev", executortype=t, idempotency_key="typo")


def run_cli(colony: Colony, *argv: str) -> int:
    return cli_main.main(
        [*argv, "--addr", colony.addr, "--colony", "dev", "--prvkey", colony.executor.hex,
         "--colony-prvkey", colony.owner.hex]
    )


async def test_cli_wait_follow_export_retention(colony: Colony, tmp_path, capsys) -> None:
    t = colony.executortype

    def cli(*argv: str) -> tuple[int, str, str]:
        rc = run_cli(colony, *argv)
        out, err = capsys.readouterr()
        return rc, out, err

    async with Client.connect(colony.addr, colony.executor) as c:
        p = await c.submit("echo", colonyname="dev", executortype=t)
        await c.close(await c.assign("dev", timeout=5), ["hi"])
        q = await c.submit("echo", colonyname="dev", executortype=t)
    rc, out, err = await trio.to_thread.run_sync(
        cli, "process", "wait", p["processid"], "--state", "successful", "-o", "json")
    assert rc == 0 and json.loads(out)["out"] == ["hi"], err
    rc, _, err = await trio.to_thread.run_sync(
        cli, "process", "wait", q["processid"], "--timeout", "0.5")
    assert rc == 1 and "(408)" in err
    rc, out, _ = await trio.to_thread.run_sync(
        cli, "process", "follow", "--type", t, "--from-start", "--count", "2", "-o", "json")
    assert rc == 0
    assert [json.loads(line)["processid"] for line in out.splitlines()] == [
        p["processid"], q["processid"]]
    path = tmp_path / "history.jsonl"
    rc, _, err = await trio.to_thread.run_sync(cli, "process", "export", "--file", str(path))
    assert rc == 0 and "exported 1 " in err
    assert [json.loads(line)["processid"] for line in path.read_text().splitlines()] == [
        p["processid"]]
    rc, out, _ = await trio.to_thread.run_sync(cli, "process", "export", "--since", "2999-01-01")
    assert rc == 0 and out == ""
    rc, out, _ = await trio.to_thread.run_sync(cli, "colony", "retention", "--seconds", "86400")
    assert rc == 0 and "86400 s" in out
    rc, out, _ = await trio.to_thread.run_sync(cli, "colony", "retention", "-o", "json")
    assert rc == 0 and json.loads(out)["seconds"] == 86400
    rc, _, err = await trio.to_thread.run_sync(cli, "colony", "retention", "--seconds", "-5")
    assert rc == 2
    # process run takes the optional spec fields as flags.
    run = ("process", "run", "--func", "once", "--type", t, "--idempotency-key", "job-1",
           "--backoff", "0.5,3,10", "--concurrency-key", "db", "--concurrency-limit", "2",
           "--maxretries", "2")
    rc, out1, _ = await trio.to_thread.run_sync(cli, *run)
    rc2, out2, _ = await trio.to_thread.run_sync(cli, *run)
    assert rc == rc2 == 0 and out1 == out2
    async with Client.connect(colony.addr, colony.executor) as c:
        spec = (await c.process(out1.strip()))["spec"]
    assert spec["backoff"] == {"initial": 0.5, "multiplier": 3, "max": 10, "jitter": 0.5}
    assert (spec["concurrencykey"], spec["concurrencylimit"]) == ("db", 2)
    rc, _, err = await trio.to_thread.run_sync(cli, "process", "run", "--func", "x",
                                               "--backoff", "1,2,3,4,5")
    assert rc == 2 and "INITIAL" in err
