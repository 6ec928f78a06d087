"""`colonies dev --nodes 3`: three colonyd processes on 127.0.0.1, driven by the real CLI.

One test walks the story: start, echo, a second dev refused, kill -9 a follower, echo again,
SIGTERM (every colonyd gone, pid files removed), a rerun on the same data (with a stale pid
file), echo again, kill -9 node1 and echo through another node. Every wait is bounded; every process is stopped in `finally`.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.dev_process import DevProcess, base_env, colonies, read_env_file

READY_TIMEOUT_S = 45
STOP_TIMEOUT_S = 25  # the executor (5 s at most), then the nodes (10 s at most)
NODES = 3


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_base_port(count: int = NODES) -> int:
    for _ in range(200):
        base = random.randint(20000, 60000)
        if all(port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no free consecutive ports")


def alive(pid: int) -> bool:
    """Running (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def start_dev(state_dir: Path, port: int, env: dict[str, str]) -> DevProcess:
    """`colonies dev --nodes 3` on ports port..port+2."""
    return DevProcess(
        state_dir, env, ["--nodes", str(NODES), "--port", str(port)],
        ready_timeout=READY_TIMEOUT_S, stop_timeout=STOP_TIMEOUT_S,
    )


def echo(env: dict[str, str], word: str) -> None:
    r = colonies(env, "process", "run", "--func", "echo", "--args", word, "--wait")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{word}\n"


def pid_files(state_dir: Path) -> list[Path]:
    return [state_dir / f"node{i}" / "colonyd.pid" for i in range(1, NODES + 1)]


def read_pids(state_dir: Path) -> list[int]:
    return [int(p.read_text()) for p in pid_files(state_dir)]


def test_dev_cluster_end_to_end(tmp_path):
    state_dir = tmp_path / "dev"
    base = base_env(tmp_path / "home")
    port = free_base_port()
    devs: list[DevProcess] = []
    seen_pids: set[int] = set()
    try:
        dev = start_dev(state_dir, port, base)
        devs.append(dev)
        dev.wait_ready()
        wait_until(lambda: "Ctrl-C stops all." in "".join(dev.stdout), 5, "the how-to")
        out = "".join(dev.stdout)
        assert "3-node cluster" in out and all(f"node{i} " in out for i in (1, 2, 3))
        pids = read_pids(state_dir)
        seen_pids.update(pids)
        assert len(set(pids)) == NODES and all(alive(p) for p in pids)
        for i in range(NODES):
            assert (state_dir / f"node{i + 1}" / "colonyd.log").exists()
        values = read_env_file(state_dir / "env")
        assert values["COLONIES_SERVER_ADDR"].startswith(f"/ip4/127.0.0.1/tcp/{port}/p2p/")
        assert values["COLONIES_COLONY_NAME"] == "dev"
        env = {**base, **values}
        echo(env, "hello")

        # A second dev on the same dir is refused on one line: its nodes are running.
        r = colonies(base, "dev", "--nodes", "3", "--port", str(port), "--dir", str(state_dir))
        assert r.returncode == 2
        assert r.stderr.count("\n") == 1 and "already runs as colonyd pid" in r.stderr

        # kill -9 a follower: dev says so and keeps running; the cluster still works.
        victim = pids[2]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: "node3 (colonyd pid" in dev.err(), 10, "dev to report node3")
        assert "exited unexpectedly (killed by SIGKILL)" in dev.err()
        assert "node3/colonyd.log" in dev.err()
        assert dev.proc.poll() is None
        echo(env, "still")

        # SIGTERM: every colonyd gone, pid files removed, exit 0.
        assert dev.terminate() == 0, dev.err()
        assert "Traceback" not in dev.err()
        assert not any(alive(p) for p in pids)
        assert not any(p.exists() for p in pid_files(state_dir))

        # Rerun on the same data, with a stale pid file from a "crashed" run (a dead pid).
        dead = subprocess.Popen(["true"])
        dead.wait(timeout=10)
        (state_dir / "node2" / "colonyd.pid").write_text(f"{dead.pid}\n")
        dev = start_dev(state_dir, port, base)
        devs.append(dev)
        dev.wait_ready()
        wait_until(lambda: "existing keys" in "".join(dev.stdout), 5, "the how-to")
        pids = read_pids(state_dir)
        seen_pids.update(pids)
        assert read_env_file(state_dir / "env") == values  # same node1 address and keys
        echo(env, "again")

        # kill -9 node1 (the env's first address, maybe the leader): a new CLI process with
        # the same env starts from the next node, and the executor moves off node1 by itself.
        assert len(values["COLONIES_SERVER_ADDR"].split(",")) == NODES
        os.kill(pids[0], signal.SIGKILL)
        wait_until(lambda: "node1" in dev.err() and "exited" in dev.err(), 10, "the report")
        echo(env, "failover")
        assert dev.terminate() == 0, dev.err()
        assert not any(alive(p) for p in pids)
        assert not any(p.exists() for p in pid_files(state_dir))
    finally:
        for d in devs:
            d.kill()
        for pid in seen_pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_dev_cluster_port_in_use_is_one_line(tmp_path):
    port = free_base_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", port + 1))
        busy.listen()
        r = colonies(base_env(tmp_path / "home"), "dev", "--nodes", "3", "--port", str(port),
                     "--dir", str(tmp_path / "dev"))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1, r.stderr
    assert f"port {port + 1} on 127.0.0.1 (for node2) is in use" in r.stderr
    assert not (tmp_path / "dev" / "node1" / "colonyd.pid").exists()


def test_dev_cluster_rejects_listen(tmp_path):
    r = colonies(base_env(tmp_path / "home"), "dev", "--nodes", "3", "--listen",
                 "/ip4/127.0.0.1/tcp/0", "--dir", str(tmp_path / "dev"))
    assert r.returncode == 2
    assert "--listen is for a single node" in r.stderr
