"""The chaos history checker: does a recorded history keep the promises Colonies makes?

    python simulations/checker.py REPORT_DIR      # exit 0: every rule held; 1: the first
                                                  # violated rule and the operations involved

A report folder holds ``history.jsonl`` (one client operation per line, with its invocation
and completion times) and ``final.json`` (each acknowledged process as the cluster reported
it after healing and a quiet period, and each node's state digest).

History line fields: ``op`` (submit | assign | close | observe), ``pid``, ``t0``/``t1``
(time.monotonic() at invocation and completion; ``t1`` null when no reply came), ``ok``
(the reply was a success), and by op: ``attempt``, ``state`` (what the reply showed),
``successful`` (close), ``starttime`` (assign: the leader-stamped start, unix ns).

Operations are compared in real-time order only: A precedes B when A completed before B was
invoked (writes and consistent reads are linearizable, so B must see a state reachable from
what A saw). Concurrent operations are never compared.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from consensus.lifecycle import TRANSITIONS, Event  # noqa: E402
from consensus.process_ops import EXEC_TIMEOUT_ERROR, WAIT_TIMEOUT_ERROR  # noqa: E402
from protocol.messages import (  # noqa: E402
    FAILED,
    FINISHED_STATES,
    RUNNING,
    STATE_NAMES,
    SUCCESS,
    WAITING,
)

NS_PER_S = 1_000_000_000
# Leader stamps and our clocks are one machine's clock; allow for stamping jitter.
CLOCK_SLACK_NS = 50_000_000

RULES = (
    "no-lost-submit",
    "single-close",
    "no-expired-close",
    "legal-transitions",
    "workflow-order",
    "converged",
    "limits-held",
)


@dataclass
class Violation:
    rule: str
    message: str
    ops: list[dict[str, Any]] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"violated: {self.rule}: {self.message}"]
        lines += [f"  op: {json.dumps(op, sort_keys=True)}" for op in self.ops[:6]]
        return "\n".join(lines)


def reachable(src: tuple[int, int], dst: tuple[int, int]) -> bool:
    """Can a process go from (state, attempt) ``src`` to ``dst`` through the lifecycle table?
    An assign is the only event that starts a new attempt."""
    if src == dst:
        return True
    seen = {src}
    todo = [src]
    while todo:
        state, attempt = todo.pop()
        for (frm, event), to in TRANSITIONS.items():
            if frm != state:
                continue
            nxt = (to, attempt + 1 if event is Event.ASSIGN else attempt)
            if nxt == dst:
                return True
            if nxt[1] <= dst[1] and nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return False


def _observations(history: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per process: every successful operation whose reply showed a (state, attempt)."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for op in history:
        if not op.get("ok") or op.get("t1") is None:
            continue
        kind = op["op"]
        if kind == "submit":
            out[op["pid"]].append({**op, "state": WAITING, "attempt": 0})
        elif kind == "assign":
            out[op["pid"]].append({**op, "state": RUNNING})
        elif kind == "close":
            out[op["pid"]].append({**op, "state": SUCCESS if op["successful"] else FAILED})
        elif kind == "observe":
            out[op["pid"]].append(op)
    return out


def digest_key(d: dict[str, Any]) -> tuple[Any, ...]:
    """What must be equal on converged nodes: the live state's digest and applied index, and
    the archive's (rows and logs) with the index it reflects."""
    archive = d.get("archive") or {}
    return (d.get("digest"), d.get("applied"), archive.get("digest"), archive.get("applied"))


def check(history: list[dict[str, Any]], final: dict[str, Any]) -> Violation | None:
    """The first violated rule (in RULES order), or None."""
    processes: dict[str, dict[str, Any]] = final.get("processes", {})
    submits = [op for op in history if op["op"] == "submit" and op.get("ok")]
    for op in submits:
        p = processes.get(op["pid"])
        if p is None:
            return Violation("no-lost-submit", f"acknowledged process {op['pid']} is gone", [op])
        if p["state"] not in FINISHED_STATES:
            shown = STATE_NAMES.get(p["state"], p["state"])
            return Violation(
                "no-lost-submit", f"process {op['pid']} never finished (still {shown})", [op, p]
            )

    closes = [op for op in history if op["op"] == "close" and op.get("ok")]
    by_pid: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for op in closes:
        if op["successful"]:
            by_pid[op["pid"]].append(op)
    for pid, ops in by_pid.items():
        if len(ops) > 1:
            return Violation("single-close", f"process {pid} closed successfully {len(ops)} times", ops)
        p = processes.get(pid)
        if p is not None and (p["state"] != SUCCESS or p["attempt"] != ops[0]["attempt"]):
            return Violation(
                "single-close",
                f"process {pid}: close of attempt {ops[0]['attempt']} accepted, but it ended "
                f"{STATE_NAMES.get(p['state'])} at attempt {p['attempt']}",
                [ops[0], p],
            )

    obs = _observations(history)
    for op in closes:
        for seen in obs.get(op["pid"], []):
            if seen is op or seen["t1"] >= op["t0"]:
                continue
            newer = seen["attempt"] > op["attempt"]
            ended = seen["attempt"] == op["attempt"] and seen["state"] != RUNNING
            if newer or ended:
                return Violation(
                    "no-expired-close",
                    f"process {op['pid']}: close of attempt {op['attempt']} accepted after "
                    "that attempt had ended",
                    [seen, op],
                )

    for pid, seen in obs.items():
        ordered = sorted(seen, key=lambda o: o["t1"])
        for i, a in enumerate(ordered):
            for b in ordered[i + 1:]:
                if a["t1"] < b["t0"] and not reachable(
                    (a["state"], a["attempt"]), (b["state"], b["attempt"])
                ):
                    return Violation(
                        "legal-transitions",
                        f"process {pid} went from {STATE_NAMES.get(a['state'])}#{a['attempt']} "
                        f"to {STATE_NAMES.get(b['state'])}#{b['attempt']}",
                        [a, b],
                    )
        p = processes.get(pid)
        if p is not None:
            last = ordered[-1]
            if not reachable((last["state"], last["attempt"]), (p["state"], p["attempt"])):
                return Violation(
                    "legal-transitions",
                    f"process {pid} ended {STATE_NAMES.get(p['state'])}#{p['attempt']} after "
                    f"{STATE_NAMES.get(last['state'])}#{last['attempt']} was seen",
                    [last, p],
                )

    for op in history:
        if op["op"] != "assign" or not op.get("ok"):
            continue
        child = processes.get(op["pid"], {})
        for parent_id in child.get("parents", []):
            parent = processes.get(parent_id)
            ok = (
                parent is not None
                and parent["state"] == SUCCESS
                and op.get("starttime", 0) + CLOCK_SLACK_NS >= parent["endtime"]
            )
            if not ok:
                return Violation(
                    "workflow-order",
                    f"workflow child {op['pid']} started before its parent {parent_id} succeeded",
                    [op, parent or {"pid": parent_id, "missing": True}],
                )

    digests = final.get("digests", {})
    if len({digest_key(d) for d in digests.values()}) > 1:
        return Violation(
            "converged",
            "the nodes' state digests differ",
            [{"node": n, **d} for n, d in sorted(digests.items())],
        )

    for pid, p in sorted(processes.items()):
        if p["state"] != FAILED:
            continue
        spec = p["spec"]
        if EXEC_TIMEOUT_ERROR in p.get("errors", []):
            limit = spec["maxexectime"] * NS_PER_S
            if spec["maxretries"] > -1 and p["retries"] < spec["maxretries"]:
                return Violation(
                    "limits-held",
                    f"process {pid} failed on exec timeout after {p['retries']} of "
                    f"{spec['maxretries']} retries",
                    [p],
                )
            if p["endtime"] - p["starttime"] + CLOCK_SLACK_NS < limit:
                return Violation(
                    "limits-held", f"process {pid} timed out before maxexectime", [p]
                )
        if WAIT_TIMEOUT_ERROR in p.get("errors", []):
            limit = spec["maxwaittime"] * NS_PER_S
            if p["endtime"] - p["submissiontime"] + CLOCK_SLACK_NS < limit:
                return Violation(
                    "limits-held", f"process {pid} failed waiting before maxwaittime", [p]
                )
    return None


def load_report(folder: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    history = [
        json.loads(line)
        for line in (folder / "history.jsonl").read_text().splitlines()
        if line.strip()
    ]
    final = json.loads((folder / "final.json").read_text())
    return history, final


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: checker.py REPORT_DIR", file=sys.stderr)
        return 2
    history, final = load_report(Path(args[0]))
    violation = check(history, final)
    if violation is not None:
        print(violation.describe())
        return 1
    print(f"ok: {len(history)} operations, {len(final.get('processes', {}))} processes, "
          f"rules held: {', '.join(RULES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
