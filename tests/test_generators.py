"""Generators in the state machine: batching by trigger, the timeout flush of a partial
batch, the queue bound, restarts (snapshots), removal, and refusals that change nothing."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from machine_harness import Harness, S, make_id

from consensus import generators
from consensus.generators import MAX_GENERATOR_QUEUE_BYTES, run_id
from consensus.graphs import member_id
from consensus.machine import ColonyMachine
from protocol.errors import AccessDenied, BadRequest, InvalidField, NotFound
from protocol.messages import MAX_GENERATOR_ARG_BYTES, MAX_GENERATOR_QUEUE, PENDING, SUCCESS


@pytest.fixture
def dev(h: Harness) -> dict[str, str]:
    return {
        "co": h.colony("dev"),
        "w1": h.executor("dev", "w1"),
        "w2": h.executor("dev", "w2"),
        "pending": h.executor("dev", "pending", state=PENDING),
        "co2": h.colony("other"),
        "o1": h.executor("other", "o1"),
    }


def node(name: str, *deps: str, **fields: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "nodename": name,
        "funcname": f"f-{name}",
        "conditions": {"executortype": "cli", "dependencies": list(deps)},
    }
    spec.update(fields)
    return spec


CHAIN = [node("a", kwargs={"mode": "fast"}), node("b", "a", args=["own"])]


def add(
    h: Harness,
    caller: str,
    trigger: int,
    timeout: int = -1,
    name: str = "gen",
    specs: list[dict] | None = None,
    colony: str = "dev",
    **kw: Any,
) -> dict:
    body = {
        "colonyname": colony,
        "name": name,
        "workflowspec": {"functionspecs": CHAIN if specs is None else specs},
        "trigger": trigger,
        "timeout": timeout,
    }
    return h.write("addgeneratormsg", caller, {"generator": body}, **kw)


def pack(h: Harness, caller: str, g: dict, arg: Any) -> dict:  # noqa: ANN401
    return h.write("packgeneratormsg", caller, {"generatorid": g["generatorid"], "arg": arg})


def get(h: Harness, caller: str, g: dict) -> dict:
    return h.read("getgeneratormsg", caller, {"generatorid": g["generatorid"]})


def runs(h: Harness, caller: str) -> list[dict]:
    """Every run, oldest first (a listing shows unfinished runs, then finished ones newest
    first)."""
    graphs = h.read("getprocessgraphsmsg", caller, {"colonyname": "dev"})
    return sorted(graphs, key=lambda g: g["submissiontime"])


def root_args(h: Harness, caller: str) -> list[list]:
    """The args of each run's root, oldest run first."""
    return [h.process(caller, g["rootprocessids"][0])["spec"]["args"] for g in runs(h, caller)]


# Adding.


def test_add_generator(h: Harness, dev):
    gen = make_id("gen-1")
    h.now += 2 * S
    g = add(h, dev["w1"], trigger=3, timeout=10, gen=gen)
    assert g["generatorid"] == gen
    assert (g["colonyname"], g["name"], g["initiatorid"], g["initiatorname"]) == (
        "dev", "gen", dev["w1"], "w1")
    assert (g["trigger"], g["timeout"], g["created"]) == (3, 10, h.now)
    assert (g["queuesize"], g["firstpack"], g["lastrun"], g["runs"]) == (0, 0, 0, 0)
    specs = g["workflowspec"]["functionspecs"]
    assert g["workflowspec"]["colonyname"] == "dev"
    assert [s["conditions"]["colonyname"] for s in specs] == ["dev", "dev"]
    assert get(h, dev["w2"], g) == g
    assert h.next_deadline() is None  # nothing waits, so no timer


@pytest.mark.parametrize(
    "specs, match",
    [
        ([], "at least one function spec"),
        ([node("a"), node("a")], "used by more than one"),
        ([node("a", "zz")], "depends on 'zz'"),
        ([node("a", "b"), node("b", "a")], "cycle"),
    ],
)
def test_invalid_workflows_are_refused_and_nothing_is_stored(h: Harness, dev, specs, match):
    with pytest.raises(BadRequest, match=match):
        add(h, dev["w1"], trigger=2, specs=specs)
    assert h.m.snapshot()["generators"] == []


def test_add_refusals(h: Harness, dev, monkeypatch):
    add(h, dev["w1"], trigger=2)
    before = h.m.snapshot()["generators"]
    with pytest.raises(BadRequest, match="named 'gen' already exists"):
        add(h, dev["w2"], trigger=2)
    with pytest.raises(BadRequest, match="names colony 'other'"):
        body = {"colonyname": "dev", "name": "x", "trigger": 1,
                "workflowspec": {"colonyname": "other", "functionspecs": CHAIN}}
        h.write("addgeneratormsg", dev["w1"], {"generator": body})
    for trigger in (0, MAX_GENERATOR_QUEUE + 1):
        with pytest.raises(InvalidField, match="trigger"):
            add(h, dev["w1"], trigger=trigger, name="x")
    with pytest.raises(AccessDenied):
        add(h, dev["pending"], trigger=2, name="x")
    with pytest.raises(AccessDenied):
        add(h, dev["o1"], trigger=2, name="x")
    with pytest.raises(NotFound, match="colony 'nosuch'"):
        add(h, dev["w1"], trigger=2, name="x", colony="nosuch")
    monkeypatch.setattr(generators, "MAX_SCHEDULES_PER_COLONY", 1)
    with pytest.raises(BadRequest, match="already has 1 generators"):
        add(h, dev["w1"], trigger=2, name="x")
    assert h.m.snapshot()["generators"] == before
    add(h, dev["o1"], trigger=2, name="x", colony="other")  # per colony


# Batching.


def test_every_trigger_arguments_make_one_run(h: Harness, dev):
    g = add(h, dev["w1"], trigger=3)
    replies = [pack(h, dev["w2"], g, i) for i in range(7)]
    assert [r["queuesize"] for r in replies] == [1, 2, 0, 1, 2, 0, 1]
    made = [r["processgraphid"] for r in replies if r["processgraphid"]]
    assert made == [run_id(g["generatorid"], 0), run_id(g["generatorid"], 1)]
    assert [x["processgraphid"] for x in runs(h, dev["w1"])] == made
    assert root_args(h, dev["w1"]) == [[0, 1, 2], [3, 4, 5]]
    now = get(h, dev["w1"], g)
    assert (now["queuesize"], now["runs"], now["lastrun"]) == (1, 2, h.now)
    # The run is the generator's workflow, started by its creator.
    run = h.read("getprocessgraphmsg", dev["w1"], {"processgraphid": made[0]})
    assert run["initiatorname"] == "w1" and run["processids"] == [
        member_id(made[0], 0), member_id(made[0], 1)]
    root = h.process(dev["w1"], member_id(made[0], 0))
    child = h.process(dev["w1"], member_id(made[0], 1))
    assert root["spec"]["kwargs"] == {"mode": "fast"}  # kept (upstream quirk 15 wiped them)
    assert child["spec"]["args"] == ["own"] and child["waitforparents"]


def test_a_run_is_a_normal_workflow(h: Harness, dev):
    g = add(h, dev["w1"], trigger=2)
    pack(h, dev["w1"], g, "x")
    pack(h, dev["w1"], g, {"k": [1, 2]})  # any msgpack value
    a = h.assign(dev["w2"], "dev")
    assert a["spec"]["args"] == ["x", {"k": [1, 2]}]
    h.close(dev["w2"], a, out=["done"])
    b = h.assign(dev["w2"], "dev")
    assert b["in"] == ["done"]
    h.close(dev["w2"], b)
    assert runs(h, dev["w1"])[0]["state"] == SUCCESS


def test_trigger_one_runs_every_pack(h: Harness, dev):
    g = add(h, dev["w1"], trigger=1, timeout=5)
    for i in range(3):
        assert pack(h, dev["w1"], g, i)["queuesize"] == 0
    assert root_args(h, dev["w1"]) == [[0], [1], [2]]
    assert h.next_deadline() is None


# The timeout.


def test_timeout_flushes_a_partial_batch(h: Harness, dev):
    g = add(h, dev["w1"], trigger=10, timeout=5)
    t0 = h.now
    pack(h, dev["w1"], g, "a")
    assert get(h, dev["w1"], g)["firstpack"] == t0
    assert h.m.next_deadline() == t0 + 5 * S
    h.advance(2)
    pack(h, dev["w1"], g, "b")  # does not move the timeout: the batch's first arg waits
    assert h.m.next_deadline() == t0 + 5 * S
    assert h.advance(2.9).get("timers") is None
    assert runs(h, dev["w1"]) == []
    result = h.advance(0.1)
    assert result["timers"] == {"generator": [g["generatorid"]]}
    assert root_args(h, dev["w1"]) == [["a", "b"]]
    after = get(h, dev["w1"], g)
    assert (after["queuesize"], after["firstpack"], after["lastrun"]) == (0, 0, h.now)
    assert h.next_deadline() is None
    assert h.advance(60).get("timers") is None  # an empty queue never runs
    # The next batch's timeout starts at its own first argument.
    pack(h, dev["w1"], g, "c")
    assert h.m.next_deadline() == h.now + 5 * S
    h.advance(5)
    assert root_args(h, dev["w1"]) == [["a", "b"], ["c"]]


def test_a_full_batch_cancels_the_timeout(h: Harness, dev):
    g = add(h, dev["w1"], trigger=2, timeout=5)
    pack(h, dev["w1"], g, "a")
    h.advance(1)
    pack(h, dev["w1"], g, "b")
    assert h.next_deadline() is None
    h.advance(3)
    pack(h, dev["w1"], g, "c")  # a new batch: its own timeout, from now
    assert h.m.next_deadline() == h.now + 5 * S
    assert h.advance(4.9).get("timers") is None
    h.advance(0.1)
    assert root_args(h, dev["w1"]) == [["a", "b"], ["c"]]


@pytest.mark.parametrize("timeout", [0, -1])
def test_without_a_timeout_a_partial_batch_waits(h: Harness, dev, timeout):
    g = add(h, dev["w1"], trigger=3, timeout=timeout)
    assert g["timeout"] == 0
    pack(h, dev["w1"], g, "a")
    assert h.next_deadline() is None
    h.advance(3600)
    assert runs(h, dev["w1"]) == [] and get(h, dev["w1"], g)["queuesize"] == 1


# Bounds and refusals.


def test_the_queue_is_bounded(h: Harness, dev):
    g = add(h, dev["w1"], trigger=MAX_GENERATOR_QUEUE)
    big = "x" * (MAX_GENERATOR_ARG_BYTES - 3)  # a str of n chars encodes in n + 3 bytes
    fits = MAX_GENERATOR_QUEUE_BYTES // MAX_GENERATOR_ARG_BYTES
    for _ in range(fits):
        pack(h, dev["w1"], g, big)
    before = h.m.snapshot()["generators"]
    with pytest.raises(BadRequest, match="is full"):
        pack(h, dev["w1"], g, big)
    assert h.m.snapshot()["generators"] == before
    with pytest.raises(InvalidField, match="larger than"):
        pack(h, dev["w1"], g, big + "y")
    assert get(h, dev["w1"], g)["queuesize"] == fits
    # The pack that completes a batch is never refused for size: it queues nothing.
    full = add(h, dev["w1"], trigger=fits + 1, name="completes")
    for _ in range(fits + 1):
        pack(h, dev["w1"], full, big)
    assert get(h, dev["w1"], full)["runs"] == 1
    assert len(root_args(h, dev["w1"])[0]) == fits + 1


def test_pack_refusals_change_nothing(h: Harness, dev):
    g = add(h, dev["w1"], trigger=3)
    pack(h, dev["w1"], g, "a")
    before = h.m.snapshot()["generators"]
    with pytest.raises(NotFound, match="generator .* not found"):
        h.write("packgeneratormsg", dev["w1"], {"generatorid": make_id("nope"), "arg": 1})
    with pytest.raises(AccessDenied):
        pack(h, dev["o1"], g, "b")
    with pytest.raises(AccessDenied):
        pack(h, dev["pending"], g, "b")
    with pytest.raises(InvalidField, match="arg"):
        h.write("packgeneratormsg", dev["w1"], {"generatorid": g["generatorid"]})
    assert h.m.snapshot()["generators"] == before


# Restarts, removal, listing.


def restart(h: Harness) -> None:
    """Replace the machine with one restored from its msgpack-encoded snapshot."""
    data = msgpack.unpackb(msgpack.packb(h.m.snapshot()), raw=False)
    restored = ColonyMachine.restore(data)
    assert restored.digest() == h.m.digest()
    h.m = restored


def test_queued_arguments_and_the_timeout_survive_a_restart(h: Harness, dev):
    g = add(h, dev["w1"], trigger=3, timeout=10)
    t0 = h.now
    pack(h, dev["w1"], g, "a")
    pack(h, dev["w1"], g, ["b"])
    restart(h)
    assert get(h, dev["w1"], g)["queuesize"] == 2
    assert h.m.next_deadline() == t0 + 10 * S
    pack(h, dev["w1"], g, "c")  # the restored queue counts on
    assert root_args(h, dev["w1"]) == [["a", ["b"], "c"]]
    pack(h, dev["w1"], g, "d")
    restart(h)
    h.advance(10)
    assert root_args(h, dev["w1"]) == [["a", ["b"], "c"], ["d"]]
    assert get(h, dev["w1"], g)["runs"] == 2


def test_remove_generator_drops_its_queue_and_timer(h: Harness, dev):
    g = add(h, dev["w1"], trigger=3, timeout=10)
    pack(h, dev["w1"], g, "a")
    assert h.write("removegeneratormsg", dev["w2"], {"generatorid": g["generatorid"]}) == {}
    assert h.next_deadline() is None and h.m.snapshot()["timers"] == []
    with pytest.raises(NotFound):
        get(h, dev["w1"], g)
    with pytest.raises(NotFound):
        pack(h, dev["w1"], g, "b")
    h.advance(20)
    assert runs(h, dev["w1"]) == []
    add(h, dev["w1"], trigger=3)  # the name is free again


def test_remove_colony_removes_its_generators(h: Harness, dev):
    g = add(h, dev["w1"], trigger=3, timeout=10)
    pack(h, dev["w1"], g, "a")
    kept = add(h, dev["o1"], trigger=3, timeout=10, colony="other")
    pack(h, dev["o1"], kept, "a")
    h.write("removecolonymsg", make_id("server-owner"), {"colonyname": "dev"})
    assert [x["name"] for x in h.m.snapshot()["generators"]] == ["gen"]
    assert [t[1] for t in h.m.snapshot()["timers"]] == [f"generator:{kept['generatorid']}"]
    h.advance(10)
    assert h.read("getprocessgraphsmsg", dev["o1"], {"colonyname": "other"})


def test_list_generators(h: Harness, dev):
    for name in ("b", "c", "a"):
        add(h, dev["w1"], trigger=2, name=name)
    add(h, dev["o1"], trigger=2, name="z", colony="other")
    listed = h.read("getgeneratorsmsg", dev["w2"], {"colonyname": "dev"})
    assert [x["name"] for x in listed] == ["a", "b", "c"]
    two = h.read("getgeneratorsmsg", dev["w2"], {"colonyname": "dev", "count": 2})
    assert [x["name"] for x in two] == ["a", "b"]
    with pytest.raises(AccessDenied):
        h.read("getgeneratorsmsg", dev["o1"], {"colonyname": "dev"})


def test_the_creator_may_be_gone(h: Harness, dev):
    """Runs keep the creator's id and name after the executor is removed."""
    g = add(h, dev["w2"], trigger=1)
    h.write("removeexecutormsg", dev["co"], {"colonyname": "dev", "executorname": "w2"})
    pack(h, dev["w1"], g, "a")
    run = runs(h, dev["w1"])[0]
    assert (run["initiatorid"], run["initiatorname"]) == (dev["w2"], "w2")


def test_two_replicas_agree():
    """The same log gives the same state and results on two machines, timers included."""
    a, b = Harness(), Harness()
    for x in (a, b):
        x.colony("dev")
        x.executor("dev", "w1")
    w1 = make_id("executor-dev-w1")
    gen = make_id("g")
    cmds = [
        a.cmd("addgeneratormsg", w1, {"generator": {
            "colonyname": "dev", "name": "g", "trigger": 2, "timeout": 3,
            "workflowspec": {"functionspecs": CHAIN}}}, gen=gen),
        *[a.cmd("packgeneratormsg", w1, {"generatorid": gen, "arg": i}) for i in range(3)],
    ]
    assert a.batch(cmds) == b.batch(cmds)
    for x in (a, b):
        x.advance(3)
    assert a.m.digest() == b.m.digest()
    assert len(a.read("getprocessgraphsmsg", w1, {"colonyname": "dev"})) == 2
