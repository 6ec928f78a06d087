"""Retries with exponential backoff and jitter, in the state machine with a controlled clock:
delays, jitter bounds, determinism across replicas, failed closes that retry, the wait
deadline while backing off, snapshots, and bad specs refused with no change."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from machine_harness import Harness, S

from consensus import backoff
from consensus.machine import ColonyMachine
from protocol.errors import BadRequest, InvalidField, NotFound
from protocol.messages import CANCELLED, FAILED, RUNNING, SUCCESS, WAITING


@pytest.fixture
def dev(h: Harness) -> dict[str, str]:
    return {"co": h.colony("dev"), "w1": h.executor("dev", "w1")}


def fail_attempt(h: Harness, w: str, p: dict[str, Any], why: str = "boom") -> None:
    h.close(w, p, ok=False, errors=[why])


def assign_or_none(h: Harness, w: str) -> dict[str, Any] | None:
    try:
        return h.assign(w, "dev")
    except NotFound:
        return None


def test_delay_grows_exponentially_up_to_max() -> None:
    b = {"initial": 1, "multiplier": 2, "max": 10, "jitter": 0}
    assert [backoff.capped_delay_ns(b, r) // S for r in range(6)] == [1, 2, 4, 8, 10, 10]
    # Fractions of seconds and multipliers are exact (integer arithmetic after one rounding).
    b = {"initial": 0.5, "multiplier": 1.5, "max": 3600, "jitter": 0}
    assert [backoff.capped_delay_ns(b, r) for r in range(3)] == [S // 2, 750_000_000, 1_125_000_000]
    # Multiplier 1: a constant delay, however many retries (no loop over them).
    b = {"initial": 3, "multiplier": 1, "max": 3600, "jitter": 0}
    assert backoff.capped_delay_ns(b, 10**9) == 3 * S


def test_jitter_stays_in_bounds_and_is_a_function_of_process_and_attempt() -> None:
    b = {"initial": 8, "multiplier": 2, "max": 3600, "jitter": 0.5}
    delays = [backoff.delay_ns(b, f"p{i}", 1, 0) for i in range(200)]
    assert all(4 * S < d <= 8 * S for d in delays)
    assert len(set(delays)) > 150  # spread, so processes that failed together do not return together
    assert backoff.delay_ns(b, "p1", 1, 0) == backoff.delay_ns(b, "p1", 1, 0)
    assert backoff.delay_ns(b, "p1", 1, 0) != backoff.delay_ns(b, "p1", 2, 0)
    full = {**b, "jitter": 1}
    assert all(0 < backoff.delay_ns(full, f"p{i}", 1, 0) <= 8 * S for i in range(100))
    none = {**b, "jitter": 0}
    assert backoff.delay_ns(none, "p1", 1, 3) == 64 * S


def test_exec_timeout_requeue_backs_off_then_becomes_assignable(h: Harness, dev) -> None:
    w = dev["w1"]
    spec_backoff = {"initial": 10, "multiplier": 2, "max": 100, "jitter": 0}
    p = h.submit(w, "dev", maxexectime=5, maxretries=3, backoff=spec_backoff)
    a1 = h.assign(w, "dev")
    h.advance(6)  # exec deadline passed: requeued with a retry, backing off 10 s
    q = h.process(w, p["processid"])
    assert q["state"] == WAITING and q["retries"] == 1
    assert q["backoffuntil"] == h.now + 10 * S
    assert h.m.assignable("dev", w) == 0 and assign_or_none(h, w) is None
    assert h.m.next_deadline() == q["backoffuntil"]
    h.advance(9)
    assert assign_or_none(h, w) is None
    result = h.advance(1)
    assert result["timers"] == {"backoff": [p["processid"]]}
    assert h.process(w, p["processid"])["backoffuntil"] == 0
    a2 = h.assign(w, "dev")
    assert a2["attempt"] == a1["attempt"] + 1
    h.advance(6)  # second timeout: retry 1 waits 10 * 2 = 20 s
    assert h.process(w, p["processid"])["backoffuntil"] == h.now + 20 * S


def test_failed_close_with_backoff_retries_until_maxretries(h: Harness, dev) -> None:
    w = dev["w1"]
    p = h.submit(w, "dev", maxretries=2, backoff={"initial": 1, "jitter": 0})
    pid = p["processid"]
    for retry in range(2):
        a = h.assign(w, "dev")
        fail_attempt(h, w, a, f"try {retry}")
        q = h.process(w, pid)
        assert q["state"] == WAITING and q["retries"] == retry + 1
        assert q["errors"] == [f"try {retry}"] and q["isassigned"] is False
        assert assign_or_none(h, w) is None  # backing off
        h.advance(2**retry)
    a = h.assign(w, "dev")
    fail_attempt(h, w, a, "last")
    q = h.process(w, pid)
    assert q["state"] == FAILED and q["errors"] == ["last"] and q["retries"] == 2


def test_failed_close_without_backoff_fails_as_in_colonies(h: Harness, dev) -> None:
    w = dev["w1"]
    p = h.submit(w, "dev", maxretries=5)
    fail_attempt(h, w, h.assign(w, "dev"))
    assert h.process(w, p["processid"])["state"] == FAILED


def test_success_after_retries(h: Harness, dev) -> None:
    w = dev["w1"]
    p = h.submit(w, "dev", maxretries=-1, backoff={"initial": 1, "max": 4, "jitter": 0})
    for _ in range(5):  # unlimited retries, the delay capped at 4 s
        fail_attempt(h, w, h.assign(w, "dev"))
        h.advance(4)
    a = h.assign(w, "dev")
    h.close(w, a, out=["ok"])
    q = h.process(w, p["processid"])
    assert q["state"] == SUCCESS and q["retries"] == 5 and q["out"] == ["ok"]


def test_wait_deadline_starts_when_the_backoff_ends(h: Harness, dev) -> None:
    w = dev["w1"]
    p = h.submit(w, "dev", maxwaittime=5, maxretries=1, backoff={"initial": 30, "jitter": 0})
    fail_attempt(h, w, h.assign(w, "dev"))
    q = h.process(w, p["processid"])
    assert q["waitdeadline"] == q["backoffuntil"] + 5 * S
    h.advance(29)  # far past now + maxwaittime, but still backing off: not failed
    assert h.process(w, p["processid"])["state"] == WAITING
    h.advance(1)
    h.advance(6)  # ready, and then not assigned within maxwaittime
    q = h.process(w, p["processid"])
    assert q["state"] == FAILED and q["errors"] == ["Maximum waiting time limit exceeded"]


def test_cancelled_while_backing_off_stays_cancelled(h: Harness, dev) -> None:
    w = dev["w1"]
    p = h.submit(w, "dev", backoff={"initial": 5})
    fail_attempt(h, w, h.assign(w, "dev"))
    h.write("cancelprocessmsg", w, {"processid": p["processid"]})
    result = h.advance(10)
    assert result.get("timers") is None  # the timer fired and found nothing to do
    assert h.process(w, p["processid"])["state"] == CANCELLED
    assert assign_or_none(h, w) is None and h.next_deadline() is None


def test_removed_while_backing_off(h: Harness, dev) -> None:
    w = dev["w1"]
    p = h.submit(w, "dev", backoff={"initial": 5})
    fail_attempt(h, w, h.assign(w, "dev"))
    h.write("removeprocessmsg", w, {"processid": p["processid"]})
    assert h.advance(10).get("timers") is None
    assert h.stats()["waitingprocesses"] == 0


def test_backoff_orders_with_other_processes(h: Harness, dev) -> None:
    """A process back from its backoff keeps its place (priority, then submission)."""
    w = dev["w1"]
    first = h.submit(w, "dev", backoff={"initial": 2, "jitter": 0})
    fail_attempt(h, w, h.assign(w, "dev"))
    second = h.submit(w, "dev")
    h.advance(2)
    assert h.assign(w, "dev")["processid"] == first["processid"]
    assert h.assign(w, "dev")["processid"] == second["processid"]


def test_workflow_member_retries_and_its_graph_keeps_running(h: Harness, dev) -> None:
    w = dev["w1"]
    spec = dict(h.spec("dev"), nodename="a", maxretries=1, backoff={"initial": 1})
    g = h.write("submitworkflowspecmsg", w, {"spec": {"colonyname": "dev", "functionspecs": [
        spec, dict(h.spec("dev"), nodename="b", conditions={
            "colonyname": "dev", "executortype": "cli", "dependencies": ["a"]})]}})
    fail_attempt(h, w, h.assign(w, "dev"))
    graph = h.read("getprocessgraphmsg", w, {"processgraphid": g["processgraphid"]})
    assert graph["state"] in (WAITING, RUNNING)
    h.advance(2)
    h.close(w, h.assign(w, "dev"))
    h.close(w, h.assign(w, "dev"))
    graph = h.read("getprocessgraphmsg", w, {"processgraphid": g["processgraphid"]})
    assert graph["state"] == SUCCESS


def _scenario(h: Harness) -> None:
    w = h.executor("dev", "w1")
    for i in range(20):
        h.submit(w, "dev", maxexectime=3, maxretries=4, backoff={"initial": 1 + i % 3})
    for _ in range(20):
        h.assign(w, "dev")
    for _ in range(12):
        h.advance(1)
        while (p := assign_or_none(h, w)) is not None:
            if int(p["processid"], 16) % 2:
                fail_attempt(h, w, p)


def test_replicas_compute_the_same_backoffs_and_snapshots_keep_them() -> None:
    a, b = Harness(), Harness()
    for x in (a, b):
        x.colony("dev")
        _scenario(x)
    assert a.m.digest() == b.m.digest()
    backing_off = [p for p in a.m.snapshot()["processes"] if p["backoffuntil"]]
    assert backing_off  # the scenario left some mid-backoff
    restored = ColonyMachine.restore(msgpack.unpackb(msgpack.packb(a.m.snapshot()), raw=False))
    assert restored.digest() == a.m.digest()
    assert restored.next_deadline() == a.m.next_deadline()
    a.advance(30)
    b.m = restored
    b.now = a.now
    b.tick()
    assert a.m.digest() == b.m.digest()
    # Every backoff due by now has ended (the ones left began in this tick's exec timeouts).
    assert all(p["backoffuntil"] == 0 or p["backoffuntil"] > a.now
               for p in a.m.snapshot()["processes"])


@pytest.mark.parametrize(
    "bad",
    [
        {"multiplier": 2},  # initial is required
        {"initial": 0},
        {"initial": -1},
        {"initial": "1"},
        {"initial": True},
        {"initial": 1, "multiplier": 0.5},
        {"initial": 1, "multiplier": 1000},
        {"initial": 10, "max": 5},
        {"initial": 1, "jitter": 1.5},
        {"initial": float("nan")},
        {"initial": 1e12},
        "fast",
    ],
)
def test_bad_backoff_is_refused_and_changes_nothing(h: Harness, dev, bad: Any) -> None:
    before = h.m.digest()
    with pytest.raises(InvalidField):
        h.submit(dev["w1"], "dev", backoff=bad)
    assert h.m.digest() == before


def test_specs_without_the_new_fields_keep_their_bytes(h: Harness, dev) -> None:
    p = h.submit(dev["w1"], "dev")
    for k in ("backoff", "idempotencykey", "concurrencykey", "concurrencylimit"):
        assert k not in p["spec"]
    spec = h.submit(dev["w1"], "dev", backoff={"initial": 1})["spec"]
    assert spec["backoff"] == {"initial": 1, "multiplier": 2, "max": 3600, "jitter": 0.5}


def test_bad_close_changes_nothing(h: Harness, dev) -> None:
    w = dev["w1"]
    h.submit(w, "dev", backoff={"initial": 1})
    a = h.assign(w, "dev")
    with pytest.raises(BadRequest):
        h.close(w, {**a, "attempt": a["attempt"] + 1}, ok=False)
    assert h.process(w, a["processid"])["state"] == RUNNING
