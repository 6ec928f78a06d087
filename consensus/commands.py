"""The write commands: one handler per client write, plus the internal bootstrap and tick.

A handler runs after the machine has checked the nonce, validated the body and checked the
role rule (roles.py). It checks the business rules (400/404) before its first mutation, so a
refused command changes nothing (but for its nonce, which the machine records).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from consensus import (
    function_ops,
    history,
    liveness,
    log_ops,
    pause_ops,
    retention,  # Beyond Colonies
    timers,
    workflows,
)
from consensus.archive import PROCESS
from consensus.crons import WRITES as CRON_WRITES
from consensus.generators import WRITES as GENERATOR_WRITES
from consensus.lifecycle import Event
from consensus.listing import ALL_STATES
from consensus.process_ops import (
    assign_next,
    cancel,
    check_current_attempt,
    close,
    expire_due,
    new_process,
    normalized_spec,
    requeue,
)
from consensus.records import Attribute, Colony, Executor, attribute_id
from consensus.request import Request
from consensus.state import ColonyState
from protocol.errors import BadRequest, NotFound
from protocol.messages import APPROVED, FINISHED_STATES, PENDING, REJECTED, RUNNING
from protocol.schema import HEX64

NO_PROCESS = "no process available for assignment"


Handler = Callable[[ColonyState, Request, int], Any]

# Colonies and executors.


def add_colony(st: ColonyState, req: Request, now: int) -> Any:
    c = req.body["colony"]
    if c["name"] in st.colonies:
        raise BadRequest(f"colony '{c['name']}' already exists")
    owned = st.colony_by_owner.get(c["colonyid"])
    if owned is not None:
        raise BadRequest(f"colony id {c['colonyid']} already owns colony '{owned}'")
    colony = Colony(colonyid=c["colonyid"], name=c["name"])
    st.add_colony(colony, gen=st.next_seq)  # a number no colony had (consensus/history.py)
    st.next_seq += 1
    return colony.to_wire()


def remove_colony(st: ColonyState, req: Request, now: int) -> Any:
    name = st.colony(req.body["colonyname"]).name
    st.remove_colony(name)
    history.purge_colony(st, now)  # its archived history goes in batches
    st.applied_changes += 1  # waiters on this colony must wake up and learn it is gone
    return {}


def add_executor(st: ColonyState, req: Request, now: int) -> Any:
    e = req.body["executor"]
    if e["executorid"] in st.executors:
        raise BadRequest(f"executor id {e['executorid']} is already registered")
    if e["executorname"] in st.colony_executors[e["colonyname"]]:
        raise BadRequest(
            f"executor '{e['executorname']}' already exists in colony '{e['colonyname']}'"
        )
    ex = Executor(
        executorid=e["executorid"],
        executortype=e["executortype"],
        executorname=e["executorname"],
        colonyname=e["colonyname"],
        state=PENDING,  # whatever the client sent: only the colony owner approves
        commissiontime=now,
    )
    st.add_executor(ex)
    return ex.to_wire()


def set_executor_state(state: int) -> Handler:
    """Approve or reject; the colony owner may toggle freely, as in Colonies."""

    def handler(st: ColonyState, req: Request, now: int) -> Any:
        ex = st.executor_named(req.body["colonyname"], req.body["executorname"])
        ex.state = state
        st.applied_changes += 1
        return {}

    return handler


def remove_executor(st: ColonyState, req: Request, now: int) -> Any:
    ex = st.executor_named(req.body["colonyname"], req.body["executorname"])
    # As Colonies: its running processes go back to the queue without counting a retry.
    for pid in st.running_of(ex.executorid):
        requeue(st, st.processes[pid], now, Event.EXECUTOR_REMOVED)
    st.remove_executor(ex)
    st.applied_changes += 1
    return {}


# Processes.


def submit(st: ColonyState, req: Request, now: int) -> Any:
    pid = req.gen
    if not isinstance(pid, str) or not HEX64.match(pid):
        raise BadRequest("a submit needs a generated 64-hex process id ('gen')")
    if st.process_exists(pid):
        raise BadRequest(f"process id {pid} is already in use")
    spec = normalized_spec(req.body["spec"])
    # Idempotency keys (consensus/idempotency.py): the same key in the same colony within
    # the window returns the first process.
    ikey = spec.get("idempotencykey")
    if ikey is not None:
        st.idempotency.prune(now)
        first = st.idempotency.find(spec["conditions"]["colonyname"], ikey)
        if first is not None and st.process_exists(first):
            return st.process(first).to_wire()
    # The role rule made the caller an approved member (an executor).
    p = new_process(st, pid, spec, req.caller, now)
    st.add_process(p)
    if ikey is not None:
        st.idempotency.remember(p.colonyname, ikey, pid, now)
    st.applied_changes += 1
    return p.to_wire()


def assign(st: ColonyState, req: Request, now: int) -> Any:
    # The body's timeout is the node's business (long-poll); here we try exactly once.
    p = assign_next(st, st.executors[req.caller], now)
    if p is None:
        colony = req.body["colonyname"]
        raise NotFound(pause_ops.paused_reason(colony) if colony in st.paused else NO_PROCESS)
    return p.to_wire()


def close_successful(st: ColonyState, req: Request, now: int) -> Any:
    p = st.process(req.body["processid"])  # an archived one is refused by the attempt check
    check_current_attempt(p, req.body["attempt"])
    close(st, p, True, req.body["out"], [], now)
    st.applied_changes += 1
    return {}


def close_failed(st: ColonyState, req: Request, now: int) -> Any:
    p = st.process(req.body["processid"])
    check_current_attempt(p, req.body["attempt"])
    close(st, p, False, [], req.body["errors"], now)
    st.applied_changes += 1
    return {}


def close_assign(st: ColonyState, req: Request, now: int) -> Any:
    """Close this attempt, then assign the caller's next process (None if there is none)."""
    b = req.body
    p = st.process(b["processid"])
    check_current_attempt(p, b["attempt"])  # the last check that can refuse: nothing done yet
    close(st, p, b["successful"], b["out"], b["errors"], now)
    st.applied_changes += 1
    nxt = assign_next(st, st.executors[req.caller], now)
    return {"closed": {}, "process": nxt.to_wire() if nxt is not None else None}


def remove_process(st: ColonyState, req: Request, now: int) -> Any:
    p = st.process(req.body["processid"])
    if p.processgraphid:
        raise BadRequest(
            f"process {p.processid} belongs to workflow {p.processgraphid}: "
            "remove the workflow instead (removeprocessgraphmsg)"
        )
    if p.state == RUNNING:
        raise BadRequest(f"process {p.processid} is running and cannot be removed")
    if p.archived:
        history.remove_process(st, p)
    else:
        st.remove_process(p)
    return {}


def remove_all_processes(st: ColonyState, req: Request, now: int) -> Any:
    """Workflow members are left alone: they go with their graph (removeallprocessgraphsmsg),
    so no graph ever names a process that is gone."""
    colony, state = req.body["colonyname"], req.body["state"]
    if state == RUNNING:
        raise BadRequest("running processes cannot be removed")
    states = [s for s in ALL_STATES if s != RUNNING] if state == -1 else [state]
    for s in states:
        for pid in st.listing.ids(colony, s):
            p = st.processes[pid]
            if not p.processgraphid:
                st.remove_process(p)
    finished = [s for s in states if s in FINISHED_STATES]
    if finished:
        # Archived ones: a batch now, the rest over the next ticks (consensus/history.py).
        history.start_removal(st, colony, PROCESS, finished, now)
    return {}


def cancel_process(st: ColonyState, req: Request, now: int) -> Any:
    p = st.process(req.body["processid"])
    if p.processgraphid:
        raise BadRequest(
            f"process {p.processid} belongs to workflow {p.processgraphid}: "
            "cancel the workflow instead (cancelprocessgraphmsg)"
        )
    cancel(st, p, now)
    return {}


def add_attribute(st: ColonyState, req: Request, now: int) -> Any:
    a = req.body["attribute"]
    p = st.process(a["targetid"])
    if p.state != RUNNING:
        raise BadRequest(f"process {p.processid} is not running: attributes cannot be added")
    aid = attribute_id(p.processid, a["key"], a["attributetype"])
    if aid in st.attributes:
        raise BadRequest(
            f"process {p.processid} already has an attribute '{a['key']}' "
            f"of type {a['attributetype']}"
        )
    attr = Attribute(
        attributeid=aid,
        targetid=p.processid,
        targetcolonyname=p.colonyname,
        attributetype=a["attributetype"],
        key=a["key"],
        value=a["value"],
    )
    st.add_attribute(p, attr)
    return attr.to_wire()


def add_member(st: ColonyState, req: Request, now: int) -> Any:
    """Record a member's address; the node then adds it to the Raft group."""
    pid, addr = req.body["peerid"], req.body["addr"]
    if not addr.endswith(f"/p2p/{pid}"):
        raise BadRequest(f"member address {addr!r} must end in /p2p/{pid}")
    st.members[pid] = addr
    return {"members": dict(st.members)}


def remove_member(st: ColonyState, req: Request, now: int) -> Any:
    pid = req.body["peerid"]
    if pid not in st.members:
        raise NotFound(f"{pid} is not a member of this cluster")
    if len(st.members) == 1:
        raise BadRequest("cannot remove the last member of the cluster")
    del st.members[pid]
    return {"members": dict(st.members)}


WRITES: dict[str, Handler] = {
    "addcolonymsg": add_colony,
    "removecolonymsg": remove_colony,
    "addexecutormsg": add_executor,
    "approveexecutormsg": set_executor_state(APPROVED),
    "rejectexecutormsg": set_executor_state(REJECTED),
    "removeexecutormsg": remove_executor,
    "submitfuncspecmsg": submit,
    "assignprocessmsg": assign,
    "closesuccessfulmsg": close_successful,
    "closefailedmsg": close_failed,
    "closeassignmsg": close_assign,
    "removeprocessmsg": remove_process,
    "removeallprocessesmsg": remove_all_processes,
    "cancelprocessmsg": cancel_process,
    "addattributemsg": add_attribute,
    "addmembermsg": add_member,
    "removemembermsg": remove_member,
    **workflows.WRITES,
    # Generators and crons.
    **GENERATOR_WRITES,
    **CRON_WRITES,
    # Logs, functions, pause, executor liveness.
    **log_ops.WRITES,
    **function_ops.WRITES,
    **pause_ops.WRITES,
    **liveness.WRITES,
    # Beyond Colonies: retention.
    **retention.WRITES,
}


# Internal commands: proposed by nodes, never by clients (the message registry has no such
# names, so a client cannot send them).

InternalHandler = Callable[[ColonyState, dict[str, Any], int], Any]


def bootstrap(st: ColonyState, cmd: dict[str, Any], now: int) -> Any:
    """Fix the server owner and the cluster id, once."""
    sid, cid = cmd.get("serverid"), cmd.get("clusterid")
    for label, v in (("serverid", sid), ("clusterid", cid)):
        if not isinstance(v, str) or not HEX64.match(v):
            raise BadRequest(f"bootstrap: {label} must be 64 lowercase hex characters")
    member = cmd.get("member")
    if member is not None:
        _check_member(member, "bootstrap")
    if st.server_id:
        if (st.server_id, st.cluster_id) != (sid, cid):
            raise BadRequest("bootstrap: the cluster is already bootstrapped with other ids")
        return {}
    st.server_id, st.cluster_id = sid, cid
    if member is not None:
        st.members[member[0]] = member[1]
    return {}


def _check_member(member: Any, op: str) -> None:
    if not (
        isinstance(member, list)
        and len(member) == 2
        and all(isinstance(x, str) for x in member)
        and member[1].endswith(f"/p2p/{member[0]}")
    ):
        raise BadRequest(f"{op}: member must be [peer id, its full multiaddr]")


def announce(st: ColonyState, cmd: dict[str, Any], now: int) -> Any:
    """A member's own address, proposed by that node when it starts: it replaces the address
    of a listed member (a node that moved) and lists the first node of a cluster bootstrapped
    before the member book. It never adds a node to a cluster that has a book."""
    member = cmd.get("member")
    _check_member(member, "announce")
    pid, addr = member
    if pid in st.members or not st.members:
        st.members[pid] = addr
        return {"members": dict(st.members)}
    raise NotFound(f"{pid} is not a member of this cluster")


def barrier(st: ColonyState, cmd: dict[str, Any], now: int) -> Any:
    """A no-op through the log: a read after it sees every write committed before it."""
    return {}


def tick(st: ColonyState, cmd: dict[str, Any], now: int) -> Any:
    result: dict[str, Any] = expire_due(st, now)
    fired = timers.fire_due(st, now)
    if result["requeued"] or result["failed"] or fired:
        st.applied_changes += 1
    if fired:
        result["timers"] = fired
    return result


INTERNAL: dict[str, InternalHandler] = {
    "bootstrap": bootstrap,
    "announce": announce,
    "tick": tick,
    "barrier": barrier,
}
