"""node/raft_journal.py: appends survive a reopen, a record cut off by a crash is dropped and
everything before it kept, compaction and truncation are durable, and the replica syncs before
it counts or acknowledges an entry."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import trio

from node.raft_journal import MAGIC, DurableJournal, JournalError, SyncPolicy
from node.raft_transport import RaftTransport
from tests.raft_harness import converged, wait_until


def journal(tmp_path: Path) -> DurableJournal:
    return DurableJournal(tmp_path / "raft.journal", tmp_path / "raft.meta")


def fill(j: DurableJournal, n: int, start: int = 1) -> None:
    for i in range(start, start + n):
        j.add(f"cmd-{i}".encode() * 10, i, 1 + i // 10)


def test_entries_and_raft_state_survive_a_reopen(tmp_path):
    j = journal(tmp_path)
    fill(j, 25)
    j.setCurrentTerm(3, "peer-b")
    j.setRaftCommitIndex(20)
    assert j.dirty
    j.sync()
    assert not j.dirty and j.synced_index == 25
    j._destroy()
    again = journal(tmp_path)
    assert len(again) == 25 and again[0] == (b"cmd-1" * 10, 1, 1) and again[-1][1] == 25
    assert (again.getCurrentTerm(), again.getVotedForNodeId()) == (3, "peer-b")
    assert again.getRaftCommitIndex() == 20  # stored on close
    assert {p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {0o600}


@pytest.mark.parametrize("cut", [1, 5, 9, 20, 40])
def test_a_journal_cut_off_mid_record_keeps_every_whole_record(tmp_path, cut, caplog):
    """A crash while the last record was being written (kill -9 or power loss before the
    sync): only whole records come back, the torn tail is dropped and the file truncated."""
    j = journal(tmp_path)
    fill(j, 10)
    j.sync()
    whole = j.byte_size
    j.add(b"the record being written" * 4, 11, 2)
    j._destroy()
    path = tmp_path / "raft.journal"
    with open(path, "r+b") as f:
        f.truncate(whole + cut)  # the crash: part of record 11 reached the disk
    again = journal(tmp_path)
    assert [e[1] for e in again] == list(range(1, 11))
    assert path.stat().st_size == whole
    assert "cut off or corrupt" in caplog.text
    again.add(b"after the crash", 11, 3)  # appends go after the last whole record
    again._destroy()
    assert journal(tmp_path)[-1] == (b"after the crash", 11, 3)


def test_a_corrupt_record_ends_the_journal_there(tmp_path):
    j = journal(tmp_path)
    fill(j, 10)
    j._destroy()
    path = tmp_path / "raft.journal"
    data = bytearray(path.read_bytes())
    data[j._offsets[6] + 12] ^= 0xFF  # a flipped bit inside record 7's body
    path.write_bytes(bytes(data))
    assert [e[1] for e in journal(tmp_path)] == list(range(1, 7))


def test_truncation_and_compaction_are_on_disk(tmp_path):
    j = journal(tmp_path)
    fill(j, 30)
    j.deleteEntriesFrom(20)  # a conflicting suffix
    assert [e[1] for e in j][-1] == 20
    j.deleteEntriesTo(15)  # compaction: the first 15 go
    assert [e[1] for e in j] == list(range(16, 21))
    fill(j, 2, start=21)
    j.sync()
    j._destroy()
    assert [e[1] for e in journal(tmp_path)] == list(range(16, 23))
    assert not (tmp_path / "raft.journal.tmp").exists()


def test_a_pysyncobj_journal_is_converted(tmp_path):
    """Data dirs written by earlier versions hold PySyncObj's FileJournal format."""
    from pysyncobj.journal import FileJournal

    old = FileJournal(str(tmp_path / "raft.journal"))
    for i in range(1, 8):
        old.add(f"entry {i}".encode(), i, 2)
    old.setCurrentTerm(2, "peer-x")
    old.setRaftCommitIndex(6)
    old.onOneSecondTimer()
    old._destroy()
    j = journal(tmp_path)
    assert [(e[0], e[1]) for e in j] == [(f"entry {i}".encode(), i) for i in range(1, 8)]
    assert (j.getCurrentTerm(), j.getVotedForNodeId(), j.getRaftCommitIndex()) == (2, "peer-x", 6)
    assert (tmp_path / "raft.journal").read_bytes().startswith(MAGIC)
    assert not (tmp_path / "raft.journal.meta").exists()


def test_something_else_is_refused(tmp_path):
    (tmp_path / "raft.journal").write_bytes(b"not a journal at all")
    with pytest.raises(JournalError, match="not a raft journal"):
        journal(tmp_path)


def test_the_sync_policy_setting():
    assert SyncPolicy.parse("always").always
    assert SyncPolicy.parse("50ms") == SyncPolicy("interval", 0.05)
    assert SyncPolicy.parse("0.2s").interval_s == 0.2 and SyncPolicy.parse("1").interval_s == 1
    for bad in ("never", "0ms", "11s", "-5ms", ""):
        with pytest.raises(ValueError):
            SyncPolicy.parse(bad)
    assert str(SyncPolicy.parse("50ms")) == "every 50 ms"


async def test_nothing_is_counted_or_acknowledged_before_it_is_on_disk(tmp_path, monkeypatch):
    """Followers send next_node_idx only with a clean journal; the leader's commit index never
    passes what its own journal has synced; several frames share one sync."""
    from tests.test_raft_cluster_memory import cluster

    early_acks: list[str] = []
    original = RaftTransport._send

    def checked_send(self: RaftTransport, peer: str, message: dict) -> bool:
        if message.get("type") == "next_node_idx" and message.get("success"):
            colony = owners.get(self.self_id)
            if colony is not None and colony.journal.dirty:
                early_acks.append(self.self_id)
        return original(self, peer, message)

    owners: dict = {}
    monkeypatch.setattr(RaftTransport, "_send", checked_send)
    async with cluster(tmp_path) as c:
        nodes = list(c.live())
        for n in nodes:
            owners[n.id] = n.colony
        leader = await c.leader()
        beyond: list[int] = []

        async def put(i: int) -> None:
            await leader.put(i)
            if leader.colony.commit_index > leader.colony.journal.synced_index:
                beyond.append(i)

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(put, i)
        await wait_until(lambda: converged(nodes), 10, "convergence")
        syncs = leader.colony.journal.syncs
    assert early_acks == [] and beyond == []
    assert syncs < 100  # group commit: one sync covers many writes


def test_the_record_format_is_what_the_docs_say(tmp_path):
    j = journal(tmp_path)
    j.add(b"abc", 7, 2)
    j._destroy()
    data = (tmp_path / "raft.journal").read_bytes()
    length, _crc = struct.unpack_from("<II", data, len(MAGIC))
    assert length == 16 + 3 and struct.unpack_from("<QQ", data, len(MAGIC) + 8) == (7, 2)
    end = len(MAGIC) + 8 + 19
    assert j.byte_size == end and not data[end:].strip(b"\0")  # allocated ahead: zeros
