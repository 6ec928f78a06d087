"""`colonies dev`: a single-node colony in one process, for trying things out.

    colonies dev                 # then, in another shell:
    source .colonies-dev/env
    colonies process run --func echo --args hello --wait

It runs, in one trio loop: a ColonyNode (data in <dir>/node), colony `dev`, an approved
executor `dev-executor` of type `cli` (the default executor type of `colonies process run`),
and an in-process executor serving `echo` (returns its args) and `helloworld`. The first run
creates the dev keys (server owner, colony owner, executor) in <dir>/keys.toml; later runs
reuse them and the node's data, so the colony, executor and processes are still there. The
node listens on a fixed port by default so <dir>/env stays valid across restarts.
Ctrl-C or SIGTERM stops everything and exits 0.

The keys file uses config-file names, so `colonies --config <dir>/keys.toml` works too.

    colonies dev --nodes 3       # a 3-node Raft cluster on 127.0.0.1:50080-50082

With --nodes N (N > 1) the nodes are N `colonyd` processes on 127.0.0.1, ports --port BASE ..
BASE+N-1 (default 50080..), data in <dir>/node1 .. <dir>/nodeN, each with colonyd.pid and
colonyd.log there. The first run starts node1 (it bootstraps the cluster with the dev server
key), then each other node with --join node1 (it asks to be added, with the same key, and is
ready once it has caught up). Later runs start the nodes that have data all at once (they
find each other from their saved members), then join any new ones. The colony, executor and
env file are the same as with one node; the env file's COLONIES_SERVER_ADDR lists every node,
comma-separated, so a client starts from any live one and fails over by itself.

A colonyd that dies is reported with its log; dev mode keeps running while a majority of the
nodes lives, and stops everything and exits 1 once the majority is gone (the cluster cannot
commit anything then). Ctrl-C or SIGTERM stops the executor, then every colonyd (SIGTERM,
then SIGKILL after NODE_STOP_TIMEOUT_S), removes the pid files and exits 0. The colonyd
processes get SIGTERM from the kernel if dev mode itself is killed (Linux); a pid file left
by a crashed run is ignored unless its pid is a live colonyd.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from cli.config import DEFAULT_EXECUTOR_TYPE, ConfigError, parse_key
from protocol.identity import PrivateKey
from protocol.messages import APPROVED

DEFAULT_DIR = ".colonies-dev"
DEFAULT_PORT = 50080
DEFAULT_LISTEN = f"/ip4/127.0.0.1/tcp/{DEFAULT_PORT}"
MAX_NODES = 9
COLONY_NAME = "dev"
EXECUTOR_NAME = "dev-executor"
EXECUTOR_TYPE = DEFAULT_EXECUTOR_TYPE
KEYS_FILE = "keys.toml"
ENV_FILE = "env"
NODE_DIR = "node"
# How long the in-process executor long-polls: the node drains in-flight calls on shutdown,
# so this bounds how long a stop waits for an idle executor.
EXECUTOR_POLL_S = 1
# Cluster mode (--nodes N): files in <dir>/nodeK, and how long each step may take.
PID_FILE = "colonyd.pid"
LOG_FILE = "colonyd.log"
READY_FILE = "colonyd.ready"
NODE_READY_TIMEOUT_S = 90  # a joining node retries asking to be added for up to 60 s
NODE_STOP_TIMEOUT_S = 10  # SIGTERM, then SIGKILL
EXECUTOR_STOP_TIMEOUT_S = 5
WATCH_INTERVAL_S = 0.25

log = logging.getLogger("colonies.dev")


@dataclass(frozen=True)
class DevKeys:
    server: PrivateKey
    colony: PrivateKey
    executor: PrivateKey


def add_parser(groups: argparse._SubParsersAction) -> None:
    p = groups.add_parser(
        "dev",
        help="run a dev colony (one node, or --nodes N) in the foreground",
        description="Run a node, colony 'dev' and an executor serving echo and helloworld, "
        "all in one process; or, with --nodes N, N colonyd processes on 127.0.0.1 forming "
        "a Raft cluster. Writes DIR/env to source in another shell.",
    )
    p.add_argument("--dir", default=DEFAULT_DIR, type=Path, help=f"state dir (default {DEFAULT_DIR})")
    p.add_argument("--listen", default=None, metavar="MULTIADDR",
                   help=f"single node: listen address (default {DEFAULT_LISTEN})")
    p.add_argument("--nodes", type=node_count, default=1, metavar="N",
                   help="run N colonyd processes as one cluster (default 1: a single in-process "
                   "node); dev mode keeps running while a majority of them lives")
    p.add_argument("--port", type=port_number, default=None, metavar="BASE",
                   help=f"listen on 127.0.0.1 port BASE (the nodes: BASE .. BASE+N-1; "
                   f"default {DEFAULT_PORT}); keep it across runs")
    p.add_argument("--log-level", default=os.environ.get("COLONIES_LOG_LEVEL", "warning"))
    p.set_defaults(run_sync=main)


def node_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid node count {text!r}") from None
    if not 1 <= n <= MAX_NODES:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_NODES}, got {n}")
    return n


def port_number(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 1 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"must be 1 to 65535, got {n}")
    return n


# Files.


def _write_private(path: Path, text: str) -> None:
    """Mode 0600 from the first byte, then moved into place (never a readable partial file)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def load_or_create_keys(
    state_dir: Path, node_dirs: list[Path] | None = None
) -> tuple[DevKeys, bool]:
    """The dev keys, and whether they were created now. `node_dirs` (default <dir>/node)
    must not hold node data when the keys are created."""
    path = state_dir / KEYS_FILE
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read {path}: {e}; delete {state_dir} to start over") from None
        try:
            keys = DevKeys(
                server=parse_key(str(data["server_prvkey"]), f"{path} (server_prvkey)"),
                colony=parse_key(str(data["colony_prvkey"]), f"{path} (colony_prvkey)"),
                executor=parse_key(str(data["prvkey"]), f"{path} (prvkey)"),
            )
        except KeyError as e:
            raise ConfigError(f"{path} lacks {e.args[0]!r}; delete {state_dir} to start over") from None
        return keys, False
    for node_dir in node_dirs if node_dirs is not None else [state_dir / NODE_DIR]:
        if node_dir.is_dir() and any(node_dir.iterdir()):
            raise ConfigError(
                f"{path} is missing but {node_dir} holds a node's data (owned by the lost keys); "
                f"delete {state_dir} to start over"
            )
    keys = DevKeys(PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate())
    _write_private(
        path,
        "# colonies dev keys: secret. Usable as a config file (colonies --config ...).\n"
        f'server_prvkey = "{keys.server.hex}"\n'
        f'colony_prvkey = "{keys.colony.hex}"\n'
        f'prvkey = "{keys.executor.hex}"  # executor {EXECUTOR_NAME}\n'
        f'colony_name = "{COLONY_NAME}"\n'
        f'executor_type = "{EXECUTOR_TYPE}"\n'
        f'executor_name = "{EXECUTOR_NAME}"\n',
    )
    return keys, True


def env_lines(addr: str, keys: DevKeys) -> dict[str, str]:
    return {
        "COLONIES_SERVER_ADDR": addr,
        "COLONIES_COLONY_NAME": COLONY_NAME,
        "COLONIES_PRVKEY": keys.executor.hex,
        "COLONIES_COLONY_PRVKEY": keys.colony.hex,
        "COLONIES_SERVER_PRVKEY": keys.server.hex,
        "COLONIES_EXECUTOR_TYPE": EXECUTOR_TYPE,
        "COLONIES_EXECUTOR_NAME": EXECUTOR_NAME,
    }


def write_env_file(path: Path, values: dict[str, str], note: str = "") -> None:
    body = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items())
    _write_private(
        path,
        "# colonies dev environment (holds secret keys): source this file\n" + body
        + (f"# {note}\n" if note else ""),
    )


def dialable(addrs: list[str]) -> str:
    """The address a local client should use: 0.0.0.0 and :: mean 'this host'."""
    for a in addrs:
        if "/ip4/0.0.0.0/" not in a and "/ip6/::/" not in a:
            return a
    a = addrs[0]
    return a.replace("/ip4/0.0.0.0/", "/ip4/127.0.0.1/").replace("/ip6/::/", "/ip6/::1/")


# The dev colony.


def echo(*args: Any, **kwargs: Any) -> list:
    return list(args)


def helloworld(*args: Any, **kwargs: Any) -> str:
    return "Hello, World!"


async def ensure_colony(addr: str | list[str], keys: DevKeys) -> None:
    """Register colony `dev` and approve `dev-executor`, unless an earlier run did."""
    from node.client import Client

    async with Client.connect(addr, keys.server) as c:
        colonies = {col["name"]: col for col in await c.colonies()}
        existing = colonies.get(COLONY_NAME)
        if existing is None:
            await c.add_colony(keys.colony.id, COLONY_NAME)
        elif existing["colonyid"] != keys.colony.id:
            raise ConfigError(
                f"colony {COLONY_NAME} exists with another owner ({existing['colonyid']}); "
                "the dev keys do not match the node's data"
            )
        owner = c.with_key(keys.colony)
        executors = {e["executorname"]: e for e in await owner.executors(COLONY_NAME)}
        ex = executors.get(EXECUTOR_NAME)
        if ex is None:
            await owner.add_executor(keys.executor.id, EXECUTOR_NAME, EXECUTOR_TYPE, COLONY_NAME)
        elif ex["executorid"] != keys.executor.id or ex["executortype"] != EXECUTOR_TYPE:
            raise ConfigError(
                f"executor {EXECUTOR_NAME} exists with another id or type; "
                "the dev keys do not match the node's data"
            )
        if ex is None or ex["state"] != APPROVED:
            await owner.approve_executor(COLONY_NAME, EXECUTOR_NAME)


async def run_dev(state_dir: Path, listen: str) -> None:
    from node.daemon import ColonyNode, NodeConfig
    from node.executor import Executor

    keys, created = load_or_create_keys(state_dir)
    node = ColonyNode(
        NodeConfig(data_dir=state_dir / NODE_DIR, listen=[listen], server_prvkey=keys.server.hex)
    )
    executor: Executor | None = None

    async with trio.open_nursery() as nursery:

        async def run_node(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            # The node handles SIGTERM/SIGINT once it is ready: it drains calls, then returns.
            await node.run(task_status=task_status)
            nursery.cancel_scope.cancel()

        async def abort_on_signal_while_starting() -> None:
            # Before the node takes over the signals (it does once ready), a signal aborts.
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    node.stop()
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(abort_on_signal_while_starting)
        await nursery.start(run_node)
        addr = dialable(node.addrs)
        await ensure_colony(addr, keys)

        executor = Executor(
            addr, keys.executor, colonyname=COLONY_NAME, executortype=EXECUTOR_TYPE,
            poll_timeout=EXECUTOR_POLL_S,
        )
        executor.function(echo)
        executor.function(helloworld)

        async def stop_executor_with_node() -> None:
            # The node drains on a signal; the executor's long-poll must end for it to finish.
            while node.rpc is None or not node.rpc.stopping:
                await trio.sleep(0.05)
            logging.getLogger("colonies.executor").setLevel(logging.ERROR)
            assert executor is not None
            executor.stop()

        nursery.start_soon(executor.run)
        nursery.start_soon(stop_executor_with_node)

        env_path = state_dir / ENV_FILE
        write_env_file(env_path, env_lines(addr, keys))
        print("ready", flush=True)
        print(
            f"colonies dev: node {addr}\n"
            f"  colony {COLONY_NAME}, executor {EXECUTOR_NAME} (type {EXECUTOR_TYPE}) serving "
            f"echo, helloworld; {'new' if created else 'existing'} keys in "
            f"{state_dir / KEYS_FILE}\n"
            "  in another shell:\n"
            f"    source {shlex.quote(str(env_path))}\n"
            "    colonies process run --func echo --args hello --wait\n"
            "  Ctrl-C stops.",
            flush=True,
        )


# Cluster mode: N colonyd processes.


@dataclass
class ClusterNode:
    index: int
    dir: Path
    port: int
    proc: subprocess.Popen | None = None
    addr: str | None = None
    reported: bool = False  # its unexpected exit was reported

    @property
    def name(self) -> str:
        return f"node{self.index}"

    @property
    def pid_file(self) -> Path:
        return self.dir / PID_FILE

    @property
    def log_file(self) -> Path:
        return self.dir / LOG_FILE

    @property
    def ready_file(self) -> Path:
        return self.dir / READY_FILE

    @property
    def listen(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.port}"

    def has_state(self) -> bool:
        from consensus.raft import DUMP_FILE, JOURNAL_FILE

        return any((self.dir / f).exists() for f in (JOURNAL_FILE, DUMP_FILE))

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def cluster_nodes(state_dir: Path, count: int, base_port: int) -> list[ClusterNode]:
    root = state_dir.resolve()  # the children get absolute paths
    return [ClusterNode(i, root / f"node{i}", base_port + i - 1) for i in range(1, count + 1)]


def is_live_colonyd(pid: int) -> bool:
    """Whether `pid` is a running colonyd (a pid file's pid may have been reused since)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, someone else's
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # gone now; or no /proc: assume the worst
    except OSError:
        return True
    return b"cli.daemon" in cmdline or b"colonyd" in cmdline


def clear_stale_pid_file(node: ClusterNode, state_dir: Path) -> None:
    try:
        text = node.pid_file.read_text().strip()
    except FileNotFoundError:
        return
    if text.isdigit() and is_live_colonyd(int(text)):
        raise ConfigError(
            f"{node.name} already runs as colonyd pid {text} ({node.pid_file}): another "
            f"`colonies dev` uses {state_dir}; stop it first"
        )
    node.pid_file.unlink(missing_ok=True)  # left by a run that crashed


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def check_port_free(node: ClusterNode, count: int, patience_s: float = 2.0) -> None:
    """The plain bind colonyd does (SO_REUSEADDR, no SO_REUSEPORT). The default ports lie in
    Linux's ephemeral range, so a short-lived outgoing connection may hold one for a moment:
    that is waited out briefly, a listener is not."""
    deadline = time.monotonic() + patience_s
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", node.port))
                return
            except OSError as e:
                error = e.strerror
        if _listening(node.port) or time.monotonic() > deadline:
            raise ConfigError(
                f"port {node.port} on 127.0.0.1 (for {node.name}) is in use ({error}); "
                f"choose other ports with --port BASE (uses BASE..BASE+{count - 1})"
            )
        time.sleep(0.2)


def check_same_port(node: ClusterNode, state_dir: Path) -> None:
    """The members dial the addresses they know: a node must come back on its old port."""
    from node.datadir import ADDR_FILE

    try:
        text = (node.dir / ADDR_FILE).read_text()
    except OSError:
        return
    m = re.search(r"/tcp/(\d+)/", text)
    if m and int(m.group(1)) != node.port:
        old_base = int(m.group(1)) - (node.index - 1)
        raise ConfigError(
            f"{node.name} listened on port {m.group(1)} before (the other members dial that "
            f"address): rerun with --port {old_base}, or delete {state_dir} to start over"
        )


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when dev mode dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def set_signal() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))
        if os.getppid() != parent:  # the parent died before the prctl
            os.kill(os.getpid(), signal.SIGTERM)

    return set_signal


def child_env(keys: DevKeys) -> dict[str, str]:
    env = dict(os.environ)
    env["COLONIES_SERVER_PRVKEY"] = keys.server.hex
    env.pop("COLONIES_METRICS_ADDR", None)  # N nodes cannot share one metrics port
    # `python -m cli.daemon` must find this package whatever the working directory.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def spawn_node(node: ClusterNode, env: dict[str, str], join: str | None) -> None:
    try:
        node.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create {node.dir}: {e.strerror}") from None
    node.ready_file.unlink(missing_ok=True)
    argv = [
        sys.executable, "-m", "cli.daemon", "--data-dir", str(node.dir),
        "--listen", node.listen, "--ready-file", str(node.ready_file), "--log-level", "info",
    ]
    if join is not None:
        argv += ["--join", join]
    with open(node.log_file, "a") as log_file:
        log_file.write(
            f"--- colonies dev: {node.name} starting {time.strftime('%Y-%m-%d %H:%M:%S')}"
            f"{' (joining ' + join + ')' if join else ''} ---\n"
        )
        log_file.flush()
        # Its own session: a Ctrl-C in the terminal reaches dev mode only, which stops the
        # nodes in order. Popen runs in this (the main) thread, which the death signal needs.
        node.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            env=env, start_new_session=True, preexec_fn=_die_with_parent(),
        )
    node.pid_file.write_text(f"{node.proc.pid}\n")


def exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def last_log_line(node: ClusterNode) -> str:
    try:
        with open(node.log_file, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln]
    return lines[-1][:300] if lines else ""


async def wait_node_ready(node: ClusterNode) -> None:
    assert node.proc is not None
    deadline = time.monotonic() + NODE_READY_TIMEOUT_S
    while True:
        code = node.proc.poll()
        if code is not None:
            node.reported = True
            last = last_log_line(node)
            raise ConfigError(
                f"{node.name} (colonyd) stopped before it was ready ({exit_text(code)})"
                f"{': ' + last if last else ''}; its log: {node.log_file}"
            )
        try:
            text = node.ready_file.read_text()
        except FileNotFoundError:
            text = ""
        addrs = [a for a in text.split() if "/p2p/" in a]
        if text.endswith("\n") and addrs:
            node.addr = dialable(addrs)
            return
        if time.monotonic() > deadline:
            raise ConfigError(
                f"{node.name} (colonyd) not ready within {NODE_READY_TIMEOUT_S} s; "
                f"its log: {node.log_file}"
            )
        await trio.sleep(0.1)


async def start_cluster(nodes: list[ClusterNode], env: dict[str, str], state_dir: Path) -> None:
    """Nodes with data start together (each waits for a leader, so none is ready alone);
    then the new ones join node1, one at a time."""
    with_state = [n for n in nodes if n.has_state()]
    if with_state and nodes[0] not in with_state:
        raise ConfigError(
            f"{nodes[0].dir} has no cluster data but {with_state[0].dir} has; "
            f"delete {state_dir} to start over"
        )
    first = with_state or [nodes[0]]
    print(
        f"colonies dev: starting {len(nodes)} colonyd nodes on 127.0.0.1 ports "
        f"{nodes[0].port}-{nodes[-1].port}",
        file=sys.stderr, flush=True,
    )
    for n in first:
        spawn_node(n, env, join=None)
    for n in first:
        await wait_node_ready(n)
        print(f"colonies dev: {n.name} ready", file=sys.stderr, flush=True)
    join = nodes[0].addr
    for n in nodes:
        if n.proc is None:
            spawn_node(n, env, join=join)
            await wait_node_ready(n)
            print(f"colonies dev: {n.name} joined", file=sys.stderr, flush=True)


async def stop_nodes(nodes: list[ClusterNode]) -> None:
    """SIGTERM, a bounded wait, then SIGKILL; every child reaped, pid files removed."""
    for n in nodes:
        if n.running():
            assert n.proc is not None
            try:
                n.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + NODE_STOP_TIMEOUT_S
    while any(n.running() for n in nodes) and time.monotonic() < deadline:
        await trio.sleep(0.05)
    for n in nodes:
        if n.proc is None:
            continue
        if n.running():
            print(
                f"colonies dev: {n.name} did not stop within {NODE_STOP_TIMEOUT_S} s; killing it",
                file=sys.stderr, flush=True,
            )
            n.proc.kill()
        n.proc.wait()
        n.pid_file.unlink(missing_ok=True)
        n.ready_file.unlink(missing_ok=True)


async def watch_nodes(
    nodes: list[ClusterNode],
    on_exit: Callable[[list[ClusterNode]], None] = lambda alive: None,
) -> None:
    """Reports each colonyd that exits (and calls `on_exit` with the live ones); returns when
    fewer than a majority live."""
    majority = len(nodes) // 2 + 1
    while True:
        exited = [n for n in nodes if not n.reported and n.proc is not None
                  and n.proc.poll() is not None]
        for n in exited:
            assert n.proc is not None
            n.reported = True
            n.pid_file.unlink(missing_ok=True)
            print(
                f"colonies dev: {n.name} (colonyd pid {n.proc.pid}) exited unexpectedly "
                f"({exit_text(n.proc.returncode)}); its log: {n.log_file}",
                file=sys.stderr, flush=True,
            )
        if exited:
            alive = [m for m in nodes if m.running()]
            on_exit(alive)
            if len(alive) < majority:
                print(
                    f"colonies dev: only {len(alive)} of {len(nodes)} nodes run, fewer than "
                    f"the {majority} the cluster needs; stopping",
                    file=sys.stderr, flush=True,
                )
                return
            print(
                f"colonies dev: {len(alive)} of {len(nodes)} nodes still run; the cluster "
                "keeps working",
                file=sys.stderr, flush=True,
            )
        await trio.sleep(WATCH_INTERVAL_S)


async def run_cluster(state_dir: Path, count: int, base_port: int) -> int:
    """Runs until a signal (returns 0) or until the cluster loses its majority (returns 1)."""
    from node.executor import Executor

    nodes = cluster_nodes(state_dir, count, base_port)
    extra = [
        p for p in sorted(state_dir.glob("node[0-9]*"))
        if p.name[4:].isdigit() and int(p.name[4:]) > count
        and ClusterNode(int(p.name[4:]), p.resolve(), 0).has_state()
    ]
    if extra:
        raise ConfigError(
            f"{extra[-1]} holds a member of a larger dev cluster: rerun with "
            f"--nodes {extra[-1].name[4:]}, or delete {state_dir} to start over"
        )
    keys, created = load_or_create_keys(state_dir, [n.dir for n in nodes])
    for n in nodes:
        clear_stale_pid_file(n, state_dir)
    for n in nodes:
        check_same_port(n, state_dir)
        check_port_free(n, count)
    env = child_env(keys)
    lost_majority = False
    ready = False
    stop_requested = trio.Event()
    executor: Executor | None = None
    executor_done = trio.Event()
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:

                async def on_signal() -> None:
                    async for _ in signals:
                        if ready:
                            stop_requested.set()  # the executor first, then the nodes
                        else:
                            nursery.cancel_scope.cancel()
                        return

                def use_live_nodes(alive: list[ClusterNode]) -> None:
                    # The executor reconnects to these: no time lost dialling dead nodes.
                    if executor is not None:
                        executor.addr = [n.addr for n in alive if n.addr is not None]

                async def watch() -> None:
                    nonlocal lost_majority
                    await watch_nodes(nodes, use_live_nodes)
                    lost_majority = True
                    stop_requested.set()

                nursery.start_soon(on_signal)
                await start_cluster(nodes, env, state_dir)
                nursery.start_soon(watch)
                addrs = [n.addr for n in nodes if n.addr is not None]
                live = [n.addr for n in nodes if n.addr is not None and n.running()]
                await ensure_colony(live, keys)

                executor = Executor(
                    live, keys.executor, colonyname=COLONY_NAME, executortype=EXECUTOR_TYPE,
                    poll_timeout=EXECUTOR_POLL_S,
                )
                executor.function(echo)
                executor.function(helloworld)

                async def run_executor() -> None:
                    assert executor is not None
                    try:
                        await executor.run()
                    finally:
                        executor_done.set()

                nursery.start_soon(run_executor)
                env_path = state_dir / ENV_FILE
                write_env_file(env_path, env_lines(",".join(addrs), keys))
                ready = True
                print("ready", flush=True)
                node_lines = "".join(
                    f"    {n.name} {n.addr}\n      pid file {n.pid_file}, log {n.log_file}\n"
                    for n in nodes
                )
                last = nodes[-1]
                print(
                    f"colonies dev: {count}-node cluster on 127.0.0.1\n{node_lines}"
                    f"  colony {COLONY_NAME}, executor {EXECUTOR_NAME} (type {EXECUTOR_TYPE}) "
                    f"serving echo, helloworld; {'new' if created else 'existing'} keys in "
                    f"{state_dir / KEYS_FILE}\n"
                    "  in another shell:\n"
                    f"    source {shlex.quote(str(env_path))}   # COLONIES_SERVER_ADDR lists all nodes\n"
                    "    colonies process run --func echo --args hello --wait\n"
                    "    colonies status                 # the Raft members and leader\n"
                    f"  It keeps working while {count // 2 + 1} of {count} nodes run; try\n"
                    f"    kill -9 $(cat {shlex.quote(str(last.pid_file))})\n"
                    "  Ctrl-C stops all.",
                    flush=True,
                )
                await stop_requested.wait()
                logging.getLogger("colonies.executor").setLevel(logging.ERROR)
                executor.stop()
                with trio.move_on_after(EXECUTOR_STOP_TIMEOUT_S):
                    await executor_done.wait()
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await stop_nodes(nodes)
    return 1 if lost_majority else 0


def main(args: argparse.Namespace) -> int:
    from cli.logs import setup_logging

    nodes: int = getattr(args, "nodes", 1)
    port: int | None = getattr(args, "port", None)
    if nodes == 1:
        if args.listen and port is not None:
            raise ConfigError("use --listen or --port, not both")
        listen = args.listen or (f"/ip4/127.0.0.1/tcp/{port}" if port else DEFAULT_LISTEN)
    else:
        if args.listen:
            raise ConfigError(
                "--listen is for a single node; a --nodes cluster listens on 127.0.0.1, "
                "ports from --port"
            )
        port = DEFAULT_PORT if port is None else port
        if port + nodes - 1 > 65535:
            raise ConfigError(f"--port {port} leaves no room for {nodes} nodes (up to 65535)")
    setup_logging(args.log_level)
    state_dir: Path = args.dir
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create {state_dir}: {e.strerror}") from None
    if nodes == 1:
        trio.run(run_dev, state_dir, listen)
        print("colonies dev: stopped", file=sys.stderr, flush=True)
        return 0
    assert port is not None
    code = trio.run(run_cluster, state_dir, nodes, port)
    print("colonies dev: stopped", file=sys.stderr, flush=True)
    return code
