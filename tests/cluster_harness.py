"""Real `colonyd` processes on 127.0.0.1 for cluster integration tests.

    with LocalCluster(tmp_path, server_key) as cluster:
        cluster.start(3)                              # bootstrap n1, join n2 and n3
        leader = await cluster.wait_leader()
        cluster.kill(leader)                          # SIGKILL
        cluster.restart(leader); await cluster.wait_ready(leader)

Every node listens on a fixed free port (found by binding port 0), so a restarted node keeps
its address and its peer id (the node key lives in its data dir). Each node's stderr goes to
`<workdir>/<name>.stderr` (appended across restarts, with a marker line per start); when the
`with` block fails, the end of every node's log is printed, which pytest shows with the
failure. Every wait is bounded and says what it waited for when it gives up.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio

from node.client import Client
from protocol.errors import ColoniesError
from protocol.identity import PrivateKey

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
INFO_TIMEOUT_S = 2.0

T = TypeVar("T")

# libp2p sets this logger to INFO at import; its per-second lines from the test's own client
# hosts would bury a failure's report.
logging.getLogger("libp2p.network.auto_connector").setLevel(logging.WARNING)


def vector_key(role: str) -> PrivateKey:
    vectors = json.loads((DATA / "identity.json").read_text())
    for ident in vectors["identities"]:
        if ident.get("role_in_upstream_dev_setup") == role:
            return PrivateKey.from_hex(ident["prvkey"])
    raise KeyError(role)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ClusterError(AssertionError):
    """A bounded wait gave up, or a node misbehaved (an AssertionError, so pytest shows it
    as a test failure with its message)."""


class NodeProc:
    """One `colonyd` with its own data dir and fixed port; start, kill, stop, restart."""

    def __init__(
        self, workdir: Path, name: str, env: dict[str, str], args: list[str] | None = None
    ) -> None:
        self.name = name
        self.args = list(args or [])  # more colonyd options, on every start
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.dir / "data"
        self.ready_file = self.dir / "ready"
        self.log_path = workdir / f"{name}.stderr"
        self.port = free_port()
        self.listen = f"/ip4/127.0.0.1/tcp/{self.port}"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.addr = ""  # the full multiaddr (with /p2p/<peer id>), known once ready
        self.starts = 0

    @property
    def peer_id(self) -> str:
        return self.addr.rsplit("/p2p/", 1)[1] if self.addr else ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, join: str | None = None) -> None:
        if self.running:
            raise ClusterError(f"{self.name} is already running")
        self.ready_file.unlink(missing_ok=True)
        self.starts += 1
        argv = [
            sys.executable, "-m", "cli.daemon",
            "--data-dir", str(self.data_dir),
            "--listen", self.listen,
            "--ready-file", str(self.ready_file),
            "--log-level", "info",
            *self.args,
        ]
        if join:
            argv += ["--join", join]
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start #{self.starts}: {' '.join(argv[3:])}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
            )

    async def wait_ready(self, timeout: float = START_TIMEOUT_S) -> str:
        """The node's full address once its ready file is written (it has caught up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise ClusterError(f"{self.name} exited with {code} before it was ready:\n"
                                   f"{self.tail()}")
            try:
                text = self.ready_file.read_text()
            except FileNotFoundError:
                text = ""
            if text.endswith("\n"):
                self.addr = text.splitlines()[0].strip()
                return self.addr
            await trio.sleep(0.05)
        raise ClusterError(f"{self.name} not ready within {timeout:g} s:\n{self.tail()}")

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, a bounded wait, then SIGKILL. Safe to call twice; returns the exit code."""
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGCONT)  # in case a test paused it
                p.send_signal(signal.SIGTERM)
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            except ProcessLookupError:
                pass
        return p.returncode

    async def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                return self.proc.returncode
            await trio.sleep(0.05)
        raise ClusterError(f"{self.name} still running after {timeout:g} s:\n{self.tail()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, n: int = 25) -> str:
        lines = self.log_text().splitlines()
        return "\n".join(f"  [{self.name}] {line}" for line in lines[-n:])


class LocalCluster:
    """Nodes n1..nN sharing one server owner key (given to each in the environment)."""

    def __init__(
        self, workdir: Path, server: PrivateKey, args: list[str] | None = None
    ) -> None:
        self.workdir = workdir
        self.server = server
        self.args = args  # more colonyd options for every node
        self.env = dict(os.environ)
        self.env["COLONIES_SERVER_PRVKEY"] = server.hex
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.nodes: list[NodeProc] = []

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        for n in self.nodes:  # all at once: each drains for up to a few seconds
            n.signal(signal.SIGCONT)
            n.signal(signal.SIGTERM)
        codes = {n.name: n.stop() for n in self.nodes}
        if exc_type is not None:
            print(f"\n----- cluster logs (exit codes {codes}) -----")
            self.show_logs()

    def show_logs(self, lines: int = 40) -> None:
        """The end of every node's stderr, on stdout (pytest shows it with a failure)."""
        for n in self.nodes:
            state = "running" if n.running else f"exited {n.proc.returncode if n.proc else None}"
            print(f"--- {n.name} ({state}) {n.addr}")
            print(n.tail(lines))

    @contextmanager
    def logs_on_failure(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self.show_logs()
            raise

    # --- processes ----------------------------------------------------------------------------

    def add_node(self) -> NodeProc:
        node = NodeProc(self.workdir, f"n{len(self.nodes) + 1}", self.env, self.args)
        self.nodes.append(node)
        return node

    async def start(self, n: int) -> list[NodeProc]:
        """Bootstrap the first node, then join the others to it (all started together)."""
        first = self.add_node()
        first.start()
        await first.wait_ready()
        others = [self.add_node() for _ in range(n - 1)]
        for node in others:
            node.start(join=first.addr)
        for node in others:
            await node.wait_ready()
        return self.nodes

    @property
    def running(self) -> list[NodeProc]:
        return [n for n in self.nodes if n.running]

    def by_peer(self, peer_id: str) -> NodeProc:
        for n in self.nodes:
            if n.peer_id == peer_id:
                return n
        raise ClusterError(f"no node has peer id {peer_id}")

    def addrs(self, nodes: list[NodeProc] | None = None) -> list[str]:
        return [n.addr for n in (nodes if nodes is not None else self.running)]

    @asynccontextmanager
    async def client_on(
        self, node: NodeProc, key: PrivateKey | None = None
    ) -> AsyncIterator[Client]:
        """A client of exactly this node (reads then show its own replica)."""
        async with Client.connect(node.addr, key or self.server, timeout=5) as c:
            if c.addr != node.addr:
                raise ClusterError(f"wanted a connection to {node.name}, got {c.addr}")
            yield c

    # --- what the nodes say -------------------------------------------------------------------

    async def info(self, node: NodeProc) -> dict[str, Any] | None:
        """The node's own server info (None if it does not answer quickly)."""
        with trio.move_on_after(INFO_TIMEOUT_S):
            try:
                async with Client.connect(node.addr, self.server, timeout=INFO_TIMEOUT_S) as c:
                    if c.addr != node.addr:
                        return None
                    return await c.server_info_fresh()
            except (ColoniesError, OSError):
                return None
        return None

    async def wait_leader(
        self, among: list[NodeProc] | None = None, timeout: float = 15.0
    ) -> NodeProc:
        """The node that every node in `among` (default: the running ones) names as leader,
        and that says it is leader with a quorum."""
        async def agreed() -> NodeProc | None:
            nodes = among if among is not None else self.running
            infos = [await self.info(n) for n in nodes]
            if any(i is None for i in infos):
                return None
            leaders = {i["raft"]["leader"] for i in infos}
            if len(leaders) != 1 or None in leaders:
                return None
            leader = self.by_peer(leaders.pop())
            if not leader.running:
                return None
            info = await self.info(leader)
            if info is None or info["raft"]["state"] != "leader" or not info["raft"]["has_quorum"]:
                return None
            return leader

        return await wait_for(agreed, timeout, "the running nodes to agree on a leader")

    async def wait_caught_up(self, nodes: list[NodeProc] | None = None, timeout: float = 15.0) -> None:
        """Every node in `nodes` (default: running) has applied what the leader had committed."""
        leader = await self.wait_leader(timeout=timeout)
        target = (await self.info(leader) or {}).get("raft", {}).get("commit_index", 1 << 62)

        async def applied() -> bool | None:
            for n in nodes if nodes is not None else self.running:
                info = await self.info(n)
                if info is None or info["raft"]["last_applied"] < target:
                    return None
            return True

        await wait_for(applied, timeout, f"every node to apply up to index {target}")


async def wait_for(check: Callable[[], Awaitable[T | None]], timeout: float, what: str,
                   every: float = 0.1) -> T:
    """Polls `check` until it returns something other than None/False; bounded."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = await check()
        except (ColoniesError, OSError) as e:
            value, last_error = None, e
        if value is not None and value is not False:
            return value
        if time.monotonic() >= deadline:
            extra = f" (last error: {type(last_error).__name__}: {last_error})" if last_error else ""
            raise ClusterError(f"timed out after {timeout:g} s waiting for {what}{extra}")
        await trio.sleep(every)


@dataclass
class ClusterColony:
    """A colony with one approved executor, its keys fresh (so tests do not share queues)."""

    name: str
    owner: PrivateKey
    executor: PrivateKey
    executortype: str = "cluster-test"
    executorname: str = "worker"


async def add_test_colony(admin: Client, name: str) -> ClusterColony:
    """Creates the colony and its executor through `admin` (a server-owner client)."""
    c = ClusterColony(name, PrivateKey.generate(), PrivateKey.generate())
    await admin.add_colony(c.owner.id, name)
    owner = admin.with_key(c.owner)
    await owner.add_executor(c.executor.id, c.executorname, c.executortype, name)
    await owner.approve_executor(name, c.executorname)
    return c


async def submit(client: Client, colony: ClusterColony, i: int, executortype: str = "") -> str:
    """Submits a small process through `client` (any key allowed to submit); its id."""
    p = await client.submit(
        "echo", colonyname=colony.name, executortype=executortype or colony.executortype,
        args=[i],
    )
    return p["processid"]
