"""Crons in the state machine: expressions and intervals, wait-for-previous, run-now, the
previous run's output as the next run's input, removal, restarts, and refusals."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from machine_harness import SERVER, T0, Harness, S, make_id

from consensus import cron_schedule, generators
from consensus.generators import run_id
from consensus.machine import ColonyMachine
from protocol.errors import AccessDenied, BadRequest, InvalidField, NotFound
from protocol.messages import CANCELLED, FAILED, PENDING, SUCCESS, WAITING

# T0 is 2023-11-14 22:13:20 UTC.


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


def node(name: str, *deps: str) -> dict[str, Any]:
    return {
        "nodename": name,
        "funcname": f"f-{name}",
        "conditions": {"executortype": "cli", "dependencies": list(deps)},
    }


ONE = [node("a")]
# Two leaves: the next run's input is their outputs, in graph order.
FORK = [node("a"), node("b", "a"), node("c", "a")]


def add(
    h: Harness,
    caller: str,
    *,
    interval: int = -1,
    expr: str = "",
    wait: bool = False,
    name: str = "cron",
    specs: list[dict] | None = None,
    colony: str = "dev",
    **kw: Any,
) -> dict:
    body = {
        "colonyname": colony,
        "name": name,
        "workflowspec": {"functionspecs": ONE if specs is None else specs},
        "cronexpression": expr,
        "interval": interval,
        "waitforprevprocessgraph": wait,
    }
    return h.write("addcronmsg", caller, {"cron": body}, **kw)


def get(h: Harness, caller: str, c: dict) -> dict:
    return h.read("getcronmsg", caller, {"cronid": c["cronid"]})


def run_now(h: Harness, caller: str, c: dict) -> dict:
    return h.write("runcronmsg", caller, {"cronid": c["cronid"]})


def runs(h: Harness, caller: str) -> list[dict]:
    """Every run, oldest first (a listing shows unfinished runs, then finished ones newest
    first)."""
    graphs = h.read("getprocessgraphsmsg", caller, {"colonyname": "dev"})
    return sorted(graphs, key=lambda g: g["submissiontime"])


def finish(h: Harness, caller: str, ok: bool = True, out: list | None = None) -> dict:
    """Assign the next process and close it."""
    p = h.assign(caller, "dev")
    h.close(caller, p, ok, **({"out": out} if out is not None and ok else {}))
    return p


# Intervals.


def test_interval_cron_runs_every_interval(h: Harness, dev):
    cid = make_id("cron-1")
    c = add(h, dev["w1"], interval=10, gen=cid)
    assert c["cronid"] == cid and c["interval"] == 10 and c["cronexpression"] == ""
    assert (c["nextrun"], c["lastrun"], c["runs"], c["prevprocessgraphid"]) == (
        T0 + 10 * S, 0, 0, "")
    assert h.m.next_deadline() == T0 + 10 * S
    assert h.advance(9.9).get("timers") is None
    assert h.advance(0.1)["timers"] == {"cron": [cid]}
    assert [g["processgraphid"] for g in runs(h, dev["w1"])] == [run_id(cid, 0)]
    after = get(h, dev["w1"], c)
    assert (after["lastrun"], after["runs"], after["nextrun"]) == (T0 + 10 * S, 1, T0 + 20 * S)
    assert after["prevprocessgraphid"] == run_id(cid, 0)
    run = runs(h, dev["w1"])[0]
    assert run["initiatorname"] == "w1" and run["state"] == WAITING


def test_interval_runs_keep_their_phase_and_missed_runs_are_coalesced(h: Harness, dev):
    c = add(h, dev["w1"], interval=10)
    h.advance(13)  # a late tick: the run happens, the phase stays T0 + 10k
    assert get(h, dev["w1"], c)["nextrun"] == T0 + 20 * S
    h.advance(45)  # T0 + 58: runs due at 20, 30, 40, 50 were missed; one run, next at 60
    assert len(runs(h, dev["w1"])) == 2
    assert get(h, dev["w1"], c)["nextrun"] == T0 + 60 * S


# Expressions.


@pytest.mark.parametrize(
    "expr, first, second",
    [
        ("0/15 * * * * *", 10, 25),  # 22:13:30 then 22:13:45
        ("*/1 * * * * *", 1, 2),
        ("0 14 22 * * *", 40, 40 + 86_400),  # daily at 22:14:00
        ("@hourly", 2800, 2800 + 3600),
        ("0 0 0 * * THU", 92_800, 92_800 + 7 * 86_400),  # Thursdays at 00:00
    ],
)
def test_expression_cron(h: Harness, dev, expr, first, second):
    c = add(h, dev["w1"], expr=expr)
    assert c["nextrun"] == T0 + first * S and c["interval"] == -1
    h.advance(first - 0.5)
    assert runs(h, dev["w1"]) == []
    h.advance(0.5)
    assert len(runs(h, dev["w1"])) == 1
    assert get(h, dev["w1"], c)["nextrun"] == T0 + second * S


def test_next_run_is_computed_from_the_given_time_only():
    # Strictly after the given time, and the same answer wherever the second starts.
    assert cron_schedule.next_after("0/15 * * * * *", T0) == T0 + 10 * S
    assert cron_schedule.next_after("0/15 * * * * *", T0 + 10 * S) == T0 + 25 * S
    assert cron_schedule.next_after("0/15 * * * * *", T0 + 10 * S + 1) == T0 + 25 * S
    assert cron_schedule.next_after("0/15 * * * * *", T0 + 9 * S + 999_999_999) == T0 + 10 * S


@pytest.mark.parametrize(
    "expr, match",
    [
        ("* * * * *", "expected 6 fields .* got 5"),
        ("0 * * * * * 2030", "expected 6 fields .* got 7"),
        ("61 * * * * *", "out of range"),
        ("*/0 * * * * *", "not acceptable"),
        ("0 0 0 30 2 *", "matches no time"),
        ("R * * * * *", "random value"),
        ("0 0 R * * *", "random value"),
        ("H * * * * *", "hash"),
        ("@every 5s", "unknown descriptor .* use an interval"),
        ("x" * 300, "longer than 256"),
    ],
)
def test_bad_expressions_are_refused_at_add(h: Harness, dev, expr, match):
    with pytest.raises(BadRequest, match=match) as e:
        add(h, dev["w1"], expr=expr)
    assert "invalid cron expression" in e.value.message
    assert h.m.snapshot()["crons"] == [] and h.next_deadline() is None


def test_names_with_r_in_them_are_fine(h: Harness, dev):
    add(h, dev["w1"], expr="0 0 0 * APR FRI")


def test_add_refusals_change_nothing(h: Harness, dev, monkeypatch):
    add(h, dev["w1"], interval=5)
    before = (h.m.snapshot()["crons"], h.m.snapshot()["timers"])
    with pytest.raises(BadRequest, match="not both"):
        add(h, dev["w1"], interval=5, expr="* * * * * *", name="x")
    with pytest.raises(BadRequest, match="needs a cronexpression"):
        add(h, dev["w1"], name="x")
    for interval in (0, -2, 10**9):
        with pytest.raises(InvalidField, match="interval"):
            add(h, dev["w1"], interval=interval, name="x")
    with pytest.raises(BadRequest, match="named 'cron' already exists"):
        add(h, dev["w2"], interval=5)
    with pytest.raises(BadRequest, match="cycle"):
        add(h, dev["w1"], interval=5, name="x", specs=[node("a", "b"), node("b", "a")])
    with pytest.raises(AccessDenied):
        add(h, dev["pending"], interval=5, name="x")
    with pytest.raises(AccessDenied):
        add(h, dev["o1"], interval=5, name="x")
    monkeypatch.setattr(generators, "MAX_SCHEDULES_PER_COLONY", 1)
    with pytest.raises(BadRequest, match="already has 1 crons"):
        add(h, dev["w1"], interval=5, name="x")
    assert (h.m.snapshot()["crons"], h.m.snapshot()["timers"]) == before


# Wait for the previous run.


def test_wait_for_previous_skips_while_it_is_unfinished(h: Harness, dev):
    c = add(h, dev["w1"], interval=1, wait=True)
    h.advance(1)
    assert len(runs(h, dev["w1"])) == 1
    assert h.advance(1)["timers"] == {"cron": [c["cronid"]]}  # skipped: it is waiting
    p = h.assign(dev["w2"], "dev")
    for _ in range(3):  # skipped: it is running
        assert h.advance(1)["timers"] == {"cron": [c["cronid"]]}
    assert len(runs(h, dev["w1"])) == 1
    state = get(h, dev["w1"], c)
    assert (state["runs"], state["skipped"], state["nextrun"]) == (1, 4, h.now + S)
    h.close(dev["w2"], p)
    h.advance(1)
    assert [g["state"] for g in runs(h, dev["w1"])] == [SUCCESS, WAITING]


@pytest.mark.parametrize("ending", ["failed", "cancelled", "removed"])
def test_a_failed_cancelled_or_removed_previous_run_does_not_block(h: Harness, dev, ending):
    c = add(h, dev["w1"], interval=1, wait=True)
    h.advance(1)
    gid = runs(h, dev["w1"])[0]["processgraphid"]
    if ending == "failed":
        finish(h, dev["w2"], ok=False)
    elif ending == "cancelled":
        h.write("cancelprocessgraphmsg", dev["w1"], {"processgraphid": gid})
    else:
        h.write("removeprocessgraphmsg", dev["w1"], {"processgraphid": gid})
    h.advance(1)
    assert get(h, dev["w1"], c)["runs"] == 2 and get(h, dev["w1"], c)["skipped"] == 0
    states = [g["state"] for g in runs(h, dev["w1"])]
    expected = {"failed": [FAILED, WAITING], "cancelled": [CANCELLED, WAITING],
                "removed": [WAITING]}
    assert states == expected[ending]


def test_without_wait_runs_pile_up(h: Harness, dev):
    add(h, dev["w1"], interval=1)
    h.advance(1)
    h.advance(1)
    h.advance(1)
    assert [g["state"] for g in runs(h, dev["w1"])] == [WAITING] * 3


# Run now.


def test_run_now_runs_and_restarts_the_interval(h: Harness, dev):
    c = add(h, dev["w1"], interval=10)
    h.advance(4)
    reply = run_now(h, dev["w2"], c)
    assert reply["runs"] == 1 and reply["lastrun"] == h.now
    assert reply["nextrun"] == h.now + 10 * S and h.m.next_deadline() == h.now + 10 * S
    assert [g["processgraphid"] for g in runs(h, dev["w1"])] == [run_id(c["cronid"], 0)]
    h.advance(6)  # the old schedule (T0 + 10) is gone
    assert len(runs(h, dev["w1"])) == 1
    h.advance(4)
    assert len(runs(h, dev["w1"])) == 2


def test_run_now_keeps_an_expression_schedule(h: Harness, dev):
    c = add(h, dev["w1"], expr="0/15 * * * * *")
    reply = run_now(h, dev["w1"], c)
    assert reply["runs"] == 1 and reply["nextrun"] == T0 + 10 * S


def test_run_now_is_refused_while_a_waited_for_run_is_unfinished(h: Harness, dev):
    c = add(h, dev["w1"], interval=60, wait=True)
    run_now(h, dev["w1"], c)
    before = (h.m.snapshot()["crons"], h.m.snapshot()["timers"], len(runs(h, dev["w1"])))
    with pytest.raises(BadRequest, match="waits for its previous run.*which is waiting"):
        run_now(h, dev["w1"], c)
    assert (h.m.snapshot()["crons"], h.m.snapshot()["timers"], len(runs(h, dev["w1"]))) == before
    finish(h, dev["w2"])
    assert run_now(h, dev["w1"], c)["runs"] == 2


def test_run_now_refusals(h: Harness, dev):
    c = add(h, dev["w1"], interval=60)
    with pytest.raises(NotFound, match="cron .* not found"):
        h.write("runcronmsg", dev["w1"], {"cronid": make_id("nope")})
    with pytest.raises(AccessDenied):
        run_now(h, dev["o1"], c)
    assert runs(h, dev["w1"]) == []


# Output to input.


def test_the_previous_runs_leaf_outputs_are_the_next_runs_input(h: Harness, dev):
    c = add(h, dev["w1"], interval=10, specs=FORK)
    h.advance(10)
    first = runs(h, dev["w1"])[0]
    a = h.assign(dev["w2"], "dev")
    assert a["in"] == []  # the first run has no previous output
    h.close(dev["w2"], a, out=["from-a"])
    b, cc = h.assign(dev["w2"], "dev"), h.assign(dev["w2"], "dev")
    assert b["in"] == ["from-a"]
    h.close(dev["w2"], cc, out=["from-c"])  # leaves close in any order
    h.close(dev["w2"], b, out=["from-b", 2])
    h.advance(10)
    second = runs(h, dev["w1"])[1]
    root = h.process(dev["w1"], second["rootprocessids"][0])
    assert root["in"] == ["from-b", 2, "from-c"]  # leaves in graph order
    children = [h.process(dev["w1"], pid) for pid in second["processids"][1:]]
    assert [p["in"] for p in children] == [[], []]  # only the roots get it
    assert get(h, dev["w1"], c)["prevprocessgraphid"] == second["processgraphid"]
    assert first["processgraphid"] != second["processgraphid"]


def test_run_now_gets_the_previous_output_too(h: Harness, dev):
    c = add(h, dev["w1"], interval=60)
    run_now(h, dev["w1"], c)
    finish(h, dev["w2"], out=["r1"])
    run_now(h, dev["w1"], c)
    assert h.assign(dev["w2"], "dev")["in"] == ["r1"]


# Removal, restarts, listing.


def test_remove_cron_clears_its_timer(h: Harness, dev):
    c = add(h, dev["w1"], interval=1)
    h.advance(1)
    assert h.write("removecronmsg", dev["w2"], {"cronid": c["cronid"]}) == {}
    assert h.next_deadline() is None and h.m.snapshot()["timers"] == []
    h.advance(5)
    assert len(runs(h, dev["w1"])) == 1  # its past run stays
    with pytest.raises(NotFound):
        get(h, dev["w1"], c)
    with pytest.raises(NotFound):
        run_now(h, dev["w1"], c)


def test_remove_colony_removes_its_crons(h: Harness, dev):
    add(h, dev["w1"], interval=1)
    kept = add(h, dev["o1"], interval=1, colony="other")
    h.write("removecolonymsg", SERVER, {"colonyname": "dev"})
    assert [t[1] for t in h.m.snapshot()["timers"]] == [f"cron:{kept['cronid']}"]
    h.advance(1)
    assert len(h.read("getprocessgraphsmsg", dev["o1"], {"colonyname": "other"})) == 1


def test_crons_survive_a_restart(h: Harness, dev):
    c = add(h, dev["w1"], interval=10, wait=True, specs=FORK)
    add(h, dev["w1"], expr="0/15 * * * * *", name="e")
    h.advance(10)
    data = msgpack.unpackb(msgpack.packb(h.m.snapshot()), raw=False)
    restored = ColonyMachine.restore(data)
    assert restored.digest() == h.m.digest()
    assert restored.snapshot()["crons"] == h.m.snapshot()["crons"]
    h.m = restored
    h.advance(10)  # the restored cron waits for its unfinished previous run
    assert get(h, dev["w1"], c)["skipped"] == 1
    assert restored.next_deadline() == T0 + 25 * S


def test_list_crons(h: Harness, dev):
    for name in ("b", "a", "c"):
        add(h, dev["w1"], interval=5, name=name)
    listed = h.read("getcronsmsg", dev["w2"], {"colonyname": "dev", "count": 2})
    assert [x["name"] for x in listed] == ["a", "b"]
    assert h.read("getcronsmsg", dev["o1"], {"colonyname": "other"}) == []
    with pytest.raises(AccessDenied):
        h.read("getcronsmsg", dev["o1"], {"colonyname": "dev"})
