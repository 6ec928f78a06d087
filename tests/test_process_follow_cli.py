"""The CLI for subscriptions, export, retention and the optional spec fields, against
`colonies dev` in a subprocess: `process wait|follow|export`, `colony retention`, and
`process run --backoff|--idempotency-key|--concurrency-key|--concurrency-limit`; then the
issue's process-model verbs end to end with the dev executor (`workflow submit|ls|get|cancel|
remove`, `generator add|pack|ls|get|remove`, `cron add|ls|get|run|remove`, `colony stats`,
`log get --follow` on a running process).

Every bad input must give one line on stderr, a non-zero exit status and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.dev_process import ROOT, DevProcess, base_env, colonies, read_env_file

READY_TIMEOUT_S = 30
STOP_TIMEOUT_S = 8
WAITING, RUNNING, SUCCESS, FAILED, CANCELLED = range(5)

Env = dict[str, str]


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, r.stderr
    return r.stdout


def refused(r: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """A clear one-line error: exit status `code`, no traceback, every needle in it."""
    err = r.stderr.strip()
    assert r.returncode == code, (r.returncode, r.stdout, err)
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and err.startswith("colonies: error:"), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def background(env: Env, *argv: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", *argv], cwd=ROOT, env=env,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 20) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{proc.args} did not end: {out} {err}")
    return proc.returncode, out, err


def get(env: Env, pid: str) -> dict:
    return json.loads(ok(colonies(env, "process", "get", "--processid", pid, "-o", "json")))


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Env, Env, Path]]:
    """One `colonies dev` for the module: (the dev env, a manual executor's env, a dir)."""
    tmp = tmp_path_factory.mktemp("follow-cli")
    base = base_env(tmp / "home")
    proc = DevProcess(
        tmp / "dev", base, ["--listen", "/ip4/127.0.0.1/tcp/0"],
        ready_timeout=READY_TIMEOUT_S, stop_timeout=STOP_TIMEOUT_S,
    )
    try:
        proc.wait_ready()
        env = {**base, **read_env_file(tmp / "dev" / "env")}
        key = json.loads(ok(colonies(env, "key", "generate", "-o", "json")))
        ok(colonies(env, "executor", "add", "--name", "hand-1", "--type", "manual",
                    "--executorid", key["id"], "--approve"))
        yield env, {**env, "COLONIES_PRVKEY": key["prvkey"]}, tmp
        assert proc.terminate() == 0
    finally:
        proc.kill()


def test_process_wait(dev: tuple[Env, Env, Path]) -> None:
    env, me, _ = dev
    pid = ok(colonies(env, "process", "run", "--func", "echo", "--args", "hi")).strip()
    done = json.loads(ok(colonies(env, "process", "wait", pid, "--timeout", "15", "-o", "json")))
    assert (done["processid"], done["state"], done["out"]) == (pid, SUCCESS, ["hi"])
    table = ok(colonies(env, "process", "wait", pid, "--state", "finished"))
    assert pid in table and "successful" in table.lower()
    refused(colonies(env, "process", "wait", pid, "--state", "failed"), 1,
            "will never be failed", "(400)")

    # Pushed, not polled: a waiter started before the change returns when it is applied.
    hand = ok(colonies(env, "process", "run", "--func", "sum", "--type", "manual")).strip()
    refused(colonies(env, "process", "wait", hand, "--timeout", "0.5"), 1, "(408)")
    waiter = background(env, "process", "wait", hand, "--state", "running", "--timeout", "20",
                        "-o", "json")
    time.sleep(1)
    assert waiter.poll() is None
    assigned = json.loads(ok(colonies(me, "process", "assign", "--timeout", "5", "-o", "json")))
    assert assigned["processid"] == hand
    rc, out, err = finish(waiter)
    assert rc == 0, err
    assert (json.loads(out)["processid"], json.loads(out)["state"]) == (hand, RUNNING)
    ok(colonies(me, "process", "close", "--processid", hand, "--attempt", "1"))

    refused(colonies(env, "process", "wait", pid, "--state", "done"), 2, "invalid choice")
    refused(colonies(env, "process", "wait", pid, "--timeout", "soon"), 2, "--timeout")
    refused(colonies(env, "process", "wait", "0" * 64, "--timeout", "2"), 1, "(404)")
    refused(colonies(env, "process", "wait"), 2, "ID")


def test_process_follow(dev: tuple[Env, Env, Path]) -> None:
    env, _, _ = dev
    t = "follow-only"  # no executor serves this type: the processes stay waiting
    first = ok(colonies(env, "process", "run", "--func", "f0", "--type", t)).strip()
    # Nothing new within the timeout: no output, exit 0.
    r = colonies(env, "process", "follow", "--type", t, "--timeout", "1")
    assert ok(r) == "" and r.stderr == ""
    # --from-start begins with what is there; -o json is one object a line.
    lines = ok(colonies(env, "process", "follow", "--type", t, "--from-start", "--count", "1",
                        "-o", "json")).splitlines()
    assert [json.loads(x)["processid"] for x in lines] == [first]
    out = ok(colonies(env, "process", "follow", "--type", t, "--from-start", "--count", "1"))
    assert out.split() == [first, "f0", "waiting"]

    # A follower is woken by the submits, in order; other types are not shown.
    follower = background(env, "process", "follow", "--type", t, "--count", "2",
                          "--timeout", "20", "-o", "json")
    time.sleep(1.5)  # its cursor is fixed at its first answer
    ok(colonies(env, "process", "run", "--func", "other", "--type", "another-type"))
    a = ok(colonies(env, "process", "run", "--func", "f1", "--type", t)).strip()
    b = ok(colonies(env, "process", "run", "--func", "f2", "--type", t)).strip()
    rc, out, err = finish(follower)
    assert rc == 0, err
    got = [json.loads(x) for x in out.splitlines()]
    assert [(p["processid"], p["spec"]["funcname"]) for p in got] == [(a, "f1"), (b, "f2")]

    refused(colonies(env, "process", "follow", "--count", "many"), 2, "--count")
    refused(colonies(env, "process", "follow", "--count", "-1"), 2, "must be 0 or more")
    refused(colonies(env, "process", "follow", "--timeout", "x"), 2, "--timeout")
    # An error is reported, not cut off by --timeout (which counts from the connection).
    refused(colonies(env, "--colony", "nosuch", "process", "follow", "--timeout", "2"), 1,
            "(404)")


def test_process_export(dev: tuple[Env, Env, Path]) -> None:
    env, _, tmp = dev
    before = time.time()
    pid = ok(colonies(env, "process", "run", "--func", "echo", "--args", "kept",
                      "--wait", "--timeout", "15"))
    assert pid.strip() == "kept"
    r = colonies(env, "process", "export")
    history = [json.loads(x) for x in ok(r).splitlines()]
    assert history and all(p["state"] in (SUCCESS, FAILED, CANCELLED) for p in history)
    assert ["kept"] in [p["out"] for p in history]
    assert f"exported {len(history)} finished processes of colony dev" in r.stderr
    # -o json changes nothing: export always writes JSON lines.
    assert ok(colonies(env, "process", "export", "-o", "json")).splitlines() == \
        ok(r).splitlines()

    path = tmp / "history.jsonl"
    r = colonies(env, "process", "export", "--file", str(path), "--since", str(before - 1))
    assert ok(r) == ""
    recent = [json.loads(x) for x in path.read_text().splitlines()]
    assert ["kept"] in [p["out"] for p in recent] and len(recent) <= len(history)
    assert f"exported {len(recent)} " in r.stderr
    r = colonies(env, "process", "export", "--since", "2999-01-01T00:00:00Z")
    assert ok(r) == "" and "exported 0 " in r.stderr

    refused(colonies(env, "process", "export", "--since", "yesterday"), 2,
            "expected unix seconds or an ISO 8601 time")
    refused(colonies(env, "process", "export", "--file", str(tmp / "no" / "such" / "dir.jl")),
            2, "cannot write")


def test_spec_flags_on_process_run(dev: tuple[Env, Env, Path]) -> None:
    env, me, _ = dev
    # Idempotency: the same key returns the first process.
    run = ("process", "run", "--func", "once", "--type", "nobody", "--idempotency-key", "job-1")
    first = json.loads(ok(colonies(env, *run, "-o", "json")))
    assert first["spec"]["idempotencykey"] == "job-1"
    assert ok(colonies(env, *run)).strip() == first["processid"]
    other = ok(colonies(env, "process", "run", "--func", "once", "--type", "nobody",
                        "--idempotency-key", "job-2")).strip()
    assert other != first["processid"]

    # Concurrency: a mutex key runs one at a time; the second waits for the first's close.
    mutex = ("process", "run", "--func", "sum", "--type", "manual", "--concurrency-key", "db")
    p1 = json.loads(ok(colonies(env, *mutex, "-o", "json")))
    assert p1["spec"]["concurrencykey"] == "db"  # no limit given: 1, a mutex
    p2 = ok(colonies(env, *mutex)).strip()
    a1 = json.loads(ok(colonies(me, "process", "assign", "--timeout", "5", "-o", "json")))
    assert a1["processid"] == p1["processid"]
    refused(colonies(me, "process", "assign", "--timeout", "-1"), 1, "(404)")
    ok(colonies(me, "process", "close", "--processid", a1["processid"], "--attempt", "1"))
    a2 = json.loads(ok(colonies(me, "process", "assign", "--timeout", "5", "-o", "json")))
    assert a2["processid"] == p2
    ok(colonies(me, "process", "close", "--processid", p2, "--attempt", "1"))

    # Backoff: a failed close retries, assignable again only after the delay.
    p = json.loads(ok(colonies(env, "process", "run", "--func", "flaky", "--type", "manual",
                               "--backoff", "4,2,10,0", "--maxretries", "1", "-o", "json")))
    assert p["spec"]["backoff"] == {"initial": 4, "multiplier": 2, "max": 10, "jitter": 0}
    pid = p["processid"]
    assert json.loads(ok(colonies(me, "process", "assign", "--timeout", "5", "-o", "json")))[
        "processid"] == pid
    ok(colonies(me, "process", "fail", "--processid", pid, "--attempt", "1", "--errors", "no"))
    failed_at = time.monotonic()
    q = get(env, pid)
    assert (q["state"], q["retries"]) == (WAITING, 1) and q["backoffuntil"] > 0
    again = json.loads(ok(colonies(me, "process", "assign", "--timeout", "20", "-o", "json")))
    waited = time.monotonic() - failed_at
    assert (again["processid"], again["attempt"]) == (pid, 2)
    assert 3 < waited < 20, waited
    ok(colonies(me, "process", "close", "--processid", pid, "--attempt", "2", "--out", "ok"))

    flags = ("process", "run", "--func", "x", "--type", "nobody")
    refused(colonies(env, *flags, "--backoff", "1,2,3,4,5"), 2, "INITIAL")
    refused(colonies(env, *flags, "--backoff", "soon"), 2, "expected numbers")
    refused(colonies(env, *flags, "--backoff", "1,1000"), 1, "(400)")
    refused(colonies(env, *flags, "--concurrency-limit", "2"), 1, "(400)")
    refused(colonies(env, *flags, "--concurrency-key", "db", "--concurrency-limit", "x"), 2,
            "--concurrency-limit")
    refused(colonies(env, *flags, "--idempotency-key", "k" * 300), 1, "(400)")


def test_workflow_generator_cron_and_stats_verbs(dev: tuple[Env, Env, Path]) -> None:
    """The issue's verbs, run by the dev executor: each with its success path, -o json and a
    bad input."""
    env, _, tmp = dev
    wf = tmp / "wf.json"
    wf.write_text(json.dumps([
        {"nodename": "a", "funcname": "echo", "args": ["x"]},
        {"nodename": "b", "funcname": "echo", "conditions": {"dependencies": ["a"]}},
    ]))
    # workflow submit --wait: b gets a's output as its input.
    done = json.loads(ok(colonies(env, "workflow", "submit", "--spec", str(wf), "--wait",
                                  "--timeout", "20", "-o", "json")))
    gid = done["processgraphid"]
    assert done["state"] == SUCCESS
    graphs = json.loads(ok(colonies(env, "workflow", "ls", "--state", "successful", "-o",
                                    "json")))
    assert gid in [g["processgraphid"] for g in graphs]
    got = json.loads(ok(colonies(env, "workflow", "get", gid, "-o", "json")))
    b = next(n for n in got["nodes"] if n["nodename"] == "b")
    assert get(env, b["processid"])["in"] == ["x"]
    assert "b" in ok(colonies(env, "workflow", "get", gid))
    refused(colonies(env, "workflow", "cancel", gid), 1, "(400)")  # finished already
    assert "removed" in ok(colonies(env, "workflow", "remove", gid))
    refused(colonies(env, "workflow", "get", gid), 1, "(404)")

    # workflow cancel: a workflow nobody runs is cancelled whole.
    idle = tmp / "idle.json"
    idle.write_text(json.dumps([
        {"nodename": "a", "funcname": "f", "conditions": {"executortype": "nobody"}},
        {"nodename": "b", "funcname": "f",
         "conditions": {"executortype": "nobody", "dependencies": ["a"]}},
    ]))
    gid = ok(colonies(env, "workflow", "submit", "--spec", str(idle))).strip()
    out = json.loads(ok(colonies(env, "workflow", "cancel", gid, "-o", "json")))
    assert out["processgraphid"] == gid
    got = json.loads(ok(colonies(env, "workflow", "get", gid, "-o", "json")))
    assert got["state"] == CANCELLED
    assert [n["state"] for n in got["nodes"]] == [CANCELLED, CANCELLED]
    cyc = tmp / "cycle.json"
    cyc.write_text(json.dumps([
        {"nodename": "a", "funcname": "f", "conditions": {"dependencies": ["b"]}},
        {"nodename": "b", "funcname": "f", "conditions": {"dependencies": ["a"]}},
    ]))
    refused(colonies(env, "workflow", "submit", "--spec", str(cyc)), 1, "cycle", "(400)")

    # generator: two packs make one run, which the dev executor runs.
    one = tmp / "one.json"
    one.write_text(json.dumps([{"nodename": "a", "funcname": "echo"}]))
    gen = json.loads(ok(colonies(env, "generator", "add", "--name", "g", "--spec", str(one),
                                 "--trigger", "2", "-o", "json")))
    genid = gen["generatorid"]
    ok(colonies(env, "generator", "pack", genid, "--arg", "p1"))
    packed = json.loads(ok(colonies(env, "generator", "pack", genid, "--arg", "2", "--json",
                                    "-o", "json")))
    run = packed["processgraphid"]
    root = json.loads(ok(colonies(env, "workflow", "get", run, "-o", "json")))["nodes"][0]
    done = json.loads(ok(colonies(env, "process", "wait", root["processid"], "--timeout", "15",
                                  "-o", "json")))
    assert done["out"] == ["p1", 2]
    assert [g["runs"] for g in json.loads(ok(colonies(env, "generator", "ls", "-o", "json")))
            if g["generatorid"] == genid] == [1]
    assert json.loads(ok(colonies(env, "generator", "get", genid, "-o", "json")))[
        "queuesize"] == 0
    refused(colonies(env, "generator", "add", "--name", "g2", "--spec", str(one),
                     "--trigger", "0"), 2, "--trigger")
    ok(colonies(env, "generator", "remove", genid))
    refused(colonies(env, "generator", "pack", genid, "--arg", "x"), 1, "(404)")

    # cron: an interval cron runs on its own (a short real-time check), and on `run`.
    cron = json.loads(ok(colonies(env, "cron", "add", "--name", "c", "--spec", str(one),
                                  "--interval", "1", "--wait-for-prev", "-o", "json")))
    cid = cron["cronid"]

    def ran_twice() -> bool:
        return json.loads(ok(colonies(env, "cron", "get", cid, "-o", "json")))["runs"] >= 2

    until(ran_twice, 20, "two cron runs")
    ok(colonies(env, "cron", "remove", cid))
    listed = json.loads(ok(colonies(env, "cron", "ls", "-o", "json")))
    assert cid not in [c["cronid"] for c in listed]
    cid = ok(colonies(env, "cron", "add", "--name", "daily", "--spec", str(one), "--cron",
                      "0 0 3 * * *")).strip()
    ran = json.loads(ok(colonies(env, "cron", "run", cid, "-o", "json")))
    assert ran["runs"] == 1 and ran["prevprocessgraphid"]
    assert "0 0 3 * * *" in ok(colonies(env, "cron", "ls"))
    refused(colonies(env, "cron", "add", "--name", "bad", "--spec", str(one), "--cron",
                     "61 * * * * *"), 1, "invalid cron expression", "(400)")
    refused(colonies(env, "cron", "add", "--name", "bad", "--spec", str(one), "--interval",
                     "-3"), 2, "--interval")
    ok(colonies(env, "cron", "remove", cid))
    refused(colonies(env, "cron", "run", cid), 1, "(404)")

    # colony stats: the counts are the list sizes, in both forms.
    stats = json.loads(ok(colonies(env, "colony", "stats", "-o", "json")))
    for verb, label in (("psw", "waiting"), ("ps", "running"), ("pss", "successful"),
                        ("psf", "failed"), ("psc", "cancelled")):
        listed = json.loads(ok(colonies(env, "process", verb, "--count", "100", "-o",
                                        "json")))
        assert stats[f"{label}processes"] == len(listed), label
        graphs = json.loads(ok(colonies(env, "workflow", "ls", "--state", label, "--count",
                                        "100", "-o", "json")))
        assert stats[f"{label}workflows"] == len(graphs), label
    table = ok(colonies(env, "colony", "stats"))
    assert "successful" in table.lower() and str(stats["successfulprocesses"]) in table
    refused(colonies(env, "--colony", "nosuch", "colony", "stats"), 1, "(404)")


def test_log_follow_while_the_process_runs(dev: tuple[Env, Env, Path]) -> None:
    env, me, _ = dev
    pid = ok(colonies(env, "process", "run", "--func", "sum", "--type", "manual")).strip()
    assert json.loads(ok(colonies(me, "process", "assign", "--timeout", "5", "-o", "json")))[
        "processid"] == pid
    ok(colonies(me, "log", "add", "--processid", pid, "--message", "first"))
    # A follower of a running process prints lines as they are applied and ends with it.
    follower = background(env, "log", "get", "--processid", pid, "--follow", "-o", "json")
    time.sleep(1)
    ok(colonies(me, "log", "add", "--processid", pid, "--message", "second"))
    ok(colonies(me, "process", "close", "--processid", pid, "--attempt", "1"))
    rc, out, err = finish(follower)
    assert rc == 0, err
    assert [json.loads(x)["message"] for x in out.splitlines()] == ["first", "second"]
    refused(colonies(me, "log", "add", "--processid", pid, "--message", "late"), 1, "(400)")
    refused(colonies(env, "log", "get", "--processid", pid, "--count", "0"), 2, "--count")


def test_colony_retention(dev: tuple[Env, Env, Path]) -> None:
    """Last in the module: it sweeps the colony's finished processes and workflows."""
    env, me, _ = dev
    shown = ok(colonies(env, "colony", "retention"))
    assert "removed 2592000 s after they end (the default)" in shown
    assert json.loads(ok(colonies(env, "colony", "retention", "-o", "json"))) == {
        "colonyname": "dev", "seconds": 30 * 86_400, "count": 0, "default": True}
    refused(colonies(env, "colony", "retention", "--seconds", "-5"), 2, "between 0 (no limit)")
    refused(colonies(env, "colony", "retention", "--keep-everything", "--count", "5"), 2,
            "goes alone")
    refused(colonies(env, "colony", "retention", "--seconds", "week"), 2, "invalid integer")
    refused(colonies(env, "colony", "retention", "--seconds", str(10**12)), 2, "between 0")
    # Only the colony owner sets it.
    refused(colonies({**me, "COLONIES_COLONY_PRVKEY": me["COLONIES_PRVKEY"]}, "colony",
                     "retention", "--seconds", "60"), 1, "(403)")

    # A short real-time check: with 1 s, a finished process and a finished workflow go,
    # a waiting one stays.
    pid = ok(colonies(env, "process", "run", "--func", "echo", "--args", "gone")).strip()
    assert json.loads(ok(colonies(env, "process", "wait", pid, "--timeout", "15", "-o",
                                  "json")))["out"] == ["gone"]
    waiting = ok(colonies(env, "process", "run", "--func", "f", "--type", "nobody")).strip()
    graphs = json.loads(ok(colonies(env, "workflow", "ls", "-o", "json")))
    finished = [g["processgraphid"] for g in graphs if g["state"] in (SUCCESS, CANCELLED)]
    assert finished
    set_ = json.loads(ok(colonies(env, "colony", "retention", "--seconds", "1", "-o", "json")))
    assert set_ == {"colonyname": "dev", "seconds": 1, "count": 0, "default": False}
    assert "removed 1 s after they end" in ok(colonies(env, "colony", "retention"))

    def swept() -> bool:
        return colonies(env, "process", "get", "--processid", pid).returncode == 1

    until(swept, 15, "the retention sweep")
    refused(colonies(env, "process", "get", "--processid", pid), 1, "(404)")
    for gid in finished:
        refused(colonies(env, "workflow", "get", gid), 1, "(404)")
    assert get(env, waiting)["state"] == WAITING
    stats = json.loads(ok(colonies(env, "colony", "stats", "-o", "json")))
    assert stats["successfulprocesses"] == stats["cancelledprocesses"] == 0
    assert stats["successfulworkflows"] == stats["cancelledworkflows"] == 0
    assert stats["waitingprocesses"] == len(json.loads(ok(colonies(
        env, "process", "psw", "--count", "100", "-o", "json"))))
    assert "kept" in ok(colonies(env, "colony", "retention", "--seconds", "0"))
