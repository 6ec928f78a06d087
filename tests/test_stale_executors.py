"""Executor liveness in the state machine, with the controlled clock: heard-from on writes,
the per-colony stale-after, stale executors' processes back to the queue (a retry counted),
heartbeats, and the setting's validation."""

from __future__ import annotations

import msgpack
import pytest
from machine_harness import SERVER, Harness, S

from consensus.liveness import STALE_ERROR, stale_key
from consensus.machine import ColonyMachine
from protocol.errors import AccessDenied, InvalidField
from protocol.messages import FAILED, PENDING, RUNNING, WAITING


@pytest.fixture
def dev(h: Harness) -> dict[str, str]:
    return {
        "co": h.colony("dev"),
        "w1": h.executor("dev", "w1"),
        "w2": h.executor("dev", "w2"),
        "pending": h.executor("dev", "pending", state=PENDING),
    }


def set_after(h: Harness, caller: str, seconds: int, colony: str = "dev") -> dict:
    body = {"colonyname": colony, "staleafter": seconds}
    return h.write("setexecutorstaleaftermsg", caller, body)


def executor(h: Harness, caller: str, name: str) -> dict:
    return h.read("getexecutormsg", caller, {"colonyname": "dev", "executorname": name})


def heartbeat(h: Harness, caller: str) -> dict:
    return h.write("executorheartbeatmsg", caller, {"colonyname": "dev"})


def test_every_executor_write_marks_it_heard_from(h: Harness, dev):
    h.now += 3 * S
    p = h.submit(dev["w1"], "dev")
    assert executor(h, dev["w1"], "w1")["lastheardfromtime"] == h.now
    h.now += S
    h.assign(dev["w2"], "dev")
    h.now += S
    h.write("addlogmsg", dev["w2"], {"processid": p["processid"], "message": "x"})
    assert executor(h, dev["w1"], "w2")["lastheardfromtime"] == h.now
    h.now += S
    assert heartbeat(h, dev["pending"]) == {"staleafter": 0}  # any executor of the colony
    assert executor(h, dev["w1"], "pending")["lastheardfromtime"] == h.now
    # A refused write (wrong role) does not count.
    h.now += S
    with pytest.raises(AccessDenied):
        h.write("addlogmsg", dev["w1"], {"processid": p["processid"], "message": "x"})
    assert executor(h, dev["w1"], "w1")["lastheardfromtime"] == h.now - 4 * S


def test_staleness_is_off_by_default(h: Harness, dev):
    h.submit(dev["w1"], "dev")
    h.assign(dev["w1"], "dev")
    assert h.next_deadline() is None  # no timer when off
    h.advance(10_000)
    assert executor(h, dev["w1"], "w1")["stale"] is False
    assert h.read("getprocessesmsg", dev["w1"], {"colonyname": "dev"})[0]["state"] == RUNNING


def test_a_silent_executor_goes_stale_and_its_processes_go_back(h: Harness, dev):
    set_after(h, dev["co"], 60)
    p = h.submit(dev["w1"], "dev")
    q = h.submit(dev["w1"], "dev")
    a = h.assign(dev["w1"], "dev")
    b = h.assign(dev["w1"], "dev")
    assert {a["processid"], b["processid"]} == {p["processid"], q["processid"]}
    assert h.m.next_deadline() == h.now + 60 * S
    # w2 keeps calling in; w1 falls silent.
    h.advance(30)
    heartbeat(h, dev["w2"])
    assert h.advance(29).get("timers") is None
    result = h.advance(1)
    assert result["timers"] == {"stale": [dev["w1"]]}
    w1 = executor(h, dev["w2"], "w1")
    assert w1["stale"] is True and executor(h, dev["w2"], "w2")["stale"] is False
    for pid in (p["processid"], q["processid"]):
        got = h.process(dev["w2"], pid)
        assert got["state"] == WAITING and got["retries"] == 1 and got["isassigned"] is False
    # Its late close is refused; another executor takes the work.
    with pytest.raises(AccessDenied, match="not assigned to the caller"):
        h.close(dev["w1"], a)
    assert h.assign(dev["w2"], "dev")["attempt"] == 2
    # w2 is due at its heartbeat + 60 s: it calls in again just in time.
    h.advance(1)
    heartbeat(h, dev["w2"])
    # When w1 calls in again it is no longer stale.
    heartbeat(h, dev["w1"])
    assert executor(h, dev["w1"], "w1")["stale"] is False


def test_a_stale_executors_process_without_retries_left_fails(h: Harness, dev):
    set_after(h, dev["co"], 10)
    p = h.submit(dev["w1"], "dev", maxretries=0)
    h.assign(dev["w1"], "dev")
    wf = {"colonyname": "dev", "functionspecs": [dict(h.spec("dev"), nodename="a", maxretries=0),
                                                  dict(h.spec("dev"), nodename="b")]}
    g = h.write("submitworkflowspecmsg", dev["w2"], {"spec": wf})
    h.assign(dev["w1"], "dev")  # a (the first root)
    h.advance(10)
    got = h.process(dev["w1"], p["processid"])
    assert got["state"] == FAILED and got["errors"] == [STALE_ERROR]
    graph = h.read("getprocessgraphmsg", dev["w2"], {"processgraphid": g["processgraphid"]})
    assert graph["state"] == FAILED  # a failed member fails its workflow


def test_the_setting_counts_from_when_it_is_turned_on(h: Harness, dev):
    h.submit(dev["w1"], "dev")
    h.assign(dev["w1"], "dev")
    h.advance(1000)
    assert set_after(h, dev["co"], 60) == {"colonyname": "dev", "staleafter": 60}
    assert h.advance(59).get("timers") is None  # not at once, though silent for 1000 s
    assert h.advance(1)["timers"] == {"stale": [dev["w1"]]}
    # Never-heard executors have no timer; turning it off clears the rest and the marks.
    assert h.m._st.timers.get(stale_key(dev["w2"])) is None
    set_after(h, dev["co"], 0)
    assert executor(h, dev["w1"], "w1")["stale"] is False and h.next_deadline() is None
    assert h.read("getpausestatusmsg", dev["w1"], {"colonyname": "dev"})["staleafter"] == 0


def test_the_setting_is_validated_and_owner_only(h: Harness, dev):
    before = h.m.digest()
    for bad in (-1, 1, 4, 86_401, True):
        with pytest.raises(InvalidField):
            set_after(h, dev["co"], bad)  # type: ignore[arg-type]
    for caller in (dev["w1"], SERVER):
        with pytest.raises(AccessDenied):
            set_after(h, caller, 60)
    with pytest.raises(AccessDenied):
        h.write("executorheartbeatmsg", dev["co"], {"colonyname": "dev"})  # not an executor
    assert h.m.digest() == before
    assert set_after(h, dev["co"], 5)["staleafter"] == 5
    assert set_after(h, dev["co"], 86_400)["staleafter"] == 86_400


def test_removing_a_stale_candidate_clears_its_timer(h: Harness, dev):
    set_after(h, dev["co"], 60)
    heartbeat(h, dev["w1"])
    h.write("removeexecutormsg", dev["co"], {"colonyname": "dev", "executorname": "w1"})
    assert h.next_deadline() is None


def test_liveness_survives_snapshots(h: Harness, dev):
    set_after(h, dev["co"], 60)
    h.submit(dev["w1"], "dev")
    h.assign(dev["w1"], "dev")
    h.advance(60)
    data = msgpack.unpackb(msgpack.packb(h.m.snapshot()), raw=False)
    restored = ColonyMachine.restore(data)
    assert restored.digest() == h.m.digest()
    heartbeat(h, dev["w2"])
    cmd = h.cmd("executorheartbeatmsg", dev["w2"], {"colonyname": "dev"})
    assert restored.apply(cmd, h.now) == {"staleafter": 60}
    assert restored.next_deadline() == h.m.next_deadline()
