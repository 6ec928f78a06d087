"""`colonies dev --nodes N`: N `colonyd` processes on 127.0.0.1 forming one cluster, with the
dev colony, executor and env file of single-node dev mode (cli/dev.py explains the whole
behaviour)."""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from cli.config import ConfigError
from cli.dev import (
    COLONY_NAME,
    ENV_FILE,
    EXECUTOR_NAME,
    EXECUTOR_POLL_S,
    EXECUTOR_TYPE,
    KEYS_FILE,
    DevKeys,
    dialable,
    echo,
    ensure_colony,
    env_lines,
    helloworld,
    load_or_create_keys,
    write_env_file,
)

PID_FILE = "colonyd.pid"
LOG_FILE = "colonyd.log"
READY_FILE = "colonyd.ready"
NODE_READY_TIMEOUT_S = 90  # a joining node retries asking to be added for up to 60 s
NODE_STOP_TIMEOUT_S = 10  # SIGTERM, then SIGKILL
EXECUTOR_STOP_TIMEOUT_S = 5
WATCH_INTERVAL_S = 0.25


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
        from node.raft_replica import DUMP_FILE, JOURNAL_FILE

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


