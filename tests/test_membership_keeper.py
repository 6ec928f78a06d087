"""node/membership.py: how the member book drives the Raft group, decided against fakes of
the replica, its transport and the replicator (the real ones run in test_raft_cluster_memory
and the process tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pysyncobj import FAIL_REASON

from node.membership import (
    MEMBERS_FILE,
    PROMOTE_MAX_LAG,
    Membership,
    NodeRemoved,
    check_not_removed,
    load_members,
    save_members,
)
from node.raft_replica import GROUP_TIMEOUTS, SOLO_TIMEOUTS
from protocol.errors import BadRequest

A = "16Uiu2HAmMmu7o74vsbemwzENv8XTtQxKzKCkJTTAiS3ddBgfwwqJ"
B = "16Uiu2HAmQLaCeatmZZNk9UZjf7MNrXDUjnXxNqjte3q3rX6vaimY"
C = "16Uiu2HAm7o9ud1G8vdNKDdsT79nXaZzRfn7vPZyAuL6TRmstRdKT"


def addr(pid: str) -> str:
    return f"/ip4/127.0.0.1/tcp/4001/p2p/{pid}"


class FakeColony:
    def __init__(self, self_id: str, members: list[str]) -> None:
        self.self_id = self_id
        self.member_ids = sorted(members)
        self.is_leader = True
        self.leader_id: str | None = self_id
        self.last_applied = self.log_end_index = self.commit_index = 10
        self.changes: list[tuple[str, str, Any]] = []
        self.timeouts: Any = None
        # The leader's view of each learner's log (absent: no session with it).
        self.learner_match: dict[str, int] = {}

    def learner_match_index(self, pid: str) -> int | None:
        return self.learner_match.get(pid)

    def addNodeToCluster(self, node: Any, callback: Any) -> None:  # noqa: N802 (PySyncObj's name)
        self.changes.append(("add", node.id, callback))
        assert node.addr == addr(node.id)

    def removeNodeFromCluster(self, node: Any, callback: Any) -> None:  # noqa: N802
        self.changes.append(("rem", node.id, callback))

    def set_timeouts(self, timeouts: Any) -> None:
        self.timeouts = timeouts


class FakeTransport:
    def __init__(self, members: dict[str, str | None]) -> None:
        self.members = dict(members)
        self.learners: dict[str, str | None] = {}
        self.heard: dict[str, float] = {}  # seconds since each member last sent anything

    def set_learners(self, learners: dict[str, str | None]) -> None:
        self.learners = dict(learners)

    def last_heard(self) -> dict[str, float]:
        return self.heard

    def add_member(self, pid: str, address: str | None = None) -> None:
        self.members[pid] = address


class FakeMachine:
    def __init__(self, members: dict[str, str]) -> None:
        self.members = members


class FakeReplicator:
    def __init__(self, book: dict[str, str]) -> None:
        self.machine = FakeMachine(book)
        self.kicks = 0

    def kick(self) -> None:
        self.kicks += 1


def keeper(tmp_path: Path, book: dict[str, str], raft: list[str], me: str = A) -> tuple[
    Membership, FakeColony, FakeTransport, list[str]
]:
    colony = FakeColony(me, raft)
    transport = FakeTransport({p: addr(p) for p in raft if p != me})
    stopped: list[str] = []
    m = Membership(
        tmp_path, colony, transport, FakeReplicator(book),  # type: ignore[arg-type]
        on_removed=lambda: stopped.append("stopped"),
    )
    return m, colony, transport, stopped


def test_the_leader_adds_book_members_one_change_at_a_time(tmp_path: Path) -> None:
    m, colony, _, _ = keeper(tmp_path, {A: addr(A), B: addr(B), C: addr(C)}, [A])
    colony.learner_match = {B: 10, C: 10}
    m.check()
    m.check()  # the first change is still in flight: no second one
    first, second = sorted([B, C])
    assert [c[:2] for c in colony.changes] == [("add", first)]
    colony.changes[0][2](None, FAIL_REASON.SUCCESS)
    colony.member_ids = sorted([A, first])
    colony.log_end_index = 11  # the change's entry: the book may be behind it until applied
    m.check()
    assert len(colony.changes) == 1
    colony.last_applied = 11
    m.check()
    assert [c[:2] for c in colony.changes] == [("add", first), ("add", second)]


def test_book_members_outside_the_group_are_learners_until_caught_up(tmp_path: Path) -> None:
    m, colony, transport, _ = keeper(tmp_path, {A: addr(A), B: addr(B), C: addr(C)}, [A, B])
    m.check()
    assert transport.learners == {C: addr(C)}  # every node lets it in, without a vote
    assert colony.changes == []  # no session with the leader yet
    colony.learner_match[C] = 0
    colony.commit_index = 500
    m.check()
    assert colony.changes == []
    colony.learner_match[C] = 500 - PROMOTE_MAX_LAG - 1
    m.check()
    assert colony.changes == []  # still behind
    colony.learner_match[C] = 500 - PROMOTE_MAX_LAG
    m.check()
    assert [c[:2] for c in colony.changes] == [("add", C)]


def test_a_follower_lets_learners_in_but_promotes_nobody(tmp_path: Path) -> None:
    m, colony, transport, _ = keeper(tmp_path, {A: addr(A), B: addr(B), C: addr(C)}, [A, B])
    colony.is_leader = False
    colony.learner_match[C] = 10
    m.check()
    assert transport.learners == {C: addr(C)} and colony.changes == []


def test_a_failed_change_is_retried_later(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m, colony, _, _ = keeper(tmp_path, {A: addr(A), B: addr(B)}, [A])
    colony.learner_match[B] = 10
    clock = [100.0]
    monkeypatch.setattr("node.membership.time.monotonic", lambda: clock[0])
    m.check()
    colony.changes[0][2](None, FAIL_REASON.MISSING_LEADER)
    m.check()
    assert len(colony.changes) == 1
    clock[0] += 1.5
    m.check()
    assert [c[:2] for c in colony.changes] == [("add", B), ("add", B)]


def test_the_leader_removes_raft_members_that_left_the_book(tmp_path: Path) -> None:
    m, colony, _, stopped = keeper(tmp_path, {A: addr(A), B: addr(B)}, [A, B, C])
    m.check()
    assert [c[:2] for c in colony.changes] == [("rem", C)]
    assert not stopped


def test_followers_change_nothing_but_addresses(tmp_path: Path) -> None:
    moved = "/ip4/127.0.0.1/tcp/5002/p2p/" + B
    m, colony, transport, _ = keeper(tmp_path, {A: addr(A), B: moved, C: addr(C)}, [A, B])
    colony.is_leader = False
    m.check()
    assert colony.changes == []
    assert transport.members[B] == moved


def test_an_empty_book_enforces_nothing(tmp_path: Path) -> None:
    m, colony, _, stopped = keeper(tmp_path, {}, [A, B])
    m.check()
    assert colony.changes == [] and not stopped


def test_a_removed_follower_leaves_once_no_leader_talks_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [100.0]
    monkeypatch.setattr("node.membership.time.monotonic", lambda: clock[0])
    m, colony, transport, stopped = keeper(tmp_path, {B: addr(B), C: addr(C)}, [A, B, C])
    colony.is_leader, colony.leader_id = False, B
    transport.heard = {B: 0.1}
    m.check()
    clock[0] += 10
    m.check()
    assert not stopped  # a leader still talks to it: its vote may be needed
    # The leader dropped it from the group before sending it that entry: PySyncObj still
    # names the leader, who no longer talks to it.
    transport.heard = {B: 5.0}
    m.check()
    assert stopped == ["stopped"] and m.removed
    with pytest.raises(NodeRemoved, match="removed from its cluster"):
        check_not_removed(tmp_path)


def test_a_removed_leader_steps_aside_when_others_can_elect(tmp_path: Path) -> None:
    m, colony, _, stopped = keeper(tmp_path, {B: addr(B), C: addr(C)}, [A, B, C])
    m.check()
    assert stopped == ["stopped"] and colony.changes == []


def test_member_file_round_trip_and_timings(tmp_path: Path) -> None:
    assert load_members(tmp_path) == {}
    m, colony, _, _ = keeper(tmp_path, {A: addr(A)}, [A])
    m.on_transport_members({B: addr(B), C: None})
    assert load_members(tmp_path) == {B: addr(B), C: None}
    assert colony.timeouts == GROUP_TIMEOUTS
    m.on_transport_members({})
    assert colony.timeouts == SOLO_TIMEOUTS and load_members(tmp_path) == {}


@pytest.mark.parametrize(
    "text",
    ["not json", json.dumps({"members": []}), json.dumps({"members": {"x": None}}),
     json.dumps({"members": {B: "/dns/evil"}}), json.dumps({})],
)
def test_a_bad_member_file_is_a_clear_error(tmp_path: Path, text: str) -> None:
    (tmp_path / MEMBERS_FILE).write_text(text)
    with pytest.raises(BadRequest, match=MEMBERS_FILE):
        load_members(tmp_path)


def test_save_members_replaces_the_file_whole(tmp_path: Path) -> None:
    save_members(tmp_path, {B: addr(B)})
    save_members(tmp_path, {C: None})
    assert load_members(tmp_path) == {C: None}
    assert not (tmp_path / (MEMBERS_FILE + ".tmp")).exists()
