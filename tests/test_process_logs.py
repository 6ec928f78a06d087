"""Process logs in the state machine: who may append, cursors, bounds, removal, snapshots."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from machine_harness import SERVER, Harness, S

from consensus.machine import ColonyMachine
from consensus.process_log import ProcessLog
from protocol.errors import AccessDenied, BadRequest, InvalidField, NotFound
from protocol.messages import MAX_LOG_COUNT, MAX_LOG_LINE_BYTES, MAX_LOG_LINES


@pytest.fixture
def dev(h: Harness) -> dict[str, str]:
    return {
        "co": h.colony("dev"),
        "w1": h.executor("dev", "w1"),
        "w2": h.executor("dev", "w2"),
        "co2": h.colony("other"),
        "o1": h.executor("other", "o1"),
    }


def add(h: Harness, caller: str, pid: str, message: str) -> Any:
    return h.write("addlogmsg", caller, {"processid": pid, "message": message})


def logs(h: Harness, caller: str, pid: str, **kw: Any) -> list[dict]:
    return h.read("getlogsmsg", caller, {"processid": pid, **kw})


def running(h: Harness, dev: dict[str, str]) -> dict:
    h.submit(dev["w1"], "dev")
    return h.assign(dev["w1"], "dev")


def test_the_assigned_executor_appends_and_members_read(h: Harness, dev):
    p = running(h, dev)
    pid = p["processid"]
    first = add(h, dev["w1"], pid, "starting")
    h.now += S
    add(h, dev["w1"], pid, "half way")
    assert first == {
        "processid": pid,
        "colonyname": "dev",
        "executorname": "w1",
        "message": "starting",
        "timestamp": h.now - S,
        "seq": 1,
    }
    got = logs(h, dev["w2"], pid)  # any approved member reads
    assert [(ln["seq"], ln["message"]) for ln in got] == [(1, "starting"), (2, "half way")]
    assert [ln["timestamp"] for ln in got] == [h.now - S, h.now]


def test_cursors_count_latest_and_since(h: Harness, dev):
    pid = running(h, dev)["processid"]
    for i in range(10):
        h.now += S
        add(h, dev["w1"], pid, f"line {i}")
    seqs = lambda **kw: [ln["seq"] for ln in logs(h, dev["w1"], pid, **kw)]  # noqa: E731
    assert seqs(afterseq=7) == [8, 9, 10]
    assert seqs(count=3) == [1, 2, 3]
    assert seqs(count=3, latest=True) == [8, 9, 10]
    assert seqs(afterseq=2, count=2) == [3, 4]
    assert seqs(afterseq=10) == []
    # `since` is a time: lines strictly newer (line i was written at T0 + (i+1) s + setup).
    stamps = [ln["timestamp"] for ln in logs(h, dev["w1"], pid)]
    assert seqs(since=stamps[5]) == [7, 8, 9, 10]
    assert seqs(since=stamps[5], afterseq=8) == [9, 10]


def test_lines_of_one_entry_share_a_time_but_not_a_sequence_number(h: Harness, dev):
    pid = running(h, dev)["processid"]
    cmds = [h.cmd("addlogmsg", dev["w1"], {"processid": pid, "message": str(i)}) for i in range(3)]
    assert [r[0] for r in h.batch(cmds)] == [200, 200, 200]
    got = logs(h, dev["w1"], pid)
    assert [ln["seq"] for ln in got] == [1, 2, 3]
    assert len({ln["timestamp"] for ln in got}) == 1
    assert [ln["seq"] for ln in logs(h, dev["w1"], pid, afterseq=1)] == [2, 3]


def test_only_the_assigned_executor_and_only_while_running(h: Harness, dev):
    p = running(h, dev)
    pid = p["processid"]
    before = h.m.digest()
    for caller in (dev["w2"], dev["co"], dev["o1"]):
        with pytest.raises(AccessDenied):
            add(h, caller, pid, "not mine")
    with pytest.raises(NotFound):
        add(h, dev["w1"], "0" * 64, "no such process")
    assert h.m.digest() == before  # refused before the commit point: nothing recorded
    h.close(dev["w1"], p)
    with pytest.raises(BadRequest, match="only while it runs"):
        add(h, dev["w1"], pid, "too late")
    assert logs(h, dev["w1"], pid) == []
    # A cancelled process stays assigned to its executor: refused with the reason.
    q = running(h, dev)
    h.write("cancelprocessmsg", dev["w2"], {"processid": q["processid"]})
    with pytest.raises(BadRequest, match="cancelled"):
        add(h, dev["w1"], q["processid"], "after cancel")


def test_reading_needs_an_approved_member_of_the_processs_colony(h: Harness, dev):
    pid = running(h, dev)["processid"]
    add(h, dev["w1"], pid, "x")
    for caller in (dev["o1"], dev["co2"]):
        with pytest.raises(AccessDenied):
            logs(h, caller, pid)
    with pytest.raises(BadRequest, match="belongs to colony 'dev'"):
        logs(h, dev["w1"], pid, colonyname="other")
    assert len(logs(h, dev["w1"], pid, colonyname="dev")) == 1


def test_bad_input_is_refused_with_typed_errors(h: Harness, dev):
    pid = running(h, dev)["processid"]
    before = h.m.digest()
    for body in (
        {"processid": pid, "message": "x" * (MAX_LOG_LINE_BYTES + 1)},
        {"processid": pid, "message": "é" * (MAX_LOG_LINE_BYTES // 2 + 1)},  # bytes, not chars
        {"processid": pid},
        {"processid": "nothex", "message": "x"},
        {"processid": pid, "message": 7},
    ):
        with pytest.raises(InvalidField):
            h.write("addlogmsg", dev["w1"], body)
    assert h.m.digest() == before
    add(h, dev["w1"], pid, "x" * MAX_LOG_LINE_BYTES)  # exactly at the bound is fine
    for kw in ({"count": 0}, {"count": MAX_LOG_COUNT + 1}, {"afterseq": -1}, {"timeout": 61}):
        with pytest.raises(InvalidField):
            logs(h, dev["w1"], pid, **kw)


def test_a_full_log_drops_its_oldest_lines(h: Harness, dev):
    pid = running(h, dev)["processid"]
    cmds = [
        h.cmd("addlogmsg", dev["w1"], {"processid": pid, "message": f"m{i}"})
        for i in range(MAX_LOG_LINES + 5)
    ]
    assert all(r[0] == 200 for r in h.batch(cmds))
    got = logs(h, dev["w1"], pid, count=MAX_LOG_COUNT)
    assert got[0]["seq"] == 6 and got[0]["message"] == "m5"  # lines 1-5 were dropped
    assert logs(h, dev["w1"], pid, latest=True, count=1)[0]["seq"] == MAX_LOG_LINES + 5
    # A cursor inside the dropped part reads from the oldest kept line.
    assert logs(h, dev["w1"], pid, afterseq=2, count=1)[0]["seq"] == 6
    assert len(h.m._st.logs[pid].lines) == MAX_LOG_LINES


def test_logs_go_with_their_process(h: Harness, dev):
    p = running(h, dev)
    add(h, dev["w1"], p["processid"], "x")
    h.close(dev["w1"], p)
    h.write("removeprocessmsg", dev["w1"], {"processid": p["processid"]})
    assert h.m._st.logs == {}
    # ... and with a workflow, and with a colony.
    wf = {"colonyname": "dev", "functionspecs": [dict(h.spec("dev"), nodename="a")]}
    g = h.write("submitworkflowspecmsg", dev["w1"], {"spec": wf})
    a = h.assign(dev["w1"], "dev")
    add(h, dev["w1"], a["processid"], "in a workflow")
    h.close(dev["w1"], a)
    h.write("removeprocessgraphmsg", dev["w1"], {"processgraphid": g["processgraphid"]})
    assert h.m._st.logs == {}
    q = running(h, dev)
    add(h, dev["w1"], q["processid"], "y")
    h.write("removecolonymsg", SERVER, {"colonyname": "dev"})
    assert h.m._st.logs == {}


def test_logs_survive_snapshots_and_replicas_agree(h: Harness, dev):
    pid = running(h, dev)["processid"]
    for i in range(3):
        add(h, dev["w1"], pid, f"line {i}")
    data = msgpack.unpackb(msgpack.packb(h.m.snapshot()), raw=False)
    restored = ColonyMachine.restore(data)
    assert restored.digest() == h.m.digest()
    assert restored.read("getlogsmsg", dev["w2"], {"processid": pid}, h.now) == logs(
        h, dev["w2"], pid
    )
    # The next line continues the sequence on the restored replica too.
    cmd = h.cmd("addlogmsg", dev["w1"], {"processid": pid, "message": "next"})
    assert restored.apply(cmd, h.now)["seq"] == h.m.apply(cmd, h.now)["seq"] == 4


def test_a_snapshot_without_logs_still_loads(h: Harness, dev):
    running(h, dev)
    data = h.m.snapshot()
    for key in ("logs", "functions", "pausedcolonies", "staleafter"):
        data.pop(key)
    assert ColonyMachine.restore(data).read("getexecutorsmsg", dev["w1"], {"colonyname": "dev"},
                                            h.now)


def test_the_ring_reads_by_cursor_in_order():
    log = ProcessLog(processid="p", colonyname="dev")
    for i in range(5):
        log.append(f"m{i}", "w", 100 + i // 2)  # two lines per timestamp
    assert [ln.seq for ln in log.read(0, 100, 10, False)] == [3, 4, 5]
    assert [ln.seq for ln in log.read(3, 0, 10, False)] == [4, 5]
    assert [ln.seq for ln in log.read(0, 0, 2, True)] == [4, 5]
    assert log.read(5, 0, 10, False) == []
