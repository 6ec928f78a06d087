"""Colony statistics always equal the per-state list sizes, whatever happened before:
random submits, assigns, closes, cancels, removals, workflows (cancelled and failed ones too),
timeouts, stale executors, removed executors and pauses, retention sweeps, idempotent,
concurrency-limited and backed-off submits, checked after every step."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from machine_harness import Harness

from protocol.errors import ColoniesError
from protocol.messages import MAX_LIST_COUNT, STATE_NAMES

LABELS = {0: "waiting", 1: "running", 2: "successful", 3: "failed", 4: "cancelled"}
assert set(LABELS) == set(STATE_NAMES)

# Kinds listed more than once are drawn more often, so that runs reach every state.
KINDS = (
    ["submit"] * 3 + ["assign"] * 4 + ["close"] * 4 + ["workflow"] * 2 + ["advance"] * 2
    + ["resume"] * 2
    + ["cancel", "remove", "cancelgraph", "removegraph", "removeall", "pause", "removeexecutor"]
    + ["retention", "keyed"]
)
# (kind, a number to pick with, a small int, a flag); each kind reads what it needs.
OPS = st.tuples(st.sampled_from(KINDS), st.integers(0, 50), st.integers(-1, 3), st.booleans())


class World:
    def __init__(self) -> None:
        self.h = h = Harness()
        self.co = h.colony("dev")
        self.names = ["w0", "w1", "w2"]
        self.ids = [h.executor("dev", n) for n in self.names]
        self.reader = h.executor("dev", "reader")  # never removed: reads the lists
        h.write("setexecutorstaleaftermsg", self.co, {"colonyname": "dev", "staleafter": 30})
        self.pids: list[str] = []
        self.gids: list[str] = []
        self.running: list[dict[str, Any]] = []

    def apply(self, op: tuple) -> None:
        h, (kind, pick, small, flag) = self.h, op
        if kind == "submit":
            p = h.submit(self.reader, "dev", maxexectime=small, maxretries=min(small, 1))
            self.pids.append(p["processid"])
        elif kind == "workflow":
            specs = []
            for i in range(pick % 4 + 1):
                deps = [f"n{i - 1}"] if flag and i else []
                specs.append(dict(h.spec("dev"), nodename=f"n{i}",
                                  conditions={"executortype": "cli", "dependencies": deps}))
            g = h.write("submitworkflowspecmsg", self.reader,
                        {"spec": {"colonyname": "dev", "functionspecs": specs}})
            self.gids.append(g["processgraphid"])
            self.pids.extend(g["processids"])
        elif kind == "assign":
            self.running.append(h.assign(self.ids[pick % 3], "dev"))
        elif kind == "close":
            if self.running:
                p = self.running.pop(pick % len(self.running))
                h.close(p["assignedexecutorid"], p, ok=flag or small > 0)
        elif kind in ("cancel", "remove") and self.pids:
            pid = self.pids[pick % len(self.pids)]
            msg = "cancelprocessmsg" if kind == "cancel" else "removeprocessmsg"
            h.write(msg, self.reader, {"processid": pid})
        elif kind in ("cancelgraph", "removegraph") and self.gids:
            gid = self.gids[pick % len(self.gids)]
            msg = "cancelprocessgraphmsg" if kind == "cancelgraph" else "removeprocessgraphmsg"
            h.write(msg, self.reader, {"processgraphid": gid})
        elif kind == "removeall":
            state = [-1, 0, 2, 3, 4][pick % 5]
            h.write("removeallprocessesmsg", self.co, {"colonyname": "dev", "state": state})
        elif kind == "advance":
            h.advance(pick)  # exec timeouts, and executors silent for 30 s go stale
            h.write("executorheartbeatmsg", self.reader, {"colonyname": "dev"})
        elif kind in ("pause", "resume"):
            msg = "pauseassignmentsmsg" if kind == "pause" else "resumeassignmentsmsg"
            h.write(msg, self.co, {"colonyname": "dev"})
        elif kind == "retention":  # 0 (off), 1 or 2 s; the sweeps run as time advances
            h.write("setretentionmsg", self.co, {"colonyname": "dev", "seconds": pick % 3})
        elif kind == "keyed":  # an idempotency key, a concurrency key, a backoff
            extra = {"backoff": {"initial": 1, "jitter": 0}} if flag else {}
            p = h.submit(self.reader, "dev", idempotencykey=f"k{pick % 4}",
                         concurrencykey=f"c{small % 2}", maxretries=1, **extra)
            self.pids.append(p["processid"])
        elif kind == "removeexecutor":
            name = self.names[pick % 3]
            h.write("removeexecutormsg", self.co, {"colonyname": "dev", "executorname": name})
            self.ids[pick % 3] = h.executor("dev", name)

    def check(self) -> None:
        h = self.h
        stats = h.read("getcolonystatsmsg", self.reader, {"colonyname": "dev"})
        for state, label in LABELS.items():
            procs = h.read("getprocessesmsg", self.reader,
                           {"colonyname": "dev", "state": state, "count": MAX_LIST_COUNT})
            graphs = h.read("getprocessgraphsmsg", self.reader,
                            {"colonyname": "dev", "state": state, "count": MAX_LIST_COUNT})
            assert stats[f"{label}processes"] == len(procs), (label, stats)
            assert stats[f"{label}workflows"] == len(graphs), (label, stats)
            assert all(p["state"] == state for p in procs)
        assert stats["executors"] == len(h.read("getexecutorsmsg", self.reader,
                                                {"colonyname": "dev"}))
        assert h.stats()["waitingprocesses"] == stats["waitingprocesses"]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, min_size=10, max_size=80))
def test_colony_statistics_equal_the_list_sizes(ops: list[tuple]) -> None:
    w = World()
    for op in ops:
        try:
            w.apply(op)
        except ColoniesError:
            pass  # a refusal changes nothing; the invariant must hold all the same
        w.check()
