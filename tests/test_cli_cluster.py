"""`colonies cluster` and `colonies status` against a real three-node cluster.

The three `ColonyNode`s run in the test's trio loop (Raft over libp2p on 127.0.0.1); the CLI's
`main` runs in a worker thread with its own trio loop, as a user's command would, and
`status --watch` runs as a subprocess so that Ctrl-C is a real SIGINT. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from cli.main import main
from node.client import Client
from node.daemon import ColonyNode, NodeConfig
from protocol.identity import PrivateKey
from tests.conftest import vector_key

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_TIMEOUT_S = 30.0
CLI_TIMEOUT_S = 20.0
REMOVE_TIMEOUT_S = 15.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Member:
    node: ColonyNode
    stopped: trio.Event = field(default_factory=trio.Event)

    @property
    def addr(self) -> str:
        return self.node.announce

    @property
    def peer_id(self) -> str:
        return self.node.peer_id


@dataclass
class Cluster:
    members: list[Member]
    server: PrivateKey

    def leader(self) -> Member:
        leaders = [m for m in self.members if not m.stopped.is_set()
                   and m.node.raft_status()["state"] == "leader"]
        assert len(leaders) == 1, [m.node.raft_status()["state"] for m in self.members]
        return leaders[0]

    def followers(self) -> list[Member]:
        lead = self.leader()
        return [m for m in self.members if m is not lead and not m.stopped.is_set()]


async def _run_member(member: Member, task_status: trio.TaskStatus[None]) -> None:
    try:
        await member.node.run(task_status=task_status)
    finally:
        member.stopped.set()


async def _wait_formed(members: list[Member], timeout: float) -> None:
    """Until every node has the full member book and the leader has all in its Raft group."""
    want = {m.peer_id for m in members}
    with trio.fail_after(timeout):
        while True:
            statuses = [m.node.raft_status() for m in members]
            books = [set(m.node.replicator.machine.members) for m in members]
            leaders = [s for s in statuses if s["state"] == "leader"]
            if (
                all(b == want for b in books)
                and len(leaders) == 1
                and set(leaders[0]["members"]) == want
                and all(s["leader"] == leaders[0]["self"] for s in statuses)
                and all(s["last_applied"] >= leaders[0]["commit_index"] - 1 for s in statuses)
            ):
                return
            await trio.sleep(0.05)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    server = vector_key("server")

    def make(name: str, join: list[str]) -> Member:
        config = NodeConfig(
            data_dir=tmp_path / name,
            listen=[f"/ip4/127.0.0.1/tcp/{free_port()}"],
            server_prvkey=server.hex,
            join=join,
        )
        return Member(ColonyNode(config))

    async with trio.open_nursery() as nursery:
        with trio.fail_after(CLUSTER_TIMEOUT_S):
            first = make("n1", [])
            await nursery.start(_run_member, first)
            members = [first]
            for name in ("n2", "n3"):
                m = make(name, [first.addr])
                await nursery.start(_run_member, m)
                members.append(m)
        await _wait_formed(members, CLUSTER_TIMEOUT_S)
        yield Cluster(members, server)
        for m in members:
            m.node.stop()


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("COLONIES_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


async def colonies(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`colonies ARGV` in a worker thread (its own trio loop); (exit status, stdout, stderr)."""
    capsys.readouterr()
    run: Callable[[], int] = lambda: main(list(argv))  # noqa: E731
    with trio.fail_after(CLI_TIMEOUT_S):
        code = await trio.to_thread.run_sync(run, abandon_on_cancel=True)
    out, err = capsys.readouterr()
    return code, out, err


def as_json(out: str) -> Any:  # noqa: ANN401
    return json.loads(out)


async def test_cluster_ls_status_remove_and_no_leader(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], clean_env: None
) -> None:
    leader = cluster.leader()
    follower, other = cluster.followers()
    seed = follower.addr  # any member will do: the view is the whole cluster's
    server = ["--server-prvkey", cluster.server.hex]

    # cluster ls: three members, all reachable, exactly one leader.
    code, out, err = await colonies(capsys, "cluster", "ls", "--addr", seed, "-o", "json")
    assert code == 0, err
    listing = as_json(out)
    rows = listing["members"]
    assert {r["peerid"] for r in rows} == {m.peer_id for m in cluster.members}
    assert all(r["reachable"] and r["raft"] == "voter" for r in rows)
    assert [r["role"] for r in rows].count("leader") == 1
    assert listing["leader"] == leader.peer_id
    assert len({r["term"] for r in rows}) == 1
    code, out, err = await colonies(capsys, "cluster", "ls", "--addr", seed)
    assert code == 0, err
    assert all(m.peer_id in out for m in cluster.members) and "leader" in out

    # status: every node's view, the leader's commit index, no lag to speak of.
    code, out, err = await colonies(capsys, "status", "--addr", seed, *server, "-o", "json")
    assert code == 0, err
    status = as_json(out)
    assert status["leader"] == leader.peer_id and status["reachable"] == status["members"] == 3
    nodes = {n["peerid"]: n for n in status["nodes"]}
    assert set(nodes) == {m.peer_id for m in cluster.members}
    assert nodes[leader.peer_id]["role"] == "leader"
    assert {nodes[m.peer_id]["role"] for m in (follower, other)} == {"follower"}
    for n in nodes.values():
        assert isinstance(n["commit_index"], int) and isinstance(n["applied_index"], int)
        assert isinstance(n["lag"], int) and n["lag"] >= 0
        assert isinstance(n["queued"], int) and isinstance(n["in_flight"], int)
    assert nodes[leader.peer_id]["leader_contact_s"] is None
    assert isinstance(nodes[follower.peer_id]["leader_contact_s"], float)
    assert status["statistics"]["colonies"] == 0  # the server key sees the server's counts
    code, out, err = await colonies(capsys, "status", "--addr", seed)
    assert code == 0, err
    assert "Nodes" in out and "leader" in out and leader.peer_id[-10:] in out

    # Flags are spelled out: no prefix matching.
    code, _, err = await colonies(capsys, "status", "--addr", seed, "--server", cluster.server.hex)
    assert code == 2 and "--server" in err

    # Removing a live follower: it leaves the book and the group, and stops serving.
    code, out, err = await colonies(
        capsys, "cluster", "remove", follower.peer_id, "--addr", leader.addr, *server, "-o", "json"
    )
    assert code == 0, err
    assert follower.peer_id not in as_json(out)["members"]
    with trio.fail_after(REMOVE_TIMEOUT_S):
        await follower.stopped.wait()  # its run() returned
    code, out, err = await colonies(capsys, "cluster", "ls", "--addr", leader.addr, "-o", "json")
    assert code == 0, err
    assert {r["peerid"] for r in as_json(out)["members"]} == {leader.peer_id, other.peer_id}

    # Pointed at the node that is gone: nothing reachable reports a leader (exit 3).
    code, out, err = await colonies(capsys, "status", "--addr", follower.addr, "-o", "json")
    assert code == 3
    status = as_json(out)
    assert status["leader"] is None and status["reachable"] == 0
    assert [n["role"] for n in status["nodes"]] == ["down"]
    assert "no reachable node reports a leader" in err
    code, out, err = await colonies(capsys, "cluster", "ls", "--addr", follower.addr)
    assert code == 1 and err.startswith("colonies: error: cannot reach")

    # A member that is down shows as down; the command still succeeds while a leader answers.
    other.node.stop()
    with trio.fail_after(REMOVE_TIMEOUT_S):
        await other.stopped.wait()
    code, out, err = await colonies(
        capsys, "status", "--addr", leader.addr, "--timeout", "1", "-o", "json"
    )
    assert code == 0, err
    nodes = {n["peerid"]: n for n in as_json(out)["nodes"]}
    assert nodes[other.peer_id]["role"] == "down" and not nodes[other.peer_id]["reachable"]
    assert nodes[leader.peer_id]["role"] == "leader"


async def test_status_colony_view_and_watch(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], clean_env: None, tmp_path: Path
) -> None:
    leader = cluster.leader()
    owner, executor = vector_key("colony"), vector_key("executor")
    async with Client.connect(leader.addr, cluster.server) as c:
        await c.add_colony(owner.id, "dev")
        await c.with_key(owner).add_executor(executor.id, "w1", "t", "dev")
        await c.with_key(owner).approve_executor("dev", "w1")
        worker = c.with_key(executor)
        for i in range(3):
            await worker.submit("echo", colonyname="dev", executortype="t", args=[str(i)])
        await worker.close(await worker.assign("dev", 1), ["done"])

    colony = ["--addr", leader.addr, "--colony", "dev", "--prvkey", executor.hex]
    code, out, err = await colonies(capsys, "status", *colony, "--interval", "0.3", "-o", "json")
    assert code == 0, err
    status = as_json(out)
    view = status["colonyview"]
    assert view["executors"]["approved"] == 1 and view["executors"]["online"] == 1
    assert view["processes"]["waiting"] == 2 and view["processes"]["successful"] == 1
    assert isinstance(view["oldest_waiting_s"], float) and view["oldest_waiting_s"] >= 0
    assert view["assigns_per_s"] == 0  # nothing was assigned during the sample window
    assert status["colony"]["waitingprocesses"] == 2  # the node's counts, as before
    code, out, err = await colonies(capsys, "status", *colony, "--interval", "0")
    assert code == 0, err
    assert "Colony dev" in out and "1 online" in out and "waiting 2" in out

    # --watch in a real process: a JSON line per round until Ctrl-C, then exit 0, quietly.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLONIES_")}
    env.update(PYTHONPATH=str(ROOT), HOME=str(tmp_path / "home"))
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "cli.main", "status", "--watch", "--interval", "0.2", *colony,
         "-o", "json"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        buf = b""
        with trio.fail_after(CLI_TIMEOUT_S):
            while buf.count(b"\n") < 3:  # by the third round there is a rate
                chunk = await proc.stdout.receive_some(65536)
                assert chunk, "status --watch ended before printing three rounds"
                buf += chunk
        rounds = [json.loads(line) for line in buf.splitlines()[:3]]
        assert all(r["leader"] == leader.peer_id and len(r["nodes"]) == 3 for r in rounds)
        assert isinstance(rounds[2]["colonyview"]["assigns_per_s"], float | int), rounds
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(10):
            code = await proc.wait()
            err = b""
            while chunk := await proc.stderr.receive_some(65536):
                err += chunk
        assert code == 0, err.decode()
        assert b"Traceback" not in err, err.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.move_on_after(5):
                await proc.wait()
