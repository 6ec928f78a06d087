"""node/raft_transport.py and its parts: the Raft codec, the pickle guards, and a 3-node cluster on real
libp2p hosts (127.0.0.1), each node driven by its own Replicator in one trio test."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pysyncobj.pickle
import pytest
import trio
from libp2p.custom_types import TProtocol
from pysyncobj import FAIL_REASON
from pysyncobj.node import Node
from pysyncobj.syncobj import _COMMAND_TYPE

from node.p2p import connect, full_addrs, peer_id_of, running_host
from node.pickle_guard import (
    MEMBERSHIP_GLOBALS,
    parse_membership_command,
    parse_version_command,
    restricted_loads,
)
from node.raft_codec import (
    HEARTBEAT,
    RaftMessageRefused,
    RaftMessageTooLarge,
    decode_raft_message,
    encode_raft_message,
)
from node.raft_libp2p import RAFT_PROTOCOL_ID, libp2p_raft_transport
from node.raft_replica import GROUP_TIMEOUTS, NullTransport, ReplicatedColony
from protocol.errors import ColoniesError
from protocol.framing import FrameDecoder, encode_frame
from protocol.identity import PrivateKey
from tests.raft_harness import (
    FakeMachine,
    RaftNode,
    build_node,
    converged,
    free_port,
    leader_of,
    wait_until,
)

log = logging.getLogger(__name__)
PWNED: list[str] = []


def _pwn(*args: Any) -> None:
    PWNED.append("code ran")


class Evil:
    """Unpickling this calls _pwn: what an attacker would put in a log command."""

    def __reduce__(self) -> tuple[Callable[..., None], tuple[()]]:
        return (_pwn, ())


EVIL_MEMBERSHIP = pysyncobj.pickle.dumps(["add", "16Uiu2HAmEvil", Evil()])


# --- the codec -----------------------------------------------------------------------------------

SAMPLES: list[dict[str, Any]] = [
    {"type": "request_vote", "term": 3, "last_log_index": 10, "last_log_term": 2},
    {"type": "response_vote", "term": 3},
    {"type": "timeout_now", "term": 4},
    {"type": "next_node_idx", "next_node_idx": 11, "reset": False, "success": True},
    {"type": "apply_command", "command": b"\x00batch", "request_id": 5},
    {"type": "apply_command", "command": b"\x00batch"},
    {"type": "apply_command_response", "request_id": 5, "log_idx": 12, "log_term": 3},
    {"type": "apply_command_response", "request_id": 5, "error": FAIL_REASON.NOT_LEADER},
    {
        "type": "append_entries",
        "term": 3,
        "commit_index": 9,
        "entries": [(b"\x00a", 10, 3), (b"\x01", 11, 3)],
        "prevLogIdx": 9,
        "prevLogTerm": 2,
    },
    {"type": "append_entries", "term": 3, "commit_index": 9, "entries": [],
     "prevLogIdx": None, "prevLogTerm": None},
    {"type": "append_entries", "term": 3, "commit_index": 9, "serialized": (b"dump", True, False)},
    {"type": "append_entries", "term": 3, "commit_index": 9, "serialized": None},
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m["type"])
def test_every_pysyncobj_message_round_trips_with_its_tuples(message):
    (body,) = encode_raft_message(message)
    decoded = decode_raft_message(body)
    assert decoded == message
    for entry in decoded.get("entries", []):
        assert type(entry) is tuple  # PySyncObj compares entries with tuples
    if decoded.get("serialized") is not None:
        assert type(decoded["serialized"]) is tuple


@pytest.mark.parametrize(
    "message",
    [
        {"type": "append_entries", "transmission": "start", "data": b"x", "term": 1,
         "commit_index": 0, "prevLogIdx": 1, "prevLogTerm": 0},
        {"type": "append_entries", "transmission": "finish", "data": EVIL_MEMBERSHIP,
         "term": 1, "commit_index": 0, "prevLogIdx": 1, "prevLogTerm": 0},
        {"type": "status"},
        {"type": "request_vote", "term": 1, "last_log_index": 1},
        {"type": "request_vote", "term": True, "last_log_index": 1, "last_log_term": 1},
        {"type": "request_vote", "term": -1, "last_log_index": 1, "last_log_term": 1},
        {"type": "apply_command", "command": "text, not bytes"},
        {"type": "apply_command", "command": b""},
        {"type": "apply_command_response", "request_id": 1},
        {"type": "append_entries", "term": 1, "commit_index": 0, "prevLogIdx": 1},
        {"type": "append_entries", "term": 1, "commit_index": 0, "prevLogIdx": 1,
         "prevLogTerm": 1, "entries": [[b"\x00", 2]]},
        {"type": "append_entries", "term": 1, "commit_index": 0, "serialized": [b"x", 1, 0]},
        ["not", "a", "map"],
    ],
)
def test_anything_else_is_refused(message):
    with pytest.raises(RaftMessageRefused):
        decode_raft_message(msgpack.packb(message, use_bin_type=True))


def test_garbage_and_extension_types_are_refused():
    with pytest.raises(RaftMessageRefused):
        decode_raft_message(b"\xc1not msgpack")
    with pytest.raises(RaftMessageRefused):
        decode_raft_message(msgpack.packb(msgpack.ExtType(1, b"x")))
    # Unknown extra fields are not passed on.
    body = msgpack.packb({"type": "response_vote", "term": 1, "extra": b"x"})
    assert decode_raft_message(body) == {"type": "response_vote", "term": 1}


def test_an_oversized_append_entries_is_split_into_consecutive_ones():
    entries = [(b"\x00" + bytes(1000), i, 7) for i in range(10, 30)]
    message = {"type": "append_entries", "term": 7, "commit_index": 9, "entries": entries,
               "prevLogIdx": 9, "prevLogTerm": 6}
    bodies = encode_raft_message(message, max_body=4500)
    assert len(bodies) > 1 and all(len(b) <= 4500 for b in bodies)
    parts = [decode_raft_message(b) for b in bodies]
    assert [e for p in parts for e in p["entries"]] == entries
    prev = (9, 6)
    for part in parts:
        assert (part["prevLogIdx"], part["prevLogTerm"]) == prev
        assert part["term"] == 7 and part["commit_index"] == 9
        prev = part["entries"][-1][1:]
    with pytest.raises(RaftMessageTooLarge):
        encode_raft_message({**message, "entries": entries[:1]}, max_body=500)


# --- the pickle guards ---------------------------------------------------------------------------


def test_the_restricted_unpickler_allows_a_membership_change_and_nothing_else():
    PWNED.clear()
    add = pysyncobj.pickle.dumps(["add", "16Uiu2HAmA", Node("16Uiu2HAmA")])
    assert restricted_loads(add, MEMBERSHIP_GLOBALS) == ["add", "16Uiu2HAmA", Node("16Uiu2HAmA")]
    with_addr = Node("16Uiu2HAmA", addr="/ip4/127.0.0.1/tcp/1/p2p/16Uiu2HAmA")
    request = parse_membership_command(pysyncobj.pickle.dumps(["rem", "16Uiu2HAmA", with_addr]))
    assert request is not None and request[:2] == ["rem", "16Uiu2HAmA"]
    assert request[2].addr == with_addr.addr

    with pytest.raises(Exception, match="not allowed"):
        restricted_loads(EVIL_MEMBERSHIP, MEMBERSHIP_GLOBALS)
    assert parse_membership_command(EVIL_MEMBERSHIP) is None
    for bad in (
        ["add", "16Uiu2HAmA", Node("16Uiu2HAmB")],  # id mismatch
        ["add", "16Uiu2HAmA", Node("16Uiu2HAmA", port=1)],  # attributes we do not know
        ["add", "16Uiu2HAmA", Node("16Uiu2HAmA", addr=b"bytes")],  # needs _codecs: refused
        ["swap", "16Uiu2HAmA", Node("16Uiu2HAmA")],
        ("add", "16Uiu2HAmA", Node("16Uiu2HAmA")),
        ["add", "", Node("")],
        {"add": 1},
    ):
        assert parse_membership_command(pysyncobj.pickle.dumps(bad)) is None, bad
    assert parse_version_command(pysyncobj.pickle.dumps(2)) == 2
    assert parse_version_command(pysyncobj.pickle.dumps(Evil())) is None
    assert PWNED == []


def _tick_until(colony: ReplicatedColony, cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "raft did not get there in time"
        colony.doTick(0)
        time.sleep(0.001)


def test_the_colony_never_unpickles_a_membership_or_version_payload(tmp_path):
    PWNED.clear()
    colony = ReplicatedColony("16Uiu2HAmSelf", [], tmp_path, FakeMachine())
    try:
        _tick_until(colony, lambda: colony.caught_up)
        # Proposed (what the leader does with a command a follower forwarded): denied.
        answers: list[int] = []
        colony._applyCommand(
            EVIL_MEMBERSHIP, lambda _r, err: answers.append(err), _COMMAND_TYPE.MEMBERSHIP
        )
        _tick_until(colony, lambda: bool(answers))
        assert answers == [FAIL_REASON.REQUEST_DENIED]
        # Applied or replayed from a journal (followers, restarts): ignored.
        assert colony._SyncObj__doApplyCommand(bytes([_COMMAND_TYPE.MEMBERSHIP]) + EVIL_MEMBERSHIP) is None
        evil_version = pysyncobj.pickle.dumps(Evil())
        assert colony._SyncObj__doApplyCommand(bytes([_COMMAND_TYPE.VERSION]) + evil_version) is None
        assert colony._SyncObj__doApplyCommand(b"") is None
        assert colony.refused_commands == 3
        assert colony.member_ids == ["16Uiu2HAmSelf"]
        # The group still works.
        results: list[Any] = []
        batch = msgpack.packb({"now": 1, "cmds": [{"op": "put", "n": 1}]}, use_bin_type=True)
        colony.propose(batch, lambda r, e: results.append((r, e)))
        _tick_until(colony, lambda: bool(results))
        assert results[0][1] == FAIL_REASON.SUCCESS
    finally:
        colony.close()
    assert PWNED == []


def test_a_joining_node_does_not_stand_for_election(tmp_path):
    # Its partner "answers" (the transport says connected) but is not a leader.
    transport = NullTransport()
    colony = ReplicatedColony(
        "16Uiu2HAmNew", ["16Uiu2HAmOld"], tmp_path, FakeMachine(), transport=transport,
        joining=True,
    )
    try:
        transport._onNodeConnected(Node("16Uiu2HAmOld"))
        deadline = time.monotonic() + GROUP_TIMEOUTS.max_timeout + 0.2
        while time.monotonic() < deadline:
            colony.doTick(0)
            time.sleep(0.005)
        assert colony.term == 0 and colony.learner
    finally:
        colony.close()


# --- a cluster on real libp2p hosts --------------------------------------------------------------


@dataclass
class Spec:
    key: PrivateKey
    port: int
    data_dir: Path

    @property
    def id(self) -> str:
        return peer_id_of(self.key).to_string()

    @property
    def addr(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.port}/p2p/{self.id}"


def record_deliveries(node: RaftNode, seen: Counter[str]) -> None:
    """Counts, per sender, the messages the transport hands to PySyncObj."""
    deliver = node.transport._onMessageReceivedCallback
    assert deliver is not None

    def recording(sender: Node, message: dict[str, Any]) -> None:
        seen[sender.id] += 1
        deliver(sender, message)

    node.transport.setOnMessageReceivedCallback(recording)


async def serve_p2p_node(
    spec: Spec, specs: list[Spec], *, task_status: trio.TaskStatus[RaftNode]
) -> None:
    """One node: its host, transport and replicator, until node.kill()."""
    scope, stopped = trio.CancelScope(), trio.Event()
    node: RaftNode | None = None
    members = {s.id: s.addr for s in specs if s.id != spec.id}
    try:
        with scope:
            async with running_host(spec.key, [f"/ip4/127.0.0.1/tcp/{spec.port}"]) as host:
                assert full_addrs(host) == [spec.addr]
                transport = libp2p_raft_transport(host, spec.id, members)
                node = build_node(
                    spec.id, spec.data_dir, transport, members, GROUP_TIMEOUTS, host=host
                )
                node.scope, node.stopped = scope, stopped
                async with trio.open_nursery() as nursery:
                    await nursery.start(transport.run)
                    await nursery.start(node.snapshots.run)
                    nursery.start_soon(node.replicator.run)
                    task_status.started(node)
    finally:
        if node is not None:
            with trio.CancelScope(shield=True):
                await node.replicator.close()
        stopped.set()


async def read_frames(stream: Any, decoder: FrameDecoder, until: Callable[[bytes], bool]) -> None:
    while True:
        data = await stream.read(65536)
        assert data, "stream ended"
        for body in decoder.feed(data):
            if until(body):
                return


async def test_three_libp2p_nodes_replicate_refuse_outsiders_and_fail_over(tmp_path):
    specs = [Spec(PrivateKey.generate(), free_port(), tmp_path / f"node{i}") for i in range(3)]
    seen: Counter[str] = Counter()
    async with trio.open_nursery() as nursery:
        started = time.monotonic()
        nodes = [await nursery.start(serve_p2p_node, s, specs) for s in specs]
        for node in nodes:
            record_deliveries(node, seen)
        await wait_until(lambda: leader_of(nodes) is not None, 15, "a leader")
        leader = leader_of(nodes)
        assert leader is not None
        log.warning("libp2p: leader elected %.2fs after the first host started",
                    time.monotonic() - started)
        await wait_until(lambda: all(len(n.transport.connected) == 2 for n in nodes), 10,
                         "every session")
        followers = [n for n in nodes if n is not leader]

        # Writes through the leader, and through followers (forwarded by PySyncObj).
        for i in range(10):
            assert (await leader.put(i))[0] == 200
        for i in range(10, 20):
            status, value = await followers[i % 2].put(i)
            assert status == 200 and value["n"] == i
        await wait_until(lambda: converged(nodes, 20), 5, "replicas to converge")

        # An outsider (a valid libp2p peer, not a member) opening the raft protocol.
        term = leader.colony.term
        refused = leader.transport.counters["inbound_refused"]
        async with running_host(PrivateKey.generate(), ["/ip4/127.0.0.1/tcp/0"]) as outsider:
            outsider_id = outsider.get_id().to_string()
            await connect(outsider, specs[nodes.index(leader)].addr)
            vote = {"type": "request_vote", "term": term + 100, "last_log_index": 10**6,
                    "last_log_term": term + 100}
            got = b""
            with trio.fail_after(5):
                try:
                    # The reset may come before the protocol confirmation is read, failing
                    # new_stream itself, or after it, failing the write or the read.
                    stream = await outsider.new_stream(
                        leader.host.get_id(), [TProtocol(RAFT_PROTOCOL_ID)]
                    )
                    await stream.write(encode_frame(msgpack.packb(vote, use_bin_type=True)))
                    while chunk := await stream.read(65536):
                        got += chunk
                except Exception as e:  # reset (or EOF): what we expect
                    log.info("outsider stream ended: %r", e)
            assert got == b""  # not even the hello
        assert leader.transport.counters["inbound_refused"] == refused + 1
        assert seen[outsider_id] == 0
        assert leader.colony.term == term and leader.is_leader

        # A member (allow-listed) that sends a chunked entry and a pickled MEMBERSHIP payload.
        PWNED.clear()
        rogue_key = PrivateKey.generate()
        rogue_id = peer_id_of(rogue_key).to_string()
        leader.transport.add_member(rogue_id)
        async with running_host(rogue_key, ["/ip4/127.0.0.1/tcp/0"]) as rogue:
            await connect(rogue, specs[nodes.index(leader)].addr)
            stream = await rogue.new_stream(leader.host.get_id(), [TProtocol(RAFT_PROTOCOL_ID)])
            decoder = FrameDecoder()
            with trio.fail_after(5):
                await read_frames(stream, decoder, lambda body: body == HEARTBEAT)  # hello
            chunk = {"type": "append_entries", "transmission": "finish", "data": EVIL_MEMBERSHIP,
                     "term": leader.colony.term, "commit_index": 0, "prevLogIdx": 1,
                     "prevLogTerm": 0}
            command = bytes([_COMMAND_TYPE.MEMBERSHIP]) + EVIL_MEMBERSHIP
            forward = {"type": "apply_command", "command": command, "request_id": 7}
            await stream.write(b"".join(
                encode_frame(msgpack.packb(m, use_bin_type=True)) for m in (chunk, forward)
            ))
            answers: list[dict[str, Any]] = []

            def is_answer(body: bytes) -> bool:
                if body != HEARTBEAT:
                    message = decode_raft_message(body)
                    if message["type"] == "apply_command_response":
                        answers.append(message)
                return bool(answers)

            with trio.fail_after(5):
                await read_frames(stream, decoder, is_answer)
            assert answers == [
                {"type": "apply_command_response", "request_id": 7,
                 "error": FAIL_REASON.REQUEST_DENIED}
            ]
            await stream.reset()
        assert leader.transport.counters["transmission_refused"] == 1
        assert seen[rogue_id] == 1  # the apply_command only
        assert leader.colony.refused_commands == 1 and PWNED == []
        leader.transport.remove_member(rogue_id)
        assert sorted(leader.colony.member_ids) == sorted(s.id for s in specs)

        # Kill the leader's host under writes from a follower; the others elect and go on.
        writer_node = followers[0]
        acks: list[float] = []
        stop = trio.Event()

        async def write_continuously() -> None:
            i = 1000
            while not stop.is_set():
                i += 1
                try:
                    if (await writer_node.put(i, timeout=2.0))[0] == 200:
                        acks.append(time.monotonic())
                except ColoniesError:
                    await trio.sleep(0.02)

        async with trio.open_nursery() as writers:
            writers.start_soon(write_continuously)
            await wait_until(lambda: len(acks) >= 20, 10, "writes before the kill")
            old = leader
            killed_at = time.monotonic()
            await old.kill()
            survivors = [n for n in nodes if n is not old]
            await wait_until(lambda: leader_of(survivors) is not None, 10, "a new leader")
            elected = time.monotonic() - killed_at
            acked_before = sum(1 for t in acks if t <= killed_at)
            await wait_until(lambda: sum(1 for t in acks if t > killed_at) >= 20, 10,
                             "writes after the kill")
            stop.set()
        gap = max(b - a for a, b in zip(acks, acks[1:], strict=False))
        resumed = min(t for t in acks if t > killed_at) - killed_at
        log.warning(
            "libp2p failover: new leader %.2fs after the kill, first ack after %.2fs, "
            "longest gap between acks %.2fs (%d acks before, %d after)",
            elected, resumed, gap, acked_before, len(acks) - acked_before,
        )
        assert gap < 10
        new_leader = leader_of(survivors)
        assert new_leader is not None and new_leader is not old
        await wait_until(lambda: converged(survivors), 5, "the survivors to agree")

        # Restart the old leader: same key, same data dir, same address. It catches up.
        old_spec = specs[nodes.index(old)]
        restarted_at = time.monotonic()
        back = await nursery.start(serve_p2p_node, old_spec, specs)
        nodes[nodes.index(old)] = back
        assert (await new_leader.put("after restart"))[0] == 200
        caught_up = await wait_until(lambda: converged(nodes), 10, "the restarted node to catch up")
        log.warning("libp2p: restarted node caught up %.2fs after its restart (%.2fs wait)",
                    time.monotonic() - restarted_at, caught_up)
        assert len(back.machine.applied) == len(new_leader.machine.applied)
        assert leader_of(nodes) is new_leader
        for node in nodes:
            assert node.transport.counters["messages_refused"] == 0

        for node in nodes:
            await node.kill()
        nursery.cancel_scope.cancel()


def test_member_addresses_must_name_the_member():
    a, b = (peer_id_of(PrivateKey.generate()).to_string() for _ in range(2))
    addr_b = f"/ip4/127.0.0.1/tcp/4001/p2p/{b}"
    transport = libp2p_raft_transport(None, a, {b: f"/ip4/127.0.0.1/tcp/4001/p2p/{a}"})
    assert transport.members == {b: None}  # another peer's address: ignored
    transport.add_member(b, "not a multiaddr")
    assert transport.members == {b: None}
    changes: list[dict[str, str | None]] = []
    transport._on_members_changed = changes.append
    transport.addNode(Node(b, addr=addr_b))  # what addNodeToCluster(Node(id, addr=...)) gives
    assert transport.members == {b: addr_b} and changes == [{b: addr_b}]
    transport.addNode(Node(b))  # a known address is kept
    transport.dropNode(Node(b))
    assert transport.members == {} and changes[-1] == {}
