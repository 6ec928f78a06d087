"""The archive (consensus/archive.py, node/archive_sqlite.py): finished work moves there when
the log is applied, replay after a restart changes nothing, reads during a replay see the
archive as it was, pages, retention, and files on disk. Every test runs against both the
in-memory twin and SQLite."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
from machine_harness import CLUSTER, SERVER, T0, Harness, S

from consensus.archive import GRAPH, PROCESS, Archive, MemoryArchive
from consensus.machine import ColonyMachine
from node.archive_sqlite import ARCHIVE_FILE, SqliteArchive
from protocol.errors import NotFound
from protocol.messages import CANCELLED, FAILED, SUCCESS, WAITING
from tests.test_machine import _workload

MakeArchive = Callable[[], Archive]


@pytest.fixture(params=["memory", "sqlite"])
def make_archive(request: pytest.FixtureRequest, tmp_path: Path) -> MakeArchive:
    if request.param == "memory":
        return MemoryArchive
    return lambda: SqliteArchive(tmp_path / ARCHIVE_FILE)


def indexed(batches: list[bytes], first: int = 2) -> list[tuple[int, bytes]]:
    return list(enumerate(batches, start=first))


def boot(m: ColonyMachine) -> None:
    cmd = {"op": "bootstrap", "serverid": SERVER, "clusterid": CLUSTER}
    m.apply_batch(msgpack.packb({"now": T0, "cmds": [cmd]}), 1)


def test_replaying_from_a_snapshot_over_the_archive_changes_nothing(make_archive):
    """A restart: the live state comes from the last snapshot, the archive is where it was
    (ahead of the snapshot), and the journal replays the entries in between."""
    batches = indexed(_workload(3))
    m = ColonyMachine(make_archive())
    boot(m)
    half = len(batches) // 2
    results = [m.apply_batch(b, i) for i, b in batches[:half]]
    snapshot = msgpack.unpackb(msgpack.packb(m.snapshot()), raw=False)
    results += [m.apply_batch(b, i) for i, b in batches[half:]]
    live, history = m.digest(), m.archive.digest()
    stats = m.statistics()
    assert stats["successfulprocesses"] + stats["failedprocesses"] > 10  # history to replay

    again = ColonyMachine.restore(snapshot, m.archive, index=batches[half - 1][0])
    replayed = [again.apply_batch(b, i) for i, b in batches[half:]]
    assert replayed == results[half:]  # the same answers, from the same reads
    assert again.digest() == live and again.archive.digest() == history


def test_reads_during_a_replay_see_the_archive_as_it_was(make_archive):
    """A keyed submit that deduplicated to an archived process, which a later entry removed:
    replayed over an archive that no longer shows it, the submit must still deduplicate."""
    h = Harness(archive=make_archive())
    h.colony("dev")  # setup applied directly: nothing in it reaches the archive
    w = h.executor("dev", "w1")
    index = 10

    def entry(cmd: dict) -> list:
        nonlocal index
        index += 1
        return h.m.apply_batch(msgpack.packb({"now": h.now, "cmds": [cmd]}), index)[0]

    spec = h.spec("dev", idempotencykey="order-42")
    first = entry(h.cmd("submitfuncspecmsg", w, {"spec": spec}))[1]
    p = entry(h.cmd("assignprocessmsg", w, {"colonyname": "dev", "timeout": -1}))[1]
    entry(h.cmd("closesuccessfulmsg", w, {"processid": p["processid"], "attempt": 1}))
    snapshot = msgpack.unpackb(msgpack.packb(h.m.snapshot()), raw=False)
    at_snapshot = index
    later = [
        h.cmd("submitfuncspecmsg", w, {"spec": spec}),  # deduplicates to the archived one
        h.cmd("removeprocessmsg", w, {"processid": first["processid"]}),
    ]
    h.now += S
    dedup, removed = entry(later[0]), entry(later[1])
    assert dedup[1]["processid"] == first["processid"] and removed[0] == 200
    assert h.m.archive.get(PROCESS, first["processid"]) is None
    live = h.m.digest()

    h.m, index = ColonyMachine.restore(snapshot, h.m.archive, index=at_snapshot), at_snapshot
    assert [entry(cmd) for cmd in later] == [dedup, removed]  # the same reads, the same state
    assert h.m.digest() == live


def test_finished_work_leaves_memory_for_the_archive(make_archive):
    h = Harness(archive=make_archive())
    h.colony("dev")
    w = h.executor("dev", "w1")
    done = h.submit(w, "dev")
    p = h.assign(w, "dev")
    h.write("addlogmsg", w, {"processid": p["processid"], "message": "halfway"})
    h.write("addattributemsg", w, {"attribute": {"targetid": p["processid"], "key": "k",
                                                 "value": "v", "attributetype": 1}})
    h.close(w, p, out=["out"])
    waiting = h.submit(w, "dev")
    st = h.m._st
    assert set(st.processes) == {waiting["processid"]} and not st.logs
    assert h.m.archive.get(PROCESS, done["processid"]) is not None
    got = h.process(w, done["processid"])
    assert got["state"] == SUCCESS and got["out"] == ["out"]
    lines = h.read("getlogsmsg", w, {"colonyname": "dev", "processid": done["processid"]})
    assert [ln["message"] for ln in lines] == ["halfway"]
    attr = got["attributes"][-1]
    assert h.read("getattributemsg", w, {"attributeid": attr["attributeid"]})["value"] == "v"
    assert h.stats()["successfulprocesses"] == 1 and h.stats()["waitingprocesses"] == 1
    # A workflow goes whole, when its last member finishes.
    specs = [dict(h.spec("dev"), nodename="a"),
             dict(h.spec("dev"), nodename="b", conditions={"executortype": "cli",
                                                           "dependencies": ["a"]})]
    g = h.write("submitworkflowspecmsg", w, {"spec": {"colonyname": "dev", "functionspecs": specs}})
    h.close(w, h.assign(w, "dev"))  # waiting: the old one first
    h.close(w, h.assign(w, "dev"))  # a
    assert g["processgraphid"] in st.graphs  # b is still waiting
    h.close(w, h.assign(w, "dev"))  # b
    assert g["processgraphid"] not in st.graphs and not st.processes
    graph = h.read("getprocessgraphmsg", w, {"processgraphid": g["processgraphid"]})
    assert graph["state"] == SUCCESS and [n["state"] for n in graph["nodes"]] == [SUCCESS] * 2
    assert h.m.archive.get(GRAPH, g["processgraphid"]) is not None
    assert h.stats()["successfulworkflows"] == 1 and h.stats()["successfulprocesses"] == 4


def test_pages_newest_first_and_in_submission_order(make_archive):
    h = Harness(archive=make_archive())
    h.colony("dev")
    w = h.executor("dev", "w1")
    ended = []
    for i in range(25):
        h.submit(w, "dev")
        p = h.assign(w, "dev")
        h.now += S
        h.close(w, p, ok=i % 5 != 0)
        ended.append(p["processid"])
    h.submit(w, "dev")  # one waiting
    seen, before = [], {}
    while True:
        page = h.read("getprocessesmsg", w, {"colonyname": "dev", "state": SUCCESS, "count": 7,
                                              **before})
        if not page:
            break
        seen += page
        before = {"beforetime": page[-1]["endtime"], "beforeid": page[-1]["processid"]}
    successes = [pid for i, pid in enumerate(ended) if i % 5 != 0]
    assert [p["processid"] for p in seen] == successes[::-1]
    everything = h.read("getprocessesmsg", w, {"colonyname": "dev", "count": 100})
    assert everything[0]["state"] == WAITING and len(everything) == 26
    assert {p["state"] for p in everything[1:]} == {SUCCESS, FAILED}
    follow = h.read("followprocessesmsg", w, {"colonyname": "dev", "afterseq": 0, "count": 100})
    assert [p["processid"] for p in follow["processes"]][:25] == ended


def test_removing_and_retention_take_rows_out(make_archive):
    from consensus import history

    h = Harness(archive=make_archive())
    owner = h.colony("dev")
    w = h.executor("dev", "w1")
    for _ in range(12):
        h.submit(w, "dev")
        h.close(w, h.assign(w, "dev"))
    cancelled = h.submit(w, "dev")
    h.write("cancelprocessmsg", w, {"processid": cancelled["processid"]})
    assert h.stats()["cancelledprocesses"] == 1
    old, history.MAX_REMOVED_PER_TICK = history.MAX_REMOVED_PER_TICK, 5
    try:
        h.write("removeallprocessesmsg", owner, {"colonyname": "dev", "state": SUCCESS})
        assert h.stats()["successfulprocesses"] == 7  # a batch now ...
        h.tick()
        h.tick()  # ... the rest by the timer
    finally:
        history.MAX_REMOVED_PER_TICK = old
    assert h.stats()["successfulprocesses"] == 0 and h.stats()["cancelledprocesses"] == 1
    h.write("setretentionmsg", owner, {"colonyname": "dev", "seconds": 60})
    h.advance(61)
    assert h.stats()["cancelledprocesses"] == 0
    with pytest.raises(NotFound):
        h.process(w, cancelled["processid"])
    h.m.archive.collect(h.m.archive.applied_index)
    assert h.m.archive.get(PROCESS, cancelled["processid"]) is None


def test_a_removed_colonys_history_is_gone_at_once_and_purged_in_batches(make_archive):
    from consensus import history

    h = Harness(archive=make_archive())
    h.colony("dev")
    w = h.executor("dev", "w1")
    ids = []
    for _ in range(8):
        ids.append(h.submit(w, "dev")["processid"])
        h.close(w, h.assign(w, "dev"))
    old, history.MAX_REMOVED_PER_TICK = history.MAX_REMOVED_PER_TICK, 3
    try:
        h.write("removecolonymsg", SERVER, {"colonyname": "dev"})
        h.colony("dev")  # the same name again: none of the old history shows
        w2 = h.executor("dev", "w2")
        for pid in ids:
            with pytest.raises(NotFound):
                h.process(w2, pid)
        assert h.stats()["successfulprocesses"] == 0
        assert h.read("getprocessesmsg", w2, {"colonyname": "dev", "state": SUCCESS}) == []
        for _ in range(4):
            h.tick()
    finally:
        history.MAX_REMOVED_PER_TICK = old
    assert h.m._st.purges == {}
    assert all(h.m.archive.get(PROCESS, pid) is None for pid in ids)


def test_sqlite_files_are_private_and_reopen_where_they_were(tmp_path):
    path = tmp_path / ARCHIVE_FILE
    h = Harness(archive=SqliteArchive(path))
    h.colony("dev")
    w = h.executor("dev", "w1")
    for i in range(5):
        h.submit(w, "dev")
        h.close(w, h.assign(w, "dev"), out=[i])
    digest, applied = h.m.archive.digest(), h.m.archive.applied_index
    h.m.archive.checkpoint()
    h.m.archive.close()
    assert {p.name for p in tmp_path.iterdir()} >= {ARCHIVE_FILE}
    assert all(os.stat(p).st_mode & 0o077 == 0 for p in tmp_path.iterdir())
    again = SqliteArchive(path)
    assert (again.digest(), again.applied_index) == (digest, applied)
    again.close()


def test_a_format_3_snapshot_moves_its_finished_records_to_the_archive(make_archive):
    """Snapshots of earlier versions hold every process; loading one archives the finished
    ones (at the snapshot's index) and keeps the live ones."""
    h = Harness()
    h.colony("dev")
    w = h.executor("dev", "w1")
    done = h.submit(w, "dev")
    h.close(w, h.assign(w, "dev"))
    waiting = h.submit(w, "dev")
    snap = h.m.snapshot()
    old = copy.deepcopy(snap)
    old["format"] = 3
    old["processes"] = [dict(done_record(h, done["processid"])), *snap["processes"]]
    old["retention"] = []
    for key in ("colonygen", "archived", "purges", "removals"):
        old.pop(key)
    m = ColonyMachine.restore(old, make_archive(), index=50)
    assert set(m._st.processes) == {waiting["processid"]}
    assert m.archive.get(PROCESS, done["processid"]) is not None
    assert m.statistics()["successfulprocesses"] == 1


def done_record(h: Harness, pid: str) -> dict:
    row = h.m.archive.get(PROCESS, pid)
    assert row is not None
    return row.record


def test_cancelled_and_failed_counts(make_archive):
    h = Harness(archive=make_archive())
    h.colony("dev")
    w = h.executor("dev", "w1")
    h.submit(w, "dev")
    h.close(w, h.assign(w, "dev"), ok=False)
    c = h.submit(w, "dev")
    h.write("cancelprocessmsg", w, {"processid": c["processid"]})
    stats = h.read("getcolonystatsmsg", w, {"colonyname": "dev"})
    assert (stats["failedprocesses"], stats["cancelledprocesses"]) == (1, 1)
    assert h.read("getprocessesmsg", w, {"colonyname": "dev", "state": CANCELLED})[0][
        "processid"
    ] == c["processid"]
