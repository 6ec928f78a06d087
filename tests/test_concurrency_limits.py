"""Concurrency limits per key: at most N running with one key in a colony, the assign order of
everything else unchanged, parked processes coming back in order, snapshots, bad input."""

from __future__ import annotations

import msgpack
import pytest
from machine_harness import Harness

from consensus.machine import ColonyMachine
from protocol.errors import BadRequest, InvalidField, NotFound
from protocol.messages import RUNNING, WAITING


@pytest.fixture
def dev(h: Harness) -> dict[str, str]:
    ids = {"co": h.colony("dev")}
    for n in ("w1", "w2", "w3", "w4"):
        ids[n] = h.executor("dev", n)
    ids["co2"] = h.colony("other")
    ids["o1"] = h.executor("other", "o1")
    return ids


def assign_or_none(h: Harness, w: str, colony: str = "dev") -> dict | None:
    try:
        return h.assign(w, colony)
    except NotFound:
        return None


def running_with(h: Harness, w: str, key: str) -> int:
    ps = h.read("getprocessesmsg", w, {"colonyname": "dev", "state": RUNNING})
    return sum(1 for p in ps if p["spec"].get("concurrencykey") == key)


def test_at_most_limit_running_and_the_rest_keep_their_order(h: Harness, dev) -> None:
    w = dev["w1"]
    a = [h.submit(w, "dev", concurrencykey="db", concurrencylimit=2)["processid"] for _ in range(4)]
    free = [h.submit(w, "dev")["processid"] for _ in range(2)]
    got = [assign_or_none(h, dev[n]) for n in ("w1", "w2", "w3", "w4")]
    # Two "db" processes, then the unkeyed ones in submission order; the other two wait.
    assert [p["processid"] for p in got] == [a[0], a[1], free[0], free[1]]
    assert assign_or_none(h, w) is None
    assert running_with(h, w, "db") == 2
    st = h.m._st
    assert st.concurrency.parked_count("dev", "db") == 2 and len(st.queue) == 0
    # One finishes: exactly one parked process comes back, the earliest.
    h.close(dev["w1"], got[0])
    assert st.concurrency.parked_count("dev", "db") == 1
    nxt = h.assign(dev["w1"], "dev")
    assert nxt["processid"] == a[2]
    assert assign_or_none(h, w) is None
    h.close(dev["w2"], got[1], ok=False)  # a failure frees its slot too
    assert h.assign(dev["w2"], "dev")["processid"] == a[3]


def test_a_key_without_a_limit_is_a_mutex_and_blocked_heads_do_not_block_others(
    h: Harness, dev
) -> None:
    w = dev["w1"]
    m1 = h.submit(w, "dev", concurrencykey="m", priority=5)
    m2 = h.submit(w, "dev", concurrencykey="m", priority=5)
    low = h.submit(w, "dev")
    assert h.assign(dev["w1"], "dev")["processid"] == m1["processid"]
    # m2 is at the head (priority) but its key is taken: the next one is served.
    assert h.assign(dev["w2"], "dev")["processid"] == low["processid"]
    assert h.process(w, m2["processid"])["state"] == WAITING
    assert assign_or_none(h, dev["w3"]) is None


def test_limits_are_per_colony(h: Harness, dev) -> None:
    h.submit(dev["w1"], "dev", concurrencykey="k")
    h.submit(dev["o1"], "other", concurrencykey="k")
    assert h.assign(dev["w1"], "dev") and h.assign(dev["o1"], "other")


def test_requeue_and_cancel_free_slots(h: Harness, dev) -> None:
    w = dev["w1"]
    p1 = h.submit(w, "dev", concurrencykey="k", maxexectime=5)
    p2 = h.submit(w, "dev", concurrencykey="k")
    h.assign(w, "dev")
    assert assign_or_none(h, dev["w2"]) is None  # p2 parked
    h.advance(6)  # p1 times out and goes back to the queue: its slot is free
    got = h.assign(dev["w2"], "dev")
    assert got["processid"] in (p1["processid"], p2["processid"])
    h.write("cancelprocessmsg", w, {"processid": got["processid"]})
    assert h.assign(dev["w3"], "dev")["processid"] != got["processid"]


def test_removing_the_executor_frees_its_slots(h: Harness, dev) -> None:
    h.submit(dev["w1"], "dev", concurrencykey="k")
    p2 = h.submit(dev["w1"], "dev", concurrencykey="k")
    p1 = h.assign(dev["w1"], "dev")
    assert assign_or_none(h, dev["w2"]) is None
    h.write("removeexecutormsg", dev["co"], {"colonyname": "dev", "executorname": "w1"})
    # p1 is back in the queue, and the parked p2 was released: both are assignable, in order.
    assert h.assign(dev["w2"], "dev")["processid"] == p1["processid"]
    assert assign_or_none(h, dev["w3"]) is None
    h.close(dev["w2"], h.process(dev["w2"], p1["processid"]))
    assert h.assign(dev["w3"], "dev")["processid"] == p2["processid"]


def test_parked_processes_still_time_out_waiting(h: Harness, dev) -> None:
    h.submit(dev["w1"], "dev", concurrencykey="k")
    p2 = h.submit(dev["w1"], "dev", concurrencykey="k", maxwaittime=10)
    h.assign(dev["w1"], "dev")
    assert assign_or_none(h, dev["w2"]) is None
    h.advance(11)
    assert h.process(dev["w1"], p2["processid"])["errors"] == [
        "Maximum waiting time limit exceeded"
    ]
    assert h.m._st.concurrency.parked_count("dev", "k") == 0


def test_parking_is_deterministic_and_survives_snapshots(h: Harness, dev) -> None:
    for i in range(6):
        h.submit(dev["w1"], "dev", concurrencykey=f"k{i % 2}")
    running = [assign_or_none(h, dev[n]) for n in ("w1", "w2", "w3")]
    assert running[2] is None
    data = msgpack.unpackb(msgpack.packb(h.m.snapshot()), raw=False)
    assert sum(p["parked"] for p in data["processes"]) == 4
    restored = ColonyMachine.restore(data)
    assert restored.digest() == h.m.digest()
    assert restored._st.concurrency.running("dev", "k0") == 1
    close = h.cmd(
        "closesuccessfulmsg",
        dev["w1"],
        {"processid": running[0]["processid"], "attempt": running[0]["attempt"]},
    )
    for m in (h.m, restored):
        m.apply(close, h.now)  # releases one parked k0 process on both
    assert restored.digest() == h.m.digest()
    assert restored._st.concurrency.parked_count("dev", "k0") == 1


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"concurrencylimit": 2}, BadRequest),  # a limit needs a key
        ({"concurrencykey": "k", "concurrencylimit": 0}, InvalidField),
        ({"concurrencykey": "", "concurrencylimit": 1}, InvalidField),
        ({"concurrencykey": "a b"}, InvalidField),
        ({"concurrencykey": "k", "concurrencylimit": "2"}, InvalidField),
    ],
)
def test_bad_limits_are_refused_and_change_nothing(
    h: Harness, dev, fields: dict, error: type
) -> None:
    before = h.stats()
    with pytest.raises(error):
        h.submit(dev["w1"], "dev", **fields)
    assert h.stats() == before
