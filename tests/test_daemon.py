"""colonyd as users run it: a real process, its data dir, its lock, SIGTERM, a restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

from node.client import Client
from tests.conftest import vector_key

START_TIMEOUT_S = 30


@contextmanager
def colonyd(data_dir: Path, *extra: str, env: dict | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    ready = data_dir.parent / f"{data_dir.name}.ready"
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.daemon", "--data-dir", str(data_dir), "--ready-file", str(ready), *extra],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (ready.exists() and ready.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"colonyd did not start: {proc.communicate(timeout=5)}")
            time.sleep(0.05)
        yield proc, ready.read_text().split()[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def stop(proc: subprocess.Popen) -> tuple[int, str, str]:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=15)
    return proc.returncode, out, err


def private_modes(data: Path) -> dict[str, int]:
    """Every path under ``data`` whose mode lets anyone but the owner in."""
    loose = {}
    for path in [data, *data.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            loose[str(path.relative_to(data))] = mode
    return loose


async def test_colonyd_serves_stops_cleanly_and_keeps_its_data(tmp_path: Path) -> None:
    data = tmp_path / "node"
    server = vector_key("server")
    env = {"COLONIES_SERVER_PRVKEY": server.hex}
    # A data dir left open by hand: tightened at start, with a log line saying so.
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    (data / "notes.txt").write_text("operator notes\n")
    os.chmod(data / "notes.txt", 0o644)
    with colonyd(data, env=env) as (proc, addr):
        assert "/p2p/16Uiu2" in addr
        assert (data / "node.key").stat().st_mode & 0o777 == 0o600
        async with Client.connect(addr, server) as c:
            await c.add_colony(vector_key("colony").id, "persisted")
        code, out, err = await trio.to_thread.run_sync(stop, proc)
        assert code == 0, err
        assert f"colonyd ready: {addr}" in out
        assert "Traceback" not in err
        assert "made 1 dir(s) 0700 and 1 file(s) 0600" in err
        # Everything the node wrote (keys, journal, snapshot, member book, address) is private.
        assert private_modes(data) == {}
        assert {"node.key", "raft.journal", "node.addr"} <= {
            p.name for p in data.iterdir()
        }
    # Same data dir, same key, same address family: the colony is still there.
    with colonyd(data, env=env) as (proc, addr2):
        assert addr2.split("/p2p/")[1] == addr.split("/p2p/")[1]
        async with Client.connect(addr2, server) as c:
            assert [x["name"] for x in await c.colonies()] == ["persisted"]
        assert (await trio.to_thread.run_sync(stop, proc))[0] == 0


async def test_second_daemon_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "node"
    with colonyd(data) as (proc, _):
        second = subprocess.run(
            [sys.executable, "-m", "cli.daemon", "--data-dir", str(data)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode != 0
        assert "in use by another colonyd" in second.stderr
        assert "Traceback" not in second.stderr
        assert (await trio.to_thread.run_sync(stop, proc))[0] == 0
    # Without a configured owner, the first start created one, readable only by its owner.
    assert (data / "server.key").stat().st_mode & 0o777 == 0o600


def test_bad_listen_address_is_a_clear_error(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "cli.daemon", "--data-dir", str(tmp_path / "n"), "--listen", "nonsense"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode != 0
    assert "invalid multiaddr" in r.stderr and "Traceback" not in r.stderr


def test_a_fixed_port_in_use_is_refused(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "cli.daemon", "--data-dir", str(tmp_path / "n"),
             "--listen", f"/ip4/127.0.0.1/tcp/{port}"],
            capture_output=True, text=True, timeout=30,
        )
    assert r.returncode != 0
    assert "cannot listen on" in r.stderr and "Traceback" not in r.stderr
