"""Retention: finished processes and workflows are removed a set time after they ended.

Off by default (as in Colonies, where retention is opt-in): nothing is removed until the
colony owner sets a retention time with `setretentionmsg` (`colonies colony retention
--seconds N`). Then a sweep timer "retention:<colony>" fires every min(N, 60) s and removes
the colony's finished (successful, failed, cancelled) standalone processes and finished
workflows (with all their members) whose end is more than N s in the past, oldest end first,
at most MAX_REMOVED_PER_SWEEP processes per tick; when more are due, it sets its timer again
at the same time, so the leader's ticker proposes the next tick at once and one log entry
stays cheap to apply. The setting is replicated state (in snapshots), so every replica
removes the same processes at the same place in the log.

Export before the window ends: `exportprocessesmsg` pages through a colony's finished
processes in submission order with a cursor (`colonies process export` writes them as JSON
lines), so the full history can be kept outside the cluster.
"""

from __future__ import annotations

from typing import Any

from consensus import timers
from consensus.records import NS_PER_S
from consensus.request import Request
from consensus.state import ColonyState
from protocol.messages import FINISHED_STATES

KIND = "retention"
SWEEP_PERIOD_S = 60
MAX_REMOVED_PER_SWEEP = 1000
# An export page scans at most this many finished processes per returned one (the rest are
# filtered out by `since`), so a page stays cheap; the cursor moves past what was scanned.
EXPORT_SCAN_FACTOR = 10

def timer_key(colony: str) -> str:
    return f"{KIND}:{colony}"


def period_ns(seconds: int) -> int:
    return min(seconds, SWEEP_PERIOD_S) * NS_PER_S


# Writes and reads.


def set_retention(st: ColonyState, req: Request, now: int) -> Any:
    colony, seconds = req.body["colonyname"], req.body["seconds"]
    if seconds == 0:
        st.retention.pop(colony, None)
        st.timers.clear(timer_key(colony))
    else:
        st.retention[colony] = seconds
        st.timers.set(timer_key(colony), now + period_ns(seconds), KIND)
    return {"colonyname": colony, "seconds": seconds}


def get_retention(st: ColonyState, req: Request) -> Any:
    colony = req.body["colonyname"]
    return {"colonyname": colony, "seconds": st.retention.get(colony, 0)}


def export_processes(st: ColonyState, req: Request) -> Any:
    """Finished processes (workflow members too) submitted after `afterseq`, in submission
    order, that ended at or after `since`; `cursor` is where the next page starts, `more`
    whether there may be more."""
    b = req.body
    count, since = b["count"], b["since"]
    cursor, out, scanned = b["afterseq"], [], 0
    more = False
    for seq, pid in st.listing.after(b["colonyname"], FINISHED_STATES, "", b["afterseq"]):
        if len(out) == count or scanned == count * EXPORT_SCAN_FACTOR:
            more = True
            break
        scanned += 1
        cursor = seq
        p = st.processes[pid]
        if p.endtime >= since:
            out.append(p.to_wire())
    return {"processes": out, "cursor": cursor, "more": more}


# The sweep.


def sweep(st: ColonyState, key: str, now: int) -> list[str]:
    colony = key[len(KIND) + 1 :]
    seconds = st.retention.get(colony)
    if seconds is None or colony not in st.colonies:
        st.retention.pop(colony, None)
        return []
    cutoff = now - seconds * NS_PER_S
    budget = MAX_REMOVED_PER_SWEEP
    removed: list[str] = []
    leftover = False  # due work left for the next tick because the budget ran out
    for _end, _seq, gid in st.finished.ended_before(True, colony, cutoff, budget):
        g = st.graphs[gid]
        if len(g.processids) > budget:
            leftover = True  # next tick, with a fresh budget (graphs are bounded in size)
            break
        if any(g.counts[s] for s in range(len(g.counts)) if s not in FINISHED_STATES):
            continue  # a member is not finished (cannot happen for a finished graph today)
        budget -= len(g.processids)
        st.remove_graph(g)
        removed.append(gid)
    for _end, _seq, pid in st.finished.ended_before(False, colony, cutoff, budget):
        st.remove_process(st.processes[pid])
        budget -= 1
        removed.append(pid)
    if budget == 0 and any(st.finished.ended_before(g, colony, cutoff, 1) for g in (True, False)):
        leftover = True
    st.timers.set(key, now if leftover else now + period_ns(seconds), KIND)
    return removed


timers.HANDLERS[KIND] = sweep

WRITES = {"setretentionmsg": set_retention}
READS = {"getretentionmsg": get_retention, "exportprocessesmsg": export_processes}
