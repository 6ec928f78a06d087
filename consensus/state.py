"""The replicated colony state: records plus the indexes derived from them.

This module owns consistency, not policy: every mutation goes through a primitive here that
updates the records and every index together (assign queue, deadlines, listings, running
processes per executor), so no command can leave them disagreeing. Role rules live in
roles.py, the commands in commands.py.

Index membership of a process is a pure function of its fields (`_index`/`_unindex`), so a
state change is: unindex, assign fields, reindex. The field assignments cannot fail, which
keeps a command from being half-applied.

Process graphs (workflows) are kept the same way: a member's state is counted in its graph
(`_index`/`_unindex`), and every transition of a member refreshes the graph's state, times
and listing in O(1). What a member's end does to the rest of its graph (children become
ready, a failure fails the graph) is workflow policy, in graphs.py.

Only live state is here: a standalone process that finishes, and a graph that finishes with
its members, are noted in `settling_*` and moved to the archive (consensus/archive.py) when
the command ends (consensus/history.py). Lookups by id (`process`, `graph`, `attribute`) find
archived records too, as read-only views.
"""

from __future__ import annotations

from typing import Any

from consensus.archive import GRAPH, PROCESS, Archive, MemoryArchive
from consensus.assign_queue import AssignQueue
from consensus.concurrency import ConcurrencyIndex
from consensus.deadlines import EXEC, WAIT, DeadlineIndex
from consensus.function_record import Function
from consensus.idempotency import IdempotencyBook
from consensus.lifecycle import Event, next_state
from consensus.listing import ALL_STATES, ProcessListing
from consensus.nonces import NonceBook
from consensus.process_log import ProcessLog
from consensus.records import Attribute, Colony, Executor, Process, ProcessGraph, graph_state
from consensus.schedule_records import Cron, Generator, Registry
from protocol.errors import InternalError, NotFound
from protocol.messages import CANCELLED, FAILED, FINISHED_STATES, RUNNING, SUCCESS, WAITING

# The process fields a transition may change (everything else is fixed at submission).
_MUTABLE = frozenset(
    {
        "assignedexecutorid",
        "isassigned",
        "starttime",
        "endtime",
        "waitdeadline",
        "execdeadline",
        "retries",
        "attempt",
        "out",
        "errors",
        "inputs",
        "waitforparents",
        "parents",
        "children",
        "backoffuntil",  # retries with backoff
        "parked",  # concurrency limits
    }
)


# Statistics keys, as Colonies names them: waitingprocesses, ..., cancelledworkflows.
_STAT_LABELS = (
    (WAITING, "waiting"),
    (RUNNING, "running"),
    (SUCCESS, "successful"),
    (FAILED, "failed"),
    (CANCELLED, "cancelled"),
)


class ColonyState:
    def __init__(self, archive: Archive | None = None) -> None:
        self.server_id = ""
        self.cluster_id = ""
        # The Raft group's members: libp2p peer id -> full multiaddr. PySyncObj keeps the
        # ids; the addresses live here so every node (and every client) can reach every member.
        self.members: dict[str, str] = {}
        self.last_now = 0  # the latest time applied; time never goes backwards
        self.next_seq = 1  # submission sequence numbers
        self.applied_changes = 0
        self.colonies: dict[str, Colony] = {}  # by name
        self.colony_by_owner: dict[str, str] = {}  # colonyid -> name
        self.executors: dict[str, Executor] = {}  # by executorid
        self.colony_executors: dict[str, dict[str, str]] = {}  # colony -> name -> executorid
        self.processes: dict[str, Process] = {}
        self.graphs: dict[str, ProcessGraph] = {}
        self.graph_listing = ProcessListing()  # graphs per (colony, state), by seq
        self.attributes: dict[str, Attribute] = {}
        self.queue = AssignQueue()
        self.deadlines = DeadlineIndex()
        self.timers = DeadlineIndex()  # key -> (time, kind); see consensus/timers.py
        self.listing = ProcessListing()
        self.running_by_executor: dict[str, dict[str, None]] = {}
        self.nonces = NonceBook()
        # Generators and crons (generators.py, crons.py); their timers are in `timers`.
        self.generators: Registry[Generator] = Registry()
        self.crons: Registry[Cron] = Registry()
        # Beyond Colonies (backoff.py, idempotency.py, concurrency.py, retention.py).
        self.idempotency = IdempotencyBook()
        self.concurrency = ConcurrencyIndex()  # derived from the processes
        # colony -> (seconds, count) set by its owner; absent = the default (retention.py)
        self.retention: dict[str, tuple[int, int]] = {}
        # Logs, functions, pause, executor liveness (log_ops, function_ops, pause_ops,
        # liveness). Dicts used as ordered sets: iteration order is insertion order, the same
        # on every replica, and snapshots sort them anyway.
        self.logs: dict[str, ProcessLog] = {}  # by processid; goes with its process
        self.functions: dict[str, Function] = {}  # by functionid
        self.executor_functions: dict[str, dict[str, str]] = {}  # eid -> funcname -> fid
        self.paused: dict[str, None] = {}  # colonies whose assignment is paused
        self.stale_after: dict[str, int] = {}  # colony -> seconds; absent = staleness off
        # History (consensus/archive.py, consensus/history.py).
        self.archive: Archive = archive if archive is not None else MemoryArchive()
        # A colony's generation: its archived rows carry it, so those of a removed colony
        # never show in one created later under the same name.
        self.colony_gen: dict[str, int] = {}
        # Archived rows per (colony, kind, state); kind "process" (standalone), "member" (of
        # an archived graph) or "graph". Statistics read them; retention by count too.
        self.archived: dict[tuple[str, str, int], int] = {}
        # Removed colonies whose archived rows are still being purged: "name#gen" -> gen,
        # and removals of archived rows still going on (history.start_removal).
        self.purges: dict[str, int] = {}
        self.removals: dict[str, list[Any]] = {}
        # Finished in the command being applied: archived when it ends (history.settle).
        self.settling_processes: dict[str, None] = {}
        self.settling_graphs: dict[str, None] = {}

    # Lookups that answer 404 with a message a person can act on.

    def colony(self, name: str) -> Colony:
        c = self.colonies.get(name)
        if c is None:
            raise NotFound(f"colony '{name}' not found")
        return c

    def executor_named(self, colonyname: str, executorname: str) -> Executor:
        eid = self.colony_executors.get(colonyname, {}).get(executorname)
        if eid is None:
            raise NotFound(f"executor '{executorname}' not found in colony '{colonyname}'")
        return self.executors[eid]

    def process(self, processid: str) -> Process:
        """A live process, or an archived one (a read-only view)."""
        p = self.processes.get(processid)
        if p is None:
            p = self.archived_process(processid)
        if p is None:
            raise NotFound(f"process {processid} not found")
        return p

    def graph(self, processgraphid: str) -> ProcessGraph:
        """A live graph, or an archived one (a read-only view)."""
        g = self.graphs.get(processgraphid)
        if g is None:
            row = self.archive.get(GRAPH, processgraphid)
            if row is not None and self.colony_gen.get(row.colony) == row.gen:
                g = ProcessGraph.from_snapshot(row.record, archived=True)
        if g is None:
            raise NotFound(f"process graph {processgraphid} not found")
        return g

    def attribute(self, attributeid: str) -> Attribute:
        a = self.attributes.get(attributeid)
        if a is None:
            owner = self.archive.attribute_owner(attributeid)
            p = self.archived_process(owner) if owner is not None else None
            a = next((x for x in p.attributes if x.attributeid == attributeid), None) if p else None
        if a is None:
            raise NotFound(f"attribute {attributeid} not found")
        return a

    def archived_process(self, processid: str) -> Process | None:
        row = self.archive.get(PROCESS, processid)
        if row is None or self.colony_gen.get(row.colony) != row.gen:
            return None
        return Process.from_snapshot(row.record, archived=True)

    def process_exists(self, processid: str) -> bool:
        return processid in self.processes or self.archived_process(processid) is not None

    def graph_exists(self, processgraphid: str) -> bool:
        return processgraphid in self.graphs or self.archive.get(GRAPH, processgraphid) is not None

    # Colonies and executors.

    def add_colony(self, colony: Colony, gen: int) -> None:
        self.colonies[colony.name] = colony
        self.colony_by_owner[colony.colonyid] = colony.name
        self.colony_executors[colony.name] = {}
        self.colony_gen[colony.name] = gen

    def remove_colony(self, name: str) -> None:
        """Remove a colony with everything in it: graphs, processes, attributes, executors."""
        colony = self.colonies[name]
        for state in ALL_STATES:
            for gid in self.graph_listing.ids(name, state):
                self.remove_graph(self.graphs[gid])
        for state in ALL_STATES:
            for pid in self.listing.ids(name, state):
                self.remove_process(self.processes[pid])
        for eid in list(self.colony_executors[name].values()):
            self.remove_executor(self.executors[eid])
        del self.colony_executors[name]
        self.generators.remove_colony(name, self.timers.clear)
        self.crons.remove_colony(name, self.timers.clear)
        self.paused.pop(name, None)
        self.stale_after.pop(name, None)
        self.retention.pop(name, None)  # retention: its sweep timer then finds nothing
        # Its archived rows are invisible from now on (another generation) and purged in
        # batches by history.purge, so that no log entry has to delete a colony's history.
        gen = self.colony_gen.pop(name)
        for key in [k for k in self.archived if k[0] == name]:
            del self.archived[key]
        self.purges[f"{name}#{gen}"] = gen
        del self.colony_by_owner[colony.colonyid]
        del self.colonies[name]

    def add_executor(self, executor: Executor) -> None:
        self.executors[executor.executorid] = executor
        self.colony_executors[executor.colonyname][executor.executorname] = executor.executorid

    def remove_executor(self, executor: Executor) -> None:
        """Drop the record. Its running processes must have been requeued (or removed)."""
        if self.running_by_executor.get(executor.executorid):
            raise InternalError("executor still has running processes")
        for fid in self.executor_functions.pop(executor.executorid, {}).values():
            del self.functions[fid]  # as Colonies: its functions go with it
        self.timers.clear(f"stale:{executor.executorid}")
        del self.colony_executors[executor.colonyname][executor.executorname]
        del self.executors[executor.executorid]

    def running_of(self, executorid: str) -> list[str]:
        """The ids of the processes this executor runs, sorted (an order every replica shares)."""
        return sorted(self.running_by_executor.get(executorid, ()))

    def add_function(self, f: Function) -> None:
        self.functions[f.functionid] = f
        self.executor_functions.setdefault(f.executorid, {})[f.funcname] = f.functionid

    def remove_function(self, f: Function) -> None:
        mine = self.executor_functions[f.executorid]
        del mine[f.funcname]
        if not mine:
            del self.executor_functions[f.executorid]
        del self.functions[f.functionid]

    # Processes.

    def add_process(self, p: Process) -> None:
        self.processes[p.processid] = p
        for a in p.attributes:
            self.attributes[a.attributeid] = a
        self._index(p)

    def remove_process(self, p: Process) -> None:
        self.logs.pop(p.processid, None)  # its log lines go with it
        self._unindex(p)
        for a in p.attributes:
            del self.attributes[a.attributeid]
        del self.processes[p.processid]

    def transition(self, p: Process, event: Event, changes: dict[str, Any], now: int) -> None:
        """Move `p` along the lifecycle table and set `changes`, keeping every index right
        (its graph's state too, which may change at `now`)."""
        new_state = next_state(p.state, event)  # refuses an illegal move before any change
        self._set(p, new_state, changes, now)

    def update(self, p: Process, changes: dict[str, Any], now: int) -> None:
        """Change fields of `p` without a state change (e.g. its parents all succeeded)."""
        self._set(p, p.state, changes, now)

    def _set(self, p: Process, state: int, changes: dict[str, Any], now: int) -> None:
        if p.archived:
            raise InternalError(f"archived process {p.processid} cannot change")
        for k in changes:
            if k not in _MUTABLE:
                raise InternalError(f"process field '{k}' cannot change")
        was_running = p.state == RUNNING
        self._unindex(p)
        p.state = state
        for k, v in changes.items():
            setattr(p, k, v)
        self._index(p)
        if was_running and state != RUNNING and "concurrencykey" in p.spec:
            self._release_parked(p.colonyname, p.spec["concurrencykey"], now)
        if p.processgraphid:
            self.refresh_graph(self.graphs[p.processgraphid], now)
        elif state in FINISHED_STATES:
            self.settling_processes[p.processid] = None

    # Process graphs. Members are added with add_process after their graph, and removed
    # with it.

    def add_graph(self, g: ProcessGraph) -> None:
        self.graphs[g.processgraphid] = g
        self.graph_listing.add(g.colonyname, g.state, "", g.seq, g.processgraphid)

    def remove_graph(self, g: ProcessGraph) -> None:
        """Remove a graph and all its processes."""
        for pid in g.processids:
            self.remove_process(self.processes[pid])
        self.graph_listing.remove(g.colonyname, g.state, "", g.seq)
        del self.graphs[g.processgraphid]

    def refresh_graph(self, g: ProcessGraph, now: int) -> None:
        """Recompute the graph's state from its member counts (O(1)); it starts when it first
        runs and ends when it reaches a final state (a graph cancelled or failed before
        anything ran keeps starttime 0)."""
        state = graph_state(g.counts, len(g.processids))
        if state == g.state:
            return
        self.graph_listing.remove(g.colonyname, g.state, "", g.seq)
        g.state = state
        if state == RUNNING and g.starttime == 0:
            g.starttime = now
        if state in FINISHED_STATES:
            g.endtime = now
            self.settling_graphs[g.processgraphid] = None
        self.graph_listing.add(g.colonyname, g.state, "", g.seq, g.processgraphid)

    def add_attribute(self, p: Process, a: Attribute) -> None:
        p.attributes.append(a)
        self.attributes[a.attributeid] = a

    def _index(self, p: Process) -> None:
        pid = p.processid
        self.listing.add(p.colonyname, p.state, p.executortype, p.seq, pid)
        if p.processgraphid:
            self.graphs[p.processgraphid].counts[p.state] += 1
        if p.state == WAITING:
            # A workflow member waiting for its parents is neither assignable nor on a wait
            # deadline: its wait starts when it becomes ready (semantics quirk #9, decided).
            if not p.waitforparents:
                self._enqueue(p)
                if p.waitdeadline > 0:
                    self.deadlines.set(pid, p.waitdeadline, WAIT)
        elif p.state == RUNNING:
            if p.execdeadline > 0:
                self.deadlines.set(pid, p.execdeadline, EXEC)
            self.running_by_executor.setdefault(p.assignedexecutorid, {})[pid] = None
        self._index_beyond(p, True)

    def _unindex(self, p: Process) -> None:
        pid = p.processid
        self.listing.remove(p.colonyname, p.state, p.executortype, p.seq)
        if p.processgraphid:
            self.graphs[p.processgraphid].counts[p.state] -= 1
        self.deadlines.clear(pid)
        if p.state == WAITING:
            if not p.waitforparents:
                self._dequeue(p)
        elif p.state == RUNNING:
            running = self.running_by_executor[p.assignedexecutorid]
            del running[pid]
            if not running:
                del self.running_by_executor[p.assignedexecutorid]
        self._index_beyond(p, False)

    # Beyond Colonies: retries with backoff, concurrency limits, retention. A ready WAITING
    # process is in exactly one place: backing off (only its timer), parked on its
    # concurrency key, or in the assign queue.

    def _enqueue(self, p: Process) -> None:
        if p.backoffuntil:
            return
        if p.parked:
            self.concurrency.park(p.colonyname, p.spec["concurrencykey"], p.queue_key)
        else:
            self.queue.add(p.colonyname, p.executortype, p.target_names, p.queue_key)

    def _dequeue(self, p: Process) -> None:
        if p.backoffuntil:
            return
        if p.parked:
            self.concurrency.unpark(p.colonyname, p.spec["concurrencykey"], p.queue_key)
        else:
            self.queue.remove(p.colonyname, p.executortype, p.target_names, p.queue_key)

    def _index_beyond(self, p: Process, add: bool) -> None:
        ckey = p.spec.get("concurrencykey")
        if ckey is not None and p.state == RUNNING:
            if add:
                self.concurrency.started(p.colonyname, ckey)
            else:
                self.concurrency.stopped(p.colonyname, ckey)

    def _release_parked(self, colony: str, ckey: str, now: int) -> None:
        """A process of `ckey` stopped running: move the earliest parked processes of the
        key back into the queue, as many as there are free slots (concurrency.py)."""
        released = 0
        while True:
            head = self.concurrency.first_parked(colony, ckey)
            if head is None:
                return
            q = self.processes[head[2]]
            if self.concurrency.running(colony, ckey) + released >= q.spec.get(
                "concurrencylimit", 1
            ):
                return
            self._set(q, q.state, {"parked": False}, now)
            released += 1

    # Statistics: the live listings' sizes plus the archived counts.

    def statistics(self) -> dict[str, int]:
        stats = {"colonies": len(self.colonies), "executors": len(self.executors)}
        archived: dict[tuple[str, int], int] = {}
        for (_colony, kind, state), n in self.archived.items():
            key = ("graph" if kind == "graph" else "process", state)
            archived[key] = archived.get(key, 0) + n
        for state, label in _STAT_LABELS:
            stats[f"{label}processes"] = (
                self.listing.total(state) + archived.get(("process", state), 0)
            )
        for state, label in _STAT_LABELS:
            stats[f"{label}workflows"] = (
                self.graph_listing.total(state) + archived.get(("graph", state), 0)
            )
        return stats

    def colony_statistics(self, name: str) -> dict[str, int]:
        stats = {"colonies": 1, "executors": len(self.colony_executors[name])}
        a = self.archived
        for state, label in _STAT_LABELS:
            stats[f"{label}processes"] = (
                self.listing.count(name, state)
                + a.get((name, "process", state), 0)
                + a.get((name, "member", state), 0)
            )
        for state, label in _STAT_LABELS:
            stats[f"{label}workflows"] = (
                self.graph_listing.count(name, state) + a.get((name, "graph", state), 0)
            )
        return stats
