"""Workflows against a reference model (hypothesis stateful test).

The model is naive on purpose: plain dicts, whole-graph scans, graph states recomputed from
the members every time. Hypothesis draws random DAGs, assigns, successful and failed closes,
clock advances (exec timeouts with and without retries left, wait timeouts), cancels,
removals and dynamic children (append, insert, with an existing child); the machine must
agree with the model on every process (state, readiness, parents, children, `in`), every
graph state, which process each executor gets, the deadlines, and statistics that equal the
list sizes.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from machine_harness import Harness, S, assert_listing, make_id

from consensus.graphs import member_id
from protocol.errors import AccessDenied, BadRequest, NotFound
from protocol.messages import CANCELLED, FAILED, RUNNING, SUCCESS, WAITING

EXECUTORS = {"a1": "t1", "a2": "t1", "b1": "t2"}  # name -> type
STATES = (WAITING, RUNNING, SUCCESS, FAILED, CANCELLED)
STAT_KEYS = {
    WAITING: "waiting",
    RUNNING: "running",
    SUCCESS: "successful",
    FAILED: "failed",
    CANCELLED: "cancelled",
}


@st.composite
def dags(draw: st.DrawFn) -> list[dict[str, Any]]:
    """1-6 nodes; each depends on a random ordered subset of the earlier ones."""
    n = draw(st.integers(1, 6))
    nodes = []
    for i in range(n):
        deps = draw(st.lists(st.integers(0, i - 1), unique=True, max_size=3)) if i else []
        nodes.append(
            {
                "name": f"n{i}",
                "deps": deps,
                "type": draw(st.sampled_from(["t1", "t1", "t2"])),
                "maxexectime": draw(st.sampled_from([-1, -1, 2, 4])),
                "maxretries": draw(st.sampled_from([-1, 0, 1])),
                "maxwaittime": draw(st.sampled_from([-1, -1, 0, 3, 9])),
            }
        )
    return nodes


def graph_state(states: list[int]) -> int:
    if FAILED in states:
        return FAILED
    if CANCELLED in states:
        return CANCELLED
    if all(s == SUCCESS for s in states):
        return SUCCESS
    if SUCCESS in states or RUNNING in states:
        return RUNNING
    return WAITING


class Workflows(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.h = Harness()
        self.owner = self.h.colony("dev")
        self.ids = {n: self.h.executor("dev", n, t) for n, t in EXECUTORS.items()}
        self.procs: dict[str, dict[str, Any]] = {}  # pid -> model process
        self.order: list[str] = []  # processes in submission order
        self.graphs: dict[str, list[str]] = {}  # gid -> member pids, in creation order
        self.graph_order: list[str] = []
        self.seq = 0  # the machine's shared process/graph sequence
        self.n = 0

    # Model helpers.

    def _new(self, pid: str, gid: str, spec: dict[str, Any], parents: list[str]) -> None:
        self.seq += 1
        now = self.h.now
        mw = spec["maxwaittime"]
        self.procs[pid] = {
            "gid": gid,
            "seq": self.seq,
            "prioritytime": now,
            "type": spec["type"],
            "maxexectime": spec["maxexectime"],
            "maxretries": spec["maxretries"],
            "maxwaittime": mw,
            "state": WAITING,
            "parents": list(parents),
            "children": [],
            "waitfor": bool(parents),
            "in": [],
            "out": [],
            "assigned": "",
            "attempt": 0,
            "retries": 0,
            "waitdeadline": now + mw * S if mw > 0 and not parents else 0,
            "execdeadline": 0,
        }
        self.order.append(pid)
        self.graphs[gid].append(pid)

    def _ready(self, r: dict[str, Any]) -> bool:
        return r["state"] == WAITING and not r["waitfor"]

    def _release(self, pid: str) -> None:
        r = self.procs[pid]
        r["waitfor"] = False
        r["in"] = [x for q in r["parents"] for x in self.procs[q]["out"]]
        mw = r["maxwaittime"]
        r["waitdeadline"] = self.h.now + mw * S if mw > 0 else 0

    def _succeeded(self, pid: str) -> None:
        for c in self.procs[pid]["children"]:
            rc = self.procs[c]
            if (
                rc["state"] == WAITING
                and rc["waitfor"]
                and all(self.procs[q]["state"] == SUCCESS for q in rc["parents"])
            ):
                self._release(c)

    def _failed(self, pid: str) -> None:
        for q in self.graphs[self.procs[pid]["gid"]]:
            if self.procs[q]["state"] in (WAITING, RUNNING):
                self.procs[q]["state"] = FAILED

    def _requeue(self, r: dict[str, Any]) -> None:
        r["state"] = WAITING
        r["assigned"] = ""
        r["execdeadline"] = 0
        mw = r["maxwaittime"]
        r["waitdeadline"] = self.h.now + mw * S if mw > 0 else 0

    def _graph_state(self, gid: str) -> int:
        return graph_state([self.procs[q]["state"] for q in self.graphs[gid]])

    def _candidates(self, who: str) -> list[tuple[int, int, str]]:
        return sorted(
            (r["prioritytime"], r["seq"], pid)
            for pid, r in self.procs.items()
            if self._ready(r) and r["type"] == EXECUTORS[who]
        )

    def _running(self) -> list[str]:
        return sorted(pid for pid, r in self.procs.items() if r["state"] == RUNNING)

    # Rules.

    @rule(dag=dags(), who=st.sampled_from(sorted(EXECUTORS)))
    def submit(self, dag: list[dict[str, Any]], who: str) -> None:
        self.n += 1
        gid = make_id(f"graph-{self.n}")
        specs = [
            {
                "nodename": d["name"],
                "funcname": "f",
                "maxexectime": d["maxexectime"],
                "maxretries": d["maxretries"],
                "maxwaittime": d["maxwaittime"],
                "conditions": {
                    "executortype": d["type"],
                    "dependencies": [dag[j]["name"] for j in d["deps"]],
                },
            }
            for d in dag
        ]
        body = {"spec": {"colonyname": "dev", "functionspecs": specs}}
        g = self.h.write("submitworkflowspecmsg", self.ids[who], body, gen=gid)
        assert g["processgraphid"] == gid
        self.seq += 1  # the graph's own sequence number
        self.graphs[gid] = []
        self.graph_order.append(gid)
        pids = [member_id(gid, i) for i in range(len(dag))]
        for i, d in enumerate(dag):
            mw = d["maxwaittime"]
            spec = dict(d, maxwaittime=-1 if mw == 0 else mw)
            self._new(pids[i], gid, spec, [pids[j] for j in d["deps"]])
        for i, d in enumerate(dag):
            for j in d["deps"]:
                self.procs[pids[j]]["children"].append(pids[i])
        assert g["processids"] == pids

    @rule(who=st.sampled_from(sorted(EXECUTORS)))
    def assign(self, who: str) -> None:
        candidates = self._candidates(who)
        try:
            got = self.h.assign(self.ids[who], "dev")
        except NotFound:
            assert not candidates
            return
        assert candidates, "assigned a process that is not ready"
        pid = candidates[0][2]
        assert got["processid"] == pid
        r = self.procs[pid]
        r["state"] = RUNNING
        r["assigned"] = self.ids[who]
        r["attempt"] += 1
        me = r["maxexectime"]
        r["execdeadline"] = self.h.now + me * S if me > 0 else 0
        assert got["in"] == r["in"]

    @precondition(lambda self: self._running())
    @rule(data=st.data(), ok=st.sampled_from([True, True, True, False]))
    def close(self, data: st.DataObject, ok: bool) -> None:
        self._close(data.draw(st.sampled_from(self._running())), ok)

    @rule(who=st.sampled_from(sorted(EXECUTORS)))
    def work(self, who: str) -> None:
        """Assign and close successfully in one step, so graphs get deep quickly."""
        before = set(self._running())
        self.assign(who)
        started = set(self._running()) - before
        if started:
            self._close(started.pop(), True)

    def _close(self, pid: str, ok: bool) -> None:
        r = self.procs[pid]
        out = [pid[:6], r["attempt"]]
        self.h.close(r["assigned"], {"processid": pid, "attempt": r["attempt"]}, ok=ok, out=out)
        if ok:
            r["state"] = SUCCESS
            r["out"] = out
            self._succeeded(pid)
        else:
            r["state"] = FAILED
            self._failed(pid)

    @rule(seconds=st.integers(0, 5))
    def advance(self, seconds: int) -> None:
        self.h.now += seconds * S
        now = self.h.now
        due = sorted(
            [(r["execdeadline"], pid, "exec") for pid, r in self.procs.items()
             if r["state"] == RUNNING and 0 < r["execdeadline"] <= now]
            + [(r["waitdeadline"], pid, "wait") for pid, r in self.procs.items()
               if self._ready(r) and 0 < r["waitdeadline"] <= now]
        )
        requeued, failed = [], []
        for _, pid, kind in due:
            r = self.procs[pid]
            if kind == "exec" and r["state"] != RUNNING:
                continue
            if kind == "wait" and not self._ready(r):
                continue
            if kind == "wait" or (r["maxretries"] > -1 and r["retries"] >= r["maxretries"]):
                r["state"] = FAILED
                failed.append(pid)
                self._failed(pid)
            else:
                self._requeue(r)
                r["retries"] += 1
                requeued.append(pid)
        assert self.h.tick() == {"requeued": requeued, "failed": failed}

    @precondition(lambda self: self.graphs)
    @rule(data=st.data(), who=st.sampled_from(sorted(EXECUTORS)))
    def cancel_graph(self, data: st.DataObject, who: str) -> None:
        gid = data.draw(st.sampled_from(self.graph_order))
        body = {"processgraphid": gid}
        if self._graph_state(gid) in (SUCCESS, FAILED, CANCELLED):
            try:
                self.h.write("cancelprocessgraphmsg", self.ids[who], body)
            except BadRequest:
                return
            raise AssertionError("cancelled a finished graph")
        self.h.write("cancelprocessgraphmsg", self.ids[who], body)
        for q in self.graphs[gid]:
            if self.procs[q]["state"] in (WAITING, RUNNING):
                self.procs[q]["state"] = CANCELLED

    @precondition(lambda self: self.graphs)
    @rule(data=st.data(), who=st.sampled_from(sorted(EXECUTORS)))
    def remove_graph(self, data: st.DataObject, who: str) -> None:
        gid = data.draw(st.sampled_from(self.graph_order))
        body = {"processgraphid": gid}
        if self._graph_state(gid) == RUNNING:
            try:
                self.h.write("removeprocessgraphmsg", self.ids[who], body)
            except BadRequest:
                return
            raise AssertionError("removed a running graph")
        self.h.write("removeprocessgraphmsg", self.ids[who], body)
        for q in self.graphs.pop(gid):
            del self.procs[q]
            self.order.remove(q)
        self.graph_order.remove(gid)

    @precondition(lambda self: self._running())
    @rule(
        data=st.data(),
        insert=st.booleans(),
        with_existing=st.booleans(),
        etype=st.sampled_from(["t1", "t2"]),
        maxwaittime=st.sampled_from([-1, 4]),
    )
    def add_child(
        self, data: st.DataObject, insert: bool, with_existing: bool, etype: str, maxwaittime: int
    ) -> None:
        parent = data.draw(st.sampled_from(self._running()))
        rp = self.procs[parent]
        gid = rp["gid"]
        waiting = [q for q in self.graphs[gid] if self.procs[q]["state"] == WAITING]
        existing = ""
        if with_existing and not insert and waiting:
            existing = data.draw(st.sampled_from(waiting))
        self.n += 1
        pid = make_id(f"child-{self.n}")
        body = {
            "processgraphid": gid,
            "parentprocessid": parent,
            "childprocessid": existing,
            "insert": insert,
            "spec": {
                "nodename": f"c{self.n}",
                "funcname": "f",
                "maxwaittime": maxwaittime,
                "conditions": {"executortype": etype},
            },
        }
        # Only the executor running the parent may add to it.
        other = next(i for i in self.ids.values() if i != rp["assigned"])
        with pytest.raises(AccessDenied):
            self.h.write("addchildmsg", other, body)
        got = self.h.write("addchildmsg", rp["assigned"], body, gen=pid)
        assert got["processid"] == pid
        spec = {"type": etype, "maxexectime": -1, "maxretries": -1, "maxwaittime": maxwaittime}
        self._new(pid, gid, spec, [parent])
        rc = self.procs[pid]
        if insert:
            rc["children"] = list(rp["children"])
            for c in rp["children"]:
                ps = self.procs[c]["parents"]
                self.procs[c]["parents"] = [pid if q == parent else q for q in ps]
            rp["children"] = [pid]
        else:
            rp["children"].append(pid)
            if existing:
                rc["children"] = [existing]
                re = self.procs[existing]
                re["parents"].append(pid)
                re["waitfor"] = True
                re["waitdeadline"] = 0

    # Invariants.

    @invariant()
    def processes_agree(self) -> None:
        if not hasattr(self, "h"):
            return
        reader = self.ids["a1"]
        for pid, r in self.procs.items():
            p = self.h.process(reader, pid)
            got = (p["state"], p["waitforparents"], p["parents"], p["children"], p["attempt"])
            want = (r["state"], r["waitfor"], r["parents"], r["children"], r["attempt"])
            assert got == want, pid
            assert p["processgraphid"] == r["gid"]
            assert p["in"] == r["in"], pid
            assert p["retries"] == r["retries"]
            if self._ready(r):
                assert p["waitdeadline"] == r["waitdeadline"]

    @invariant()
    def graphs_agree(self) -> None:
        if not hasattr(self, "h"):
            return
        reader = self.ids["a1"]
        for gid, members in self.graphs.items():
            g = self.h.read("getprocessgraphmsg", reader, {"processgraphid": gid})
            assert g["state"] == self._graph_state(gid), gid
            assert g["processids"] == members
            roots = [q for q in members if not self.procs[q]["parents"]]
            assert g["rootprocessids"] == roots

    @invariant()
    def each_executor_gets_the_right_count(self) -> None:
        if not hasattr(self, "h"):
            return
        for who in EXECUTORS:
            assert self.h.m.assignable("dev", self.ids[who]) == len(self._candidates(who))

    @invariant()
    def statistics_are_list_sizes(self) -> None:
        if not hasattr(self, "h"):
            return
        stats = self.h.stats()
        reader = self.ids["a1"]
        for state, label in STAT_KEYS.items():
            want = [pid for pid in self.order if self.procs[pid]["state"] == state]
            assert stats[f"{label}processes"] == len(want)
            body = {"colonyname": "dev", "state": state}
            listed = self.h.read("getprocessesmsg", reader, body)
            assert_listing(listed, want, "processid")
            gwant = [g for g in self.graph_order if self._graph_state(g) == state]
            assert stats[f"{label}workflows"] == len(gwant)
            glisted = self.h.read("getprocessgraphsmsg", reader, body)
            assert_listing(glisted, gwant, "processgraphid")
        assert sum(stats[f"{label}processes"] for label in STAT_KEYS.values()) == len(self.procs)

    @invariant()
    def next_deadline_is_the_earliest(self) -> None:
        if not hasattr(self, "h"):
            return
        pending = [r["waitdeadline"] for r in self.procs.values()
                   if self._ready(r) and r["waitdeadline"] > 0]
        pending += [r["execdeadline"] for r in self.procs.values()
                    if r["state"] == RUNNING and r["execdeadline"] > 0]
        assert self.h.next_deadline() == (min(pending) if pending else None)


Workflows.TestCase.settings = settings(
    max_examples=250,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestWorkflows = Workflows.TestCase
