"""Crons: a workflow started on a schedule, a cron expression or an interval.

The rules (semantics notes 2.7, with upstream's quirk 14 fixed):
- A cron has either a 6-field expression with seconds (cron_schedule.py) or an interval in
  seconds, checked when it is added (400 with the reason, nothing stored).
- Its next run is computed when it is added (and after each run) from the time stamped on
  the log entry, and kept as a timer (consensus/timers.py, kind "cron") that the leader's
  tick fires; no replica reads a clock.
- Interval runs keep their phase: the next run is the last scheduled time plus the interval
  (upstream used now + interval, so runs drifted). Runs missed while no leader could tick are
  not made up one by one: the cron runs once and moves to its next time after now.
- A run submits the cron's workflow; its root processes get as input (`in`) the outputs of
  the previous run's leaves, concatenated in the graph's order, whatever their state.
- waitforprevprocessgraph: a scheduled run is skipped (counted in `skipped`) while the
  previous run is WAITING or RUNNING. A previous run that failed, was cancelled or was
  removed does not block (upstream blocked forever on a cancelled one).
- runcronmsg starts a run now and restarts an interval cron's phase from now; with
  waitforprevprocessgraph and the previous run unfinished it is refused (400) rather than
  silently ignored as upstream does.
- `random` (upstream's unreachable option) is not supported.

Ids: a cron's id is its add's generated id; its n-th run's graph id is generators.run_id.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from consensus import cron_schedule, history, timers
from consensus.generators import check_new, generated_id, run_id, scheduled_specs
from consensus.records import MAX_TIME_NS, NS_PER_S, deadline_after
from consensus.request import Request
from consensus.schedule_records import CRON_TIMER, Cron
from consensus.state import ColonyState
from consensus.workflows import create_graph
from protocol.errors import BadRequest, ColoniesError, NotFound
from protocol.messages import RUNNING, STATE_NAMES, WAITING

Handler = Callable[[ColonyState, Request, int], Any]
Query = Callable[[ColonyState, Request], Any]


def _schedule(st: ColonyState, c: Cron, nextrun: int) -> None:
    c.nextrun = nextrun
    if nextrun:
        st.timers.set(c.timer_key, nextrun, CRON_TIMER)
    else:
        st.timers.clear(c.timer_key)


def _next_from(c: Cron, now: int) -> int:
    """The first scheduled time after `now` when counting afresh from `now` (0: none)."""
    if c.interval > 0:
        return deadline_after(now, c.interval)
    return cron_schedule.next_after(c.cronexpression, now) or 0


def _following(c: Cron, now: int) -> int:
    """The next run after the one due now, keeping an interval cron's phase."""
    if c.interval <= 0 or not c.nextrun:
        return _next_from(c, now)
    step = c.interval * NS_PER_S
    missed = max(0, (now - c.nextrun) // step)
    return min(c.nextrun + (missed + 1) * step, MAX_TIME_NS)


def _unfinished_previous(st: ColonyState, c: Cron) -> str:
    """The state name of the previous run if it is still waiting or running, else ""."""
    g = st.graphs.get(c.prevprocessgraphid) if c.prevprocessgraphid else None
    if g is not None and g.state in (WAITING, RUNNING):
        return STATE_NAMES[g.state]
    return ""


def previous_output(st: ColonyState, c: Cron) -> list[Any]:
    """The outputs of the previous run's leaves, in graph order ([] if it is gone); a run
    that finished is read from the archive."""
    if not c.prevprocessgraphid:
        return []
    try:
        g = st.graph(c.prevprocessgraphid)
    except NotFound:
        return []
    out: list[Any] = []
    for p in history.graph_members(st, g):
        if not p.children:
            out.extend(p.out)
    return out


def _start_run(st: ColonyState, c: Cron, now: int) -> str:
    gid = run_id(c.cronid, c.runs)
    create_graph(
        st,
        gid,
        c.colonyname,
        c.functionspecs,
        c.initiatorid,
        now,
        initiatorname=c.initiatorname,
        root_inputs=previous_output(st, c),
    )
    c.runs += 1
    c.lastrun = now
    c.prevprocessgraphid = gid
    return gid


# Writes.


def add_cron(st: ColonyState, req: Request, now: int) -> Any:
    cid = generated_id(req, "adding a cron")
    b = req.body["cron"]
    colony = b["colonyname"]  # the role rule checked it exists
    expr, interval = b["cronexpression"].strip(), b["interval"]
    if expr and interval > 0:
        raise BadRequest(
            "a cron runs on a cron expression or on an interval, not both: give "
            "cronexpression with interval -1, or an interval without cronexpression"
        )
    if not expr and interval <= 0:
        raise BadRequest(
            "a cron needs a cronexpression (6 fields: second minute hour day-of-month month "
            "day-of-week, e.g. '0/5 * * * * *') or an interval of at least 1 second"
        )
    if expr:
        why = cron_schedule.check_expression(expr)
        if why:
            raise BadRequest(f"invalid cron expression '{expr}': {why}")
    specs = scheduled_specs(b["workflowspec"], colony, "cron")
    check_new(st.crons, cid, colony, b["name"], "cron")
    c = Cron(
        cronid=cid,
        colonyname=colony,
        name=b["name"],
        initiatorid=req.caller,
        initiatorname=st.executors[req.caller].executorname,
        functionspecs=specs,
        cronexpression=expr,
        interval=interval if not expr else -1,
        waitforprevprocessgraph=b["waitforprevprocessgraph"],
        created=now,
    )
    st.crons.add(c)
    _schedule(st, c, _next_from(c, now))
    return c.to_wire()


def run_cron(st: ColonyState, req: Request, now: int) -> Any:
    c = st.crons.by_id[req.body["cronid"]]  # the role rule checked it exists
    if c.waitforprevprocessgraph:
        state = _unfinished_previous(st, c)
        if state:
            raise BadRequest(
                f"cron '{c.name}' waits for its previous run, workflow "
                f"{c.prevprocessgraphid}, which is {state}: wait for it or cancel it"
            )
    _start_run(st, c, now)  # refuses before any change
    _schedule(st, c, _next_from(c, now))
    return c.to_wire()


def remove_cron(st: ColonyState, req: Request, now: int) -> Any:
    c = st.crons.by_id[req.body["cronid"]]
    st.timers.clear(c.timer_key)
    st.crons.remove(c)  # its past runs stay, as workflows of the colony
    return {}


def run_due(st: ColonyState, key: str, now: int) -> list[str]:
    """The timer handler: the scheduled run, or a skip while the previous one is unfinished;
    then the next run's timer."""
    c = st.crons.get(key.removeprefix(f"{CRON_TIMER}:"))
    if c is None:
        return []
    if c.waitforprevprocessgraph and _unfinished_previous(st, c):
        c.skipped += 1
    else:
        try:
            _start_run(st, c, now)
        except ColoniesError:
            # Cannot happen for a workflow checked at add; count it as skipped rather than
            # stop the cron or fail the tick.
            c.skipped += 1
    _schedule(st, c, _following(c, now))
    return [c.cronid]


# Reads.


def get_cron(st: ColonyState, req: Request) -> Any:
    return st.crons.by_id[req.body["cronid"]].to_wire()


def get_crons(st: ColonyState, req: Request) -> Any:
    found = st.crons.of_colony(req.body["colonyname"])
    return [c.to_wire() for c in itertools.islice(found, req.body["count"])]


WRITES: dict[str, Handler] = {
    "addcronmsg": add_cron,
    "runcronmsg": run_cron,
    "removecronmsg": remove_cron,
}

READS: dict[str, Query] = {
    "getcronmsg": get_cron,
    "getcronsmsg": get_crons,
}

# The timer kind this module handles (consensus/timers.py); commands.py imports this module.
timers.HANDLERS[CRON_TIMER] = run_due
