"""The chaos fault hook: fault-file parsing and reloading, and the Raft transport obeying it
(partition cuts and refuses sessions, heal restores them, drops lose messages), on the
in-memory twin that runs the production session code."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import trio
from pysyncobj.node import Node
from raft_harness import wait_until

from node.faults import NO_FAULTS, FaultFile, FaultFileError, FaultPlan, parse_plan
from node.memory_transport import MemoryNetwork
from node.raft_transport import HEARTBEAT_S


def test_a_valid_plan_parses() -> None:
    plan = parse_plan('{"block": ["p1", "p2"], "delay_ms": 30, "drop": 0.25}')
    assert plan == FaultPlan(frozenset({"p1", "p2"}), 30, 0.25)
    assert parse_plan("{}") == NO_FAULTS


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"block": "p1"}',
        '{"block": [""]}',
        '{"delay_ms": -1}',
        '{"delay_ms": 1.5}',
        '{"drop": 2}',
        '{"drop": "x"}',
        '{"partition": []}',
    ],
)
def test_a_malformed_plan_is_refused(text: str) -> None:
    with pytest.raises(FaultFileError):
        parse_plan(text)


def test_reload_keeps_the_last_good_plan_and_says_why_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "faults.json"
    faults = FaultFile(path)
    seen: list[FaultPlan] = []
    faults.listeners.append(seen.append)
    assert faults.reload() == NO_FAULTS and seen == []  # no file: no faults
    path.write_text(json.dumps({"block": ["p1"]}))
    assert faults.blocks("p1") is False
    faults.reload()
    assert faults.blocks("p1") and seen == [FaultPlan(frozenset({"p1"}))]
    path.write_text('{"block": ')  # half written
    with caplog.at_level(logging.ERROR, logger="colonies.faults"):
        faults.reload()
        faults.reload()
    assert faults.blocks("p1")
    assert len([r for r in caplog.records if "ignored" in r.getMessage()]) == 1
    path.unlink()
    faults.reload()
    assert faults.plan == NO_FAULTS and seen[-1] == NO_FAULTS


def test_drop_follows_its_probability() -> None:
    faults = FaultFile(Path("/nonexistent"), rng=random.Random(1))
    faults.plan = FaultPlan(drop=0.5)
    dropped = sum(faults.drops() for _ in range(1000))
    assert 400 < dropped < 600
    faults.plan = NO_FAULTS
    assert not any(faults.drops() for _ in range(100))


async def test_the_transport_obeys_partition_heal_and_drop(tmp_path: Path) -> None:
    network = MemoryNetwork()
    path = tmp_path / "faults.json"
    faults = FaultFile(path, rng=random.Random(2))
    async with trio.open_nursery() as nursery:
        await nursery.start(network.run)
        a = network.transport("a", {"b": network.address("b")}, answer_delay=0, faults=faults)
        b = network.transport("b", {"a": network.address("a")}, answer_delay=0)
        received: list[dict] = []
        b.setOnMessageReceivedCallback(lambda node, msg: received.append(msg))
        nursery.start_soon(a.run)
        nursery.start_soon(b.run)
        await wait_until(lambda: a.connected == ["b"], 5, "a session")

        path.write_text(json.dumps({"block": ["b"]}))
        faults.reload()
        await wait_until(lambda: a.connected == [], 1, "the partition to cut the session")
        await trio.sleep(1.0)
        assert a.connected == [] and b.connected == []  # and not re-formed either way
        assert a.stats()["fault_refused"] > 0

        path.write_text("{}")
        faults.reload()
        await wait_until(lambda: a.connected == ["b"] and b.connected == ["a"], 5, "healed")

        path.write_text(json.dumps({"drop": 1.0}))
        faults.reload()
        msg = {"type": "response_vote", "term": 1}
        assert a.send(Node("b"), msg)  # the sender cannot tell
        assert a.send(Node("b"), {"type": "timeout_now", "term": 1})
        await trio.sleep(HEARTBEAT_S * 2)  # heartbeats still pass: the session stays up
        assert received == [] and a.connected == ["b"]
        assert a.stats()["fault_dropped"] == 2
        path.write_text("{}")
        faults.reload()
        assert a.send(Node("b"), msg)
        await wait_until(lambda: len(received) == 1, 5, "a message once drops stop")
        nursery.cancel_scope.cancel()
