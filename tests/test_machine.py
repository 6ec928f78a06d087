"""ColonyMachine: every command's rules, refusals, nonces, determinism and snapshots."""

from __future__ import annotations

import copy
import hashlib
import random

import msgpack
import pytest
from machine_harness import CLUSTER, SERVER, T0, Harness, S, make_id

from consensus import commands
from consensus.machine import ColonyMachine
from protocol.errors import (
    AccessDenied,
    BadRequest,
    ExpiredEnvelope,
    NotFound,
    ReplayedEnvelope,
    UnknownMessageType,
)
from protocol.messages import (
    APPROVED,
    ENV,
    FAILED,
    OUT,
    PENDING,
    REJECTED,
    RUNNING,
    SUCCESS,
    WAITING,
)

PROCESS_FIELDS = {
    "processid",
    "initiatorid",
    "initiatorname",
    "assignedexecutorid",
    "isassigned",
    "state",
    "prioritytime",
    "submissiontime",
    "starttime",
    "endtime",
    "waitdeadline",
    "execdeadline",
    "retries",
    "attempt",
    "attributes",
    "spec",
    "in",
    "out",
    "errors",
    "waitforparents",
    "parents",
    "children",
    "processgraphid",
    "backoffuntil",  # retries with backoff (tests/test_backoff.py)
}


# The statistics keys these tests do not exercise (workflows: tests/test_workflows.py).
NOTHING_ELSE = {
    "cancelledprocesses": 0,
    "waitingworkflows": 0,
    "runningworkflows": 0,
    "successfulworkflows": 0,
    "failedworkflows": 0,
    "cancelledworkflows": 0,
}


@pytest.fixture
def dev(h: Harness) -> dict[str, str]:
    """Colony dev with an approved executor 'w1', and colony other with 'o1'."""
    ids = {"co": h.colony("dev"), "w1": h.executor("dev", "w1")}
    ids["co2"] = h.colony("other")
    ids["o1"] = h.executor("other", "o1")
    return ids


# Bootstrap and unknown commands.


def test_bootstrap_once():
    h = Harness(bootstrap=False)
    assert h.m.server_id == "" and h.m.cluster_id == ""
    assert h.m.apply({"op": "bootstrap", "serverid": SERVER, "clusterid": CLUSTER}, T0) == {}
    assert (h.m.server_id, h.m.cluster_id) == (SERVER, CLUSTER)
    # The same values again: a no-op; other values: refused.
    assert h.m.apply({"op": "bootstrap", "serverid": SERVER, "clusterid": CLUSTER}, T0) == {}
    with pytest.raises(BadRequest):
        h.m.apply({"op": "bootstrap", "serverid": make_id("x"), "clusterid": CLUSTER}, T0)
    with pytest.raises(BadRequest):
        h.m.apply({"op": "bootstrap", "serverid": "nothex", "clusterid": CLUSTER}, T0)
    assert h.m.server_id == SERVER


def test_unbootstrapped_server_has_no_owner():
    h = Harness(bootstrap=False)
    with pytest.raises(AccessDenied):
        h.write("addcolonymsg", SERVER, {"colony": {"colonyid": make_id("c"), "name": "dev"}})


def test_unknown_and_read_ops_are_refused_as_commands(h: Harness):
    with pytest.raises(BadRequest, match="unknown command op"):
        h.m.apply({"op": "dropeverything"}, T0)
    with pytest.raises(BadRequest):
        h.write("getcoloniesmsg", SERVER, {})  # a read is not a command
    with pytest.raises(BadRequest):
        h.m.apply({"nop": 1}, T0)


def test_read_refuses_writes_and_unknown_types(h: Harness):
    with pytest.raises(BadRequest):
        h.read("addcolonymsg", SERVER, {"colony": {"colonyid": make_id("c"), "name": "x"}})
    with pytest.raises(UnknownMessageType):
        h.read("nosuchmsg", SERVER)
    with pytest.raises(UnknownMessageType):
        h.read("getserverinfomsg", SERVER)  # the node answers it


# Colonies.


def test_add_colony_server_owner_only(h: Harness):
    owner = make_id("owner")
    body = {"colony": {"colonyid": owner, "name": "dev"}}
    with pytest.raises(AccessDenied):
        h.write("addcolonymsg", owner, body)
    assert h.write("addcolonymsg", SERVER, body) == {"colonyid": owner, "name": "dev"}
    with pytest.raises(BadRequest, match="already exists"):
        h.write("addcolonymsg", SERVER, {"colony": {"colonyid": make_id("o2"), "name": "dev"}})
    with pytest.raises(BadRequest, match="already owns"):
        h.write("addcolonymsg", SERVER, {"colony": {"colonyid": owner, "name": "dev2"}})


def test_get_colonies_server_owner_only_sorted(h: Harness, dev):
    assert [c["name"] for c in h.read("getcoloniesmsg", SERVER)] == ["dev", "other"]
    for caller in (dev["co"], dev["w1"]):
        with pytest.raises(AccessDenied):
            h.read("getcoloniesmsg", caller)


def test_get_colony_needs_approved_member(h: Harness, dev):
    assert h.read("getcolonymsg", dev["w1"], {"colonyname": "dev"}) == {
        "colonyid": dev["co"],
        "name": "dev",
    }
    pending = h.executor("dev", "p1", state=PENDING)
    # The colony owner is not a member (as Colonies), nor are pending or foreign executors.
    for caller in (dev["co"], pending, dev["o1"], SERVER):
        with pytest.raises(AccessDenied):
            h.read("getcolonymsg", caller, {"colonyname": "dev"})
    with pytest.raises(NotFound):
        h.read("getcolonymsg", dev["w1"], {"colonyname": "nosuch"})


def test_colony_stats_member_or_owner(h: Harness, dev):
    h.submit(dev["w1"], "dev")
    h.submit(dev["o1"], "other")
    expect = {
        "colonies": 1,
        "executors": 1,
        "waitingprocesses": 1,
        "runningprocesses": 0,
        "successfulprocesses": 0,
        "failedprocesses": 0,
        **NOTHING_ELSE,
    }
    assert h.read("getcolonystatsmsg", dev["w1"], {"colonyname": "dev"}) == expect
    assert h.read("getcolonystatsmsg", dev["co"], {"colonyname": "dev"}) == expect
    rejected = h.executor("dev", "r1", state=REJECTED)
    for caller in (rejected, dev["o1"], dev["co2"], SERVER):
        with pytest.raises(AccessDenied):
            h.read("getcolonystatsmsg", caller, {"colonyname": "dev"})


def test_statistics_server_owner_only(h: Harness, dev):
    h.submit(dev["w1"], "dev")
    assert h.stats() == {
        "colonies": 2,
        "executors": 2,
        "waitingprocesses": 1,
        "runningprocesses": 0,
        "successfulprocesses": 0,
        "failedprocesses": 0,
        **NOTHING_ELSE,
    }
    with pytest.raises(AccessDenied):
        h.read("getstatisticsmsg", dev["co"])


def test_remove_colony_cascades(h: Harness, dev):
    w2 = h.executor("dev", "w2")
    running = h.submit(dev["w1"], "dev", maxexectime=10, env={"k": "v"})
    h.submit(dev["w1"], "dev", maxwaittime=10)
    p = h.assign(dev["w1"], "dev")
    assert p["processid"] == running["processid"]
    attr = h.write(
        "addattributemsg",
        dev["w1"],
        {"attribute": {"targetid": p["processid"], "attributetype": OUT, "key": "o", "value": "1"}},
    )
    kept = h.submit(dev["o1"], "other")
    assert h.m.next_deadline() is not None
    with pytest.raises(AccessDenied):
        h.write("removecolonymsg", dev["co"], {"colonyname": "dev"})
    before = h.m.applied_changes
    assert h.write("removecolonymsg", SERVER, {"colonyname": "dev"}) == {}
    assert h.m.applied_changes > before
    with pytest.raises(NotFound):
        h.write("removecolonymsg", SERVER, {"colonyname": "dev"})
    assert h.stats() == {
        "colonies": 1,
        "executors": 1,
        "waitingprocesses": 1,
        "runningprocesses": 0,
        "successfulprocesses": 0,
        "failedprocesses": 0,
        **NOTHING_ELSE,
    }
    assert h.next_deadline() is None
    assert not h.m.assignable("dev", dev["w1"]) and not h.m.assignable("dev", w2)
    with pytest.raises(NotFound):
        h.process(dev["o1"], running["processid"])
    with pytest.raises(NotFound):
        h.read("getattributemsg", dev["o1"], {"attributeid": attr["attributeid"]})
    assert h.process(dev["o1"], kept["processid"])["state"] == WAITING
    # The name, the owner id and the executor ids are free again.
    h.colony("dev")
    assert h.executor("dev", "w1") == dev["w1"]
    assert h.read("getprocessesmsg", dev["w1"], {"colonyname": "dev"}) == []


# Executors.


def test_add_executor_colony_owner_only_forced_pending(h: Harness, dev):
    eid = make_id("new")
    body = {
        "executor": {
            "executorid": eid,
            "executortype": "gpu",
            "executorname": "n1",
            "colonyname": "dev",
            "state": APPROVED,  # ignored: only the colony owner approves
        }
    }
    for caller in (SERVER, dev["w1"], dev["co2"]):
        with pytest.raises(AccessDenied):
            h.write("addexecutormsg", caller, body)
    h.now += 5
    ex = h.write("addexecutormsg", dev["co"], body)
    assert ex == {
        "executorid": eid,
        "executortype": "gpu",
        "executorname": "n1",
        "colonyname": "dev",
        "state": PENDING,
        "commissiontime": h.now,
        "lastheardfromtime": 0,
        "stale": False,
    }
    body["executor"]["executorid"] = make_id("new2")
    with pytest.raises(BadRequest, match="already exists"):
        h.write("addexecutormsg", dev["co"], body)
    # The same id, even in another colony.
    dup = {"executor": dict(body["executor"], executorid=eid, colonyname="other", executorname="x")}
    with pytest.raises(BadRequest, match="already registered"):
        h.write("addexecutormsg", dev["co2"], dup)
    missing = {"executor": dict(body["executor"], colonyname="nosuch")}
    with pytest.raises(NotFound):
        h.write("addexecutormsg", dev["co"], missing)


def test_approve_reject_toggle(h: Harness, dev):
    eid = h.executor("dev", "t1", state=PENDING)
    ref = {"colonyname": "dev", "executorname": "t1"}
    state = lambda: h.read("getexecutormsg", dev["co"], ref)["state"]  # noqa: E731
    assert state() == PENDING
    with pytest.raises(AccessDenied):
        h.write("approveexecutormsg", eid, ref)
    with pytest.raises(AccessDenied):
        h.write("approveexecutormsg", dev["w1"], ref)
    before = h.m.applied_changes
    h.write("approveexecutormsg", dev["co"], ref)
    assert state() == APPROVED and h.m.applied_changes > before
    h.write("rejectexecutormsg", dev["co"], ref)
    assert state() == REJECTED
    h.write("approveexecutormsg", dev["co"], ref)
    assert state() == APPROVED
    with pytest.raises(NotFound):
        h.write("rejectexecutormsg", dev["co"], {"colonyname": "dev", "executorname": "nope"})
    with pytest.raises(AccessDenied):
        h.write("rejectexecutormsg", dev["co2"], ref)


def test_get_executors_any_member_or_owner(h: Harness, dev):
    pending = h.executor("dev", "a-pending", state=PENDING)
    rejected = h.executor("dev", "b-rejected", state=REJECTED)
    for caller in (pending, rejected, dev["w1"], dev["co"]):
        names = [
            e["executorname"] for e in h.read("getexecutorsmsg", caller, {"colonyname": "dev"})
        ]
        assert names == ["a-pending", "b-rejected", "w1"]
    for caller in (dev["o1"], dev["co2"], SERVER):
        with pytest.raises(AccessDenied):
            h.read("getexecutorsmsg", caller, {"colonyname": "dev"})


def test_get_executor_approved_member_or_owner(h: Harness, dev):
    pending = h.executor("dev", "p", state=PENDING)
    ref = {"colonyname": "dev", "executorname": "w1"}
    assert h.read("getexecutormsg", dev["w1"], ref)["executorid"] == dev["w1"]
    assert h.read("getexecutormsg", dev["co"], ref)["executorid"] == dev["w1"]
    for caller in (pending, dev["o1"], SERVER):
        with pytest.raises(AccessDenied):
            h.read("getexecutormsg", caller, ref)
    with pytest.raises(NotFound):
        h.read("getexecutormsg", dev["w1"], {"colonyname": "dev", "executorname": "zz"})


def test_remove_executor_requeues_without_retry(h: Harness, dev):
    w2 = h.executor("dev", "w2")
    a = h.submit(w2, "dev", maxwaittime=30)
    h.submit(w2, "dev")
    h.now += 20 * S
    p = h.assign(dev["w1"], "dev")
    assert p["processid"] == a["processid"] and p["attempt"] == 1
    ref = {"colonyname": "dev", "executorname": "w1"}
    with pytest.raises(AccessDenied):
        h.write("removeexecutormsg", dev["w1"], ref)
    h.write("removeexecutormsg", dev["co"], ref)
    got = h.process(w2, a["processid"])
    assert got["state"] == WAITING and got["retries"] == 0
    assert got["isassigned"] is False and got["assignedexecutorid"] == ""
    # The wait deadline restarts, so the long first wait does not fail it at once.
    assert got["waitdeadline"] == h.now + 30 * S
    # The removed executor's late close is refused; the name can be registered again.
    with pytest.raises(AccessDenied):
        h.close(dev["w1"], p)
    with pytest.raises(NotFound):
        h.read("getexecutormsg", dev["co"], ref)
    assert h.executor("dev", "w1") == dev["w1"]
    again = h.assign(dev["w1"], "dev")
    assert again["processid"] == a["processid"] and again["attempt"] == 2
    with pytest.raises(BadRequest, match="attempt 1 is not the current attempt"):
        h.close(dev["w1"], p)


# Submitting.


def test_submit_builds_the_process(h: Harness, dev):
    h.now = T0 + 7
    p = h.submit(
        dev["w1"],
        "dev",
        priority=2,
        maxwaittime=30,
        maxexectime=0,
        args=[1, "a"],
        env={"b": "2", "a": "1"},
    )
    assert set(p) == PROCESS_FIELDS
    assert p["state"] == WAITING and p["isassigned"] is False and p["attempt"] == 0
    assert p["initiatorid"] == dev["w1"] and p["initiatorname"] == "w1"
    assert p["submissiontime"] == h.now
    assert p["prioritytime"] == h.now - 2 * 86_400 * S
    assert p["waitdeadline"] == h.now + 30 * S and p["execdeadline"] == 0
    assert p["spec"]["maxexectime"] == -1  # 0 is normalized to "no limit" (quirk 9.8)
    assert p["spec"]["args"] == [1, "a"]
    assert [(a["key"], a["value"], a["attributetype"]) for a in p["attributes"]] == [
        ("a", "1", ENV),
        ("b", "2", ENV),
    ]
    a0 = p["attributes"][0]
    assert a0["attributeid"] == hashlib.sha3_256((p["processid"] + "a" + "3").encode()).hexdigest()
    assert a0["targetid"] == p["processid"] and a0["targetcolonyname"] == "dev"
    assert p["in"] == [] and p["out"] == [] and p["errors"] == []
    assert h.read("getattributemsg", dev["w1"], {"attributeid": a0["attributeid"]}) == a0
    assert h.process(dev["w1"], p["processid"]) == p


def test_submit_zero_wait_time_means_no_limit(h: Harness, dev):
    p = h.submit(dev["w1"], "dev", maxwaittime=0)
    assert p["spec"]["maxwaittime"] == -1 and p["waitdeadline"] == 0
    assert h.next_deadline() is None


def test_submit_uses_the_generated_id(h: Harness, dev):
    gen = make_id("my-process")
    spec = {"spec": h.spec("dev")}
    p = h.write("submitfuncspecmsg", dev["w1"], spec, gen=gen)
    assert p["processid"] == gen
    with pytest.raises(BadRequest, match="already in use"):
        h.write("submitfuncspecmsg", dev["w1"], spec, gen=gen)
    with pytest.raises(BadRequest, match="generated"):
        h.write("submitfuncspecmsg", dev["w1"], spec, gen="")


def test_submit_needs_approved_member_of_the_colony(h: Harness, dev):
    pending = h.executor("dev", "p", state=PENDING)
    rejected = h.executor("dev", "r", state=REJECTED)
    for caller in (pending, rejected, dev["o1"], dev["co"], SERVER):
        with pytest.raises(AccessDenied):
            h.submit(caller, "dev")
    with pytest.raises(NotFound):
        h.submit(dev["w1"], "nosuch")
    with pytest.raises(BadRequest):  # schema: priority out of range
        h.submit(dev["w1"], "dev", priority=50_001)
    assert h.stats()["waitingprocesses"] == 0


# Assigning.


def test_assign_sets_the_attempt(h: Harness, dev):
    sub = h.submit(dev["w1"], "dev", maxexectime=10)
    h.now += 3 * S
    p = h.assign(dev["w1"], "dev")
    assert p["processid"] == sub["processid"]
    assert p["state"] == RUNNING and p["isassigned"] is True
    assert p["assignedexecutorid"] == dev["w1"]
    assert p["starttime"] == h.now and p["attempt"] == 1
    assert p["execdeadline"] == h.now + 10 * S
    assert h.m.next_deadline() == h.now + 10 * S
    w = h.read("getexecutormsg", dev["w1"], {"colonyname": "dev", "executorname": "w1"})
    assert w["lastheardfromtime"] == h.now


def test_assign_nothing_still_marks_alive(h: Harness, dev):
    h.now += 9
    with pytest.raises(NotFound, match="no process available for assignment"):
        h.assign(dev["w1"], "dev")
    w = h.read("getexecutormsg", dev["w1"], {"colonyname": "dev", "executorname": "w1"})
    assert w["lastheardfromtime"] == h.now


def test_assign_needs_approved_member(h: Harness, dev):
    h.submit(dev["w1"], "dev")
    pending = h.executor("dev", "p", state=PENDING)
    for caller in (pending, dev["o1"], dev["co"], SERVER):
        with pytest.raises(AccessDenied):
            h.assign(caller, "dev")
    assert h.m.assignable("dev", dev["w1"])
    assert not h.m.assignable("dev", pending)
    assert not h.m.assignable("other", dev["w1"])
    assert not h.m.assignable("dev", make_id("nobody"))
    assert h.stats()["waitingprocesses"] == 1


def test_assignable_follows_the_queue(h: Harness, dev):
    assert not h.m.assignable("dev", dev["w1"])
    h.submit(dev["w1"], "dev", "gpu")
    assert not h.m.assignable("dev", dev["w1"])  # another type
    h.submit(dev["w1"], "dev", names=["w9"])
    assert not h.m.assignable("dev", dev["w1"])  # reserved for another name
    h.submit(dev["w1"], "dev", names=["w1"])
    assert h.m.assignable("dev", dev["w1"])
    h.assign(dev["w1"], "dev")
    assert not h.m.assignable("dev", dev["w1"])


# Closing.


def test_close_successful(h: Harness, dev):
    h.submit(dev["w1"], "dev", maxexectime=10)
    p = h.assign(dev["w1"], "dev")
    h.now += S
    before = h.m.applied_changes
    assert h.close(dev["w1"], p, out=["done", 1]) == {}
    got = h.process(dev["w1"], p["processid"])
    assert got["state"] == SUCCESS and got["out"] == ["done", 1] and got["endtime"] == h.now
    assert h.next_deadline() is None and h.m.applied_changes > before
    # Closing twice is refused: the attempt is no longer running.
    with pytest.raises(BadRequest, match="attempt 1 is not the current attempt"):
        h.close(dev["w1"], p)
    with pytest.raises(BadRequest, match="attempt 1 is not the current attempt"):
        h.close(dev["w1"], p, ok=False)


def test_close_failed(h: Harness, dev):
    h.submit(dev["w1"], "dev")
    p = h.assign(dev["w1"], "dev")
    h.close(dev["w1"], p, ok=False, errors=["boom"])
    got = h.process(dev["w1"], p["processid"])
    assert got["state"] == FAILED and got["errors"] == ["boom"] and got["endtime"] == h.now
    assert h.stats()["failedprocesses"] == 1


def test_close_needs_the_assigned_executor(h: Harness, dev):
    peer = h.executor("dev", "peer")
    h.submit(dev["w1"], "dev")
    p = h.assign(dev["w1"], "dev")
    for caller in (peer, dev["co"], dev["o1"], SERVER):
        with pytest.raises(AccessDenied):
            h.close(caller, p)
    # An assigned executor that was rejected meanwhile is refused too (M✓ + A).
    h.write("rejectexecutormsg", dev["co"], {"colonyname": "dev", "executorname": "w1"})
    with pytest.raises(AccessDenied):
        h.close(dev["w1"], p)
    with pytest.raises(NotFound):
        h.close(dev["w1"], dict(p, processid=make_id("missing")))
    assert h.process(peer, p["processid"])["state"] == RUNNING


def test_close_wrong_attempt(h: Harness, dev):
    h.submit(dev["w1"], "dev")
    p = h.assign(dev["w1"], "dev")
    with pytest.raises(
        BadRequest, match=r"attempt 2 is not the current attempt.*current attempt is 1"
    ):
        h.close(dev["w1"], dict(p, attempt=2))
    assert h.process(dev["w1"], p["processid"])["state"] == RUNNING


def test_late_close_after_exec_timeout_is_refused(h: Harness, dev):
    h.submit(dev["w1"], "dev", maxexectime=5, maxretries=3)
    first = h.assign(dev["w1"], "dev")
    h.advance(6)
    with pytest.raises(AccessDenied):  # requeued: no longer assigned to anyone
        h.close(dev["w1"], first)
    second = h.assign(dev["w1"], "dev")
    assert second["attempt"] == 2 and second["retries"] == 1
    with pytest.raises(BadRequest, match="attempt 1 is not the current attempt"):
        h.close(dev["w1"], first)
    h.close(dev["w1"], second)
    assert h.process(dev["w1"], first["processid"])["state"] == SUCCESS


def test_close_assign(h: Harness, dev):
    a = h.submit(dev["w1"], "dev")
    b = h.submit(dev["w1"], "dev")
    p = h.assign(dev["w1"], "dev")
    body = {"processid": p["processid"], "attempt": 1, "colonyname": "dev", "timeout": -1}
    r = h.write("closeassignmsg", dev["w1"], dict(body, successful=True, out=[42]))
    assert r["closed"] == {} and r["process"]["processid"] == b["processid"]
    assert r["process"]["state"] == RUNNING and r["process"]["attempt"] == 1
    got = h.process(dev["w1"], a["processid"])
    assert got["state"] == SUCCESS and got["out"] == [42]
    body2 = dict(body, processid=b["processid"], successful=False, errors=["e"])
    r2 = h.write("closeassignmsg", dev["w1"], body2)
    assert r2 == {"closed": {}, "process": None}
    assert h.process(dev["w1"], b["processid"])["errors"] == ["e"]


def test_close_assign_refused_assigns_nothing(h: Harness, dev):
    h.submit(dev["w1"], "dev")
    waiting = h.submit(dev["w1"], "dev")
    p = h.assign(dev["w1"], "dev")
    body = {"processid": p["processid"], "colonyname": "dev", "timeout": -1, "successful": True}
    with pytest.raises(BadRequest, match="attempt 5 is not the current attempt"):
        h.write("closeassignmsg", dev["w1"], dict(body, attempt=5))
    with pytest.raises(AccessDenied):  # the assign half names a colony the caller is not in
        h.write("closeassignmsg", dev["w1"], dict(body, attempt=1, colonyname="other"))
    assert h.process(dev["w1"], p["processid"])["state"] == RUNNING
    assert h.process(dev["w1"], waiting["processid"])["state"] == WAITING


# Reading and removing processes.


def test_get_process_member_only(h: Harness, dev):
    p = h.submit(dev["w1"], "dev")
    pending = h.executor("dev", "p", state=PENDING)
    for caller in (pending, dev["o1"], dev["co"], SERVER):
        with pytest.raises(AccessDenied):
            h.process(caller, p["processid"])
    with pytest.raises(NotFound):
        h.process(dev["w1"], make_id("missing"))


def test_get_processes_filters_in_submission_order(h: Harness, dev):
    ps = [h.submit(dev["w1"], "dev", "cli" if i % 2 else "gpu", priority=i) for i in range(8)]
    ids = [p["processid"] for p in ps]
    # Assigning the highest priority first does not change the listing order.
    run = h.assign(dev["w1"], "dev")
    assert run["processid"] == ids[7]

    def listing(**kw):
        body = {"colonyname": "dev", **kw}
        return [p["processid"] for p in h.read("getprocessesmsg", dev["w1"], body)]

    assert listing() == ids
    assert listing(state=WAITING) == [i for i in ids if i != ids[7]]
    assert listing(state=RUNNING) == [ids[7]]
    assert listing(executortype="gpu") == ids[0::2]
    assert listing(executortype="cli", state=WAITING) == [ids[1], ids[3], ids[5]]
    assert listing(count=3) == ids[:3]
    assert listing(state=SUCCESS) == []
    with pytest.raises(AccessDenied):
        h.read("getprocessesmsg", dev["o1"], {"colonyname": "dev"})
    with pytest.raises(BadRequest):
        h.read("getprocessesmsg", dev["w1"], {"colonyname": "dev", "count": 101})


def test_requeued_process_keeps_its_listing_place(h: Harness, dev):
    a = h.submit(dev["w1"], "dev", maxexectime=1)
    b = h.submit(dev["w1"], "dev")
    h.assign(dev["w1"], "dev")
    h.advance(2)
    got = h.read("getprocessesmsg", dev["w1"], {"colonyname": "dev", "state": WAITING})
    assert [p["processid"] for p in got] == [a["processid"], b["processid"]]


def test_remove_process(h: Harness, dev):
    p = h.submit(dev["w1"], "dev", env={"k": "v"})
    run = h.submit(dev["w1"], "dev", priority=5)
    assert h.assign(dev["w1"], "dev")["processid"] == run["processid"]
    peer = h.executor("dev", "peer")
    with pytest.raises(BadRequest, match="running"):
        h.write("removeprocessmsg", peer, {"processid": run["processid"]})
    for caller in (dev["o1"], dev["co"]):
        with pytest.raises(AccessDenied):
            h.write("removeprocessmsg", caller, {"processid": p["processid"]})
    # Any approved member of the colony may remove a non-running process (as Colonies).
    assert h.write("removeprocessmsg", peer, {"processid": p["processid"]}) == {}
    with pytest.raises(NotFound):
        h.process(peer, p["processid"])
    with pytest.raises(NotFound):
        h.read("getattributemsg", peer, {"attributeid": p["attributes"][0]["attributeid"]})
    with pytest.raises(NotFound):
        h.write("removeprocessmsg", peer, {"processid": p["processid"]})
    assert h.stats()["waitingprocesses"] == 0 and h.stats()["runningprocesses"] == 1


def test_remove_all_processes(h: Harness, dev):
    done = h.submit(dev["w1"], "dev", priority=9)
    h.close(dev["w1"], h.assign(dev["w1"], "dev"))
    running = h.submit(dev["w1"], "dev", priority=8)
    assert h.assign(dev["w1"], "dev")["processid"] == running["processid"]
    h.submit(dev["w1"], "dev")
    h.submit(dev["w1"], "dev")
    foreign = h.submit(dev["o1"], "other")
    for caller in (dev["w1"], SERVER, dev["co2"]):
        with pytest.raises(AccessDenied):
            h.write("removeallprocessesmsg", caller, {"colonyname": "dev", "state": -1})
    with pytest.raises(BadRequest):
        h.write("removeallprocessesmsg", dev["co"], {"colonyname": "dev", "state": RUNNING})
    h.write("removeallprocessesmsg", dev["co"], {"colonyname": "dev", "state": SUCCESS})
    with pytest.raises(NotFound):
        h.process(dev["w1"], done["processid"])
    assert h.read("getcolonystatsmsg", dev["co"], {"colonyname": "dev"})["waitingprocesses"] == 2
    h.write("removeallprocessesmsg", dev["co"], {"colonyname": "dev", "state": -1})
    left = h.read("getprocessesmsg", dev["w1"], {"colonyname": "dev"})
    assert [p["processid"] for p in left] == [running["processid"]]
    assert h.process(dev["o1"], foreign["processid"])["state"] == WAITING


# Attributes.


def test_add_attribute(h: Harness, dev):
    h.submit(dev["w1"], "dev")
    p = h.assign(dev["w1"], "dev")
    attr = {"targetid": p["processid"], "attributetype": OUT, "key": "result", "value": "42"}
    a = h.write("addattributemsg", dev["w1"], {"attribute": attr})
    assert a == {
        "attributeid": hashlib.sha3_256((p["processid"] + "result" + "1").encode()).hexdigest(),
        "targetid": p["processid"],
        "targetcolonyname": "dev",
        "attributetype": OUT,
        "key": "result",
        "value": "42",
    }
    with pytest.raises(BadRequest, match="already has"):
        h.write("addattributemsg", dev["w1"], {"attribute": attr})
    assert h.process(dev["w1"], p["processid"])["attributes"] == [a]
    assert h.read("getattributemsg", dev["w1"], {"attributeid": a["attributeid"]}) == a
    for caller in (dev["o1"], dev["co"]):
        with pytest.raises(AccessDenied):
            h.read("getattributemsg", caller, {"attributeid": a["attributeid"]})
    with pytest.raises(NotFound):
        h.read("getattributemsg", dev["w1"], {"attributeid": make_id("none")})


def test_add_attribute_needs_assigned_running(h: Harness, dev):
    peer = h.executor("dev", "peer")
    waiting = h.submit(dev["w1"], "dev")
    attr = {"targetid": waiting["processid"], "attributetype": OUT, "key": "k", "value": "v"}
    with pytest.raises(AccessDenied):  # not assigned to anyone yet
        h.write("addattributemsg", dev["w1"], {"attribute": attr})
    p = h.assign(dev["w1"], "dev")
    with pytest.raises(AccessDenied):
        h.write("addattributemsg", peer, {"attribute": attr})
    h.close(dev["w1"], p)
    with pytest.raises(BadRequest, match="not running"):
        h.write("addattributemsg", dev["w1"], {"attribute": attr})
    with pytest.raises(NotFound):
        h.write("addattributemsg", dev["w1"], {"attribute": dict(attr, targetid=make_id("x"))})


# Timeouts.


def test_exec_timeout_requeues_then_fails(h: Harness, dev):
    h.submit(dev["w1"], "dev", maxexectime=5, maxretries=1, maxwaittime=100)
    p1 = h.assign(dev["w1"], "dev")
    assert h.m.next_deadline() == h.now + 5 * S
    assert h.advance(4) == {"requeued": [], "failed": []}
    before = h.m.applied_changes
    assert h.advance(1) == {"requeued": [p1["processid"]], "failed": []}
    assert h.m.applied_changes > before
    got = h.process(dev["w1"], p1["processid"])
    assert got["state"] == WAITING and got["retries"] == 1 and got["attempt"] == 1
    assert got["isassigned"] is False and got["assignedexecutorid"] == ""
    assert got["waitdeadline"] == h.now + 100 * S and got["endtime"] == h.now
    assert h.m.next_deadline() == h.now + 100 * S
    p2 = h.assign(dev["w1"], "dev")
    assert p2["attempt"] == 2 and p2["endtime"] == 0
    assert h.advance(5) == {"requeued": [], "failed": [p1["processid"]]}
    got = h.process(dev["w1"], p1["processid"])
    assert got["state"] == FAILED and got["errors"] == ["Maximum execution time limit exceeded"]
    assert h.next_deadline() is None


def test_exec_timeout_unlimited_retries(h: Harness, dev):
    h.submit(dev["w1"], "dev", maxexectime=1, maxretries=-1)
    for i in range(5):
        p = h.assign(dev["w1"], "dev")
        assert p["attempt"] == i + 1 and p["retries"] == i
        h.advance(1)
    assert h.stats()["waitingprocesses"] == 1


def test_exec_timeout_zero_retries_fails_first_time(h: Harness, dev):
    h.submit(dev["w1"], "dev", maxexectime=1, maxretries=0)
    p = h.assign(dev["w1"], "dev")
    assert h.advance(2)["failed"] == [p["processid"]]


def test_wait_timeout_fails(h: Harness, dev):
    p = h.submit(dev["w1"], "dev", maxwaittime=10)
    q = h.submit(dev["w1"], "dev", maxwaittime=20)
    assert h.m.next_deadline() == T0 + 10 * S
    assert h.advance(10) == {"requeued": [], "failed": [p["processid"]]}
    got = h.process(dev["w1"], p["processid"])
    assert got["state"] == FAILED and got["errors"] == ["Maximum waiting time limit exceeded"]
    # An assigned process no longer has a wait deadline.
    assert h.assign(dev["w1"], "dev")["processid"] == q["processid"]
    assert h.next_deadline() is None
    assert h.advance(100) == {"requeued": [], "failed": []}


def test_tick_expires_in_deadline_order(h: Harness, dev):
    late = h.submit(dev["w1"], "dev", maxwaittime=3)
    early = h.submit(dev["w1"], "dev", maxwaittime=2)
    assert h.advance(5)["failed"] == [early["processid"], late["processid"]]


# Nonces and time.


def test_replay_refused(h: Harness, dev):
    cmd = h.cmd("submitfuncspecmsg", dev["w1"], {"spec": h.spec("dev")})
    h.m.apply(cmd, h.now)
    with pytest.raises(ReplayedEnvelope):
        h.m.apply(dict(cmd, gen=make_id("other")), h.now)
    assert h.stats()["waitingprocesses"] == 1
    # Another caller's identical nonce is its own.
    other = dict(h.cmd("submitfuncspecmsg", dev["o1"], {"spec": h.spec("other")}))
    other["nonce"] = cmd["nonce"]
    h.m.apply(other, h.now)


def test_refused_request_changes_nothing(h: Harness, dev):
    """Refused before its handler runs: not even the clock or the nonce book move, so the
    digest stays and a replay gets the same refusal."""
    pending = h.executor("dev", "p", state=PENDING)
    before = h.m.digest()
    h.now += 5 * S
    cmd = h.cmd("submitfuncspecmsg", pending, {"spec": h.spec("dev")})
    for _ in range(2):
        with pytest.raises(AccessDenied):
            h.m.apply(cmd, h.now)
    assert h.m.digest() == before
    with pytest.raises(BadRequest):
        h.write("submitfuncspecmsg", dev["w1"], {"spec": {"funcname": "f"}})
    with pytest.raises(BadRequest):
        h.m.apply({"op": "bootstrap", "serverid": make_id("x"), "clusterid": CLUSTER}, h.now)
    assert h.m.digest() == before


def test_handler_refusal_consumes_the_nonce(h: Harness, dev):
    """Past the role rule the nonce is spent: a replayed assign that found nothing cannot
    later take a process on the executor's behalf."""
    cmd = h.cmd("assignprocessmsg", dev["w1"], {"colonyname": "dev", "timeout": -1})
    with pytest.raises(NotFound):
        h.m.apply(cmd, h.now)
    h.submit(dev["w1"], "dev")
    with pytest.raises(ReplayedEnvelope):
        h.m.apply(cmd, h.now)
    assert h.stats()["waitingprocesses"] == 1


def test_replayed_write_changes_nothing(h: Harness, dev):
    cmd = h.cmd("submitfuncspecmsg", dev["w1"], {"spec": h.spec("dev")})
    h.m.apply(cmd, h.now)
    after = h.m.digest()
    h.now += S
    with pytest.raises(ReplayedEnvelope):
        h.m.apply(cmd, h.now)
    assert h.m.digest() == after


def test_expired_refused_and_nonces_pruned(h: Harness, dev):
    expiry = h.now // 10**6 + 1_000
    cmd = h.cmd("submitfuncspecmsg", dev["w1"], {"spec": h.spec("dev")}, expiry=expiry)
    h.m.apply(cmd, h.now)

    def remembered() -> list[bytes]:
        return [n for _, _, n in h.m.snapshot()["nonces"]]

    assert cmd["nonce"] in remembered()
    h.now += 2 * S
    with pytest.raises(ExpiredEnvelope):
        h.m.apply(cmd, h.now)
    with pytest.raises(ExpiredEnvelope):
        h.write("submitfuncspecmsg", dev["w1"], {"spec": h.spec("dev")}, expiry=expiry)
    # Expiry exactly now is still valid; applying it prunes the expired nonce.
    fresh = h.cmd("submitfuncspecmsg", dev["w1"], {"spec": h.spec("dev")}, expiry=h.now // 10**6)
    h.m.apply(fresh, h.now)
    assert cmd["nonce"] not in remembered() and fresh["nonce"] in remembered()
    with pytest.raises(ExpiredEnvelope):
        h.m.apply(cmd, h.now)  # forgotten, and still refused by its expiry


def test_malformed_commands_refused(h: Harness, dev):
    def good():
        return h.cmd("submitfuncspecmsg", dev["w1"], {"spec": h.spec("dev")})

    for bad in (
        dict(good(), caller="short"),
        dict(good(), nonce="not-bytes"),
        dict(good(), nonce=b""),
        dict(good(), expiry="soon"),
        dict(good(), expiry=True),
        dict(good(), body="x"),
        dict(good(), body={"spec": {"funcname": "f"}}),
    ):
        with pytest.raises(BadRequest):
            h.m.apply(bad, h.now)
    with pytest.raises(BadRequest):
        h.m.apply(good(), "now")
    assert h.stats()["waitingprocesses"] == 0


def test_time_never_goes_backwards(h: Harness, dev):
    h.now = T0 + 100 * S
    h.submit(dev["w1"], "dev")
    h.now = T0  # an older stamp (a new leader with a slower clock)
    body = {"spec": h.spec("dev", maxwaittime=5)}
    p = h.write("submitfuncspecmsg", dev["w1"], body, expiry=(T0 + 200 * S) // 10**6)
    assert p["submissiontime"] == T0 + 100 * S
    assert p["waitdeadline"] == T0 + 105 * S


def test_huge_limits_stay_int64(h: Harness, dev):
    h.submit(dev["w1"], "dev", maxwaittime=2**62, maxexectime=2**62)
    p = h.assign(dev["w1"], "dev")
    assert p["execdeadline"] == 2**63 - 1
    h.now = 2**63 - 10
    late = h.write(
        "submitfuncspecmsg",
        dev["w1"],
        {"spec": h.spec("dev", priority=-50_000)},
        expiry=h.now // 10**6,
    )
    assert late["prioritytime"] == 2**63 - 1
    msgpack.packb(h.m.snapshot())
    with pytest.raises(BadRequest):
        h.m.apply({"op": "tick"}, 2**63)


# apply_batch.


def test_apply_batch_results(h: Harness, dev):
    ok = h.cmd("submitfuncspecmsg", dev["w1"], {"spec": h.spec("dev")})
    refused = h.cmd("submitfuncspecmsg", dev["o1"], {"spec": h.spec("dev")})
    res = h.batch([ok, refused, ok, {"op": "tick"}])
    assert res[0][0] == 200 and res[0][1]["state"] == WAITING
    assert res[1][0] == 403 and "approved member" in res[1][1]
    assert res[2][0] == 403 and "replayed" in res[2][1]
    assert res[3] == [200, {"requeued": [], "failed": []}]


@pytest.mark.parametrize(
    "batch",
    [
        b"",
        b"\xc1",
        b"\x92\x01",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"now": T0}),
        msgpack.packb({"now": T0, "cmds": "x"}),
        msgpack.packb({"now": "x", "cmds": [{"op": "tick"}]}),
        msgpack.packb({"now": -5, "cmds": [{"op": "tick"}]}),
        msgpack.packb({"now": 2**64 - 1, "cmds": [{"op": "tick"}]}),
        msgpack.packb({"now": T0, "cmds": [1, None, [], {"op": 5}, {"op": "tick"}]}),
        msgpack.packb({"now": T0, "cmds": [{"op": "addcolonymsg", "caller": SERVER}]}),
        msgpack.packb({1: 2}),
        b"\xdf\xff\xff\xff\xff",  # a map claiming 4 billion entries
    ],
)
def test_apply_batch_never_raises(h: Harness, batch: bytes):
    res = h.m.apply_batch(batch)
    assert isinstance(res, list)
    for r in res:
        assert isinstance(r, list) and len(r) == 2 and isinstance(r[0], int)


def test_apply_batch_random_garbage_never_raises(h: Harness, dev):
    rng = random.Random(7)
    good = msgpack.packb({"now": T0, "cmds": [h.cmd("getcolonymsg", SERVER, {})]})
    for _ in range(2000):
        n = rng.randrange(0, 64)
        blob = bytes(rng.randrange(256) for _ in range(n))
        assert isinstance(h.m.apply_batch(blob), list)
        mutated = bytearray(good)
        mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        assert isinstance(h.m.apply_batch(bytes(mutated)), list)
    values = [None, 1, -1, "x", b"x", [], {}, [1], {"a": 1}, 2**63, 1.5, True]
    fields = ["op", "caller", "nonce", "expiry", "body", "gen"]
    for _ in range(500):
        cmd = h.cmd("submitfuncspecmsg", dev["w1"], {"spec": h.spec("dev")})
        for f in rng.sample(fields, rng.randrange(1, 4)):
            cmd[f] = rng.choice(values)
        res = h.m.apply_batch(msgpack.packb({"now": h.now, "cmds": [cmd]}))
        assert len(res) == 1 and res[0][0] in (200, 400, 403, 404)


def test_internal_error_is_reported_not_raised(h: Harness, dev, monkeypatch):
    def broken(st, req, now):
        raise RuntimeError("kaboom")

    monkeypatch.setitem(commands.WRITES, "submitfuncspecmsg", broken)
    res = h.batch([h.cmd("submitfuncspecmsg", dev["w1"], {"spec": h.spec("dev")})])
    assert res[0][0] == 500 and res[0][1].startswith("internal error: RuntimeError: kaboom")
    assert h.stats()["waitingprocesses"] == 0


# Determinism and snapshots.


def _workload(seed: int, n: int = 300) -> list[bytes]:
    """Batches of mixed commands, built by a driver that never reads the machine."""
    rng = random.Random(seed)
    h = Harness()
    batches: list[bytes] = []
    now = T0

    def emit(cmds: list[dict]) -> None:
        batches.append(msgpack.packb({"now": now, "cmds": cmds}))

    emit(
        [h.cmd("addcolonymsg", SERVER, {"colony": {"colonyid": make_id("co-dev"), "name": "dev"}})]
    )
    execs = {}
    setup = []
    for name in ("a", "b", "c"):
        eid = make_id(f"x-{name}")
        execs[name] = eid
        ex = {
            "executorid": eid,
            "executortype": rng.choice(["t1", "t2"]),
            "executorname": name,
            "colonyname": "dev",
        }
        setup.append(h.cmd("addexecutormsg", make_id("co-dev"), {"executor": ex}))
        setup.append(
            h.cmd(
                "approveexecutormsg", make_id("co-dev"), {"colonyname": "dev", "executorname": name}
            )
        )
    emit(setup)
    pids: list[str] = []
    for _ in range(n):
        now += rng.randrange(0, 3 * S)
        h.now = now  # the commands' expiry follows the clock
        cmds = []
        for _ in range(rng.randrange(1, 5)):
            who = execs[rng.choice("abc")]
            r = rng.random()
            if r < 0.4:
                gen = make_id(f"p{len(pids)}-{seed}")
                pids.append(gen)
                spec = h.spec(
                    "dev",
                    rng.choice(["t1", "t2"]),
                    rng.choice([[], ["a"], ["b", "c"]]),
                    priority=rng.randrange(-2, 3),
                    maxexectime=rng.randrange(-1, 4),
                    maxretries=rng.randrange(-1, 2),
                    maxwaittime=rng.randrange(-1, 8),
                    env={"k": str(rng.random())},
                )
                cmds.append(h.cmd("submitfuncspecmsg", who, {"spec": spec}, gen=gen))
            elif r < 0.7:
                cmds.append(h.cmd("assignprocessmsg", who, {"colonyname": "dev", "timeout": -1}))
            elif r < 0.9 and pids:
                body = {"processid": rng.choice(pids[-8:]), "attempt": rng.choice([1, 1, 2])}
                op = rng.choice(["closesuccessfulmsg", "closefailedmsg"])
                cmds.append(h.cmd(op, who, body))
            elif pids:
                cmds.append(h.cmd("removeprocessmsg", who, {"processid": rng.choice(pids)}))
            if rng.random() < 0.3:
                cmds.append({"op": "tick"})
        emit(cmds)
    return batches


def test_two_replicas_converge():
    batches = _workload(1)
    a, b = ColonyMachine(), ColonyMachine()
    for m in (a, b):
        m.apply({"op": "bootstrap", "serverid": SERVER, "clusterid": CLUSTER}, T0)
    for i, batch in enumerate(batches):
        assert a.apply_batch(batch) == b.apply_batch(batch)
        if i % 25 == 0:
            assert a.digest() == b.digest()
    assert a.digest() == b.digest()
    assert a.archive.digest() == b.archive.digest()  # the same history archived
    stats = a.statistics()
    assert sum(v for k, v in stats.items() if k.endswith("processes")) > 50  # it did something
    assert stats["waitingprocesses"] and stats["successfulprocesses"] and stats["failedprocesses"]


def test_snapshot_restore_round_trip():
    batches = _workload(2)
    a = ColonyMachine()
    a.apply({"op": "bootstrap", "serverid": SERVER, "clusterid": CLUSTER}, T0)
    half = len(batches) // 2
    for batch in batches[:half]:
        a.apply_batch(batch)
    data = msgpack.unpackb(msgpack.packb(a.snapshot()), raw=False)
    # The snapshot holds the live state; the archive comes with it (a copy here).
    b = ColonyMachine.restore(data, copy.deepcopy(a.archive))
    assert b.digest() == a.digest()
    assert b.snapshot() == a.snapshot()
    assert (b.server_id, b.cluster_id, b.applied_changes) == (SERVER, CLUSTER, a.applied_changes)
    assert b.next_deadline() == a.next_deadline()
    for batch in batches[half:]:
        assert a.apply_batch(batch) == b.apply_batch(batch)
        assert a.next_deadline() == b.next_deadline()
    assert a.digest() == b.digest() and a.archive.digest() == b.archive.digest()
    assert ColonyMachine.restore(b.snapshot(), b.archive).digest() == b.digest()


def test_empty_machine_snapshot():
    m = ColonyMachine()
    assert ColonyMachine.restore(m.snapshot()).digest() == m.digest()
    assert m.next_deadline() is None and m.applied_changes == 0


def test_digest_changes_with_state(h: Harness, dev):
    d = h.m.digest()
    h.submit(dev["w1"], "dev")
    assert h.m.digest() != d


def test_replies_do_not_change_afterwards(h: Harness, dev):
    p = h.submit(dev["w1"], "dev")
    snapshot = msgpack.packb(p)
    h.close(dev["w1"], h.assign(dev["w1"], "dev"), out=[1])
    assert msgpack.packb(p) == snapshot
