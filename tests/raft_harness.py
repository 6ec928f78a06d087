"""Multi-node Raft clusters in one trio test: ReplicatedColony + Replicator + a Raft transport
per node (libp2p or the in-memory twin), with a small fake state machine."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import trio

from node.raft_replica import RaftTimeouts, ReplicatedColony
from node.raft_transport import RaftTransport
from node.replicator import Replicator
from node.snapshot_transfer import SnapshotTransfer
from protocol.errors import ColoniesError


class FakeMachine:
    """The ColonyMachine interface, reduced to an append-only list of (now, cmd)."""

    def __init__(self) -> None:
        self.applied: list[list[Any]] = []
        self.batch_sizes: list[int] = []  # not replicated: one per apply_batch on this object

    def apply_batch(self, batch: bytes, index: int | None = None) -> list[list[Any]]:
        data = msgpack.unpackb(batch, raw=False)
        self.batch_sizes.append(len(data["cmds"]))
        out: list[list[Any]] = []
        for cmd in data["cmds"]:
            self.applied.append([data["now"], cmd])
            out.append([200, {"n": cmd.get("n"), "seq": len(self.applied)}])
        return out

    def snapshot(self) -> dict[str, Any]:
        return {"applied": self.applied}

    @classmethod
    def restore(cls, data: dict[str, Any]) -> FakeMachine:
        machine = cls()
        machine.applied = data["applied"]
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

    def values(self) -> list[Any]:
        return [cmd.get("n") for _, cmd in self.applied]


@dataclass(eq=False)
class RaftNode:
    id: str
    data_dir: Path
    transport: RaftTransport
    colony: ReplicatedColony
    replicator: Replicator
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    stopped: trio.Event = field(default_factory=trio.Event)
    host: Any = None
    snapshots: Any = None  # node/snapshot_transfer.py

    @property
    def machine(self) -> FakeMachine:
        machine = self.replicator.machine
        assert isinstance(machine, FakeMachine)
        return machine

    @property
    def is_leader(self) -> bool:
        return not self.stopped.is_set() and self.colony.is_leader

    async def put(self, n: Any, timeout: float = 5.0) -> list[Any]:
        return await self.replicator.submit({"op": "put", "n": n}, timeout=timeout)

    async def kill(self) -> None:
        self.scope.cancel()
        await self.stopped.wait()


def build_node(
    node_id: str,
    data_dir: Path,
    transport: RaftTransport,
    partners: Iterable[str],
    timeouts: RaftTimeouts,
    *,
    joining: bool = False,
    host: Any = None,
) -> RaftNode:
    colony = ReplicatedColony(
        node_id,
        list(partners),
        data_dir,
        FakeMachine(),
        transport=transport,
        timeouts=timeouts,
        joining=joining,
    )
    replicator = Replicator(colony, relay=transport)
    transport.attach(replicator.kick)
    node = RaftNode(node_id, data_dir, transport, colony, replicator, host=host)
    node.snapshots = SnapshotTransfer(data_dir, colony, transport)
    colony.on_snapshot_needed = node.snapshots.needed
    return node


async def serve_node(node: RaftNode, *, task_status: trio.TaskStatus[RaftNode]) -> None:
    """Runs the node's transport and replicator until ``node.kill()``."""
    try:
        with node.scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(node.transport.run)
                await nursery.start(node.snapshots.run)
                nursery.start_soon(node.replicator.run)
                task_status.started(node)
    finally:
        with trio.CancelScope(shield=True):
            await node.replicator.close()
        node.stopped.set()


async def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Polls ``cond`` every 10 ms; returns the seconds it took, fails the test after timeout."""
    start = trio.current_time()
    with trio.move_on_after(timeout):
        while not cond():
            await trio.sleep(0.01)
        return trio.current_time() - start
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def leader_of(nodes: Iterable[RaftNode]) -> RaftNode | None:
    """The live node every other live node follows, if there is one."""
    live = [n for n in nodes if not n.stopped.is_set()]
    leaders = [n for n in live if n.colony.is_leader]
    if len(leaders) != 1:
        return None
    leader = leaders[0]
    if all(n.colony.leader_id == leader.id for n in live):
        return leader
    return None


def converged(nodes: Iterable[RaftNode], count: int | None = None) -> bool:
    nodes = list(nodes)
    digests = {n.machine.digest() for n in nodes}
    if len(digests) != 1:
        return False
    return count is None or all(len(n.machine.applied) == count for n in nodes)


async def put_retrying(node: RaftNode, n: Any, deadline: float) -> bool:
    """Submits until acknowledged or the trio-clock deadline; True when acknowledged."""
    while trio.current_time() < deadline:
        try:
            status, _ = await node.put(n, timeout=max(0.05, min(2.0, deadline - trio.current_time())))
            return status == 200
        except ColoniesError:
            await trio.sleep(0.05)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
