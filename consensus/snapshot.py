"""Snapshots of the live state: plain msgpack-able data in a canonical order (sorted by name
or sequence), so two replicas with the same state produce the same bytes.

2 added process graphs and the processes' workflow fields; format 1 snapshots (no
workflows) still load. 3 added the timers (consensus/timers.py) and the sections of the
features that use them; every section added since 2 is optional when reading. Format 3
also carries process logs, functions, paused colonies, per-colony stale-after and the
executors' stale mark (all optional on read). Beyond Colonies adds the idempotency keys,
retention per colony and the processes' backoffuntil and parked fields (optional too).
Generators (with their queued arguments) and crons: sections of format 3, optional too.
4 holds only live state: finished standalone processes and finished graphs are in the
archive, and the snapshot carries the colonies' generations, the archived counts and the
removals in progress. Finished records in an older snapshot move to the archive on load.
"""

from __future__ import annotations

from typing import Any

from consensus.archive import Archive
from consensus.function_record import Function
from consensus.idempotency import IdempotencyBook
from consensus.nonces import NonceBook
from consensus.process_log import ProcessLog
from consensus.records import Colony, Executor, Process, ProcessGraph
from consensus.schedule_records import Cron, Generator
from consensus.state import ColonyState
from protocol.messages import FINISHED_STATES

SNAPSHOT_FORMAT = 4
READABLE_SNAPSHOT_FORMATS = (1, 2, 3, 4)


def to_snapshot(st: ColonyState) -> dict[str, Any]:
    """The live state (consensus/state.py) as plain data."""
    return {
        "format": SNAPSHOT_FORMAT,
        "serverid": st.server_id,
        "clusterid": st.cluster_id,
        "lastnow": st.last_now,
        "nextseq": st.next_seq,
        "appliedchanges": st.applied_changes,
        "colonies": [st.colonies[n].to_wire() for n in sorted(st.colonies)],
        "executors": [
            st.executors[eid].to_wire()
            for eid in sorted(
                st.executors,
                key=lambda e: (st.executors[e].colonyname, st.executors[e].executorname),
            )
        ],
        "processgraphs": [
            g.to_snapshot() for g in sorted(st.graphs.values(), key=lambda g: g.seq)
        ],
        "processes": [
            p.to_snapshot() for p in sorted(st.processes.values(), key=lambda p: p.seq)
        ],
        "nonces": st.nonces.to_snapshot(),
        "members": [[pid, st.members[pid]] for pid in sorted(st.members)],
        "timers": [list(e) for e in st.timers.entries()],
        # Generators and crons, by colony and name (format 3, optional on read).
        "generators": st.generators.to_snapshot(),
        "crons": st.crons.to_snapshot(),
        # Logs, functions, pause, executor liveness (format 3, optional on read).
        "logs": [st.logs[pid].to_snapshot() for pid in sorted(st.logs)],
        "functions": [
            f.to_snapshot()
            for f in sorted(
                st.functions.values(),
                key=lambda f: (f.colonyname, f.executorname, f.funcname),
            )
        ],
        "pausedcolonies": sorted(st.paused),
        "staleafter": [[c, st.stale_after[c]] for c in sorted(st.stale_after)],
        # Beyond Colonies (format 3, optional on read): idempotency keys by first submit
        # time, retention per colony. Backoff and parking live in the processes' fields.
        "idempotencykeys": st.idempotency.to_snapshot(),
        "retention": [[c, *st.retention[c]] for c in sorted(st.retention)],
        # History (format 4).
        "colonygen": [[c, st.colony_gen[c]] for c in sorted(st.colony_gen)],
        "archived": [[*k, st.archived[k]] for k in sorted(st.archived)],
        "purges": [[k, st.purges[k]] for k in sorted(st.purges)],
        "removals": [[k, *st.removals[k]] for k in sorted(st.removals)],
    }


def from_snapshot(data: dict[str, Any], archive: Archive | None = None) -> ColonyState:
    """The state a snapshot holds, over ``archive``. A snapshot older than format 4 may
    hold finished records: they are noted in ``settling_*``, for the caller to archive
    (history.settle) at the snapshot's index."""
    if data.get("format") not in READABLE_SNAPSHOT_FORMATS:
        raise ValueError(f"unsupported snapshot format {data.get('format')!r}")
    st = ColonyState(archive)
    st.server_id = data["serverid"]
    st.cluster_id = data["clusterid"]
    st.last_now = data["lastnow"]
    st.next_seq = data["nextseq"]
    st.applied_changes = data["appliedchanges"]
    gens = {c: g for c, g in data.get("colonygen", [])}
    for c in data["colonies"]:
        colony = Colony.from_snapshot(c)
        st.add_colony(colony, gens.get(colony.name, 0))
    for e in data["executors"]:
        st.add_executor(Executor.from_snapshot(e))
    # Graphs first: adding a member counts it in its graph. Their states come from the
    # snapshot; the counts are rebuilt from the members.
    for g in data.get("processgraphs", []):
        st.add_graph(ProcessGraph.from_snapshot(g))
    for p in data["processes"]:
        st.add_process(Process.from_snapshot(p))
    st.nonces = NonceBook.from_snapshot(data["nonces"])
    st.members = {pid: addr for pid, addr in data.get("members", [])}
    for at, key, kind in data.get("timers", []):
        st.timers.set(key, at, kind)
    for d in data.get("generators", []):
        st.generators.add(Generator.from_snapshot(d))
    for d in data.get("crons", []):
        st.crons.add(Cron.from_snapshot(d))
    for d in data.get("logs", []):
        st.logs[d["processid"]] = ProcessLog.from_snapshot(d)
    for d in data.get("functions", []):
        st.add_function(Function.from_snapshot(d))
    st.paused = dict.fromkeys(data.get("pausedcolonies", []))
    st.stale_after = {c: s for c, s in data.get("staleafter", [])}
    st.idempotency = IdempotencyBook.from_snapshot(data.get("idempotencykeys", []))
    # Format 3: [colony, seconds]; format 4: [colony, seconds, count].
    st.retention = {r[0]: (r[1], r[2] if len(r) > 2 else 0) for r in data.get("retention", [])}
    st.archived = {(c, kind, state): n for c, kind, state, n in data.get("archived", [])}
    st.purges = {k: g for k, g in data.get("purges", [])}
    st.removals = {r[0]: list(r[1:]) for r in data.get("removals", [])}
    if data["format"] < 4:
        for pid, p in st.processes.items():
            if p.state in FINISHED_STATES and not p.processgraphid:
                st.settling_processes[pid] = None
        for gid, g in st.graphs.items():
            if g.state in FINISHED_STATES:
                st.settling_graphs[gid] = None
    return st
