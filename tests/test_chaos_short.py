"""A short seeded chaos run, end to end: 3 real nodes (the first preloaded with 5000
finished processes of another colony, which the others install as a snapshot), 2 executor
processes, 40 s of faults (seed 393's schedule: a kill of the leader, a SIGSTOP, slow and
dropped messages, executor kills, a kill -9 of every node at once, and a follower that needs
a snapshot and loses its leader in the middle of the transfer), then heal, drain, final reads,
digests of the live state and the archive, and the checker, which must find every rule held.
Plus the run's option checks and schedule."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from simulations.chaos import parse_args
from simulations.chaos_faults import DEFAULT_MIX, FAULT_KINDS, NODE_FAULTS, parse_mix, plan_schedule

ROOT = Path(__file__).resolve().parent.parent
MIX = "kill-leader=2,pause,partition,slow,drop,kill-executor=2,kill-install=2,restart-all"
SHORT = ["--duration", "40", "--seed", "393", "--nodes", "3", "--executors", "2", "--quiet", "3",
         "--faults", MIX, "--preload", "5000", "--plain"]
RUN_TIMEOUT_S = 170


def test_the_fault_mix_parses_and_refuses_clearly() -> None:
    assert parse_mix("kill=2,pause") == {"kill": 2.0, "pause": 1.0}
    assert set(parse_mix(DEFAULT_MIX)) == set(FAULT_KINDS)
    for bad, said in [("explode", "unknown fault"), ("kill=x", "must be a number"),
                      ("kill=-1", "0..1000"), ("kill=0", "above 0")]:
        with pytest.raises(ValueError, match=said):
            parse_mix(bad)


@pytest.mark.parametrize("argv", [["--duration", "0"], ["--nodes", "0"], ["--executors", "-1"],
                                  ["--rate", "0"], ["--faults", "nosuch"], ["--overrun", "2"]])
def test_bad_options_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_the_schedule_is_seeded_and_node_faults_never_overlap() -> None:
    mix = parse_mix(DEFAULT_MIX)
    a = plan_schedule(random.Random(5), 120, mix, 3, 2)
    assert a == plan_schedule(random.Random(5), 120, mix, 3, 2)
    assert a != plan_schedule(random.Random(6), 120, mix, 3, 2)
    node = [e for e in a if e.kind in NODE_FAULTS]
    for first, second in zip(node, node[1:], strict=False):
        assert first.at + first.duration < second.at
    assert all(e.at + e.duration <= 120 for e in a)
    assert not [e for e in plan_schedule(random.Random(5), 60, mix, 3, 0)
                if e.kind == "kill-executor"]


def test_a_short_chaos_run_keeps_every_promise(tmp_path: Path) -> None:
    report = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "simulations" / "chaos.py"), *SHORT,
         "--report-dir", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    summary = json.loads((report / "summary.json").read_text())
    assert summary["verdict"] == "ok", out[-6000:]
    faults = summary["faults"]
    assert faults.get("kill-leader", 0) >= 1 and faults.get("pause", 0) >= 1, summary
    assert faults.get("restart-all", 0) >= 1 and faults.get("kill-install", 0) >= 1, summary
    assert faults.get("kill-executor", 0) >= 1, summary
    assert summary["acknowledged_processes"] > 50, summary
    assert summary["executor_run_restarts"] == 0, summary  # executors survive failovers
    for name in ("history.jsonl", "final.json", "summary.txt", "faults.jsonl"):
        assert (report / name).stat().st_size > 0
    assert len(list((report / "nodes").glob("colonyd-n*.stderr"))) >= 4  # with a restart
    digests = {(d["digest"], d["applied"], d["archive"]["digest"], d["archive"]["applied"])
               for d in summary["digests"].values()}
    assert len(digests) == 1 and None not in next(iter(digests)), summary["digests"]
    assert summary["timings"]["preload_s"] > 0
    assert "every rule held" in out
