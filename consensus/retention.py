"""Retention: archived processes and workflows are removed after an age, or beyond a count.

Finished work lives in the archive on disk (consensus/archive.py), not in memory, so keeping
it costs disk only. By default a colony keeps it ``DEFAULT_RETENTION_S`` (30 days) after it
ended. The colony owner changes that with ``setretentionmsg`` (`colonies colony retention`):
an age in seconds, a count (keep the newest N standalone processes and the newest N
workflows), both, neither (keep everything), or back to the default. A colony's sweep timer
"retention:<colony>" is set for when its oldest archived row comes due (at once when it holds
more than its count), and only while it has archived rows, so an idle cluster proposes no
sweeps. A sweep removes, oldest end first, what is past the age or beyond the count:
workflows with all their members, and standalone processes, at most MAX_REMOVED_PER_SWEEP
rows per tick; when more are due it sets its timer again at once, so the leader's ticker
proposes the next tick and one log entry stays cheap to apply. The setting is replicated
state, so every replica removes the same rows at the same place in the log.

Export before the window ends: `exportprocessesmsg` pages through a colony's finished
processes in submission order with a cursor (`colonies process export` writes them as JSON
lines), so the full history can be kept outside the cluster.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import Any

from consensus import history, timers
from consensus.archive import GRAPH, PROCESS, Archived
from consensus.records import NS_PER_S, Process
from consensus.request import Request
from consensus.state import ColonyState
from protocol.messages import FINISHED_STATES

KIND = "retention"
DEFAULT_RETENTION_S = 30 * 86_400
MAX_REMOVED_PER_SWEEP = 1000


def timer_key(colony: str) -> str:
    return f"{KIND}:{colony}"


def policy(st: ColonyState, colony: str) -> tuple[int, int]:
    """(seconds, count) for a colony: its owner's setting, else the default."""
    return st.retention.get(colony, (DEFAULT_RETENTION_S, 0))


def next_due(st: ColonyState, colony: str, now: int) -> int | None:
    """When the colony's oldest archived row comes due (now if it holds more than its
    count), or None when nothing will."""
    seconds, count = policy(st, colony)
    if count and any(history.archived_total(st, colony, k) > count for k in ("process", "graph")):
        return now
    if not seconds:
        return None
    gen = st.colony_gen[colony]
    ends = [r.ended for kind in (GRAPH, PROCESS) for r in st.archive.oldest(colony, gen, kind, 1)]
    return min(ends) + seconds * NS_PER_S if ends else None


def schedule(st: ColonyState, colony: str, now: int) -> None:
    """Set (or clear) the colony's sweep timer from what its archive holds."""
    due = next_due(st, colony, now) if colony in st.colonies else None
    if due is None:
        st.timers.clear(timer_key(colony))
    else:
        st.timers.set(timer_key(colony), max(due, now), KIND)


def after_archiving(st: ColonyState, colony: str, ended: int, now: int) -> None:
    """Rows ending at ``ended`` (the earliest of them) were just archived: come back when
    they are due, unless the timer already waits for older ones."""
    seconds, count = policy(st, colony)
    key = timer_key(colony)
    if count and any(history.archived_total(st, colony, k) > count for k in ("process", "graph")):
        st.timers.set(key, now, KIND)
    elif seconds and st.timers.get(key) is None:
        st.timers.set(key, max(ended + seconds * NS_PER_S, now), KIND)


# Writes and reads.


def set_retention(st: ColonyState, req: Request, now: int) -> Any:
    b = req.body
    colony = b["colonyname"]
    if b["default"]:
        st.retention.pop(colony, None)
    else:
        st.retention[colony] = (b["seconds"], b["count"])
    schedule(st, colony, now)
    return get_retention(st, req)


def get_retention(st: ColonyState, req: Request) -> Any:
    colony = req.body["colonyname"]
    seconds, count = policy(st, colony)
    return {
        "colonyname": colony,
        "seconds": seconds,
        "count": count,
        "default": colony not in st.retention,
    }


def export_processes(st: ColonyState, req: Request) -> Any:
    """Finished processes (workflow members too) submitted after `afterseq`, in submission
    order, that ended at or after `since`; `cursor` is where the next page starts, `more`
    whether there may be more. Archived ones come from the archive, the finished members of
    workflows still running from the live state."""
    b = req.body
    colony, count, since = b["colonyname"], b["count"], b["since"]
    live = (
        (p.seq, p)
        for _seq, pid in st.listing.after(colony, FINISHED_STATES, "", b["afterseq"])
        if (p := st.processes[pid]).endtime >= since
    )
    rows = st.archive.after_seq(
        colony, st.colony_gen[colony], "", b["afterseq"], count + 1, ended_at_least=since
    )
    archived = ((r.seq, Process.from_snapshot(r.record, archived=True)) for r in rows)
    out, cursor, more = [], b["afterseq"], False
    for seq, p in heapq.merge(live, archived, key=lambda item: item[0]):
        if len(out) == count:
            more = True
            break
        out.append(p.to_wire())
        cursor = seq
    return {"processes": out, "cursor": cursor, "more": more}


# The sweep.


def sweep(st: ColonyState, key: str, now: int) -> list[str]:
    colony = key[len(KIND) + 1 :]
    if colony not in st.colonies:
        return []
    seconds, count = policy(st, colony)
    if not seconds and not count:
        return []
    gen = st.colony_gen[colony]
    budget = MAX_REMOVED_PER_SWEEP
    removed: list[str] = []
    due: list[Archived] = []
    if seconds:
        cutoff = now - seconds * NS_PER_S
        for kind in (GRAPH, PROCESS):
            due += st.archive.oldest(colony, gen, kind, budget, ended_at_most=cutoff)
    if count:
        for kind, counted in ((GRAPH, "graph"), (PROCESS, "process")):
            excess = history.archived_total(st, colony, counted) - count
            if excess > 0:
                due += st.archive.oldest(colony, gen, kind, min(excess, budget))
    leftover = False
    for row in _unique_oldest_first(due):
        cost = history.removal_cost(row)
        if removed and cost > budget:
            leftover = True  # next tick, with a fresh budget
            break
        history.remove_rows(st, [row])
        removed.append(row.id)
        budget -= cost
    if leftover or budget <= 0:
        st.timers.set(key, now, KIND)  # more is due: the next tick goes on at once
    else:
        schedule(st, colony, now)
    return removed


def _unique_oldest_first(rows: list[Archived]) -> Iterator[Archived]:
    seen: set[tuple[str, str]] = set()
    for row in sorted(rows, key=lambda r: (r.ended, r.id)):
        if (row.kind, row.id) not in seen:
            seen.add((row.kind, row.id))
            yield row


timers.HANDLERS[KIND] = sweep

WRITES = {"setretentionmsg": set_retention}
READS = {"getretentionmsg": get_retention, "exportprocessesmsg": export_processes}
