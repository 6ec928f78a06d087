"""colonyd: one node. The root nursery holds the libp2p host, the Raft transport and
replicator, the membership keeper, the RPC service and the leader's timeout ticker; SIGTERM or
Ctrl-C drains calls and flushes the journal.

The first node of a cluster bootstraps it (server owner, cluster id, itself in the member
book). Every other node starts with ``--join ADDR``: it learns the members from ADDR, starts
its replica with them as partners without standing for election, and asks (with the server
owner key) to be added; the leader then adds it to the Raft group and it catches up.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from libp2p.custom_types import TProtocol

from consensus.machine import ColonyMachine
from node.archive_sqlite import ARCHIVE_FILE, SqliteArchive
from node.archive_upkeep import keep_archive
from node.client import Client
from node.datadir import SERVER_KEY_FILE, DataDir, load_or_create_key, read_key
from node.dispatch import Dispatcher
from node.faults import FaultFile
from node.libp2p_patches import ConnectionLimits
from node.log_context import set_log_node
from node.loop_monitor import LoopMonitor
from node.member_add import REACH_TIMEOUT_S
from node.membership import Membership, NodeRemoved, check_not_removed, load_members, save_members
from node.metrics import Metrics
from node.p2p import connect, full_addrs, parse_peer_addr, running_host
from node.raft_journal import SyncPolicy
from node.raft_libp2p import libp2p_raft_transport
from node.raft_replica import (
    DEFAULT_COMPACT_AFTER,
    DUMP_FILE,
    GROUP_TIMEOUTS,
    JOURNAL_FILE,
    SOLO_TIMEOUTS,
    ReplicatedColony,
)
from node.raft_transport import RaftTransport
from node.replicator import Replicator
from node.rpc_server import RPC_PROTOCOL_ID, RpcServer
from node.snapshot_transfer import SnapshotTransfer, complete_install
from node.ticker import run_timeouts
from protocol.errors import BadRequest, ColoniesError, Unavailable
from protocol.identity import PrivateKey

log = logging.getLogger("colonies.node")

VERSION = "0.1.0"
DRAIN_TIMEOUT_S = 3.0
JOIN_TIMEOUT_S = 60.0
LEADER_WAIT_LOG_S = 10.0
LEADER_ASK_S = 1.0
ASK_MEMBER_TIMEOUT_S = 2.0


@dataclass
class NodeConfig:
    data_dir: Path
    listen: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    # The server owner: a private key (hex) or a key file; created on first start if neither.
    server_prvkey: str | None = None
    server_key_file: Path | None = None
    ready_file: Path | None = None
    metrics_addr: str | None = None
    # Join the cluster of these member addresses instead of bootstrapping a new one.
    join: list[str] = field(default_factory=list)
    # The address other members and clients dial (default: the first listen address).
    announce: str | None = None
    # Chaos runs only: a JSON fault plan re-read every 200 ms (node/faults.py).
    fault_file: Path | None = None
    # Inbound connections from non-members held at once (libp2p_patches.ConnectionLimits).
    max_client_connections: int = ConnectionLimits.max_clients
    # When the Raft journal reaches the disk: before every acknowledgement, or on an interval
    # (node/raft_journal.py).
    journal_sync: SyncPolicy = field(default_factory=SyncPolicy)
    # Snapshot the live state and cut the journal after this many entries (or 5 minutes).
    compact_after: int = DEFAULT_COMPACT_AFTER


def server_owner_key(config: NodeConfig) -> tuple[PrivateKey, str]:
    """Returns the key and where it came from."""
    if config.server_prvkey:
        return PrivateKey.from_hex(config.server_prvkey.strip()), "COLONIES_SERVER_PRVKEY"
    if config.server_key_file is not None:
        return read_key(config.server_key_file), str(config.server_key_file)
    path = config.data_dir / SERVER_KEY_FILE
    existed = path.exists()
    key = load_or_create_key(path)
    return key, f"{path} ({'existing' if existed else 'created'})"


def configured_server_key(config: NodeConfig) -> PrivateKey | None:
    """The server owner key if the operator gave one (never a newly created one)."""
    if config.server_prvkey or config.server_key_file is not None:
        return server_owner_key(config)[0]
    path = config.data_dir / SERVER_KEY_FILE
    return read_key(path) if path.exists() else None


async def fetch_server_info(addrs: list[str]) -> dict[str, Any]:
    """Any key may read the server info; a throwaway one says nothing about us."""
    async with Client.connect(addrs, PrivateKey.generate()) as client:
        return await client.server_info_fresh()


async def ask_member(addr: str) -> dict[str, Any] | None:
    """A member's server info, or None if it does not answer within ASK_MEMBER_TIMEOUT_S."""
    with trio.move_on_after(ASK_MEMBER_TIMEOUT_S):
        try:
            return await fetch_server_info([addr])
        except ColoniesError as e:
            log.debug("member %s did not answer: %s", addr, e)
    return None


def notify_systemd(state: str) -> None:
    """sd_notify(3) for Type=notify units; a no-op outside systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("cannot notify systemd (%s): %s", path, e)


class ColonyNode:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.data = DataDir(config.data_dir)
        self.replicator: Replicator | None = None
        self.transport: RaftTransport | None = None
        self.snapshot_transfer: SnapshotTransfer | None = None
        self.membership: Membership | None = None
        self.announce = ""
        self.rpc: RpcServer | None = None
        self.metrics: Metrics | None = None
        self.loop = LoopMonitor()
        self.limits = ConnectionLimits(
            max_clients=config.max_client_connections, is_member=self._is_member
        )
        self.metrics_port: int | None = None
        self.addrs: list[str] = []
        self.peer_id = ""
        self.started_at = time.time()
        self._stop = trio.Event()

    # What any caller may learn, signed or not: enough to address and reach the cluster.
    def server_info(self) -> dict[str, Any]:
        assert self.replicator is not None
        machine = self.replicator.machine
        return {
            "version": VERSION,
            "peerid": self.peer_id,
            "addrs": self.addrs,
            "clusterid": machine.cluster_id,
            "serverid": machine.server_id,
            "members": machine.members,
            "raft": self.raft_status(),
        }

    def raft_status(self) -> dict[str, Any]:
        assert self.replicator is not None
        status = self.replicator.status()
        if self.transport is not None:
            status["last_heard"] = self.transport.last_heard()
            status["learners"] = sorted(self.transport.learners)
        if self.snapshot_transfer is not None:
            status["snapshot_transfers"] = dict(self.snapshot_transfer.counters)
        status.update(self.loop.status())
        return status

    def stop(self) -> None:
        self._stop.set()

    async def run(self, *, task_status: trio.TaskStatus[ColonyNode] = trio.TASK_STATUS_IGNORED) -> None:
        self.data.open()
        try:
            await self._run(task_status)
        finally:
            self.data.close()

    async def _run(self, task_status: trio.TaskStatus[ColonyNode]) -> None:
        check_not_removed(self.config.data_dir)
        node_key = self.data.node_key()
        async with running_host(node_key, self.config.listen, self.limits) as host:
            self.peer_id = host.get_id().to_string()
            set_log_node(self.peer_id)
            self.addrs = full_addrs(host)
            self.announce = self._announce_addr()
            others, joining = await self._initial_members()
            faults = FaultFile(self.config.fault_file) if self.config.fault_file else None
            transport = libp2p_raft_transport(
                host,
                self.peer_id,
                others,
                on_members_changed=lambda m: self._membership_hook(m),
                faults=faults,
            )
            if complete_install(self.config.data_dir):
                log.warning("finished installing the snapshot received before the last stop")
            archive = SqliteArchive(self.config.data_dir / ARCHIVE_FILE)
            raft = ReplicatedColony(
                self.peer_id,
                list(others),
                self.data,
                ColonyMachine(archive),
                transport=transport,
                timeouts=GROUP_TIMEOUTS if others else SOLO_TIMEOUTS,
                joining=joining,
                sync_policy=self.config.journal_sync,
                log_compaction_min_entries=self.config.compact_after,
            )
            self.replicator = replicator = Replicator(raft, relay=transport)
            self.snapshot_transfer = snapshots = SnapshotTransfer(
                self.config.data_dir, raft, transport
            )
            raft.on_snapshot_needed = snapshots.needed
            transport.attach(replicator.kick)
            self.transport = transport
            self.membership = membership = Membership(
                self.config.data_dir, raft, transport, replicator, on_removed=self.stop,
                ask_member=ask_member,
            )
            if joining:
                save_members(self.config.data_dir, others)
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.loop.run)
                    await nursery.start(snapshots.run)
                    nursery.start_soon(
                        keep_archive, archive, lambda: min([raft.snapshot_index, *snapshots.pinned()])
                    )
                    if faults is not None:
                        await nursery.start(faults.run)
                    await nursery.start(transport.run)
                    nursery.start_soon(replicator.run)
                    if joining:
                        nursery.start_soon(self._ask_to_join)
                    await self._wait_for_leader(replicator, joining=joining)
                    if joining:
                        await self._wait_for_state(replicator)
                    else:
                        await self._bootstrap(replicator)
                    await self._announce(replicator)
                    nursery.start_soon(membership.run)
                    self.rpc = rpc = RpcServer(
                        Dispatcher(
                            replicator,
                            self.server_info,
                            reach=lambda _peer, addr: connect(host, addr, REACH_TIMEOUT_S),
                        ).handle,
                        lambda: replicator.machine.cluster_id,
                    )
                    self.metrics = metrics = Metrics(
                        lambda: replicator.machine.statistics(),
                        self.raft_status,
                        self.loop,
                        self.limits,
                    )
                    rpc.latency = metrics.observe_rpc
                    if self.config.metrics_addr:
                        self.metrics_port = await nursery.start(
                            metrics.serve, self.config.metrics_addr
                        )
                    host.set_stream_handler(TProtocol(RPC_PROTOCOL_ID), rpc.handle_stream)
                    nursery.start_soon(run_timeouts, replicator)
                    self.data.write_addr(self.addrs)
                    if self.config.ready_file is not None:
                        self.config.ready_file.write_text("\n".join(self.addrs) + "\n")
                    notify_systemd("READY=1")
                    log.info(
                        "serving as %s (members: %s)", self.peer_id, ", ".join(raft.member_ids)
                    )
                    task_status.started(self)
                    await self._wait_for_stop()
                    notify_systemd("STOPPING=1")
                    await rpc.drain(DRAIN_TIMEOUT_S)
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await replicator.close()
                archive.close()

    def _is_member(self, peer_id: str) -> bool:
        """Raft peers are never refused as clients (libp2p_patches.ConnectionLimits)."""
        return self.transport is not None and self.transport.is_peer(peer_id)

    def _membership_hook(self, members: dict[str, str | None]) -> None:
        if self.membership is not None:
            self.membership.on_transport_members(members)

    def _announce_addr(self) -> str:
        if self.config.announce:
            pid, _ = parse_peer_addr(self.config.announce)
            if pid.to_string() != self.peer_id:
                raise BadRequest(f"--announce {self.config.announce} must end in /p2p/{self.peer_id}")
            return self.config.announce
        return self.addrs[0]

    async def _initial_members(self) -> tuple[dict[str, str | None], bool]:
        """The other members to start with, and whether this node is joining a cluster."""
        saved = load_members(self.config.data_dir)
        has_state = any(
            (self.config.data_dir / f).exists() for f in (JOURNAL_FILE, DUMP_FILE)
        )
        if not self.config.join:
            return saved, False
        if has_state:
            log.info("--join ignored: this node already has cluster state")
            return saved, False
        info = await fetch_server_info(self.config.join)
        members = info.get("members")
        if not isinstance(members, dict) or not members:
            raise BadRequest(f"{self.config.join[0]} reports no cluster members to join")
        # The partners are the voters; members that are learners themselves get no vote.
        voters = (info.get("raft") or {}).get("members") or list(members)
        others = {p: a for p, a in members.items() if p != self.peer_id and p in voters}
        log.info("joining cluster %s with members %s", info.get("clusterid"), ", ".join(others))
        return others, True

    async def _ask_to_join(self) -> None:
        """Asks the cluster to add this node, if this node holds the server owner key;
        otherwise an operator does it with `colonies cluster add`."""
        key = configured_server_key(self.config)
        if key is None:
            log.warning(
                "waiting to be added to the cluster: run `colonies cluster add %s` "
                "with the server owner key",
                self.announce,
            )
            return
        body = {"peerid": self.peer_id, "addr": self.announce}
        with trio.move_on_after(JOIN_TIMEOUT_S):
            while True:
                try:
                    async with Client.connect(self.config.join, key) as client:
                        await client.call("addmembermsg", body)
                    log.info("asked the cluster to add %s", self.announce)
                    return
                except ColoniesError as e:
                    log.warning("asking to join failed (retrying): %s", e)
                await trio.sleep(1.0)
        log.error("could not ask the cluster to add this node within %ss", JOIN_TIMEOUT_S)

    async def _wait_for_leader(self, replicator: Replicator, *, joining: bool) -> None:
        """Until a leader is known and this replica caught up. A restarted node that the
        cluster removed while it was down would wait forever (no member talks to it), so it
        asks the members meanwhile, and stops if they no longer list it."""
        assert self.membership is not None
        last_log = trio.current_time()
        while True:
            try:
                await replicator.wait_ready(LEADER_ASK_S)
                return
            except Unavailable as e:
                if trio.current_time() - last_log >= LEADER_WAIT_LOG_S:
                    log.info("waiting: %s", e.message)
                    last_log = trio.current_time()
            if not joining:
                await self.membership.ask_if_cut_off()
                if self.membership.removed:
                    raise NodeRemoved("this node was removed from its cluster while it was down")

    async def _wait_for_state(self, replicator: Replicator) -> None:
        """A joined node serves once it has the cluster's bootstrap entry and the leader has
        made it a voter (it gets the log as a learner until then: node/raft_elections.py)."""
        last_log = trio.current_time()
        while not replicator.machine.server_id or replicator.colony.learner:
            await replicator.wait_applied(replicator.applied_generation, trio.current_time() + 1)
            if trio.current_time() - last_log >= LEADER_WAIT_LOG_S:
                log.info("waiting: a learner until the leader makes this node a voter")
                last_log = trio.current_time()

    async def _announce(self, replicator: Replicator) -> None:
        """Records this node's current address in the member book when it changed."""
        book = replicator.machine.members
        if book.get(self.peer_id) == self.announce or (book and self.peer_id not in book):
            return
        cmd = {"op": "announce", "member": [self.peer_id, self.announce]}
        status, value = await replicator.submit(cmd, timeout=30)
        if status != 200:
            log.warning("announcing %s failed: %s", self.announce, value)

    async def _wait_for_stop(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as n:

                async def on_signal() -> None:
                    async for signum in signals:
                        log.info("received %s, stopping", signal.Signals(signum).name)
                        self._stop.set()
                        return

                n.start_soon(on_signal)
                await self._stop.wait()
                n.cancel_scope.cancel()

    async def _bootstrap(self, replicator: Replicator) -> None:
        """The first start fixes the server owner and the cluster id in the replicated state."""
        machine = replicator.machine
        if machine.server_id:
            if self.config.server_prvkey or self.config.server_key_file:
                key, source = server_owner_key(self.config)
                if key.id != machine.server_id:
                    log.warning(
                        "server owner from %s differs from the cluster's (%s); the cluster's is kept",
                        source,
                        machine.server_id,
                    )
            return
        key, source = server_owner_key(self.config)
        cmd = {
            "op": "bootstrap",
            "serverid": key.id,
            "clusterid": os.urandom(32).hex(),
            "member": [self.peer_id, self.announce],
        }
        status, value = await replicator.submit(cmd, timeout=30)
        if status != 200:
            raise ColoniesError(f"bootstrap failed: {value}")
        log.info("server owner %s from %s", key.id, source)


def check_listen(addrs: list[str]) -> list[str]:
    if not addrs:
        raise BadRequest("at least one --listen address is required")
    return addrs
