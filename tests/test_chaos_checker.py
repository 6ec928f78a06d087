"""The chaos checker on small hand-made histories: a clean one passes, and each rule is shown
to fail on a history that breaks it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from consensus.process_ops import EXEC_TIMEOUT_ERROR
from protocol.messages import FAILED, RUNNING, SUCCESS, WAITING
from simulations.checker import check, main, reachable

S = 1_000_000_000
SPEC = {"maxexectime": 5, "maxretries": 2, "maxwaittime": -1}


def proc(pid: str, state: int = SUCCESS, attempt: int = 1, **kw: Any) -> dict[str, Any]:
    p = {
        "processid": pid, "state": state, "attempt": attempt, "retries": 0, "spec": SPEC,
        "parents": [], "errors": [], "submissiontime": 0, "starttime": 10 * S,
        "endtime": 11 * S,
    }
    p.update(kw)
    return p


def clean() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    history = [
        {"op": "submit", "pid": "a", "t0": 0.0, "t1": 0.1, "ok": True},
        {"op": "assign", "pid": "a", "t0": 0.2, "t1": 0.3, "ok": True, "attempt": 1,
         "starttime": 10 * S},
        {"op": "close", "pid": "a", "t0": 0.4, "t1": 0.5, "ok": True, "attempt": 1,
         "successful": True},
        {"op": "observe", "pid": "a", "t0": 0.6, "t1": 0.7, "ok": True, "state": SUCCESS,
         "attempt": 1},
    ]
    final = {"processes": {"a": proc("a")},
             "digests": {"n1": {"digest": "d", "applied": 9}, "n2": {"digest": "d", "applied": 9}}}
    return history, final


def test_a_clean_history_passes() -> None:
    assert check(*clean()) is None


def test_lifecycle_reachability_follows_the_table() -> None:
    assert reachable((WAITING, 0), (SUCCESS, 2))
    assert reachable((RUNNING, 1), (WAITING, 1))
    assert not reachable((WAITING, 0), (RUNNING, 0))  # an assign starts a new attempt
    assert not reachable((SUCCESS, 1), (RUNNING, 2))  # final states stay final
    assert not reachable((RUNNING, 2), (RUNNING, 1))


def test_a_lost_submit_is_found() -> None:
    history, final = clean()
    del final["processes"]["a"]
    v = check(history, final)
    assert v is not None and v.rule == "no-lost-submit"
    final["processes"]["a"] = proc("a", state=WAITING, attempt=0)
    v = check(history, final)
    assert v is not None and v.rule == "no-lost-submit" and "never finished" in v.message


def test_two_successful_closes_are_found() -> None:
    history, final = clean()
    history.append({"op": "close", "pid": "a", "t0": 0.45, "t1": 0.55, "ok": True,
                    "attempt": 2, "successful": True})
    v = check(history, final)
    assert v is not None and v.rule == "single-close"


def test_an_accepted_close_of_an_expired_attempt_is_found() -> None:
    history, final = clean()
    history[2] = {**history[2], "successful": False}  # attempt 1 failed... accepted
    final["processes"]["a"] = proc("a", attempt=2)
    history.insert(2, {"op": "observe", "pid": "a", "t0": 0.31, "t1": 0.35, "ok": True,
                       "state": WAITING, "attempt": 1})  # requeued before the close
    history.append({"op": "assign", "pid": "a", "t0": 0.8, "t1": 0.9, "ok": True,
                    "attempt": 2, "starttime": 12 * S})
    history.pop(4)  # drop the late observe of SUCCESS#1
    v = check(history, final)
    assert v is not None and v.rule == "no-expired-close", v


def test_an_illegal_transition_is_found() -> None:
    history, final = clean()
    history.append({"op": "observe", "pid": "a", "t0": 0.8, "t1": 0.9, "ok": True,
                    "state": RUNNING, "attempt": 1})
    v = check(history, final)
    assert v is not None and v.rule == "legal-transitions"


def test_a_child_started_before_its_parent_succeeded_is_found() -> None:
    history, final = clean()
    final["processes"]["b"] = proc("b", parents=["a"], starttime=5 * S, endtime=6 * S)
    history.append({"op": "assign", "pid": "b", "t0": 0.2, "t1": 0.3, "ok": True,
                    "attempt": 1, "starttime": 5 * S})
    v = check(history, final)
    assert v is not None and v.rule == "workflow-order"


def test_diverged_digests_are_found() -> None:
    history, final = clean()
    final["digests"]["n2"]["digest"] = "other"
    v = check(history, final)
    assert v is not None and v.rule == "converged"


@pytest.mark.parametrize(
    "changes",
    [
        {"retries": 1},  # failed with a retry left
        {"retries": 2, "starttime": 10 * S, "endtime": 12 * S},  # before maxexectime (5 s)
    ],
)
def test_a_failure_before_the_limits_is_found(changes: dict[str, Any]) -> None:
    history, final = clean()
    final["processes"]["c"] = proc(
        "c", state=FAILED, attempt=3, errors=[EXEC_TIMEOUT_ERROR],
        **{"starttime": 10 * S, "endtime": 16 * S, **changes},
    )
    v = check(history, final)
    assert v is not None and v.rule == "limits-held"
    final["processes"]["c"].update(retries=2, starttime=10 * S, endtime=16 * S)
    assert check(history, final) is None


def test_the_command_line_reports_the_first_violation(tmp_path: Path, capsys: Any) -> None:
    history, final = clean()
    final["digests"]["n1"]["applied"] = 3
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(op) + "\n" for op in history))
    (tmp_path / "final.json").write_text(json.dumps(final))
    assert main([str(tmp_path)]) == 1
    assert "violated: converged" in capsys.readouterr().out
    final["digests"]["n1"]["applied"] = 9
    (tmp_path / "final.json").write_text(json.dumps(final))
    assert main([str(tmp_path)]) == 0
