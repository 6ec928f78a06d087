"""Executor liveness: executors that stop calling in go stale, and their running processes
go back to the queue.

Heard from. Every write an executor makes that passes its role rule (assign, close, addlog,
heartbeat, submit, ...) sets its `lastheardfromtime` to the entry's time (machine.py calls
`heard_from`), so liveness goes through the log like everything else. An idle executor calls
in with `executorheartbeatmsg`; the executor helper (node/executor.py) sends one every
stale-after/3 seconds when it made no other write, which keeps the write rate at most three
per stale-after per executor.

Stale. Per colony and off by default: the colony owner sets `staleafter` seconds with
setexecutorstaleaftermsg (0 turns it off). Off by default because an executor that runs a
long function without calling in (the CLI, or a Colonies SDK executor through a gateway)
would otherwise lose its process; Colonies HEAD has this hazard with its 600 s default. With
it on, each heard-from (re)arms a timer "stale:<executorid>" at now + staleafter; when it
fires (consensus/timers.py, through the leader's tick), the executor is marked stale and each
of its RUNNING processes is handled as an exec timeout is: back to the queue with a retry
counted, or failed when it has no retries left (a process that kills every executor that runs
it does not circle forever). The next call from the executor clears the mark. Turning
staleness on counts from that moment, not from the executors' last calls, so enabling it
never requeues at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from consensus import graphs, timers
from consensus.lifecycle import Event
from consensus.process_ops import requeue
from consensus.records import NS_PER_S
from consensus.request import Request
from consensus.state import ColonyState

Handler = Callable[[ColonyState, Request, int], Any]

STALE_KIND = "stale"
STALE_ERROR = "Executor stopped calling in (stale)"


def stale_key(executorid: str) -> str:
    return f"{STALE_KIND}:{executorid}"


def heard_from(st: ColonyState, executorid: str, now: int) -> None:
    """The executor made a write at `now` (no-op for callers that are not executors)."""
    ex = st.executors.get(executorid)
    if ex is None:
        return
    ex.lastheardfromtime = now
    ex.stale = False
    after = st.stale_after.get(ex.colonyname)
    if after:
        st.timers.set(stale_key(executorid), now + after * NS_PER_S, STALE_KIND)


def on_stale(st: ColonyState, key: str, now: int) -> list[str]:
    """The timer handler: mark the executor stale and give up its running processes."""
    ex = st.executors.get(key.partition(":")[2])
    if ex is None or not st.stale_after.get(ex.colonyname):
        return []  # removed, or staleness turned off since (both clear the timer; defensive)
    for pid in st.running_of(ex.executorid):
        p = st.processes[pid]
        maxretries = p.spec["maxretries"]
        if maxretries > -1 and p.retries >= maxretries:
            st.transition(
                p, Event.EXECUTOR_STALE_FAIL, {"endtime": now, "errors": [STALE_ERROR]}, now
            )
            graphs.member_failed(st, p, now)
        else:
            requeue(st, p, now, Event.EXECUTOR_STALE_REQUEUE)
    ex.stale = True
    st.applied_changes += 1  # requeued processes are assignable
    return [ex.executorid]


def heartbeat(st: ColonyState, req: Request, now: int) -> Any:
    """machine.py has marked the caller heard from; tell it how often to call in."""
    return {"staleafter": st.stale_after.get(req.body["colonyname"], 0)}


def set_stale_after(st: ColonyState, req: Request, now: int) -> Any:
    colony, after = req.body["colonyname"], req.body["staleafter"]
    if after:
        st.stale_after[colony] = after
    else:
        st.stale_after.pop(colony, None)
    for eid in sorted(st.colony_executors[colony].values()):
        ex = st.executors[eid]
        ex.stale = False
        if after and ex.lastheardfromtime:
            st.timers.set(stale_key(eid), now + after * NS_PER_S, STALE_KIND)
        else:
            st.timers.clear(stale_key(eid))  # never heard from: nothing to time out
    return {"colonyname": colony, "staleafter": after}


timers.HANDLERS[STALE_KIND] = on_stale

WRITES: dict[str, Handler] = {
    "executorheartbeatmsg": heartbeat,
    "setexecutorstaleaftermsg": set_stale_after,
}
