"""Prometheus metrics, served from the trio loop (no exporter thread).

Process and executor counts keep Colonies' metric names (`colonies_server_*`); Raft health and
RPC latency are ours. Gauges are read from the local replica when scraped, so they cost
nothing between scrapes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from node.libp2p_patches import ConnectionLimits
from node.loop_monitor import BUCKETS_S as LAG_BUCKETS_S
from node.loop_monitor import STALL_S, LoopMonitor
from node.p2p import parse_multiaddr
from protocol.errors import BadRequest

log = logging.getLogger("colonies.metrics")

MAX_REQUEST_BYTES = 8192
SCRAPE_TIMEOUT_S = 5.0


class _StateCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, int]], raft: Callable[[], dict[str, Any]]) -> None:
        self.stats, self.raft = stats, raft

    def collect(self) -> Any:
        s = self.stats()
        for name, key in (
            ("colonies_server_colonies", "colonies"),
            ("colonies_server_executors", "executors"),
            ("colonies_server_processes_waiting", "waitingprocesses"),
            ("colonies_server_processes_running", "runningprocesses"),
            ("colonies_server_processes_successful", "successfulprocesses"),
            ("colonies_server_processes_failed", "failedprocesses"),
            ("colonies_server_processes_cancelled", "cancelledprocesses"),
            ("colonies_server_workflows_waiting", "waitingworkflows"),
            ("colonies_server_workflows_running", "runningworkflows"),
            ("colonies_server_workflows_successful", "successfulworkflows"),
            ("colonies_server_workflows_failed", "failedworkflows"),
            ("colonies_server_workflows_cancelled", "cancelledworkflows"),
        ):
            yield GaugeMetricFamily(name, f"Number of {key} in the replicated state", value=s[key])
        r = self.raft()
        yield GaugeMetricFamily(
            "colonies_raft_has_leader", "1 if this node knows a Raft leader", value=int(bool(r.get("leader")))
        )
        yield GaugeMetricFamily(
            "colonies_raft_is_leader",
            "1 if this node is the Raft leader",
            value=int(r.get("state") == "leader"),
        )
        yield GaugeMetricFamily("colonies_raft_term", "Current Raft term", value=r.get("term", 0))
        yield GaugeMetricFamily(
            "colonies_raft_commit_index", "Raft commit index", value=r.get("commit_index", 0)
        )
        yield GaugeMetricFamily(
            "colonies_raft_applied_index", "Last applied Raft index", value=r.get("last_applied", 0)
        )
        yield GaugeMetricFamily(
            "colonies_raft_proposals_pending",
            "Commands queued or in flight in the Raft log",
            value=r.get("queued", 0) + r.get("in_flight", 0),
        )
        yield CounterMetricFamily(
            "colonies_raft_leader_changes",
            "Leader changes seen by this node (a lost leader counts too)",
            value=r.get("leader_changes", 0),
        )


class _LoopCollector(Collector):
    def __init__(self, loop: LoopMonitor) -> None:
        self.loop = loop

    def collect(self) -> Any:
        yield GaugeMetricFamily(
            "colonies_event_loop_lag_max_seconds",
            "The longest the node's event loop went without running its tasks, in about the "
            "last minute (node/loop_monitor.py)",
            value=self.loop.max_recent(),
        )
        yield CounterMetricFamily(
            "colonies_event_loop_stalls",
            f"Event loop lags of {STALL_S * 1000:.0f} ms or more",
            value=self.loop.stalls,
        )


class _ConnectionCollector(Collector):
    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits

    def collect(self) -> Any:
        lim = self.limits
        for name, value, what in (
            ("colonies_p2p_client_connections", lim.clients, "Inbound connections of clients"),
            ("colonies_p2p_member_connections", lim.members, "Inbound connections of members"),
            ("colonies_p2p_handshakes", lim.handshakes, "Inbound connections negotiating"),
            ("colonies_p2p_buffered_bytes", lim.buffered, "Unread bytes of client streams"),
        ):
            yield GaugeMetricFamily(name, what, value=value)
        refused = CounterMetricFamily(
            "colonies_p2p_refused",
            "Connections, streams or bytes refused by a limit (libp2p_patches.ConnectionLimits)",
            labels=["limit"],
        )
        for limit, n in sorted(lim.refused.items()):
            refused.add_metric([limit], n)
        yield refused


class Metrics:
    def __init__(
        self,
        stats: Callable[[], dict[str, int]],
        raft: Callable[[], dict[str, Any]],
        loop: LoopMonitor | None = None,
        limits: ConnectionLimits | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StateCollector(stats, raft))
        if limits is not None:
            self.registry.register(_ConnectionCollector(limits))
        if loop is not None:
            self.registry.register(_LoopCollector(loop))
            lag = Histogram(
                "colonies_event_loop_lag_seconds",
                "How late the event loop's heartbeat woke up (time other tasks held the loop)",
                registry=self.registry,
                buckets=LAG_BUCKETS_S,
            )
            loop.on_lag(lag.observe)
        self.rpc_seconds = Histogram(
            "colonies_rpc_seconds",
            "RPC latency by message type and status",
            ["msgtype", "status"],
            registry=self.registry,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )

    def observe_rpc(self, msgtype: str, status: int, seconds: float) -> None:
        self.rpc_seconds.labels(msgtype, str(status)).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def serve(self, addr: str, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve GET /metrics on `addr` (host:port or a /ip4/../tcp/.. multiaddr)."""
        host, port = parse_host_port(addr)
        listeners = await trio.open_tcp_listeners(port, host=host)
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(SCRAPE_TIMEOUT_S):
                request = b""
                while b"\r\n\r\n" not in request and len(request) < MAX_REQUEST_BYTES:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    request += chunk
                line = request.split(b"\r\n", 1)[0].split()
                if len(line) >= 2 and line[0] == b"GET" and line[1].split(b"?")[0] in (b"/metrics", b"/"):
                    body, status = self.render(), b"200 OK"
                else:
                    body, status = b"not found\n", b"404 Not Found"
                head = (
                    b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain; version=0.0.4\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
                )
                await stream.send_all(head + body)
        except (trio.BrokenResourceError, OSError) as e:
            log.debug("metrics client went away: %r", e)
        finally:
            await stream.aclose()


def parse_host_port(addr: str) -> tuple[str, int]:
    if addr.startswith("/"):
        parts = str(parse_multiaddr(addr)).split("/")
        try:
            return parts[2], int(parts[4])
        except (IndexError, ValueError):
            raise BadRequest(f"metrics address {addr!r} must be /ip4/HOST/tcp/PORT") from None
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise BadRequest(f"metrics address {addr!r} must be HOST:PORT")
    return host or "127.0.0.1", int(port)
