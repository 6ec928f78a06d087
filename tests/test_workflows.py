"""Workflows (process graphs) in the state machine: submit, validation, readiness and
inputs, graph states, failure propagation, cancel, remove, addchild, snapshots."""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack
import pytest
from machine_harness import SERVER, Harness, S, make_id

from consensus import workflows
from consensus.graphs import find_cycle, member_id
from consensus.machine import ColonyMachine
from consensus.snapshot import SNAPSHOT_FORMAT
from protocol.errors import AccessDenied, BadRequest, NotFound
from protocol.messages import (
    CANCELLED,
    FAILED,
    MAX_WORKFLOW_SPECS,
    RUNNING,
    SUCCESS,
    WAITING,
)


@pytest.fixture
def dev(h: Harness) -> dict[str, str]:
    """Colony dev (owner co) with approved executors w1, w2 (type cli) and g1 (type gpu);
    colony other with o1."""
    ids = {"co": h.colony("dev"), "w1": h.executor("dev", "w1"), "w2": h.executor("dev", "w2")}
    ids["g1"] = h.executor("dev", "g1", "gpu")
    ids["co2"] = h.colony("other")
    ids["o1"] = h.executor("other", "o1")
    return ids


def node(name: str, *deps: str, etype: str = "cli", **fields: Any) -> dict[str, Any]:
    """A workflow function spec; its colony comes from the workflow."""
    spec: dict[str, Any] = {
        "nodename": name,
        "funcname": f"f-{name}",
        "conditions": {"executortype": etype, "dependencies": list(deps)},
    }
    spec.update(fields)
    return spec


def submit(
    h: Harness, caller: str, specs: list[dict], colony: str = "dev", gen: str | None = None
) -> dict:
    body = {"spec": {"colonyname": colony, "functionspecs": specs}}
    return h.write("submitworkflowspecmsg", caller, body, gen=gen)


def graph(h: Harness, caller: str, gid: str) -> dict:
    return h.read("getprocessgraphmsg", caller, {"processgraphid": gid})


def by_name(h: Harness, caller: str, gid: str) -> dict[str, dict]:
    """name -> process, for every member of the graph."""
    g = graph(h, caller, gid)
    return {n["nodename"]: h.process(caller, n["processid"]) for n in g["nodes"]}


def states(h: Harness, caller: str, gid: str) -> dict[str, int]:
    return {n: p["state"] for n, p in by_name(h, caller, gid).items()}


DIAMOND = [node("a"), node("b", "a"), node("c", "a"), node("d", "c", "b")]


# Submitting.


def test_submit_builds_the_graph(h: Harness, dev):
    gen = make_id("wf-1")
    h.now += 3 * S
    specs = [
        node("a", maxwaittime=10, maxexectime=0, env={"k": "v"}),
        node("b", "a", maxwaittime=10),
        node("c", "a"),
        node("d", "c", "b"),
    ]
    specs[0]["conditions"]["colonyname"] = "other"  # the workflow's colony wins
    g = submit(h, dev["w1"], specs, gen=gen)
    pids = [hashlib.sha3_256(f"{gen}/{i}".encode()).hexdigest() for i in range(4)]
    assert pids == [member_id(gen, i) for i in range(4)]
    assert g == {
        "processgraphid": gen,
        "colonyname": "dev",
        "initiatorid": dev["w1"],
        "initiatorname": "w1",
        "rootprocessids": [pids[0]],
        "processids": pids,
        "state": WAITING,
        "submissiontime": h.now,
        "starttime": 0,
        "endtime": 0,
    }
    a, b, c, d = (h.process(dev["w2"], pid) for pid in pids)
    assert a["spec"]["conditions"]["colonyname"] == "dev" and a["spec"]["maxexectime"] == -1
    assert a["processgraphid"] == gen and a["initiatorname"] == "w1"
    assert (a["parents"], a["children"], a["waitforparents"]) == ([], [pids[1], pids[2]], False)
    assert (b["parents"], b["children"], b["waitforparents"]) == ([pids[0]], [pids[3]], True)
    assert d["parents"] == [pids[2], pids[1]] and d["waitforparents"] is True  # as declared
    assert a["waitdeadline"] == h.now + 10 * S
    assert b["waitdeadline"] == 0  # its wait starts when it is ready
    assert a["attributes"][0]["key"] == "k"
    assert all(p["state"] == WAITING for p in (a, b, c, d))
    full = graph(h, dev["w2"], gen)
    assert [n["nodename"] for n in full["nodes"]] == ["a", "b", "c", "d"]
    assert full["nodes"][1] == {
        "processid": pids[1],
        "nodename": "b",
        "funcname": "f-b",
        "executortype": "cli",
        "state": WAITING,
        "waitforparents": True,
    }
    assert full["edges"] == [
        {"source": pids[0], "target": pids[1]},
        {"source": pids[0], "target": pids[2]},
        {"source": pids[1], "target": pids[3]},
        {"source": pids[2], "target": pids[3]},
    ]
    stats = h.stats()
    assert stats["waitingprocesses"] == 4 and stats["waitingworkflows"] == 1
    assert h.m.assignable("dev", dev["w1"]) == 1  # only the root
    # Members are listed with the colony's processes.
    listed = h.read("getprocessesmsg", dev["w1"], {"colonyname": "dev"})
    assert [p["processid"] for p in listed] == pids
    with pytest.raises(BadRequest, match="already in use"):
        submit(h, dev["w1"], [node("x")], gen=gen)


def test_submit_needs_an_approved_member(h: Harness, dev):
    pending = h.executor("dev", "p", state=0)
    for caller in (pending, dev["o1"], dev["co"], SERVER):
        with pytest.raises(AccessDenied):
            submit(h, caller, [node("a")])
    with pytest.raises(NotFound):
        submit(h, dev["w1"], [node("a")], colony="nosuch")
    with pytest.raises(BadRequest, match="generated"):
        submit(h, dev["w1"], [node("a")], gen="")


@pytest.mark.parametrize(
    ("specs", "match"),
    [
        ([], "at least one function spec"),
        ([node("a"), node("")], r"#1 \(funcname 'f-'\) has no nodename"),
        ([node("a"), node("b"), node("a")], "nodename 'a' is used by more than one"),
        ([node("a"), node("b", "a", "zz")], "'b' depends on 'zz', which is not a nodename"),
        ([node("a"), node("b", "a", "a")], "'b' lists dependency 'a' twice"),
        ([node("a", "a")], "form a cycle: a -> a"),
        ([node("r"), node("a", "r", "c"), node("b", "a"), node("c", "b")], "cycle: a -> c -> b -> a"),
    ],
)
def test_invalid_workflows_are_refused_whole(h: Harness, dev, specs, match):
    """Quirk 18 fixed: 400 with a reason, and no graph or process is left behind."""
    with pytest.raises(BadRequest, match=match):
        submit(h, dev["w1"], specs)
    assert h.read("getprocessgraphsmsg", dev["w1"], {"colonyname": "dev"}) == []
    assert h.read("getprocessesmsg", dev["w1"], {"colonyname": "dev"}) == []
    stats = h.stats()
    assert stats["waitingprocesses"] == 0 and stats["waitingworkflows"] == 0
    assert h.m.snapshot()["processgraphs"] == []


def test_too_many_specs(h: Harness, dev):
    specs = [node(f"n{i}") for i in range(MAX_WORKFLOW_SPECS + 1)]
    with pytest.raises(BadRequest, match=f"at most {MAX_WORKFLOW_SPECS} function specs"):
        submit(h, dev["w1"], specs)
    g = submit(h, dev["w1"], specs[:MAX_WORKFLOW_SPECS])
    assert len(g["processids"]) == MAX_WORKFLOW_SPECS


def test_schema_refuses_bad_specs(h: Harness, dev):
    bad = node("a")
    del bad["conditions"]["executortype"]
    with pytest.raises(BadRequest, match="executortype"):
        submit(h, dev["w1"], [bad])
    with pytest.raises(BadRequest):
        h.write("submitworkflowspecmsg", dev["w1"], {"spec": {"colonyname": "dev"}})


def test_find_cycle_long_chain_is_iterative():
    n = 5000
    chain = [[i + 1] for i in range(n - 1)] + [[]]
    assert find_cycle(chain) == []
    chain[-1] = [0]
    assert len(find_cycle(chain)) == n


# Readiness, inputs and graph states.


def test_children_wait_for_all_parents_and_get_their_outputs(h: Harness, dev):
    g = submit(h, dev["w1"], DIAMOND)
    gid = g["processgraphid"]
    a = h.assign(dev["w1"], "dev")
    assert a["processid"] == g["rootprocessids"][0]
    got = graph(h, dev["w1"], gid)
    assert got["state"] == RUNNING and got["starttime"] == h.now
    with pytest.raises(NotFound):  # b and c wait for a
        h.assign(dev["w2"], "dev")
    h.now += S
    before = h.m.applied_changes
    h.close(dev["w1"], a, out=["A"])
    assert h.m.applied_changes > before  # long-pollers wake: b and c are ready
    assert h.m.assignable("dev", dev["w2"]) == 2
    ps = by_name(h, dev["w1"], gid)
    assert ps["b"]["waitforparents"] is False and ps["b"]["in"] == ["A"]
    assert ps["d"]["waitforparents"] is True and ps["d"]["in"] == []
    b = h.assign(dev["w1"], "dev")
    c = h.assign(dev["w2"], "dev")
    assert {b["processid"], c["processid"]} == {ps["b"]["processid"], ps["c"]["processid"]}
    assert b["in"] == ["A"]
    b, c = (b, c) if b["processid"] == ps["b"]["processid"] else (c, b)
    h.close(dev["w1"] if b["assignedexecutorid"] == dev["w1"] else dev["w2"], b, out=["B1", "B2"])
    assert h.m.assignable("dev", dev["w1"]) == 0  # d still waits for c
    assert graph(h, dev["w1"], gid)["state"] == RUNNING
    h.close(c["assignedexecutorid"], c, out=[{"c": 1}])
    d = h.assign(dev["w1"], "dev")
    assert d["processid"] == ps["d"]["processid"]
    assert d["in"] == [{"c": 1}, "B1", "B2"]  # dependency order: c then b
    h.now += S
    h.close(dev["w1"], d)
    done = graph(h, dev["w1"], gid)
    assert done["state"] == SUCCESS and done["endtime"] == h.now
    stats = h.stats()
    assert stats["successfulprocesses"] == 4 and stats["successfulworkflows"] == 1


def test_graph_goes_back_to_waiting_when_its_only_runner_is_requeued(h: Harness, dev):
    g = submit(h, dev["w1"], [node("a", maxexectime=5, maxretries=1), node("b", "a")])
    gid = g["processgraphid"]
    h.assign(dev["w1"], "dev")
    assert graph(h, dev["w1"], gid)["state"] == RUNNING
    assert h.advance(5)["requeued"] == g["rootprocessids"]
    assert graph(h, dev["w1"], gid)["state"] == WAITING  # as Colonies: nothing ran or succeeded
    a = h.assign(dev["w1"], "dev")
    assert a["attempt"] == 2
    h.close(dev["w1"], a)
    assert graph(h, dev["w1"], gid)["state"] == RUNNING


def test_close_assign_hands_out_the_released_child(h: Harness, dev):
    g = submit(h, dev["w1"], [node("a"), node("b", "a")])
    a = h.assign(dev["w1"], "dev")
    body = {"processid": a["processid"], "attempt": 1, "colonyname": "dev", "timeout": -1}
    r = h.write("closeassignmsg", dev["w1"], dict(body, successful=True, out=[7]))
    assert r["process"]["processid"] == g["processids"][1] and r["process"]["in"] == [7]


def test_children_respect_executor_type(h: Harness, dev):
    g = submit(h, dev["w1"], [node("a"), node("b", "a", etype="gpu")])
    h.close(dev["w1"], h.assign(dev["w1"], "dev"))
    with pytest.raises(NotFound):
        h.assign(dev["w1"], "dev")
    assert h.assign(dev["g1"], "dev")["processid"] == g["processids"][1]


# Failures.


def test_a_failure_fails_the_graph_and_unfinished_members_only(h: Harness, dev):
    """Quirk 10 fixed: members that already succeeded keep SUCCESS."""
    specs = [node("a"), node("b", "a"), node("c", "a"), node("d", "c", "b"), node("e")]
    g = submit(h, dev["w1"], specs)
    gid = g["processgraphid"]
    a = h.assign(dev["w1"], "dev")
    h.close(dev["w1"], a, out=["A"])
    b = h.assign(dev["w1"], "dev")
    c = h.assign(dev["w2"], "dev")
    h.now += S
    h.close(dev["w1"], b, ok=False, errors=["boom"])
    assert states(h, dev["w1"], gid) == {
        "a": SUCCESS,
        "b": FAILED,
        "c": FAILED,  # was running
        "d": FAILED,  # was waiting for parents
        "e": FAILED,  # an unrelated root that never ran
    }
    got = graph(h, dev["w1"], gid)
    assert got["state"] == FAILED and got["endtime"] == h.now
    ps = by_name(h, dev["w1"], gid)
    assert ps["b"]["errors"] == ["boom"]
    assert ps["c"]["errors"] == [f"workflow {gid} failed: process {b['processid']} ('b') failed"]
    assert ps["a"]["errors"] == [] and ps["a"]["out"] == ["A"]
    # c's executor learns why its close is refused.
    with pytest.raises(BadRequest, match=f"the process failed: workflow {gid} failed"):
        h.close(dev["w2"], c)
    assert h.m.assignable("dev", dev["w1"]) == 0 and h.next_deadline() is None
    stats = h.stats()
    assert (stats["failedprocesses"], stats["successfulprocesses"]) == (4, 1)
    assert stats["failedworkflows"] == 1 and stats["runningworkflows"] == 0


def test_a_failed_leaf_fails_the_graph(h: Harness, dev):
    g = submit(h, dev["w1"], [node("a"), node("leaf", "a"), node("other", "a")])
    h.close(dev["w1"], h.assign(dev["w1"], "dev"))
    leaf = h.assign(dev["w1"], "dev")
    assert leaf["processid"] == g["processids"][1]
    h.close(dev["w1"], leaf, ok=False)
    assert states(h, dev["w1"], g["processgraphid"]) == {
        "a": SUCCESS,
        "leaf": FAILED,
        "other": FAILED,
    }
    assert graph(h, dev["w1"], g["processgraphid"])["state"] == FAILED


def test_single_process_workflow_that_fails(h: Harness, dev):
    """Quirk 3: upstream OLD left this graph WAITING/RUNNING forever."""
    g = submit(h, dev["w1"], [node("only")])
    h.close(dev["w1"], h.assign(dev["w1"], "dev"), ok=False)
    assert graph(h, dev["w1"], g["processgraphid"])["state"] == FAILED


def test_exec_timeout_without_retries_fails_the_graph(h: Harness, dev):
    g = submit(h, dev["w1"], [node("a", maxexectime=2, maxretries=0), node("b", "a")])
    h.assign(dev["w1"], "dev")
    assert h.advance(2) == {"requeued": [], "failed": [g["processids"][0]]}
    assert states(h, dev["w1"], g["processgraphid"]) == {"a": FAILED, "b": FAILED}
    assert graph(h, dev["w1"], g["processgraphid"])["state"] == FAILED


def test_wait_timeout_fails_the_graph_and_same_tick_expiries_are_skipped(h: Harness, dev):
    g = submit(h, dev["w1"], [node("a", maxwaittime=3), node("b", maxwaittime=3)])
    first = min(g["processids"], key=lambda pid: (h.m._st.deadlines.get(pid), pid))
    # Both are due in one tick; the first fails the graph and the second with it.
    assert h.advance(3) == {"requeued": [], "failed": [first]}
    assert states(h, dev["w1"], g["processgraphid"]) == {"a": FAILED, "b": FAILED}
    assert h.next_deadline() is None


def test_a_childs_wait_deadline_starts_when_it_is_ready(h: Harness, dev):
    """Quirk 9 decided: maxwaittime counts from readiness, not from submission."""
    g = submit(h, dev["w1"], [node("a"), node("b", "a", maxwaittime=5)])
    a = h.assign(dev["w1"], "dev")
    assert h.advance(100) == {"requeued": [], "failed": []}  # b was not assignable yet
    h.close(dev["w1"], a)
    b = h.process(dev["w1"], g["processids"][1])
    assert b["waitdeadline"] == h.now + 5 * S and h.m.next_deadline() == h.now + 5 * S
    assert h.advance(4)["failed"] == []
    assert h.advance(1)["failed"] == [b["processid"]]
    assert graph(h, dev["w1"], g["processgraphid"])["state"] == FAILED


# Cancelling.


def test_cancel_graph(h: Harness, dev):
    g = submit(h, dev["w1"], [node("a"), node("b", "a"), node("c", "a"), node("d", "b")])
    gid = g["processgraphid"]
    h.close(dev["w1"], h.assign(dev["w1"], "dev"), out=[1])
    b = h.assign(dev["w1"], "dev")
    ref = {"processgraphid": gid}
    for caller in (dev["o1"], dev["co"], SERVER):
        with pytest.raises(AccessDenied):
            h.write("cancelprocessgraphmsg", caller, ref)
    h.now += S
    assert h.write("cancelprocessgraphmsg", dev["w2"], ref) == {}
    assert states(h, dev["w1"], gid) == {
        "a": SUCCESS,
        "b": CANCELLED,
        "c": CANCELLED,
        "d": CANCELLED,
    }
    got = graph(h, dev["w1"], gid)
    assert got["state"] == CANCELLED and got["endtime"] == h.now
    with pytest.raises(BadRequest, match="was cancelled: attempt 1 cannot be closed"):
        h.close(dev["w1"], b)
    with pytest.raises(BadRequest, match="was cancelled"):
        h.write(
            "closeassignmsg",
            dev["w1"],
            {"processid": b["processid"], "attempt": 1, "colonyname": "dev", "timeout": -1,
             "successful": True},
        )
    with pytest.raises(BadRequest, match="is cancelled and cannot be cancelled"):
        h.write("cancelprocessgraphmsg", dev["w2"], ref)
    assert h.m.assignable("dev", dev["w1"]) == 0
    stats = h.stats()
    assert stats["cancelledprocesses"] == 3 and stats["cancelledworkflows"] == 1
    with pytest.raises(NotFound):
        h.write("cancelprocessgraphmsg", dev["w2"], {"processgraphid": make_id("nope")})


def test_graph_cancelled_before_it_ran_has_no_start(h: Harness, dev):
    g = submit(h, dev["w1"], [node("a")])
    h.now += S
    h.write("cancelprocessgraphmsg", dev["w1"], {"processgraphid": g["processgraphid"]})
    got = graph(h, dev["w1"], g["processgraphid"])
    assert (got["state"], got["starttime"], got["endtime"]) == (CANCELLED, 0, h.now)


def test_cancel_finished_graph_is_refused(h: Harness, dev):
    g = submit(h, dev["w1"], [node("a")])
    h.close(dev["w1"], h.assign(dev["w1"], "dev"))
    with pytest.raises(BadRequest, match="is successful and cannot be cancelled"):
        h.write("cancelprocessgraphmsg", dev["w1"], {"processgraphid": g["processgraphid"]})


def test_cancel_process(h: Harness, dev):
    waiting = h.submit(dev["w1"], "dev", maxwaittime=10)
    running = h.submit(dev["w1"], "dev", priority=5, maxexectime=10)
    r = h.assign(dev["w1"], "dev")
    assert r["processid"] == running["processid"]
    assert h.m.next_deadline() is not None
    for caller in (dev["o1"], dev["co"]):
        with pytest.raises(AccessDenied):
            h.write("cancelprocessmsg", caller, {"processid": waiting["processid"]})
    h.write("cancelprocessmsg", dev["w2"], {"processid": waiting["processid"]})
    h.write("cancelprocessmsg", dev["w2"], {"processid": running["processid"]})
    assert h.next_deadline() is None and h.m.assignable("dev", dev["w1"]) == 0
    got = h.process(dev["w1"], running["processid"])
    assert got["state"] == CANCELLED and got["endtime"] == h.now
    assert got["isassigned"] is True  # so its executor hears why the close is refused
    with pytest.raises(BadRequest, match="was cancelled"):
        h.close(dev["w1"], r)
    with pytest.raises(BadRequest, match="is cancelled and cannot be cancelled"):
        h.write("cancelprocessmsg", dev["w2"], {"processid": running["processid"]})
    listed = h.read("getprocessesmsg", dev["w1"], {"colonyname": "dev", "state": CANCELLED})
    assert [p["processid"] for p in listed] == [waiting["processid"], running["processid"]]
    assert h.stats()["cancelledprocesses"] == 2
    assert h.read("getcolonystatsmsg", dev["w1"], {"colonyname": "dev"})["cancelledprocesses"] == 2
    # Cancelled processes can be removed, one by one or all at once.
    h.write("removeprocessmsg", dev["w1"], {"processid": waiting["processid"]})
    h.write("removeallprocessesmsg", dev["co"], {"colonyname": "dev", "state": CANCELLED})
    assert h.stats()["cancelledprocesses"] == 0
    # The executor's running index forgot the cancelled process: it can be removed.
    h.write("removeexecutormsg", dev["co"], {"colonyname": "dev", "executorname": "w1"})


def test_cancel_process_refuses_workflow_members(h: Harness, dev):
    g = submit(h, dev["w1"], [node("a")])
    with pytest.raises(BadRequest, match="cancel the workflow instead"):
        h.write("cancelprocessmsg", dev["w1"], {"processid": g["processids"][0]})
    done = h.submit(dev["w1"], "dev", priority=9)
    h.close(dev["w1"], h.assign(dev["w1"], "dev"))
    with pytest.raises(BadRequest, match="is successful and cannot be cancelled"):
        h.write("cancelprocessmsg", dev["w1"], {"processid": done["processid"]})


# Listing and removing.


def test_list_graphs_by_state(h: Harness, dev):
    gs = [submit(h, dev["w1"], [node("a"), node("b", "a")]) for _ in range(3)]
    ids = [g["processgraphid"] for g in gs]
    submit(h, dev["o1"], [node("x")], colony="other")
    h.assign(dev["w1"], "dev")  # the first graph runs

    def listing(**kw: Any) -> list[str]:
        body = {"colonyname": "dev", **kw}
        return [g["processgraphid"] for g in h.read("getprocessgraphsmsg", dev["w1"], body)]

    assert listing() == ids
    assert listing(state=RUNNING) == ids[:1]
    assert listing(state=WAITING) == ids[1:]
    assert listing(count=2) == ids[:2]
    assert listing(state=CANCELLED) == []
    with pytest.raises(AccessDenied):
        h.read("getprocessgraphsmsg", dev["o1"], {"colonyname": "dev"})
    with pytest.raises(BadRequest):
        h.read("getprocessgraphsmsg", dev["w1"], {"colonyname": "dev", "state": 5})
    with pytest.raises(NotFound):
        graph(h, dev["w1"], make_id("nope"))
    with pytest.raises(AccessDenied):
        graph(h, dev["o1"], ids[0])
    stats = h.read("getcolonystatsmsg", dev["w1"], {"colonyname": "dev"})
    assert (stats["runningworkflows"], stats["waitingworkflows"]) == (1, 2)


def test_remove_graph(h: Harness, dev):
    g = submit(h, dev["w1"], [node("a", env={"k": "v"}), node("b", "a")])
    gid = g["processgraphid"]
    a = h.assign(dev["w1"], "dev")
    ref = {"processgraphid": gid}
    with pytest.raises(BadRequest, match="running and cannot be removed"):
        h.write("removeprocessgraphmsg", dev["w2"], ref)
    h.close(dev["w1"], a)
    with pytest.raises(BadRequest, match="running and cannot be removed"):  # b still to run
        h.write("removeprocessgraphmsg", dev["w2"], ref)
    h.write("cancelprocessgraphmsg", dev["w2"], ref)
    with pytest.raises(AccessDenied):
        h.write("removeprocessgraphmsg", dev["o1"], ref)
    assert h.write("removeprocessgraphmsg", dev["w2"], ref) == {}
    for pid in g["processids"]:
        with pytest.raises(NotFound):
            h.process(dev["w1"], pid)
    with pytest.raises(NotFound):
        h.read("getattributemsg", dev["w1"], {"attributeid": a["attributes"][0]["attributeid"]})
    with pytest.raises(NotFound):
        h.write("removeprocessgraphmsg", dev["w2"], ref)
    assert sum(v for k, v in h.stats().items() if k.endswith(("processes", "workflows"))) == 0


def test_remove_waiting_graph(h: Harness, dev):
    g = submit(h, dev["w1"], [node("a", maxwaittime=9), node("b", "a")])
    h.write("removeprocessgraphmsg", dev["w1"], {"processgraphid": g["processgraphid"]})
    assert h.next_deadline() is None and h.m.assignable("dev", dev["w1"]) == 0


def test_workflow_members_are_removed_with_their_graph_only(h: Harness, dev):
    g = submit(h, dev["w1"], [node("a")])
    single = h.submit(dev["w1"], "dev")
    with pytest.raises(BadRequest, match="remove the workflow instead"):
        h.write("removeprocessmsg", dev["w1"], {"processid": g["processids"][0]})
    h.write("removeallprocessesmsg", dev["co"], {"colonyname": "dev", "state": -1})
    listed = h.read("getprocessesmsg", dev["w1"], {"colonyname": "dev"})
    assert [p["processid"] for p in listed] == g["processids"]
    with pytest.raises(NotFound):
        h.process(dev["w1"], single["processid"])


def test_remove_all_graphs(h: Harness, dev):
    done = submit(h, dev["w1"], [node("a")])
    h.close(dev["w1"], h.assign(dev["w1"], "dev"))
    running = submit(h, dev["w1"], [node("a"), node("b", "a")])
    h.assign(dev["w1"], "dev")
    waiting = submit(h, dev["w1"], [node("a")])
    foreign = submit(h, dev["o1"], [node("x")], colony="other")
    body = {"colonyname": "dev", "state": -1}
    for caller in (dev["w1"], SERVER, dev["co2"]):
        with pytest.raises(AccessDenied):
            h.write("removeallprocessgraphsmsg", caller, body)
    with pytest.raises(BadRequest, match="running process graphs cannot be removed"):
        h.write("removeallprocessgraphsmsg", dev["co"], dict(body, state=RUNNING))
    h.write("removeallprocessgraphsmsg", dev["co"], dict(body, state=SUCCESS))
    with pytest.raises(NotFound):
        graph(h, dev["w1"], done["processgraphid"])
    h.write("removeallprocessgraphsmsg", dev["co"], body)
    left = h.read("getprocessgraphsmsg", dev["w1"], {"colonyname": "dev"})
    assert [g["processgraphid"] for g in left] == [running["processgraphid"]]
    with pytest.raises(NotFound):
        graph(h, dev["w1"], waiting["processgraphid"])
    assert graph(h, dev["o1"], foreign["processgraphid"])["state"] == WAITING


def test_remove_colony_removes_its_graphs(h: Harness, dev):
    g = submit(h, dev["w1"], [node("a", maxexectime=5), node("b", "a")])
    h.assign(dev["w1"], "dev")
    kept = submit(h, dev["o1"], [node("x")], colony="other")
    h.write("removecolonymsg", SERVER, {"colonyname": "dev"})
    kept_ids = [x["processgraphid"] for x in h.m.snapshot()["processgraphs"]]
    assert kept_ids == [kept["processgraphid"]]
    assert g["processgraphid"] not in h.m._st.graphs
    assert h.next_deadline() is None
    stats = h.stats()
    assert stats["waitingworkflows"] == 1 and stats["runningworkflows"] == 0


# Adding children (dynamic workflows).


def add_child(
    h: Harness,
    caller: str,
    gid: str,
    parent: str,
    name: str = "new",
    insert: bool = False,
    child: str = "",
    gen: str | None = None,
    **fields: Any,
) -> dict:
    body = {
        "processgraphid": gid,
        "parentprocessid": parent,
        "childprocessid": child,
        "insert": insert,
        "spec": node(name, **fields),
    }
    return h.write("addchildmsg", caller, body, gen=gen)


def test_add_child_appends(h: Harness, dev):
    g = submit(h, dev["w1"], [node("a"), node("b", "a")])
    gid = g["processgraphid"]
    a = h.assign(dev["w1"], "dev")
    gen = make_id("child-gen")
    child = add_child(h, dev["w1"], gid, a["processid"], "n", gen=gen, maxwaittime=4)
    assert child["processid"] == gen
    assert child["processgraphid"] == gid and child["spec"]["conditions"]["colonyname"] == "dev"
    assert (child["parents"], child["children"]) == ([a["processid"]], [])
    assert child["waitforparents"] is True and child["waitdeadline"] == 0
    assert child["initiatorid"] == dev["w1"]
    assert h.process(dev["w1"], a["processid"])["children"] == [g["processids"][1], gen]
    full = graph(h, dev["w1"], gid)
    assert full["processids"] == [*g["processids"], gen]
    assert full["rootprocessids"] == g["rootprocessids"]
    assert h.m.assignable("dev", dev["w2"]) == 0
    h.close(dev["w1"], a, out=["x"])
    got = h.process(dev["w1"], gen)
    assert got["waitforparents"] is False and got["in"] == ["x"]
    assert got["waitdeadline"] == h.now + 4 * S
    assert h.m.assignable("dev", dev["w2"]) == 2
    for _ in range(2):
        p = h.assign(dev["w2"], "dev")
        h.close(dev["w2"], p)
    assert graph(h, dev["w1"], gid)["state"] == SUCCESS


def test_add_child_insert_splices_between_parent_and_children(h: Harness, dev):
    specs = [node("a"), node("x"), node("b", "a"), node("c", "x", "a")]
    g = submit(h, dev["w1"], specs)
    gid = g["processgraphid"]
    pa, px, pb, pc = g["processids"]
    a = h.assign(dev["w1"], "dev")
    assert a["processid"] == pa
    n = add_child(h, dev["w1"], gid, pa, "n", insert=True)
    pn = n["processid"]
    assert (n["parents"], n["children"]) == ([pa], [pb, pc])
    assert h.process(dev["w1"], pa)["children"] == [pn]
    assert h.process(dev["w1"], pb)["parents"] == [pn]
    assert h.process(dev["w1"], pc)["parents"] == [px, pn]  # n takes a's place
    h.close(dev["w1"], a, out=["A"])
    x = h.assign(dev["w1"], "dev")
    assert x["processid"] == px
    h.close(dev["w1"], x, out=["X"])
    got = h.assign(dev["w1"], "dev")
    assert got["processid"] == pn and got["in"] == ["A"]
    with pytest.raises(NotFound):
        h.assign(dev["w2"], "dev")  # b and c wait for n
    h.close(dev["w1"], got, out=["N"])
    c = h.process(dev["w1"], pc)
    assert c["in"] == ["X", "N"]


def test_add_child_with_an_existing_child(h: Harness, dev):
    """The existing process (here a second root, still waiting) waits for the new one."""
    g = submit(h, dev["w1"], [node("a"), node("later", maxwaittime=7)])
    gid = g["processgraphid"]
    pa, plater = g["processids"]
    a = h.assign(dev["w1"], "dev")
    assert h.m.assignable("dev", dev["w2"]) == 1 and h.m.next_deadline() is not None
    n = add_child(h, dev["w1"], gid, pa, "n", child=plater)
    later = h.process(dev["w1"], plater)
    assert later["parents"] == [n["processid"]] and later["waitforparents"] is True
    assert later["waitdeadline"] == 0 and h.next_deadline() is None
    assert n["children"] == [plater]
    assert graph(h, dev["w1"], gid)["rootprocessids"] == [pa]
    assert h.m.assignable("dev", dev["w2"]) == 0
    h.close(dev["w1"], a, out=[1])
    pn = h.assign(dev["w2"], "dev")
    assert pn["processid"] == n["processid"]
    h.now += S
    h.close(dev["w2"], pn, out=[2])
    later = h.process(dev["w1"], plater)
    assert later["in"] == [2] and later["waitdeadline"] == h.now + 7 * S


def test_add_child_refusals(h: Harness, dev):
    g = submit(h, dev["w1"], [node("a"), node("b", "a")])
    gid = g["processgraphid"]
    other = submit(h, dev["w1"], [node("z")])
    a = h.assign(dev["w1"], "dev")
    z = h.assign(dev["w1"], "dev")
    pa, pb = g["processids"]
    with pytest.raises(AccessDenied):  # not the executor running the parent
        add_child(h, dev["w2"], gid, pa)
    with pytest.raises(AccessDenied):  # a waiting parent is assigned to nobody
        add_child(h, dev["w1"], gid, pb)
    with pytest.raises(NotFound):
        add_child(h, dev["w1"], make_id("nope"), pa)
    with pytest.raises(NotFound):
        add_child(h, dev["w1"], gid, make_id("nope"))
    with pytest.raises(BadRequest, match="is not part of process graph"):
        add_child(h, dev["w1"], gid, z["processid"])
    with pytest.raises(BadRequest, match="cannot be combined with insert"):
        add_child(h, dev["w1"], gid, pa, insert=True, child=pb)
    with pytest.raises(NotFound):
        add_child(h, dev["w1"], gid, pa, child=make_id("nope"))
    with pytest.raises(BadRequest, match="is not part of process graph"):
        add_child(h, dev["w1"], gid, pa, child=other["processids"][0])
    with pytest.raises(BadRequest, match="already in use"):
        add_child(h, dev["w1"], gid, pa, gen=pb)
    single = h.submit(dev["w1"], "dev", priority=9)
    s = h.assign(dev["w1"], "dev")
    assert s["processid"] == single["processid"]
    with pytest.raises(BadRequest, match="is not part of process graph"):
        add_child(h, dev["w1"], gid, s["processid"])
    h.close(dev["w1"], a)
    with pytest.raises(BadRequest, match="attempt|running"):
        add_child(h, dev["w1"], gid, pa)  # closed: no longer running
    b = h.assign(dev["w1"], "dev")
    with pytest.raises(BadRequest, match="only a waiting process can become a child"):
        add_child(h, dev["w1"], gid, b["processid"], child=pa)
    assert len(graph(h, dev["w1"], gid)["processids"]) == 2


def test_add_child_to_a_cancelled_parent_is_refused(h: Harness, dev):
    g = submit(h, dev["w1"], [node("a")])
    a = h.assign(dev["w1"], "dev")
    h.write("cancelprocessgraphmsg", dev["w1"], {"processgraphid": g["processgraphid"]})
    with pytest.raises(BadRequest, match="is cancelled: only a running process can add"):
        add_child(h, dev["w1"], g["processgraphid"], a["processid"])


def test_graph_size_bound(h: Harness, dev, monkeypatch):
    monkeypatch.setattr(workflows, "MAX_GRAPH_PROCESSES", 3)
    g = submit(h, dev["w1"], [node("a"), node("b")])
    a = h.assign(dev["w1"], "dev")
    add_child(h, dev["w1"], g["processgraphid"], a["processid"])
    with pytest.raises(BadRequest, match="the most a graph may hold"):
        add_child(h, dev["w1"], g["processgraphid"], a["processid"])


# Snapshots and determinism.


def _busy_machine() -> Harness:
    h = Harness()
    h.colony("dev")
    w1 = h.executor("dev", "w1")
    h.executor("dev", "w2")
    g = submit(h, w1, DIAMOND + [node("e", maxwaittime=50)])
    submit(h, w1, [node("only")])
    a = h.assign(w1, "dev")
    assert a["processid"] == g["processids"][0]
    add_child(h, w1, g["processgraphid"], a["processid"], "dyn", insert=True)
    h.close(w1, a, out=["A"])
    h.assign(w1, "dev")
    return h


def test_snapshot_round_trip_with_graphs():
    h = _busy_machine()
    data = msgpack.unpackb(msgpack.packb(h.m.snapshot()), raw=False)
    assert data["format"] == SNAPSHOT_FORMAT and len(data["processgraphs"]) == 2
    b = ColonyMachine.restore(data)
    assert b.digest() == h.m.digest() and b.snapshot() == h.m.snapshot()
    assert b.statistics() == h.m.statistics()
    # Both go on the same way (the counts were rebuilt from the members).
    w1 = make_id("executor-dev-w1")
    for m in (h.m, b):
        for pid in list(m._st.running_of(w1)):
            p = m._st.processes[pid]
            m.apply(
                h.cmd(
                    "closefailedmsg",
                    w1,
                    {"processid": pid, "attempt": p.attempt},
                    nonce=b"same-" + pid[:8].encode(),
                ),
                h.now,
            )
    assert b.digest() == h.m.digest()
    assert b.statistics()["failedworkflows"] == 1


def test_format_1_snapshot_still_loads(h: Harness, dev):
    p = h.submit(dev["w1"], "dev")
    data = h.m.snapshot()
    data["format"] = 1
    del data["processgraphs"]
    for d in data["processes"]:
        for k in ("processgraphid", "parents", "children", "waitforparents"):
            del d[k]
    m = ColonyMachine.restore(data)
    got = m.read("getprocessmsg", dev["w1"], {"processid": p["processid"]}, h.now)
    assert got == p
    with pytest.raises(ValueError, match="unsupported snapshot format"):
        ColonyMachine.restore(dict(data, format=SNAPSHOT_FORMAT + 1))


def test_two_replicas_agree_on_workflows():
    a, b = _busy_machine(), _busy_machine()
    assert a.m.digest() == b.m.digest()
