"""Assignment order: priority, then submission order; type filtering; name targeting; scale."""

from __future__ import annotations

import random

import pytest
from machine_harness import T0, Harness, S, make_id

from consensus.assign_queue import AssignQueue
from consensus.process_ops import assign_next
from consensus.records import Colony, Executor, Process
from consensus.state import ColonyState
from protocol.errors import NotFound
from protocol.messages import APPROVED

DAY = 86_400 * S


@pytest.fixture
def h() -> Harness:
    h = Harness()
    h.colony("dev")
    return h


def drain(h: Harness, executor: str, colony: str = "dev") -> list[str]:
    """Assign until nothing is left; the process ids in assignment order."""
    got = []
    while h.m.assignable(colony, executor):
        got.append(h.assign(executor, colony)["processid"])
    with pytest.raises(NotFound):
        h.assign(executor, colony)
    return got


# The index on its own.


def test_queue_heads_and_removal():
    q = AssignQueue()
    assert q.peek("c", "t", "n") is None
    q.add("c", "t", (), (5, 1, "a"))
    q.add("c", "t", ("n",), (3, 2, "b"))
    q.add("c", "t", ("m", "n"), (4, 3, "c"))
    q.add("c", "u", (), (1, 4, "d"))
    assert len(q) == 4
    assert q.peek("c", "t", "n") == (3, 2, "b")
    assert q.peek("c", "t", "m") == (4, 3, "c")
    assert q.peek("c", "t", "x") == (5, 1, "a")
    assert q.peek("c", "u", "n") == (1, 4, "d")
    assert q.peek("other", "t", "n") is None
    q.remove("c", "t", ("m", "n"), (4, 3, "c"))
    assert q.peek("c", "t", "m") == (5, 1, "a")
    q.remove("c", "t", ("n",), (3, 2, "b"))
    q.remove("c", "t", (), (5, 1, "a"))
    assert q.peek("c", "t", "n") is None and len(q) == 1


# Through the machine.


def test_priority_then_submission_order(h: Harness):
    w = h.executor("dev", "w")
    prios = [0, 3, -1, 3, 0, 50_000, -50_000, 1]
    ps = [h.submit(w, "dev", priority=p)["processid"] for p in prios]
    expected = [
        pid
        for _, i, pid in sorted(
            (-p, i, pid) for i, (p, pid) in enumerate(zip(prios, ps, strict=True))
        )
    ]
    assert drain(h, w) == expected


def test_one_priority_unit_is_one_day_of_age(h: Harness):
    w = h.executor("dev", "w")
    old = h.submit(w, "dev", priority=0)["processid"]
    h.now += DAY - 1
    young_prio = h.submit(w, "dev", priority=1)["processid"]  # prioritytime one ns earlier
    h.now += 2
    younger_prio = h.submit(w, "dev", priority=1)["processid"]  # one ns later than `old`
    assert drain(h, w) == [young_prio, old, younger_prio]


def test_same_time_same_priority_is_submission_order(h: Harness):
    w = h.executor("dev", "w")
    ps = [h.submit(w, "dev")["processid"] for _ in range(20)]
    assert drain(h, w) == ps


def test_type_filtering(h: Harness):
    cli = h.executor("dev", "c", "cli")
    gpu = h.executor("dev", "g", "gpu")
    a = h.submit(cli, "dev", "gpu", priority=5)["processid"]
    b = h.submit(cli, "dev", "cli")["processid"]
    c = h.submit(cli, "dev", "gpu")["processid"]
    assert drain(h, cli) == [b]
    assert drain(h, gpu) == [a, c]


def test_executor_name_targeting(h: Harness):
    w1 = h.executor("dev", "w1")
    w2 = h.executor("dev", "w2")
    w3 = h.executor("dev", "w3")
    pool = h.submit(w1, "dev")["processid"]
    only_w2 = h.submit(w1, "dev", names=["w2"])["processid"]
    w1_or_w2 = h.submit(w1, "dev", names=["w1", "w2", "w1"])["processid"]
    urgent_w1 = h.submit(w1, "dev", names=["w1"], priority=1)["processid"]
    # Targeted and pool processes compete by priority time alone.
    assert drain(h, w1) == [urgent_w1, pool, w1_or_w2]
    assert drain(h, w2) == [only_w2]
    assert drain(h, w3) == []


def test_targeted_process_taken_by_one_name_leaves_the_others(h: Harness):
    w1 = h.executor("dev", "w1")
    w2 = h.executor("dev", "w2")
    both = h.submit(w1, "dev", names=["w1", "w2"])["processid"]
    assert h.assign(w2, "dev")["processid"] == both
    assert not h.m.assignable("dev", w1)
    with pytest.raises(NotFound):
        h.assign(w1, "dev")


def test_other_colonies_are_separate(h: Harness):
    h.colony("other")
    w = h.executor("dev", "w")
    o = h.executor("other", "w")  # the same name and type in another colony
    mine = h.submit(w, "dev")["processid"]
    theirs = h.submit(o, "other", priority=10)["processid"]
    assert drain(h, w) == [mine]
    assert drain(h, o, "other") == [theirs]


def test_requeued_process_keeps_its_priority_place(h: Harness):
    w = h.executor("dev", "w")
    first = h.submit(w, "dev", maxexectime=1)["processid"]
    second = h.submit(w, "dev")["processid"]
    assert h.assign(w, "dev")["processid"] == first
    h.advance(2)
    assert drain(h, w) == [first, second]


def test_many_waiting_processes_through_the_machine(h: Harness):
    """5k submits and assigns through apply_batch (validation, nonces, roles and all)."""
    n = 5_000
    w = h.executor("dev", "w")
    rng = random.Random(3)
    prios = [rng.randrange(-5, 6) for _ in range(n)]
    pids: list[str] = []
    per_batch = 500
    for start in range(0, n, per_batch):
        cmds = []
        for i in range(start, start + per_batch):
            names = ["w"] if rng.random() < 0.3 else None
            cmd = h.cmd(
                "submitfuncspecmsg", w, {"spec": h.spec("dev", names=names, priority=prios[i])}
            )
            pids.append(cmd["gen"])
            cmds.append(cmd)
        assert all(r[0] == 200 for r in h.batch(cmds))
    expected = [pids[i] for i in sorted(range(n), key=lambda i: (-prios[i], i))]
    got: list[str] = []
    assign = {"colonyname": "dev", "timeout": -1}
    for _ in range(0, n, per_batch):
        res = h.batch([h.cmd("assignprocessmsg", w, assign) for _ in range(per_batch)])
        got.extend(r[1]["processid"] for r in res)
    assert got == expected
    assert h.stats()["runningprocesses"] == n and not h.m.assignable("dev", w)


def test_fifty_thousand_waiting_processes_assign_in_order():
    """50k waiting processes in the state, drained by assign_next: each assign is O(log n),
    so this takes well under a second; the order is (prioritytime, submission) across the
    pool index and the executor's targeted index, and other types and names are left."""
    n = 50_000
    st = ColonyState()
    st.add_colony(Colony(colonyid=make_id("co"), name="dev"), gen=1)
    ex = Executor(make_id("w"), "cli", "w", "dev", APPROVED, commissiontime=T0)
    st.add_executor(ex)
    rng = random.Random(5)
    expected: list[tuple[int, int, str]] = []
    for seq in range(1, n + 1):
        etype = "cli" if rng.random() < 0.9 else "gpu"
        names = rng.choice([[], [], ["w"], ["x"], ["x", "w"]])
        prio = rng.randrange(-5, 6)
        spec = {
            "maxexectime": -1,
            "maxwaittime": -1,
            "maxretries": -1,
            "conditions": {"colonyname": "dev", "executortype": etype, "executornames": names},
        }
        pid = make_id(f"p{seq}")
        now = T0 + seq
        p = Process(pid, seq, spec, ex.executorid, "w", now, now - prio * DAY)
        st.add_process(p)
        if etype == "cli" and (not names or "w" in names):
            expected.append(p.queue_key)
    expected.sort()
    got = []
    while (p := assign_next(st, ex, T0 + 2 * n)) is not None:
        got.append(p.queue_key)
    assert got == expected
    assert st.statistics()["runningprocesses"] == len(expected)
    assert st.statistics()["waitingprocesses"] == n - len(expected) == len(st.queue)
