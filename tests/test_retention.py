"""Retention: the default and the per-colony setting (age, count), the sweep driven by the
timers (what it removes, when, and its bounded work per tick), export pages, snapshots, and
bad input."""

from __future__ import annotations

import msgpack
import pytest
from machine_harness import Harness

from consensus import retention
from consensus.machine import ColonyMachine
from protocol.errors import AccessDenied, InvalidField, NotFound
from protocol.messages import CANCELLED, FAILED, SUCCESS


@pytest.fixture
def dev(h: Harness) -> dict[str, str]:
    ids = {"co": h.colony("dev"), "w1": h.executor("dev", "w1")}
    ids["co2"] = h.colony("other")
    ids["o1"] = h.executor("other", "o1")
    return ids


def set_retention(
    h: Harness, owner: str, seconds: int, colony: str = "dev", count: int = 0
) -> dict:
    body = {"colonyname": colony, "seconds": seconds, "count": count}
    return h.write("setretentionmsg", owner, body)


def finish(h: Harness, w: str, colony: str = "dev", ok: bool = True) -> dict:
    h.submit(w, colony)
    p = h.assign(w, colony)
    h.close(w, p, ok=ok)
    return p


def test_by_default_finished_work_is_kept_thirty_days(h: Harness, dev) -> None:
    got = h.read("getretentionmsg", dev["co"], {"colonyname": "dev"})
    assert got == {"colonyname": "dev", "seconds": 30 * 86_400, "count": 0, "default": True}
    p = finish(h, dev["w1"])
    h.advance(29 * 86_400)
    assert h.process(dev["w1"], p["processid"])["state"] == SUCCESS
    h.advance(2 * 86_400)
    with pytest.raises(NotFound):
        h.process(dev["w1"], p["processid"])
    assert h.stats()["successfulprocesses"] == 0


def test_keep_everything_and_back_to_the_default(h: Harness, dev) -> None:
    got = set_retention(h, dev["co"], 0)
    assert (got["seconds"], got["count"], got["default"]) == (0, 0, False)
    finish(h, dev["w1"])
    assert h.m.next_deadline() is None  # nothing will ever be due: no sweep
    h.advance(365 * 86_400)
    assert h.stats()["successfulprocesses"] == 1
    got = h.write("setretentionmsg", dev["co"], {"colonyname": "dev", "default": True})
    assert got["default"] and got["seconds"] == 30 * 86_400
    h.advance(60)  # a year old: due at once
    assert h.stats()["successfulprocesses"] == 0


def test_a_count_keeps_the_newest(h: Harness, dev) -> None:
    w = dev["w1"]
    set_retention(h, dev["co"], 0, count=3)
    done = []
    for _ in range(5):
        done.append(finish(h, w))
        h.advance(1)
    h.tick()
    kept = h.read("getprocessesmsg", w, {"colonyname": "dev", "state": SUCCESS})
    assert [p["processid"] for p in kept] == [p["processid"] for p in reversed(done[2:])]
    assert h.stats()["successfulprocesses"] == 3


def test_finished_processes_go_after_the_retention(h: Harness, dev) -> None:
    w = dev["w1"]
    set_retention(h, dev["co"], 3600)
    done = finish(h, w)
    failed = finish(h, w, ok=False)
    cancelled = h.submit(w, "dev")
    h.write("cancelprocessmsg", w, {"processid": cancelled["processid"]})
    waiting = h.submit(w, "dev")
    h.submit(w, "dev")
    running = h.assign(w, "dev")
    other = finish(h, dev["o1"], "other")  # no retention in colony other
    h.advance(1800)
    late = finish(h, w)  # ends 30 minutes later
    h.advance(1800)  # the first ones are one hour old now (the sweep runs every 60 s)
    h.advance(60)
    ids = {p["processid"] for p in h.read("getprocessesmsg", w, {"colonyname": "dev"})}
    for gone in (done, failed, cancelled):
        assert gone["processid"] not in ids
    for kept in (waiting, running, late):
        assert kept["processid"] in ids
    assert h.process(dev["o1"], other["processid"])["state"] == SUCCESS
    h.advance(1800)
    assert late["processid"] not in {
        p["processid"] for p in h.read("getprocessesmsg", w, {"colonyname": "dev"})
    }
    stats = h.read("getcolonystatsmsg", dev["co"], {"colonyname": "dev"})
    assert (stats["successfulprocesses"], stats["failedprocesses"]) == (0, 0)
    assert stats["cancelledprocesses"] == 0 and stats["waitingprocesses"] == 1


def test_finished_workflows_go_whole_running_ones_stay(h: Harness, dev) -> None:
    w = dev["w1"]
    set_retention(h, dev["co"], 60)

    def workflow() -> dict:
        specs = [dict(h.spec("dev"), nodename="a"), dict(h.spec("dev"), nodename="b")]
        return h.write("submitworkflowspecmsg", w, {"spec": {"colonyname": "dev",
                                                             "functionspecs": specs}})

    done, busy = workflow(), workflow()
    for _ in range(2):
        h.close(w, h.assign(w, "dev"))  # both members of `done` (a, b: no dependencies)
    h.assign(w, "dev")  # `busy` runs
    h.advance(200)
    graphs = h.read("getprocessgraphsmsg", w, {"colonyname": "dev"})
    assert [g["processgraphid"] for g in graphs] == [busy["processgraphid"]]
    assert h.stats()["successfulprocesses"] == 0  # its members went with it
    with pytest.raises(NotFound):
        h.read("getprocessgraphmsg", w, {"processgraphid": done["processgraphid"]})
    assert h.stats()["waitingprocesses"] + h.stats()["runningprocesses"] == 2


def test_failed_and_cancelled_workflows_go_after_the_retention_too(h: Harness, dev) -> None:
    w = dev["w1"]
    set_retention(h, dev["co"], 300)

    def workflow() -> dict:
        specs = [dict(h.spec("dev"), nodename="a"),
                 dict(h.spec("dev"), nodename="b", conditions={
                     "executortype": "cli", "dependencies": ["a"]})]
        return h.write("submitworkflowspecmsg", w, {"spec": {"colonyname": "dev",
                                                             "functionspecs": specs}})

    failed, cancelled = workflow(), workflow()
    h.close(w, h.assign(w, "dev"), ok=False)  # failed's root: the graph fails whole
    h.write("cancelprocessgraphmsg", w, {"processgraphid": cancelled["processgraphid"]})
    ended = {g["processgraphid"]: g["state"]
             for g in h.read("getprocessgraphsmsg", w, {"colonyname": "dev"})}
    assert ended == {failed["processgraphid"]: FAILED, cancelled["processgraphid"]: CANCELLED}
    h.advance(240)  # not yet: they ended 240 s ago
    assert len(h.read("getprocessgraphsmsg", w, {"colonyname": "dev"})) == 2
    h.advance(120)
    assert h.read("getprocessgraphsmsg", w, {"colonyname": "dev"}) == []
    stats = h.read("getcolonystatsmsg", dev["co"], {"colonyname": "dev"})
    assert (stats["failedworkflows"], stats["cancelledworkflows"]) == (0, 0)
    assert (stats["failedprocesses"], stats["cancelledprocesses"]) == (0, 0)
    for g in (failed, cancelled):
        for pid in g["processids"]:
            with pytest.raises(NotFound):
                h.process(w, pid)


def test_the_sweep_does_bounded_work_per_tick(
    h: Harness, dev, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retention, "MAX_REMOVED_PER_SWEEP", 5)
    w = dev["w1"]
    set_retention(h, dev["co"], 10)
    for _ in range(12):
        finish(h, w)
    h.advance(60)  # the sweep is due: it removes 5 and sets its timer again for now
    assert h.stats()["successfulprocesses"] == 7
    assert h.m.next_deadline() == h.now  # the ticker proposes the next tick at once
    assert len(h.tick()["timers"]["retention"]) == 5
    assert len(h.tick()["timers"]["retention"]) == 2
    assert h.stats()["successfulprocesses"] == 0
    assert h.m.next_deadline() is None  # nothing archived: no sweep until something is


def test_turning_it_off_stops_the_sweep(h: Harness, dev) -> None:
    set_retention(h, dev["co"], 60)
    finish(h, dev["w1"])
    set_retention(h, dev["co"], 0)
    assert h.m.next_deadline() is None
    h.advance(600)
    assert h.stats()["successfulprocesses"] == 1


def test_removing_the_colony_drops_its_retention(h: Harness, dev) -> None:
    from machine_harness import SERVER

    set_retention(h, dev["co"], 60)
    h.write("removecolonymsg", SERVER, {"colonyname": "dev"})
    assert h.advance(61).get("timers") is None
    assert h.m.next_deadline() is None and h.m.snapshot()["retention"] == []


def test_only_the_colony_owner_sets_it(h: Harness, dev) -> None:
    before = h.m.digest()
    with pytest.raises(AccessDenied):
        set_retention(h, dev["w1"], 60)
    with pytest.raises(AccessDenied):
        set_retention(h, dev["co2"], 60)
    assert h.m.digest() == before


@pytest.mark.parametrize("bad", [-1, 10 * 365 * 86_400 + 1, "60", 1.5])
def test_bad_retention_is_refused_and_changes_nothing(h: Harness, dev, bad: object) -> None:
    before = h.m.digest()
    with pytest.raises(InvalidField):
        h.write("setretentionmsg", dev["co"], {"colonyname": "dev", "seconds": bad})
    assert h.m.digest() == before


def test_snapshot_keeps_the_setting_and_the_sweep(h: Harness, dev) -> None:
    set_retention(h, dev["co"], 120)
    finish(h, dev["w1"])
    data = msgpack.unpackb(msgpack.packb(h.m.snapshot()), raw=False)
    assert data["retention"] == [["dev", 120, 0]]
    restored = ColonyMachine.restore(data, h.m.archive)  # the archive persists beside it
    assert restored.digest() == h.m.digest()
    h.m = restored
    h.advance(200)
    assert h.stats()["successfulprocesses"] == 0


def test_export_pages_through_finished_processes(h: Harness, dev) -> None:
    w = dev["w1"]
    finished = [finish(h, w, ok=i % 3 != 0) for i in range(7)]
    h.submit(w, "dev")  # waiting: not exported
    t_mid = h.now
    h.advance(1)
    late = finish(h, w)
    seen, cursor, pages = [], 0, 0
    while True:
        page = h.read("exportprocessesmsg", dev["co"], {"colonyname": "dev", "afterseq": cursor,
                                                        "count": 3})
        seen += page["processes"]
        cursor, pages = page["cursor"], pages + 1
        if not page["more"]:
            break
    assert [p["processid"] for p in seen] == [p["processid"] for p in [*finished, late]]
    assert {p["state"] for p in seen} == {SUCCESS, FAILED}
    assert pages == 3
    since = h.read("exportprocessesmsg", w, {"colonyname": "dev", "since": t_mid + 1})
    assert [p["processid"] for p in since["processes"]] == [late["processid"]]
    assert CANCELLED not in {p["state"] for p in since["processes"]}
