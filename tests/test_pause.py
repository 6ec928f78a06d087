"""Pausing and resuming assignment per colony in the state machine."""

from __future__ import annotations

import msgpack
import pytest
from machine_harness import SERVER, Harness

from consensus.machine import ColonyMachine
from protocol.errors import AccessDenied, InvalidField, NotFound
from protocol.messages import RUNNING, WAITING


@pytest.fixture
def dev(h: Harness) -> dict[str, str]:
    return {
        "co": h.colony("dev"),
        "w1": h.executor("dev", "w1"),
        "co2": h.colony("other"),
        "o1": h.executor("other", "o1"),
    }


def pause(h: Harness, caller: str, colony: str = "dev") -> object:
    return h.write("pauseassignmentsmsg", caller, {"colonyname": colony})


def resume(h: Harness, caller: str, colony: str = "dev") -> object:
    return h.write("resumeassignmentsmsg", caller, {"colonyname": colony})


def status(h: Harness, caller: str, colony: str = "dev") -> dict:
    return h.read("getpausestatusmsg", caller, {"colonyname": colony})


def test_paused_colony_assigns_nothing_but_still_queues(h: Harness, dev):
    p = h.submit(dev["w1"], "dev")
    pause(h, dev["co"])
    assert status(h, dev["w1"]) == {"colonyname": "dev", "ispaused": True, "staleafter": 0}
    q = h.submit(dev["w1"], "dev")  # submits still queue
    with pytest.raises(NotFound, match="paused"):
        h.assign(dev["w1"], "dev")
    assert h.m.assignable("dev", dev["w1"]) == 0  # long-pollers keep waiting
    assert [x["state"] for x in (h.process(dev["w1"], p["processid"]),
                                 h.process(dev["w1"], q["processid"]))] == [WAITING, WAITING]
    # Another colony is not affected.
    h.submit(dev["o1"], "other")
    assert h.assign(dev["o1"], "other")["state"] == RUNNING
    before = h.m.applied_changes
    resume(h, dev["co"])
    assert h.m.applied_changes > before  # wakes the long-pollers
    assert status(h, dev["w1"])["ispaused"] is False
    assert h.m.assignable("dev", dev["w1"]) == 2
    assert h.assign(dev["w1"], "dev")["processid"] == p["processid"]


def test_close_and_assign_closes_but_assigns_nothing_while_paused(h: Harness, dev):
    h.submit(dev["w1"], "dev")
    h.submit(dev["w1"], "dev")
    p = h.assign(dev["w1"], "dev")
    pause(h, dev["co"])
    body = {"processid": p["processid"], "attempt": 1, "colonyname": "dev", "timeout": -1,
            "successful": True}
    assert h.write("closeassignmsg", dev["w1"], body) == {"closed": {}, "process": None}


def test_pause_and_resume_are_idempotent(h: Harness, dev):
    pause(h, dev["co"])
    pause(h, dev["co"])
    assert status(h, dev["co"])["ispaused"] is True  # the owner may read it too
    resume(h, dev["co"])
    before = h.m.applied_changes
    resume(h, dev["co"])
    assert status(h, dev["w1"])["ispaused"] is False and h.m.applied_changes == before


def test_only_the_colony_owner_pauses(h: Harness, dev):
    before = h.m.digest()
    for caller in (dev["w1"], dev["co2"], dev["o1"], h.m.server_id):
        with pytest.raises(AccessDenied):
            pause(h, caller)
        with pytest.raises(AccessDenied):
            resume(h, caller)
    with pytest.raises(NotFound):
        pause(h, dev["co"], "nosuch")
    with pytest.raises(InvalidField):
        h.write("pauseassignmentsmsg", dev["co"], {"colonyname": ""})
    with pytest.raises(AccessDenied):
        status(h, dev["o1"])
    assert h.m.digest() == before


def test_pause_survives_snapshots_and_goes_with_its_colony(h: Harness, dev):
    pause(h, dev["co"])
    data = msgpack.unpackb(msgpack.packb(h.m.snapshot()), raw=False)
    assert data["pausedcolonies"] == ["dev"]
    restored = ColonyMachine.restore(data)
    assert restored.digest() == h.m.digest()
    assert restored.assignable("dev", dev["w1"]) == 0
    h.write("removecolonymsg", SERVER, {"colonyname": "dev"})
    assert h.m._st.paused == {}
    co = h.colony("dev")
    assert co == dev["co"] and status(h, co)["ispaused"] is False
