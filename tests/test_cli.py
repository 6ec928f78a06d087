"""`colonies` end to end: `colonies dev` in a subprocess, the real CLI against it on 127.0.0.1.

One test walks the whole story (each CLI call is a process that imports libp2p, about 1 s):
run, list, errors, a clean SIGTERM, and a second `dev` in the same dir reusing its data.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.dev_process import DevProcess, base_env, colonies, read_env_file

READY_TIMEOUT_S = 30
STOP_TIMEOUT_S = 8


def assert_one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("colonies: error: ")
    return lines[0]


def manual_executor_by_hand(env: dict[str, str], tmp_path: Path) -> None:
    """Be an executor from the shell: register, submit, assign, add an attribute, close."""
    r = colonies(env, "key", "generate", "-o", "json")
    key = json.loads(r.stdout)
    r = colonies(env, "executor", "add", "--name", "manual-1", "--type", "manual",
                 "--executorid", key["id"], "--approve", "-o", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == 1  # approved
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"funcname": "sum", "args": [1, 2],
                                "conditions": {"executortype": "manual"}}))
    r = colonies(env, "process", "submit", "--spec", str(spec))
    assert r.returncode == 0, r.stderr
    pid = r.stdout.strip()
    r = colonies(env, "process", "psw", "-o", "json")
    assert [p["processid"] for p in json.loads(r.stdout)] == [pid]

    me = {**env, "COLONIES_PRVKEY": key["prvkey"]}
    r = colonies(me, "process", "assign", "--timeout", "5", "-o", "json")
    assert r.returncode == 0, r.stderr
    assigned = json.loads(r.stdout)
    assert assigned["processid"] == pid and assigned["attempt"] == 1
    r = colonies(me, "attribute", "add", "--processid", pid, "--key", "progress",
                 "--value", "50%", "-o", "json")
    assert r.returncode == 0, r.stderr
    attribute_id = json.loads(r.stdout)["attributeid"]
    r = colonies(me, "attribute", "get", "--attributeid", attribute_id)
    assert r.returncode == 0 and "50%" in r.stdout
    r = colonies(me, "process", "close", "--processid", pid, "--attempt", "1", "--out", "3")
    assert r.returncode == 0, r.stderr
    # Closing the same attempt twice is refused by the node.
    r = colonies(me, "process", "close", "--processid", pid, "--attempt", "1")
    assert r.returncode == 1
    assert_one_error_line(r)
    r = colonies(env, "process", "get", "--processid", pid, "-o", "json")
    got = json.loads(r.stdout)
    assert got["state"] == 2 and got["out"] == ["3"]
    r = colonies(env, "process", "get", "--processid", pid)  # the table form
    assert r.returncode == 0 and pid in r.stdout and "successful" in r.stdout

    r = colonies(env, "status", "-o", "json")
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["server"]["raft"] and status["server"]["clusterid"]
    assert status["colony"]["successfulprocesses"] >= 3
    assert status["statistics"]["colonies"] == 1


def test_dev_colony_end_to_end(tmp_path):
    state_dir = tmp_path / "dev"
    base = base_env(tmp_path / "home")
    devs: list[DevProcess] = []
    try:
        # First run: creates keys, colony and executor.
        dev = DevProcess(
            state_dir, base, ["--listen", "/ip4/127.0.0.1/tcp/0"],
            ready_timeout=READY_TIMEOUT_S, stop_timeout=STOP_TIMEOUT_S,
        )
        devs.append(dev)
        dev.wait_ready()
        env_file = state_dir / "env"
        assert env_file.stat().st_mode & 0o777 == 0o600
        assert (state_dir / "keys.toml").stat().st_mode & 0o777 == 0o600
        values = read_env_file(env_file)
        assert values["COLONIES_COLONY_NAME"] == "dev"
        assert values["COLONIES_SERVER_ADDR"].startswith("/ip4/127.0.0.1/tcp/")
        assert "/tcp/0/" not in values["COLONIES_SERVER_ADDR"]  # the bound port, not the asked one
        env = {**base, **values}

        r = colonies(env, "process", "run", "--func", "echo", "--args", "hello", "--wait")
        assert r.returncode == 0, r.stderr
        assert r.stdout == "hello\n"

        r = colonies(env, "process", "run", "--func", "helloworld", "--wait")
        assert r.returncode == 0, r.stderr
        assert r.stdout == "Hello, World!\n"

        # A process that fails: exit 1, its error on one line.
        r = colonies(env, "process", "run", "--func", "nosuch", "--wait")
        line = assert_one_error_line(r)
        assert r.returncode == 1 and "no function named 'nosuch'" in line

        r = colonies(env, "process", "pss", "-o", "json")
        assert r.returncode == 0, r.stderr
        done = json.loads(r.stdout)
        assert {p["spec"]["funcname"] for p in done} == {"echo", "helloworld"}
        assert all(p["state"] == 2 for p in done)
        r = colonies(env, "process", "ps", "-o", "json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == []

        r = colonies(env, "colony", "ls", "-o", "json")
        assert r.returncode == 0, r.stderr
        colonies_before = json.loads(r.stdout)
        assert [c["name"] for c in colonies_before] == ["dev"]

        # Errors from the node and from the settings: one line, no traceback.
        r = colonies(env, "--colony", "nosuch", "process", "ps")
        assert r.returncode == 1
        assert "404" in assert_one_error_line(r)
        r = colonies({**env, "COLONIES_PRVKEY": "not-a-key"}, "process", "ps")
        assert r.returncode == 2
        assert "COLONIES_PRVKEY" in assert_one_error_line(r)
        r = colonies({**env, "COLONIES_SERVER_PRVKEY": values["COLONIES_COLONY_PRVKEY"]},
                     "colony", "ls")  # the colony owner is not the server owner
        assert r.returncode == 1
        assert "403" in assert_one_error_line(r)

        manual_executor_by_hand(env, tmp_path)

        assert dev.terminate() == 0
        assert "Traceback" not in "".join(dev.stderr)

        # Second run in the same dir: same keys, same colony, earlier processes kept.
        keys_before = (state_dir / "keys.toml").read_text()
        dev = DevProcess(
            state_dir, base, ["--listen", "/ip4/127.0.0.1/tcp/0"],
            ready_timeout=READY_TIMEOUT_S, stop_timeout=STOP_TIMEOUT_S,
        )
        devs.append(dev)
        dev.wait_ready()
        assert (state_dir / "keys.toml").read_text() == keys_before
        values2 = read_env_file(env_file)
        assert {k: v for k, v in values2.items() if k != "COLONIES_SERVER_ADDR"} == {
            k: v for k, v in values.items() if k != "COLONIES_SERVER_ADDR"
        }
        env = {**base, **values2}
        r = colonies(env, "colony", "ls", "-o", "json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == colonies_before
        r = colonies(env, "process", "run", "--func", "echo", "--args", "again", "--wait")
        assert r.returncode == 0, r.stderr
        assert r.stdout == "again\n"
        r = colonies(env, "process", "pss", "-o", "json")
        assert len(json.loads(r.stdout)) == 4
        assert dev.terminate() == 0
    finally:
        for d in devs:
            d.kill()
