"""The moves of a process through its lifecycle: create, assign, close, requeue, time out,
cancel.

Each move first checks everything that can refuse it, then calls `ColonyState.transition`
once, so a refused move changes nothing. A workflow member's end then moves its graph on
(graphs.py): its children may become ready, or its failure fails the graph.
"""

from __future__ import annotations

import sys
from typing import Any

from consensus import backoff, function_ops, graphs
from consensus.concurrency import limit_of
from consensus.deadlines import EXEC
from consensus.lifecycle import Event
from consensus.records import (
    Attribute,
    Executor,
    Process,
    attribute_id,
    compact_spec,
    deadline_after,
    priority_time,
    shared,
)
from consensus.state import ColonyState
from protocol.errors import BadRequest
from protocol.messages import CANCELLED, ENV, FAILED, RUNNING, STATE_NAMES, WAITING

EXEC_TIMEOUT_ERROR = "Maximum execution time limit exceeded"
WAIT_TIMEOUT_ERROR = "Maximum waiting time limit exceeded"

# A tick expires at most this many deadlines, so one log entry stays cheap to apply; the
# rest stay due and the leader's ticker proposes another tick at once.
MAX_EXPIRED_PER_TICK = 10_000


def normalized_spec(spec: dict[str, Any], colonyname: str | None = None) -> dict[str, Any]:
    """A copy of a validated spec as the machine stores it; `colonyname` overrides the spec's
    colony (a workflow's colony is the colony of all its specs)."""
    spec = dict(spec)
    # Quirk 9.8 fixed: 0 means "no limit", as -1 does (upstream treats a 0 maxexectime as
    # already expired on a single submit).
    for limit in ("maxexectime", "maxwaittime"):
        if spec[limit] == 0:
            spec[limit] = -1
    if colonyname is not None:
        spec["conditions"] = {**spec["conditions"], "colonyname": colonyname}
        # Idempotency keys dedupe single submits; a workflow has no single process to return.
        if "idempotencykey" in spec:
            raise BadRequest("idempotencykey applies to single submits, not to workflow specs")
    # Concurrency limits: a limit needs a key (a key alone is a mutex, limit 1).
    if "concurrencylimit" in spec and "concurrencykey" not in spec:
        raise BadRequest("concurrencylimit needs a concurrencykey (the key the limit counts)")
    return compact_spec(spec)


def new_process(
    st: ColonyState,
    pid: str,
    spec: dict[str, Any],
    initiatorid: str,
    now: int,
    *,
    processgraphid: str = "",
    parents: list[str] | None = None,
    children: list[str] | None = None,
    initiatorname: str = "",
) -> Process:
    """A WAITING process (not yet added to the state) with the next sequence number. A
    process with parents waits for them and gets its wait deadline when they have all
    succeeded; any other starts waiting now. spec.env becomes ENV attributes.
    `initiatorname` is for initiators that may be gone (a generator's or cron's creator);
    by default it is the initiating executor's name."""
    waits = bool(parents)
    p = Process(
        processid=pid,
        seq=st.next_seq,
        spec=spec,
        initiatorid=sys.intern(initiatorid),
        initiatorname=initiatorname or st.executors[initiatorid].executorname,
        submissiontime=now,
        prioritytime=priority_time(now, spec["priority"]),
        waitdeadline=0 if waits else deadline_after(now, spec["maxwaittime"]),
        processgraphid=processgraphid,
        parents=shared(list(parents or [])),
        children=shared(list(children or [])),
        waitforparents=waits,
    )
    st.next_seq += 1
    # Sorted so the order does not depend on the encoder.
    for key in sorted(spec["env"]):
        p.attributes.append(
            Attribute(
                attributeid=attribute_id(pid, key, ENV),
                targetid=pid,
                targetcolonyname=p.colonyname,
                attributetype=ENV,
                key=key,
                value=spec["env"][key],
            )
        )
    return p


def assign_next(st: ColonyState, ex: Executor, now: int) -> Process | None:
    """Give `ex` the first matching WAITING process, or None. Marks the executor alive."""
    ex.lastheardfromtime = now
    if ex.colonyname in st.paused:  # pause_ops: a paused colony hands out nothing
        return None
    p = _next_within_limits(st, ex, now)
    if p is None:
        return None
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
        now,
    )
    return p


def _next_within_limits(st: ColonyState, ex: Executor, now: int) -> Process | None:
    """The queue's head for `ex`, parking on the way every head whose concurrency key is at
    its limit (consensus/concurrency.py: each is parked once until a slot frees up)."""
    while True:
        key = st.queue.peek(ex.colonyname, ex.executortype, ex.executorname)
        if key is None:
            return None
        p = st.processes[key[2]]
        ckey = p.spec.get("concurrencykey")
        if ckey is None or st.concurrency.running(p.colonyname, ckey) < limit_of(p.spec):
            return p
        st.update(p, {"parked": True}, now)


def check_current_attempt(p: Process, attempt: int) -> None:
    """A close must name the running attempt: a late close from an expired one is refused."""
    if p.state == CANCELLED:
        raise BadRequest(
            f"process {p.processid} was cancelled: attempt {attempt} cannot be closed "
            "(its result is not recorded; stop working on it)"
        )
    if p.state == FAILED and p.errors:
        why = f"the process failed: {p.errors[0]}"
    elif p.state != RUNNING:
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
        st.transition(p, Event.CLOSE_SUCCESS, changes, now)
        function_ops.record_success(st, p, now)  # the function's run statistics
        graphs.member_succeeded(st, p, now)
    elif retries_after_failure(p):
        requeue(st, p, now, Event.CLOSE_FAILED_RETRY, errors)
    else:
        st.transition(p, Event.CLOSE_FAILED, {"endtime": now, "errors": list(errors)}, now)
        graphs.member_failed(st, p, now)


def retries_after_failure(p: Process) -> bool:
    """Retries with backoff: does a failed close of `p` go back to the queue?

    Only for a spec with a `backoff` (the retry policy): Colonies fails a process on its
    first failed close whatever its maxretries, and specs written for it keep that. With a
    backoff, maxretries counts failed closes and exec timeouts together, as Celery and
    Temporal users expect: -1 retries without limit (Temporal's default), n allows n
    retries, so n + 1 attempts in all."""
    if "backoff" not in p.spec:
        return False
    maxretries = p.spec["maxretries"]
    return maxretries == -1 or p.retries < maxretries


def cancel(st: ColonyState, p: Process, now: int) -> None:
    """WAITING or RUNNING -> CANCELLED. A running attempt stays assigned to its executor, so
    its close gets a clear refusal (check_current_attempt) rather than 'not assigned'."""
    if p.state not in (WAITING, RUNNING):
        raise BadRequest(
            f"process {p.processid} is {STATE_NAMES.get(p.state, p.state)} "
            "and cannot be cancelled (only waiting or running processes can)"
        )
    st.transition(p, Event.CANCEL, {"endtime": now}, now)


def requeue(
    st: ColonyState, p: Process, now: int, event: Event, errors: list[str] | None = None
) -> None:
    """Put a RUNNING process back in the queue; only an exec timeout or a stale executor
    (consensus/liveness.py) counts a retry.

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
    if event in (Event.EXEC_TIMEOUT_REQUEUE, Event.EXECUTOR_STALE_REQUEUE):
        changes["retries"] = p.retries + 1
    # Retries with backoff: a failed close with retries left counts a retry and keeps the
    # attempt's errors; a counted retry waits out its delay before it is assignable, and
    # its wait deadline starts when the delay ends.
    if event is Event.CLOSE_FAILED_RETRY:
        changes["retries"] = p.retries + 1
        changes["errors"] = list(errors or [])
    until = backoff.backoff_until(p, now) if "retries" in changes else 0
    if until:
        changes["backoffuntil"] = until
        changes["waitdeadline"] = deadline_after(until, p.spec["maxwaittime"])
    st.transition(p, event, changes, now)
    if until:
        st.timers.set(backoff.timer_key(p.processid), until, backoff.KIND)


def expire_due(st: ColonyState, now: int) -> dict[str, list[str]]:
    """Apply every exec and wait deadline <= now (at most MAX_EXPIRED_PER_TICK of them).

    `failed` lists the processes whose own deadline failed them; members of their workflows
    that failed with them are not listed."""
    requeued: list[str] = []
    failed: list[str] = []
    for entry in st.deadlines.due(now, MAX_EXPIRED_PER_TICK):
        _deadline, pid, kind = entry
        if st.deadlines.get(pid) != entry:
            continue  # an earlier expiry in this tick failed its workflow, and it with it
        p = st.processes[pid]
        if kind == EXEC:
            maxretries = p.spec["maxretries"]
            if maxretries > -1 and p.retries >= maxretries:
                st.transition(
                    p,
                    Event.EXEC_TIMEOUT_FAIL,
                    {"endtime": now, "errors": [EXEC_TIMEOUT_ERROR]},
                    now,
                )
                graphs.member_failed(st, p, now)
                failed.append(pid)
            else:
                requeue(st, p, now, Event.EXEC_TIMEOUT_REQUEUE)
                requeued.append(pid)
        else:
            st.transition(
                p, Event.WAIT_TIMEOUT, {"endtime": now, "errors": [WAIT_TIMEOUT_ERROR]}, now
            )
            graphs.member_failed(st, p, now)
            failed.append(pid)
    return {"requeued": requeued, "failed": failed}
