"""colonyd: one node. The root nursery holds the libp2p host, the Raft replicator, the RPC
service and the leader's timeout ticker; SIGTERM or Ctrl-C drains calls and flushes the journal.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from libp2p.custom_types import TProtocol

from consensus.raft import ReplicatedColony
from node.datadir import SERVER_KEY_FILE, DataDir, load_or_create_key, read_key
from node.dispatch import Dispatcher
from node.metrics import Metrics
from node.p2p import full_addrs, running_host
from node.replicator import Replicator
from node.rpc_server import RPC_PROTOCOL_ID, RpcServer
from node.ticker import run_timeouts
from protocol.errors import BadRequest, ColoniesError
from protocol.identity import PrivateKey

log = logging.getLogger("colonies.node")

VERSION = "0.1.0"
DRAIN_TIMEOUT_S = 3.0


@dataclass
class NodeConfig:
    data_dir: Path
    listen: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    # The server owner: a private key (hex) or a key file; created on first start if neither.
    server_prvkey: str | None = None
    server_key_file: Path | None = None
    ready_file: Path | None = None
    metrics_addr: str | None = None


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


class ColonyNode:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.data = DataDir(config.data_dir)
        self.replicator: Replicator | None = None
        self.rpc: RpcServer | None = None
        self.metrics: Metrics | None = None
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
            "raft": self.replicator.status(),
        }

    def stop(self) -> None:
        self._stop.set()

    async def run(self, *, task_status: trio.TaskStatus[ColonyNode] = trio.TASK_STATUS_IGNORED) -> None:
        self.data.open()
        try:
            await self._run(task_status)
        finally:
            self.data.close()

    async def _run(self, task_status: trio.TaskStatus[ColonyNode]) -> None:
        node_key = self.data.node_key()
        async with running_host(node_key, self.config.listen) as host:
            self.peer_id = host.get_id().to_string()
            raft = ReplicatedColony(self.peer_id, [], self.config.data_dir)
            self.replicator = replicator = Replicator(raft)
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(replicator.run)
                    await replicator.wait_ready(30)
                    await self._bootstrap(replicator)
                    self.rpc = rpc = RpcServer(
                        Dispatcher(replicator, self.server_info).handle,
                        lambda: replicator.machine.cluster_id,
                    )
                    self.metrics = metrics = Metrics(
                        lambda: replicator.machine.statistics(), replicator.status
                    )
                    rpc.latency = metrics.observe_rpc
                    if self.config.metrics_addr:
                        self.metrics_port = await nursery.start(
                            metrics.serve, self.config.metrics_addr
                        )
                    host.set_stream_handler(TProtocol(RPC_PROTOCOL_ID), rpc.handle_stream)
                    nursery.start_soon(run_timeouts, replicator)
                    self.addrs = full_addrs(host)
                    self.data.write_addr(self.addrs)
                    if self.config.ready_file is not None:
                        self.config.ready_file.write_text("\n".join(self.addrs) + "\n")
                    task_status.started(self)
                    await self._wait_for_stop()
                    await rpc.drain(DRAIN_TIMEOUT_S)
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await replicator.close()

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
        cmd = {"op": "bootstrap", "serverid": key.id, "clusterid": os.urandom(32).hex()}
        status, value = await replicator.submit(cmd, timeout=30)
        if status != 200:
            raise ColoniesError(f"bootstrap failed: {value}")
        log.info("server owner %s from %s", key.id, source)


def check_listen(addrs: list[str]) -> list[str]:
    if not addrs:
        raise BadRequest("at least one --listen address is required")
    return addrs
