"""The process lifecycle against a reference model (hypothesis stateful test).

The model is deliberately naive: plain dicts and O(n) scans. Whatever sequence of submits,
assigns, closes (current or stale attempts, right or wrong executor), clock advances with
ticks, removals and executor removals hypothesis draws, the machine must agree with it.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from machine_harness import Harness, S, assert_listing

from consensus.lifecycle import TRANSITIONS, Event, next_state, table_markdown
from protocol.errors import AccessDenied, BadRequest, NotFound
from protocol.messages import CANCELLED, FAILED, RUNNING, SUCCESS, WAITING

DAY = 86_400 * S
EXECUTORS = {"a1": "t1", "a2": "t1", "b1": "t2"}  # name -> type
STATES = (WAITING, RUNNING, SUCCESS, FAILED, CANCELLED)


def test_illegal_transitions_are_refused():
    for state in STATES:
        for event in Event:
            if (state, event) in TRANSITIONS:
                assert next_state(state, event) in STATES
            else:
                with pytest.raises(BadRequest):
                    next_state(state, event)


def test_table_renders_every_transition():
    text = table_markdown()
    assert text.count("\n") == len(TRANSITIONS) + 1
    assert "| waiting | assign | running |" in text
    assert "| running | exec timeout, retries left | waiting |" in text


class ProcessLifecycle(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.h = Harness()
        self.owner = self.h.colony("dev")
        self.ids = {n: self.h.executor("dev", n, t) for n, t in EXECUTORS.items()}
        self.model: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []  # submission order
        self.seq = 0
        self.accepted_closes: dict[str, int] = {}

    # Rules.

    @rule(
        who=st.sampled_from(sorted(EXECUTORS)),
        priority=st.integers(-2, 2),
        etype=st.sampled_from(["t1", "t2"]),
        names=st.sampled_from([[], [], ["a1"], ["a2"], ["a1", "b1"]]),
        maxexectime=st.sampled_from([-1, 0, 1, 2, 5]),
        maxretries=st.integers(-1, 2),
        maxwaittime=st.sampled_from([-1, 0, 1, 3, 8]),
    )
    def submit(
        self,
        who: str,
        priority: int,
        etype: str,
        names: list[str],
        maxexectime: int,
        maxretries: int,
        maxwaittime: int,
    ) -> None:
        p = self.h.submit(
            self.ids[who],
            "dev",
            etype,
            names,
            priority=priority,
            maxexectime=maxexectime,
            maxretries=maxretries,
            maxwaittime=maxwaittime,
        )
        now = self.h.now
        self.seq += 1
        self.model[p["processid"]] = {
            "state": WAITING,
            "prioritytime": now - priority * DAY,
            "seq": self.seq,
            "type": etype,
            "names": names,
            "maxexectime": maxexectime,
            "maxretries": maxretries,
            "maxwaittime": maxwaittime,
            "retries": 0,
            "attempt": 0,
            "assigned": "",
            "execdeadline": 0,
            "waitdeadline": now + maxwaittime * S if maxwaittime > 0 else 0,
        }
        self.order.append(p["processid"])

    @rule(who=st.sampled_from(sorted(EXECUTORS)))
    def assign(self, who: str) -> None:
        candidates = [
            (r["prioritytime"], r["seq"], pid)
            for pid, r in self.model.items()
            if r["state"] == WAITING
            and r["type"] == EXECUTORS[who]
            and (not r["names"] or who in r["names"])
        ]
        try:
            got = self.h.assign(self.ids[who], "dev")
        except NotFound:
            assert not candidates
            return
        assert candidates, "the machine assigned a process the model has no candidate for"
        expected = min(candidates)[2]
        assert got["processid"] == expected
        r = self.model[expected]
        r["state"] = RUNNING
        r["attempt"] += 1
        r["assigned"] = self.ids[who]
        me = r["maxexectime"]
        r["execdeadline"] = self.h.now + me * S if me > 0 else 0
        assert got["attempt"] == r["attempt"] and got["execdeadline"] == r["execdeadline"]

    @precondition(lambda self: self.model)
    @rule(
        data=st.data(),
        successful=st.booleans(),
        attempt_delta=st.sampled_from([0, 0, -1, 1]),
        right_executor=st.booleans(),
    )
    def close(
        self, data: st.DataObject, successful: bool, attempt_delta: int, right_executor: bool
    ) -> None:
        pid = data.draw(st.sampled_from(sorted(self.model)))
        r = self.model[pid]
        if right_executor and r["assigned"]:
            caller = r["assigned"]
        else:
            caller = self.ids[data.draw(st.sampled_from(sorted(EXECUTORS)))]
        attempt = max(1, r["attempt"] + attempt_delta)
        body = {"processid": pid, "attempt": attempt}
        if successful:
            body["out"] = ["ok"]
        else:
            body["errors"] = ["boom"]
        op = "closesuccessfulmsg" if successful else "closefailedmsg"
        ok = r["state"] == RUNNING and caller == r["assigned"] and attempt == r["attempt"]
        try:
            self.h.write(op, caller, body)
        except (AccessDenied, BadRequest) as e:
            assert not ok, f"a valid close was refused: {e}"
            if caller != r["assigned"]:
                assert isinstance(e, AccessDenied)
            return
        assert ok, "an invalid close was accepted"
        r["state"] = SUCCESS if successful else FAILED
        self.accepted_closes[pid] = self.accepted_closes.get(pid, 0) + 1

    @rule(seconds=st.integers(0, 6))
    def advance(self, seconds: int) -> None:
        self.h.now += seconds * S
        now = self.h.now
        due = sorted(
            [
                (r["execdeadline"], pid, "exec")
                for pid, r in self.model.items()
                if r["state"] == RUNNING and 0 < r["execdeadline"] <= now
            ]
            + [
                (r["waitdeadline"], pid, "wait")
                for pid, r in self.model.items()
                if r["state"] == WAITING and 0 < r["waitdeadline"] <= now
            ]
        )
        requeued, failed = [], []
        for _, pid, kind in due:
            r = self.model[pid]
            if kind == "wait":
                r["state"] = FAILED
                failed.append(pid)
            elif r["maxretries"] > -1 and r["retries"] >= r["maxretries"]:
                r["state"] = FAILED
                failed.append(pid)
            else:
                self._requeue(r, now)
                r["retries"] += 1
                requeued.append(pid)
        assert self.h.tick() == {"requeued": requeued, "failed": failed}

    @precondition(lambda self: self.model)
    @rule(data=st.data(), who=st.sampled_from(sorted(EXECUTORS)))
    def remove(self, data: st.DataObject, who: str) -> None:
        pid = data.draw(st.sampled_from(sorted(self.model)))
        try:
            self.h.write("removeprocessmsg", self.ids[who], {"processid": pid})
        except BadRequest:
            assert self.model[pid]["state"] == RUNNING
            return
        assert self.model[pid]["state"] != RUNNING
        del self.model[pid]
        self.order.remove(pid)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), who=st.sampled_from(sorted(EXECUTORS)))
    def cancel(self, data: st.DataObject, who: str) -> None:
        """Any member may cancel a waiting or running process; its executor keeps the
        assignment, so a later close is refused with a reason (BadRequest), not 403."""
        pid = data.draw(st.sampled_from(sorted(self.model)))
        r = self.model[pid]
        try:
            self.h.write("cancelprocessmsg", self.ids[who], {"processid": pid})
        except BadRequest:
            assert r["state"] not in (WAITING, RUNNING)
            return
        assert r["state"] in (WAITING, RUNNING)
        r["state"] = CANCELLED

    @rule(who=st.sampled_from(sorted(EXECUTORS)))
    def remove_and_readd_executor(self, who: str) -> None:
        """Removing an executor requeues its running processes without counting a retry."""
        self.h.write("removeexecutormsg", self.owner, {"colonyname": "dev", "executorname": who})
        for r in self.model.values():
            if r["state"] == RUNNING and r["assigned"] == self.ids[who]:
                self._requeue(r, self.h.now)
        assert self.h.executor("dev", who, EXECUTORS[who]) == self.ids[who]

    # Invariants.

    @invariant()
    def processes_agree(self) -> None:
        if not hasattr(self, "h"):
            return
        reader = self.ids["a1"]
        for pid, r in self.model.items():
            p = self.h.process(reader, pid)
            got = {k: p[k] for k in ("state", "retries", "attempt", "execdeadline")}
            want = {k: r[k] for k in ("state", "retries", "attempt", "execdeadline")}
            assert got == want, pid
            assert p["assignedexecutorid"] == r["assigned"]
            assert p["isassigned"] == (r["assigned"] != "")
            if r["state"] == WAITING:
                assert p["waitdeadline"] == r["waitdeadline"]

    @invariant()
    def statistics_are_list_sizes(self) -> None:
        if not hasattr(self, "h"):
            return
        stats = self.h.stats()
        keys = {
            WAITING: "waitingprocesses",
            RUNNING: "runningprocesses",
            SUCCESS: "successfulprocesses",
            FAILED: "failedprocesses",
            CANCELLED: "cancelledprocesses",
        }
        reader = self.ids["a1"]
        for state, key in keys.items():
            want = [pid for pid in self.order if self.model[pid]["state"] == state]
            assert stats[key] == len(want)
            listed = self.h.read("getprocessesmsg", reader, {"colonyname": "dev", "state": state})
            assert_listing(listed, want, "processid")
        assert sum(stats[k] for k in keys.values()) == len(self.model)

    @invariant()
    def never_closed_twice(self) -> None:
        if hasattr(self, "accepted_closes"):
            assert all(n == 1 for n in self.accepted_closes.values())

    @invariant()
    def next_deadline_is_the_earliest(self) -> None:
        if not hasattr(self, "h"):
            return
        pending = [
            r["waitdeadline"]
            for r in self.model.values()
            if r["state"] == WAITING and r["waitdeadline"] > 0
        ]
        pending += [
            r["execdeadline"]
            for r in self.model.values()
            if r["state"] == RUNNING and r["execdeadline"] > 0
        ]
        assert self.h.next_deadline() == (min(pending) if pending else None)

    # Helpers.

    def _requeue(self, r: dict[str, Any], now: int) -> None:
        r["state"] = WAITING
        r["assigned"] = ""
        r["execdeadline"] = 0
        mw = r["maxwaittime"]
        r["waitdeadline"] = now + mw * S if mw > 0 else 0


ProcessLifecycle.TestCase.settings = settings(
    max_examples=400,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestProcessLifecycle = ProcessLifecycle.TestCase
