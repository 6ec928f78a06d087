"""History: finished work moves into the archive, and leaves it again.

* ``settle`` runs at the end of every command: each standalone process the command finished,
  and each workflow it finished with all its members, leaves the live state for the archive
  (consensus/archive.py) with its log lines, and the archived counts (``st.archived``, what
  the statistics add to the live listings) follow.
* Removing archived work (a process or a graph by id, ``removeall``, retention, a removed
  colony) marks rows removed in the archive and takes them off the counts. One log entry
  removes at most ``MAX_REMOVED_PER_TICK`` rows: a larger removal is a job in the replicated
  state (``st.removals``, and ``st.purges`` for removed colonies) that the leader's ticker
  continues through the ``removals`` timer, so no single entry has to delete a colony's whole
  history. Rows a job has not reached yet stay readable until it does; a removed colony's are
  not (they carry its old generation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from consensus import timers
from consensus.archive import GRAPH, PROCESS, Archived, ArchivedLog, Cursor
from consensus.records import Process, ProcessGraph
from consensus.state import ColonyState
from protocol.messages import FINISHED_STATES

TIMER_KEY = "removals"
KIND = "removals"
MAX_REMOVED_PER_TICK = 1000

# Removal jobs: "colony#kind#states" -> [colony, kind, states, rows added at most at index].
Removal = list[Any]


def settle(st: ColonyState) -> dict[str, int]:
    """Archive what finished in the command just applied (see the module doc); returns the
    colonies it archived into, with the earliest end among their new rows."""
    if not st.settling_processes and not st.settling_graphs:
        return {}
    rows: list[Archived] = []
    logs: list[ArchivedLog] = []
    for gid in st.settling_graphs:
        g = st.graphs.get(gid)
        if g is None or g.state not in FINISHED_STATES:
            continue
        rows.append(_graph_row(st, g))
        _count(st, g.colonyname, "graph", g.state, 1)
        for pid in g.processids:
            p = st.processes[pid]
            rows.append(_process_row(st, p))
            _keep_log(st, p, logs)
            _count(st, p.colonyname, "member", p.state, 1)
        st.remove_graph(g)
    for pid in st.settling_processes:
        p = st.processes.get(pid)
        if p is None or p.state not in FINISHED_STATES or p.processgraphid:
            continue
        rows.append(_process_row(st, p))
        _keep_log(st, p, logs)
        _count(st, p.colonyname, "process", p.state, 1)
        st.remove_process(p)
    st.settling_processes.clear()
    st.settling_graphs.clear()
    if rows:
        st.archive.add(rows, logs)
    earliest: dict[str, int] = {}
    for row in rows:
        if row.kind == GRAPH or not row.graphid:
            earliest[row.colony] = min(earliest.get(row.colony, row.ended), row.ended)
    return earliest


def _process_row(st: ColonyState, p: Process) -> Archived:
    return Archived(
        kind=PROCESS,
        id=p.processid,
        colony=p.colonyname,
        gen=st.colony_gen[p.colonyname],
        state=p.state,
        graphid=p.processgraphid,
        executortype=p.executortype,
        seq=p.seq,
        ended=p.endtime,
        record=p.to_snapshot(),
    )


def _graph_row(st: ColonyState, g: ProcessGraph) -> Archived:
    return Archived(
        kind=GRAPH,
        id=g.processgraphid,
        colony=g.colonyname,
        gen=st.colony_gen[g.colonyname],
        state=g.state,
        graphid="",
        executortype="",
        seq=g.seq,
        ended=g.endtime,
        record=g.to_snapshot(),
    )


def _keep_log(st: ColonyState, p: Process, logs: list[ArchivedLog]) -> None:
    log = st.logs.get(p.processid)
    if log is not None and log.lines:
        logs.append(ArchivedLog(p.processid, p.colonyname, tuple(log.lines)))


def _count(st: ColonyState, colony: str, kind: str, state: int, n: int) -> None:
    key = (colony, kind, state)
    left = st.archived.get(key, 0) + n
    if left:
        st.archived[key] = left
    else:
        st.archived.pop(key, None)


def archived_total(st: ColonyState, colony: str, kind: str) -> int:
    """Archived standalone processes (kind "process") or graphs ("graph") of a colony."""
    return sum(n for (c, k, _s), n in st.archived.items() if c == colony and k == kind)


# --- reading ------------------------------------------------------------------------------


def graph_members(st: ColonyState, g: ProcessGraph) -> list[Process]:
    """A graph's processes in its order, live or archived."""
    if not g.archived:
        return [st.processes[pid] for pid in g.processids]
    by_id = {
        row.id: Process.from_snapshot(row.record, archived=True)
        for row in st.archive.members(g.processgraphid)
    }
    return [by_id[pid] for pid in g.processids if pid in by_id]


def before_cursor(body: dict[str, Any]) -> Cursor | None:
    """The paging cursor of a listing request (beforetime/beforeid), or None."""
    if not body["beforeid"] and not body["beforetime"]:
        return None
    return (body["beforetime"], body["beforeid"])


def newest_finished(
    st: ColonyState,
    colony: str,
    kind: str,
    states: Sequence[int],
    executortype: str,
    count: int,
    before: Cursor | None,
) -> list[Any]:
    """Finished processes (or graphs) of a colony in ``states``, newest end first, after
    the cursor ``before`` (end time, id): the archived ones, and for processes the finished
    members of workflows that still run (those are live)."""
    rows = st.archive.newest(colony, st.colony_gen[colony], kind, states, executortype, count, before)
    found: list[tuple[Cursor, Any]] = [
        (
            (r.ended, r.id),
            Process.from_snapshot(r.record, archived=True)
            if kind == PROCESS
            else ProcessGraph.from_snapshot(r.record, archived=True),
        )
        for r in rows
    ]
    if kind == PROCESS:
        for pid in st.listing.page(colony, states, executortype, len(st.processes)):
            p = st.processes[pid]
            if before is None or (p.endtime, pid) < before:
                found.append(((p.endtime, pid), p))
    found.sort(key=lambda item: item[0], reverse=True)
    return [record for _key, record in found[:count]]


# --- removing -----------------------------------------------------------------------------


def remove_process(st: ColonyState, p: Process) -> None:
    """Remove an archived standalone process (and its log)."""
    st.archive.remove(PROCESS, [p.processid])
    _count(st, p.colonyname, "process", p.state, -1)


def remove_graph(st: ColonyState, g: ProcessGraph) -> None:
    """Remove an archived graph with its members."""
    for row in st.archive.members(g.processgraphid):
        _count(st, row.colony, "member", row.state, -1)
    st.archive.remove(GRAPH, [g.processgraphid])
    _count(st, g.colonyname, "graph", g.state, -1)


def remove_rows(st: ColonyState, rows: Sequence[Archived]) -> int:
    """Remove archived rows (graphs with their members); how many rows that took."""
    for row in rows:
        if row.kind == GRAPH:
            remove_graph(st, ProcessGraph.from_snapshot(row.record, archived=True))
        else:
            remove_process(st, Process.from_snapshot(row.record, archived=True))
    return sum(removal_cost(row) for row in rows)


def start_removal(st: ColonyState, colony: str, kind: str, states: Sequence[int], now: int) -> None:
    """Remove a colony's archived processes or graphs in ``states`` that are archived now:
    a batch at once, the rest by the ``removals`` timer."""
    key = f"{colony}#{kind}#{','.join(map(str, states))}"
    st.removals[key] = [colony, kind, list(states), st.archive.index]
    _run_removals(st, now)


def _run_removals(st: ColonyState, now: int) -> list[str]:
    """One tick's worth of removal jobs and colony purges; returns the jobs it finished."""
    budget = MAX_REMOVED_PER_TICK
    finished: list[str] = []
    for key in sorted(st.removals):
        colony, kind, states, upto = st.removals[key]
        gen = st.colony_gen.get(colony)
        rows = [] if gen is None else st.archive.oldest(
            colony, gen, kind, budget, states=states, added_at_most=upto
        )
        taken = _fitting(rows, budget)
        budget -= remove_rows(st, taken)
        if len(taken) < len(rows) or budget <= 0:
            break  # more to do: the next tick goes on
        del st.removals[key]
        finished.append(key)
    for key in sorted(st.purges):
        if budget <= 0:
            break
        colony, gen = key.rsplit("#", 1)[0], st.purges[key]
        rows = st.archive.oldest(colony, gen, GRAPH, budget)
        rows += st.archive.oldest(colony, gen, PROCESS, budget - len(rows))
        taken = _fitting(rows, budget)
        # The colony is gone, and its counts with it: only the rows go.
        for row in taken:
            st.archive.remove(row.kind, [row.id])
            budget -= removal_cost(row)
        if len(taken) < len(rows) or budget <= 0:
            break
        del st.purges[key]
        finished.append(key)
    if st.removals or st.purges:
        st.timers.set(TIMER_KEY, now, KIND)  # more to do: the next tick goes on at once
    return finished


def removal_cost(row: Archived) -> int:
    """Rows a removal takes: a graph goes with its members."""
    return len(row.record.get("processids", ())) + 1 if row.kind == GRAPH else 1


def _fitting(rows: Sequence[Archived], budget: int) -> list[Archived]:
    """The first rows whose removal fits the budget; the first always does (a graph may hold
    more members than one tick's budget, and must still go)."""
    out: list[Archived] = []
    for row in rows:
        if out and removal_cost(row) > budget:
            break
        out.append(row)
        budget -= removal_cost(row)
    return out


def purge_colony(st: ColonyState, now: int) -> None:
    """After ColonyState.remove_colony noted a purge: start the timer that runs it."""
    _run_removals(st, now)


def _fire(st: ColonyState, key: str, now: int) -> list[str]:
    return _run_removals(st, now)


timers.HANDLERS[KIND] = _fire
