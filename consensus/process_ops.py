"""The moves of a process through its lifecycle: assign, close, requeue, time out.

Each move first checks everything that can refuse it, then calls `ColonyState.transition`
once, so a refused move changes nothing.
"""

from __future__ import annotations

from consensus.deadlines import EXEC
from consensus.lifecycle import Event
from consensus.records import Executor, Process, deadline_after
from consensus.state import ColonyState
from protocol.errors import BadRequest
from protocol.messages import RUNNING, STATE_NAMES

EXEC_TIMEOUT_ERROR = "Maximum execution time limit exceeded"
WAIT_TIMEOUT_ERROR = "Maximum waiting time limit exceeded"

# A tick expires at most this many deadlines, so one log entry stays cheap to apply; the
# rest stay due and the leader's ticker proposes another tick at once.
MAX_EXPIRED_PER_TICK = 10_000


def assign_next(st: ColonyState, ex: Executor, now: int) -> Process | None:
    """Give `ex` the first matching WAITING process, or None. Marks the executor alive."""
    ex.lastheardfromtime = now
    key = st.queue.peek(ex.colonyname, ex.executortype, ex.executorname)
    if key is None:
        return None
    p = st.processes[key[2]]
    st.transition(
        p,
        Event.ASSIGN,
        {
            "isassigned": True,
            "assignedexecutorid": ex.executorid,
            "starttime": now,
            "endtime": 0,
            "attempt": p.attempt + 1,
            "execdeadline": deadline_after(now, p.spec["maxexectime"]),
        },
    )
    return p


def check_current_attempt(p: Process, attempt: int) -> None:
    """A close must name the running attempt: a late close from an expired one is refused."""
    if p.state != RUNNING:
        why = f"the process is {STATE_NAMES.get(p.state, p.state)}"
    elif attempt != p.attempt:
        why = f"the current attempt is {p.attempt}"
    else:
        return
    raise BadRequest(
        f"attempt {attempt} is not the current attempt of process {p.processid} ({why})"
    )


def close(
    st: ColonyState, p: Process, successful: bool, out: list, errors: list[str], now: int
) -> None:
    """Close the current attempt; the caller has checked `check_current_attempt`."""
    if successful:
        changes: dict = {"endtime": now}
        if out:  # as Colonies: an empty out leaves the output alone
            changes["out"] = list(out)
        st.transition(p, Event.CLOSE_SUCCESS, changes)
    else:
        st.transition(p, Event.CLOSE_FAILED, {"endtime": now, "errors": list(errors)})


def requeue(st: ColonyState, p: Process, now: int, event: Event) -> None:
    """Put a RUNNING process back in the queue; only an exec timeout counts a retry.

    The old attempt stays the process's number but is no longer RUNNING, so its close is
    refused. The wait deadline restarts (as Colonies HEAD), else a process that waited long
    before its first assign would fail as soon as it is requeued.
    """
    changes = {
        "isassigned": False,
        "assignedexecutorid": "",
        "execdeadline": 0,
        "endtime": now,  # as Colonies: marks the end of the abandoned attempt
        "waitdeadline": deadline_after(now, p.spec["maxwaittime"]),
    }
    if event is Event.EXEC_TIMEOUT_REQUEUE:
        changes["retries"] = p.retries + 1
    st.transition(p, event, changes)


def expire_due(st: ColonyState, now: int) -> dict[str, list[str]]:
    """Apply every exec and wait deadline <= now (at most MAX_EXPIRED_PER_TICK of them)."""
    requeued: list[str] = []
    failed: list[str] = []
    for _deadline, pid, kind in st.deadlines.due(now, MAX_EXPIRED_PER_TICK):
        p = st.processes[pid]
        if kind == EXEC:
            maxretries = p.spec["maxretries"]
            if maxretries > -1 and p.retries >= maxretries:
                st.transition(
                    p, Event.EXEC_TIMEOUT_FAIL, {"endtime": now, "errors": [EXEC_TIMEOUT_ERROR]}
                )
                failed.append(pid)
            else:
                requeue(st, p, now, Event.EXEC_TIMEOUT_REQUEUE)
                requeued.append(pid)
        else:
            st.transition(p, Event.WAIT_TIMEOUT, {"endtime": now, "errors": [WAIT_TIMEOUT_ERROR]})
            failed.append(pid)
    return {"requeued": requeued, "failed": failed}
