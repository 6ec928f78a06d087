"""The replicated colony state: records plus the indexes derived from them.

This module owns consistency, not policy: every mutation goes through a primitive here that
updates the records and every index together (assign queue, deadlines, listings, running
processes per executor), so no command can leave them disagreeing. Role rules live in
roles.py, the commands in commands.py.

Index membership of a process is a pure function of its fields (`_index`/`_unindex`), so a
state change is: unindex, assign fields, reindex. The field assignments cannot fail, which
keeps a command from being half-applied.
"""

from __future__ import annotations

from typing import Any

from consensus.assign_queue import AssignQueue
from consensus.deadlines import EXEC, WAIT, DeadlineIndex
from consensus.lifecycle import Event, next_state
from consensus.listing import ALL_STATES, ProcessListing
from consensus.nonces import NonceBook
from consensus.records import Attribute, Colony, Executor, Process
from protocol.errors import InternalError, NotFound
from protocol.messages import FAILED, RUNNING, SUCCESS, WAITING

SNAPSHOT_FORMAT = 1

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
    }
)


class ColonyState:
    def __init__(self) -> None:
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
        self.attributes: dict[str, Attribute] = {}
        self.queue = AssignQueue()
        self.deadlines = DeadlineIndex()
        self.listing = ProcessListing()
        self.running_by_executor: dict[str, dict[str, None]] = {}
        self.nonces = NonceBook()

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
        p = self.processes.get(processid)
        if p is None:
            raise NotFound(f"process {processid} not found")
        return p

    def attribute(self, attributeid: str) -> Attribute:
        a = self.attributes.get(attributeid)
        if a is None:
            raise NotFound(f"attribute {attributeid} not found")
        return a

    # Colonies and executors.

    def add_colony(self, colony: Colony) -> None:
        self.colonies[colony.name] = colony
        self.colony_by_owner[colony.colonyid] = colony.name
        self.colony_executors[colony.name] = {}

    def remove_colony(self, name: str) -> None:
        """Remove a colony with everything in it: processes, attributes, executors."""
        colony = self.colonies[name]
        for state in ALL_STATES:
            for pid in self.listing.ids(name, state):
                self.remove_process(self.processes[pid])
        for eid in list(self.colony_executors[name].values()):
            self.remove_executor(self.executors[eid])
        del self.colony_executors[name]
        del self.colony_by_owner[colony.colonyid]
        del self.colonies[name]

    def add_executor(self, executor: Executor) -> None:
        self.executors[executor.executorid] = executor
        self.colony_executors[executor.colonyname][executor.executorname] = executor.executorid

    def remove_executor(self, executor: Executor) -> None:
        """Drop the record. Its running processes must have been requeued (or removed)."""
        if self.running_by_executor.get(executor.executorid):
            raise InternalError("executor still has running processes")
        del self.colony_executors[executor.colonyname][executor.executorname]
        del self.executors[executor.executorid]

    def running_of(self, executorid: str) -> list[str]:
        """The ids of the processes this executor runs, sorted (an order every replica shares)."""
        return sorted(self.running_by_executor.get(executorid, ()))

    # Processes.

    def add_process(self, p: Process) -> None:
        self.processes[p.processid] = p
        for a in p.attributes:
            self.attributes[a.attributeid] = a
        self._index(p)

    def remove_process(self, p: Process) -> None:
        self._unindex(p)
        for a in p.attributes:
            del self.attributes[a.attributeid]
        del self.processes[p.processid]

    def transition(self, p: Process, event: Event, changes: dict[str, Any]) -> None:
        """Move `p` along the lifecycle table and set `changes`, keeping every index right."""
        new_state = next_state(p.state, event)  # refuses an illegal move before any change
        for k in changes:
            if k not in _MUTABLE:
                raise InternalError(f"process field '{k}' cannot change")
        self._unindex(p)
        p.state = new_state
        for k, v in changes.items():
            setattr(p, k, v)
        self._index(p)

    def add_attribute(self, p: Process, a: Attribute) -> None:
        p.attributes.append(a)
        self.attributes[a.attributeid] = a

    def _index(self, p: Process) -> None:
        pid = p.processid
        self.listing.add(p.colonyname, p.state, p.executortype, p.seq, pid)
        if p.state == WAITING:
            self.queue.add(p.colonyname, p.executortype, p.target_names, p.queue_key)
            if p.waitdeadline > 0:
                self.deadlines.set(pid, p.waitdeadline, WAIT)
        elif p.state == RUNNING:
            if p.execdeadline > 0:
                self.deadlines.set(pid, p.execdeadline, EXEC)
            self.running_by_executor.setdefault(p.assignedexecutorid, {})[pid] = None

    def _unindex(self, p: Process) -> None:
        pid = p.processid
        self.listing.remove(p.colonyname, p.state, p.executortype, p.seq)
        self.deadlines.clear(pid)
        if p.state == WAITING:
            self.queue.remove(p.colonyname, p.executortype, p.target_names, p.queue_key)
        elif p.state == RUNNING:
            running = self.running_by_executor[p.assignedexecutorid]
            del running[pid]
            if not running:
                del self.running_by_executor[p.assignedexecutorid]

    # Statistics: always the listing sizes.

    def statistics(self) -> dict[str, int]:
        return {
            "colonies": len(self.colonies),
            "executors": len(self.executors),
            "waitingprocesses": self.listing.total(WAITING),
            "runningprocesses": self.listing.total(RUNNING),
            "successfulprocesses": self.listing.total(SUCCESS),
            "failedprocesses": self.listing.total(FAILED),
        }

    def colony_statistics(self, name: str) -> dict[str, int]:
        return {
            "colonies": 1,
            "executors": len(self.colony_executors[name]),
            "waitingprocesses": self.listing.count(name, WAITING),
            "runningprocesses": self.listing.count(name, RUNNING),
            "successfulprocesses": self.listing.count(name, SUCCESS),
            "failedprocesses": self.listing.count(name, FAILED),
        }

    # Snapshots: plain msgpack-able data in a canonical order (sorted by name or sequence),
    # so two replicas with the same state produce the same bytes.

    def to_snapshot(self) -> dict[str, Any]:
        return {
            "format": SNAPSHOT_FORMAT,
            "serverid": self.server_id,
            "clusterid": self.cluster_id,
            "lastnow": self.last_now,
            "nextseq": self.next_seq,
            "appliedchanges": self.applied_changes,
            "colonies": [self.colonies[n].to_wire() for n in sorted(self.colonies)],
            "executors": [
                self.executors[eid].to_wire()
                for eid in sorted(
                    self.executors,
                    key=lambda e: (self.executors[e].colonyname, self.executors[e].executorname),
                )
            ],
            "processes": [
                p.to_snapshot() for p in sorted(self.processes.values(), key=lambda p: p.seq)
            ],
            "nonces": self.nonces.to_snapshot(),
            "members": [[pid, self.members[pid]] for pid in sorted(self.members)],
        }

    @classmethod
    def from_snapshot(cls, data: dict[str, Any]) -> ColonyState:
        if data.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"unsupported snapshot format {data.get('format')!r}")
        st = cls()
        st.server_id = data["serverid"]
        st.cluster_id = data["clusterid"]
        st.last_now = data["lastnow"]
        st.next_seq = data["nextseq"]
        st.applied_changes = data["appliedchanges"]
        for c in data["colonies"]:
            st.add_colony(Colony.from_snapshot(c))
        for e in data["executors"]:
            st.add_executor(Executor.from_snapshot(e))
        for p in data["processes"]:
            st.add_process(Process.from_snapshot(p))
        st.nonces = NonceBook.from_snapshot(data["nonces"])
        st.members = {pid: addr for pid, addr in data.get("members", [])}
        return st
