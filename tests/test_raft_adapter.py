"""node/raft_replica.py: a one-node ReplicatedColony on disk, ticked by hand (no trio here)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pysyncobj.pickle
import pytest
from pysyncobj import FAIL_REASON

from node.datadir import DataDirLocked
from node.raft_codec import MAX_ENTRY_BYTES
from node.raft_dump import CorruptRaftState, decode_dump, encode_dump
from node.raft_replica import (
    DUMP_FILE,
    JOURNAL_FILE,
    NullTransport,
    ReplicatedColony,
)

SELF = "16Uiu2HAmSelfNodeForTests"


class FakeMachine:
    """The ColonyMachine interface, reduced to an append-only list of (now, cmd)."""

    def __init__(self) -> None:
        self.applied: list[list[Any]] = []
        self.batches = 0  # not replicated: counts apply_batch calls on this object
        self.was_restored = False

    def apply_batch(self, batch: bytes, index: int | None = None) -> list[list[Any]]:
        self.batches += 1
        data = msgpack.unpackb(batch, raw=False)
        out: list[list[Any]] = []
        for cmd in data["cmds"]:
            if cmd.get("op") == "explode":
                raise RuntimeError("a bug in the machine")
            self.applied.append([data["now"], cmd])
            out.append([200, {"n": cmd.get("n"), "seq": len(self.applied)}])
        return out

    def snapshot(self) -> dict[str, Any]:
        return {"applied": self.applied}

    @classmethod
    def restore(cls, data: dict[str, Any]) -> FakeMachine:
        machine = cls()
        machine.applied = data["applied"]
        machine.was_restored = True
        return machine

    def restored(self, data: dict[str, Any], index: int) -> FakeMachine:
        return self.restore(data)

    def sync_history(self) -> None:
        pass

    def collect_history(self, upto: int) -> int:
        return 0

    def backup_history(self, target: Any) -> None:
        Path(target).write_bytes(b"no history")  # a fake has none, but a transfer sends one

    def close_history(self) -> None:
        pass

    def reopen_history(self) -> None:
        pass

    def digest(self) -> str:
        return hashlib.sha256(msgpack.packb(self.applied, use_bin_type=True)).hexdigest()


def batch(*cmds: dict[str, Any], now: int = 1) -> bytes:
    return msgpack.packb({"now": now, "cmds": list(cmds)}, use_bin_type=True)


def tick_until(colony: ReplicatedColony, cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "raft did not get there in time"
        colony.doTick(0)
        time.sleep(0.001)


def propose_and_wait(colony: ReplicatedColony, data: bytes) -> tuple[Any, int]:
    box: list[tuple[Any, int]] = []
    colony.propose(data, lambda result, reason: box.append((result, reason)))
    tick_until(colony, lambda: bool(box))
    return box[0]


def machine_of(colony: ReplicatedColony) -> FakeMachine:
    machine = colony.machine
    assert isinstance(machine, FakeMachine)
    return machine


@pytest.fixture
def open_colony(tmp_path: Path) -> Iterator[Callable[..., ReplicatedColony]]:
    """Opens a ready one-node colony in tmp_path; everything opened is closed at the end."""
    opened: list[ReplicatedColony] = []

    def _open(machine: FakeMachine | None = None, **kwargs: Any) -> ReplicatedColony:
        colony = ReplicatedColony(SELF, [], tmp_path, machine or FakeMachine(), **kwargs)
        opened.append(colony)
        tick_until(colony, lambda: colony.caught_up)
        return colony

    yield _open
    for colony in opened:
        colony.close()


def test_one_node_elects_itself_and_reports_status(open_colony):
    colony = open_colony()
    assert colony.is_leader
    assert colony.leader_id == SELF
    assert colony.member_ids == [SELF]
    assert colony.term >= 1
    assert colony.commit_index == colony.last_applied
    status = colony.status()
    assert status["state"] == "leader" and status["leader"] == SELF
    assert status["members"] == [SELF] and status["caught_up"] is True
    msgpack.packb(status)  # the status RPC can carry it as is


def test_proposals_apply_in_order_and_return_results(open_colony):
    applied_hooks: list[int] = []
    colony = open_colony(on_applied=lambda: applied_hooks.append(1))
    answers: list[tuple[int, Any, int]] = []
    # Three entries in flight at once, proposed before any tick.
    for i in range(3):
        cmds = [{"op": "put", "n": 10 * i + j} for j in range(i + 1)]
        colony.propose(
            batch(*cmds, now=100 + i), lambda r, e, i=i: answers.append((i, r, e))
        )
    tick_until(colony, lambda: len(answers) == 3)

    assert [i for i, _, _ in answers] == [0, 1, 2]
    assert all(reason == FAIL_REASON.SUCCESS for _, _, reason in answers)
    assert answers[0][1] == [[200, {"n": 0, "seq": 1}]]
    assert answers[2][1] == [[200, {"n": 20, "seq": 4}], [200, {"n": 21, "seq": 5}],
                             [200, {"n": 22, "seq": 6}]]
    machine = machine_of(colony)
    assert [cmd["n"] for _, cmd in machine.applied] == [0, 10, 11, 20, 21, 22]
    assert [now for now, _ in machine.applied] == [100, 101, 101, 102, 102, 102]
    assert machine.batches == 3
    assert len(applied_hooks) == 3


def test_restart_replays_every_acknowledged_write_from_the_journal(tmp_path, open_colony):
    colony = open_colony()
    for n in range(20):
        result, reason = propose_and_wait(colony, batch({"op": "put", "n": n}))
        assert reason == FAIL_REASON.SUCCESS and result == [[200, {"n": n, "seq": n + 1}]]
    digest, applied_index = colony.machine.digest(), colony.last_applied
    colony.close()
    assert (tmp_path / JOURNAL_FILE).exists() and not (tmp_path / DUMP_FILE).exists()

    reopened = open_colony()
    machine = machine_of(reopened)
    assert not machine.was_restored  # no dump yet: everything came from the journal
    assert machine.batches == 20
    assert machine.digest() == digest
    assert reopened.last_applied > applied_index  # + the new term's no-op
    result, reason = propose_and_wait(reopened, batch({"op": "put", "n": 20}))
    assert reason == FAIL_REASON.SUCCESS and result == [[200, {"n": 20, "seq": 21}]]


def test_compaction_writes_a_msgpack_dump_and_restart_restores_from_it(tmp_path, open_colony):
    colony = open_colony()
    for n in range(10):
        propose_and_wait(colony, batch({"op": "put", "n": n}))
    colony.forceLogCompaction()
    dump = tmp_path / DUMP_FILE
    tick_until(colony, lambda: dump.exists() and colony.status()["log_len"] <= 2)

    raw = dump.read_bytes()
    assert not raw.startswith(b"\x1f\x8b")  # not PySyncObj's gzip-pickle
    assert raw[:1] != b"\x80"  # nor a bare pickle
    data = decode_dump(raw)  # plain msgpack all the way down
    assert msgpack.unpackb(raw, raw=False)["format"] == data["format"]
    assert data["machine"] == colony.machine.snapshot()
    assert data["members"] == [SELF]
    assert data["last"][1] == colony.last_applied
    assert not (tmp_path / (DUMP_FILE + ".tmp")).exists()  # written aside, then renamed

    # Entries after the snapshot live only in the journal; the restart must keep them.
    for n in range(10, 15):
        propose_and_wait(colony, batch({"op": "put", "n": n}))
    digest = colony.machine.digest()
    colony.close()

    reopened = open_colony()
    machine = machine_of(reopened)
    assert machine.was_restored
    assert machine.digest() == digest
    assert [cmd["n"] for _, cmd in machine.applied] == list(range(15))
    assert machine.batches == 5  # only what came after the snapshot was re-applied
    result, reason = propose_and_wait(reopened, batch({"op": "put", "n": 15}))
    assert reason == FAIL_REASON.SUCCESS and result == [[200, {"n": 15, "seq": 16}]]


def test_regular_path_never_pickles(tmp_path, open_colony, monkeypatch):
    calls: list[str] = []

    class PickleCalled(Exception):
        pass

    def spy(name: str) -> Callable[..., Any]:
        def record(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise PickleCalled(name)

        return record

    # The module PySyncObj's syncobj.py and serializer.py call (journal meta binds its own
    # names at import and is PySyncObj bookkeeping, not application state).
    for name in ("dumps", "loads", "dump", "load"):
        monkeypatch.setattr(pysyncobj.pickle, name, spy(name))

    colony = open_colony()
    for n in range(5):
        assert propose_and_wait(colony, batch({"op": "put", "n": n}))[1] == FAIL_REASON.SUCCESS
    colony.forceLogCompaction()
    tick_until(colony, lambda: (tmp_path / DUMP_FILE).exists())
    propose_and_wait(colony, batch({"op": "put", "n": 5}))
    colony.close()
    reopened = open_colony()  # loads the dump, replays the journal
    assert len(machine_of(reopened).applied) == 6
    assert calls == []

    # Positive control: PySyncObj's own membership commands do go through the spy.
    with pytest.raises(PickleCalled):
        reopened.addNodeToCluster("16Uiu2HAmAnotherNode")
    assert calls == ["dumps"]


def test_hooks_and_callbacks_that_raise_do_not_reapply(open_colony):
    def bad_hook() -> None:
        raise RuntimeError("hook bug")

    colony = open_colony(on_applied=bad_hook)
    calls: list[Any] = []

    def bad_callback(result: Any, reason: int) -> None:
        calls.append(result)
        raise RuntimeError("callback bug")

    colony.propose(batch({"op": "put", "n": 1}), bad_callback)
    tick_until(colony, lambda: bool(calls))
    for _ in range(5):
        colony.doTick(0)
    assert calls == [[[200, {"n": 1, "seq": 1}]]]
    assert machine_of(colony).batches == 1  # PySyncObj re-applies entries whose apply raised
    result, _ = propose_and_wait(colony, batch({"op": "put", "n": 2}))
    assert result == [[200, {"n": 2, "seq": 2}]]


def test_a_machine_that_raises_answers_500_and_applies_once(open_colony):
    colony = open_colony()
    result, reason = propose_and_wait(colony, batch({"op": "explode"}, {"op": "put", "n": 1}))
    assert reason == FAIL_REASON.SUCCESS
    assert [status for status, _ in result] == [500, 500]
    for _ in range(5):
        colony.doTick(0)
    assert machine_of(colony).batches == 1
    assert propose_and_wait(colony, batch({"op": "put", "n": 2}))[0][0][0] == 200


def test_a_corrupt_dump_is_fatal_not_ignored(tmp_path, open_colony):
    colony = open_colony()
    propose_and_wait(colony, batch({"op": "put", "n": 1}))
    colony.forceLogCompaction()
    tick_until(colony, lambda: (tmp_path / DUMP_FILE).exists())
    colony.close()
    (tmp_path / DUMP_FILE).write_bytes(b"\x1f\x8b not a dump")

    reopened = ReplicatedColony(SELF, [], tmp_path, FakeMachine())
    try:
        reopened.doTick(0)  # the dump is loaded on the first tick
        assert reopened.fatal_error is not None and "raft dump" in reopened.fatal_error
    finally:
        reopened.close()


def test_dump_codec_round_trip_and_rejects_garbage():
    blob = encode_dump({"k": [1, b"x"]}, (b"\x00a", 7, 2), (b"\x01", 6, 2), ["b", "a"])
    data = decode_dump(blob)
    assert data["last"] == [b"\x00a", 7, 2] and data["prev"] == [b"\x01", 6, 2]
    assert data["members"] == ["a", "b"] and data["machine"] == {"k": [1, b"x"]}
    for bad in (b"", b"\x80\x04junk", msgpack.packb({"format": 99}),
                msgpack.packb({"format": 1, "last": [1, 2], "prev": [], "members": []})):
        with pytest.raises(CorruptRaftState):
            decode_dump(bad)
    tampered = msgpack.unpackb(blob, raw=False)
    tampered["machine"] = msgpack.packb({"k": [2]})
    with pytest.raises(CorruptRaftState, match="checksum"):
        decode_dump(msgpack.packb(tampered, use_bin_type=True))


def test_guards(tmp_path, open_colony):
    with pytest.raises(ValueError, match="needs a transport"):
        ReplicatedColony(SELF, ["16Uiu2HAmPeer"], tmp_path / "other", FakeMachine())
    colony = open_colony()
    with pytest.raises(DataDirLocked, match="in use"):
        ReplicatedColony(SELF, [], tmp_path, FakeMachine())
    with pytest.raises(ValueError, match="exceeds"):
        colony.propose(b"\x00" * MAX_ENTRY_BYTES, lambda r, e: None)
    transport = NullTransport()
    assert transport.ready and transport.send(colony.selfNode, {"type": "x"}) is False
