"""The CLI for logs, functions, pause and liveness, against `colonies dev` in a subprocess:
`function ls`, `colony pause|resume|get|stats|stale-after`, `log add|get [--follow]`,
`executor ls`."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from tests.dev_process import DevProcess, base_env, colonies, read_env_file

READY_TIMEOUT_S = 30
STOP_TIMEOUT_S = 8


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_logs_functions_and_pause_from_the_cli(tmp_path: Path) -> None:
    base = base_env(tmp_path / "home")
    dev = DevProcess(
        tmp_path / "dev", base, ["--listen", "/ip4/127.0.0.1/tcp/0"],
        ready_timeout=READY_TIMEOUT_S, stop_timeout=STOP_TIMEOUT_S,
    )
    try:
        dev.wait_ready()
        env = {**base, **read_env_file(tmp_path / "dev" / "env")}

        # The dev executor (the executor helper) registered its functions when it started.
        funcs = json.loads(ok(colonies(env, "function", "ls", "-o", "json")))
        assert "echo" in {f["funcname"] for f in funcs}
        assert "echo" in ok(colonies(env, "function", "ls"))

        # Paused: a submit queues, nothing runs; resume and it runs.
        assert "paused" in ok(colonies(env, "colony", "pause"))
        got = json.loads(ok(colonies(env, "colony", "get", "-o", "json")))
        assert got["paused"] is True and got["name"] == "dev"
        pid = ok(colonies(env, "process", "run", "--func", "echo", "--args", "hi")).strip()
        time.sleep(1)
        waiting = json.loads(ok(colonies(env, "process", "psw", "-o", "json")))
        assert [p["processid"] for p in waiting] == [pid]
        ok(colonies(env, "colony", "resume"))
        r = colonies(env, "process", "get", "--processid", pid, "-o", "json")
        deadline = time.monotonic() + 15
        while json.loads(ok(r))["state"] != 2 and time.monotonic() < deadline:
            time.sleep(0.3)
            r = colonies(env, "process", "get", "--processid", pid, "-o", "json")
        assert json.loads(ok(r))["state"] == 2
        stats = json.loads(ok(colonies(env, "colony", "stats", "-o", "json")))
        assert stats["successfulprocesses"] >= 1 and stats["waitingprocesses"] == 0

        # An executor by hand writes log lines; anyone in the colony reads and follows them.
        key = json.loads(ok(colonies(env, "key", "generate", "-o", "json")))
        ok(colonies(env, "executor", "add", "--name", "manual-1", "--type", "manual",
                    "--executorid", key["id"], "--approve"))
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps({"funcname": "sum", "conditions": {"executortype": "manual"}}))
        pid = ok(colonies(env, "process", "submit", "--spec", str(spec))).strip()
        me = {**env, "COLONIES_PRVKEY": key["prvkey"]}
        ok(colonies(me, "process", "assign", "--timeout", "5"))
        line = json.loads(ok(colonies(me, "log", "add", "--processid", pid,
                                      "--message", "half way", "-o", "json")))
        assert line["seq"] == 1
        ok(colonies(me, "log", "add", "--processid", pid, "--message", "almost"))
        r = colonies(env, "log", "add", "--processid", pid, "--message", "not mine")
        assert r.returncode == 1 and "403" in r.stderr  # not the assigned executor
        lines = json.loads(ok(colonies(env, "log", "get", "--processid", pid, "-o", "json")))
        assert [ln["message"] for ln in lines] == ["half way", "almost"]
        ok(colonies(me, "process", "close", "--processid", pid, "--attempt", "1"))
        # Follow a finished process: prints every line and ends.
        out = ok(colonies(env, "log", "get", "--processid", pid, "--follow"))
        assert out.splitlines()[0].endswith("manual-1  half way") and "almost" in out
        assert len(out.splitlines()) == 2

        # Liveness: staleness on, the executors listed with it.
        ok(colonies(env, "colony", "stale-after", "60"))
        ex = {e["executorname"]: e for e in
              json.loads(ok(colonies(env, "executor", "ls", "-o", "json")))}
        assert ex["manual-1"]["liveness"] == "online"
        r = colonies(env, "colony", "stale-after", "3")  # refused by the node, changes nothing
        assert r.returncode == 1 and "must be 0 (off) or between 5 and" in r.stderr
        status = json.loads(ok(colonies(env, "status", "-o", "json")))
        view = status["colonyview"]
        assert view["paused"] is False and view["executors"]["stale_rule"] == "colony"
        assert view["executors"]["stale_after_s"] == 60
        assert dev.terminate() == 0
    finally:
        dev.kill()
