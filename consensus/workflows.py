"""The workflow messages: submit a workflow, read, cancel and remove process graphs, and add
a child to a running graph (dynamic workflows). Rules in graphs.py; role rules in roles.py.

Ids are deterministic: the node draws one random 64-hex id per write (`req.gen`); a
submitted graph's id is that id and its i-th process's id is sha3-256 of "<gen>/<i>"
(graphs.member_id); a child added with addchildmsg takes the id itself, as a single submit
does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from consensus import graphs, history
from consensus.archive import GRAPH
from consensus.listing import ALL_STATES
from consensus.process_ops import new_process, normalized_spec
from consensus.records import ProcessGraph
from consensus.request import Request
from consensus.state import ColonyState
from protocol.errors import BadRequest
from protocol.messages import (
    FINISHED_STATES,
    MAX_GRAPH_PROCESSES,
    RUNNING,
    STATE_NAMES,
    WAITING,
)
from protocol.schema import HEX64

Handler = Callable[[ColonyState, Request, int], Any]
Query = Callable[[ColonyState, Request], Any]


def _generated_id(req: Request, what: str) -> str:
    gen = req.gen
    if not isinstance(gen, str) or not HEX64.match(gen):
        raise BadRequest(f"{what} needs a generated 64-hex id ('gen')")
    return gen


def _state_name(state: int) -> str:
    return STATE_NAMES.get(state, str(state))


# Writes.


def submit_workflow(st: ColonyState, req: Request, now: int) -> Any:
    gid = _generated_id(req, "a workflow submit")
    colony = req.body["spec"]["colonyname"]  # the role rule checked it exists
    specs = [normalized_spec(s, colony) for s in req.body["spec"]["functionspecs"]]
    return create_graph(st, gid, colony, specs, req.caller, now).to_wire()


def create_graph(
    st: ColonyState,
    gid: str,
    colony: str,
    specs: list[dict[str, Any]],
    initiatorid: str,
    now: int,
    *,
    initiatorname: str = "",
    root_args: list[Any] | None = None,
    root_inputs: list[Any] | None = None,
) -> ProcessGraph:
    """Validate normalized workflow specs and add them as graph `gid`; refuses (400) before
    anything is stored. Generators and crons start their runs here too: `root_args`
    replaces the roots' spec args (a generator's batch; kwargs are kept, unlike Colonies'
    quirk 15), `root_inputs` becomes the roots' `in` (a cron's previous output).
    `initiatorname` names an initiator that may no longer be an executor."""
    parents = graphs.validate_workflow(specs)
    pids = [graphs.member_id(gid, i) for i in range(len(specs))]
    if st.graph_exists(gid) or any(st.process_exists(pid) for pid in pids):
        raise BadRequest(f"process graph id {gid} (or one of its process ids) is already in use")
    children: list[list[int]] = [[] for _ in specs]
    for i, mine in enumerate(parents):
        for j in mine:
            children[j].append(i)
    initiatorname = initiatorname or st.executors[initiatorid].executorname
    g = ProcessGraph(
        processgraphid=gid,
        seq=st.next_seq,
        colonyname=colony,
        initiatorid=initiatorid,
        initiatorname=initiatorname,
        submissiontime=now,
        rootprocessids=[pids[i] for i, mine in enumerate(parents) if not mine],
        processids=list(pids),
    )
    st.next_seq += 1
    st.add_graph(g)
    for i, spec in enumerate(specs):
        root = not parents[i]
        if root and root_args is not None:
            spec = {**spec, "args": list(root_args)}
        p = new_process(
            st,
            pids[i],
            spec,
            initiatorid,
            now,
            processgraphid=gid,
            parents=[pids[j] for j in parents[i]],
            children=[pids[k] for k in children[i]],
            initiatorname=initiatorname,
        )
        if root and root_inputs:
            p.inputs = list(root_inputs)  # not yet in the state: no index holds it
        st.add_process(p)
    st.refresh_graph(g, now)
    st.applied_changes += 1  # its roots are assignable
    return g


def remove_process_graph(st: ColonyState, req: Request, now: int) -> Any:
    g = st.graph(req.body["processgraphid"])  # the role rule checked it exists
    if g.archived:
        history.remove_graph(st, g)
        return {}
    _check_removable(st, g)
    st.remove_graph(g)
    return {}


def _check_removable(st: ColonyState, g: ProcessGraph) -> None:
    # A graph with a running member is RUNNING; the second test guards that invariant.
    if g.state == RUNNING or g.counts[RUNNING]:
        raise BadRequest(
            f"process graph {g.processgraphid} is running and cannot be removed "
            "(cancel it first, or wait until it finishes)"
        )


def remove_all_process_graphs(st: ColonyState, req: Request, now: int) -> Any:
    colony, state = req.body["colonyname"], req.body["state"]
    if state == RUNNING:
        raise BadRequest("running process graphs cannot be removed")
    states = [s for s in ALL_STATES if s != RUNNING] if state == -1 else [state]
    for s in states:
        for gid in st.graph_listing.ids(colony, s):
            st.remove_graph(st.graphs[gid])
    finished = [s for s in states if s in FINISHED_STATES]
    if finished:
        # Archived ones: a batch now, the rest over the next ticks (consensus/history.py).
        history.start_removal(st, colony, GRAPH, finished, now)
    return {}


def cancel_process_graph(st: ColonyState, req: Request, now: int) -> Any:
    g = st.graph(req.body["processgraphid"])
    if g.state in FINISHED_STATES:
        raise BadRequest(
            f"process graph {g.processgraphid} is {_state_name(g.state)} "
            "and cannot be cancelled (only waiting or running graphs can)"
        )
    graphs.cancel_graph(st, g, now)
    return {}


def add_child(st: ColonyState, req: Request, now: int) -> Any:
    """Add a process to a running graph, as a child of the caller's running process.

    insert=false: the new process is appended to the parent's children; with
    `childprocessid`, that existing (not yet started) process of the graph also becomes the
    new process's child, and waits for it. insert=true: the new process is spliced between
    the parent and all of the parent's children (each keeps its place in its parents' order,
    so its `in` order holds). Children's nodenames need not be unique (a function that fans
    out adds many of the same kind); the parent must be running, so the graph is too.
    """
    b = req.body
    g = st.graph(b["processgraphid"])
    parent = st.process(b["parentprocessid"])  # the role rule: it exists, caller runs it
    if parent.processgraphid != g.processgraphid:
        raise BadRequest(
            f"process {parent.processid} is not part of process graph {g.processgraphid}"
        )
    if parent.state != RUNNING:
        raise BadRequest(
            f"process {parent.processid} is {_state_name(parent.state)}: "
            "only a running process can add children"
        )
    if len(g.processids) >= MAX_GRAPH_PROCESSES:
        raise BadRequest(
            f"process graph {g.processgraphid} already holds {len(g.processids)} processes, "
            f"the most a graph may hold"
        )
    pid = _generated_id(req, "adding a child")
    if st.process_exists(pid):
        raise BadRequest(f"process id {pid} is already in use")
    existing = None
    if b["childprocessid"]:
        if b["insert"]:
            raise BadRequest(
                "childprocessid cannot be combined with insert (insert makes the new process "
                "the parent of all the parent's children)"
            )
        existing = st.process(b["childprocessid"])
        if existing.processgraphid != g.processgraphid:
            raise BadRequest(
                f"process {existing.processid} is not part of process graph {g.processgraphid}"
            )
        # Every ancestor of a running process has succeeded, so a process that has not
        # started cannot be one: the new edge cannot close a cycle.
        if existing.state != WAITING:
            raise BadRequest(
                f"process {existing.processid} is {_state_name(existing.state)}: only a "
                "waiting process can become a child"
            )
    spec = normalized_spec(b["spec"], g.colonyname)
    new_children = list(parent.children) if b["insert"] else []
    if existing is not None:
        new_children = [existing.processid]
    child = new_process(
        st,
        pid,
        spec,
        req.caller,
        now,
        processgraphid=g.processgraphid,
        parents=[parent.processid],
        children=new_children,
    )
    # Nothing below can refuse.
    g.processids.append(pid)
    st.add_process(child)
    if b["insert"]:
        for cid in parent.children:
            c = st.processes[cid]
            moved = [pid if q == parent.processid else q for q in c.parents]
            st.update(c, {"parents": moved}, now)
        st.update(parent, {"children": [pid]}, now)
    else:
        st.update(parent, {"children": [*parent.children, pid]}, now)
    if existing is not None:
        # It now waits for the new process too (its wait deadline restarts when it is
        # ready again); a root that gets a parent is no longer a root.
        st.update(
            existing,
            {"parents": [*existing.parents, pid], "waitforparents": True, "waitdeadline": 0},
            now,
        )
        if existing.processid in g.rootprocessids:
            g.rootprocessids.remove(existing.processid)
    st.refresh_graph(g, now)
    return child.to_wire()


# Reads.


def get_process_graph(st: ColonyState, req: Request) -> Any:
    """The graph, plus `nodes` and `edges` (parent -> child) for drawing it."""
    g = st.graph(req.body["processgraphid"])
    reply = g.to_wire()
    nodes, edges = [], []
    for p in history.graph_members(st, g):
        pid = p.processid
        nodes.append(
            {
                "processid": pid,
                "nodename": p.spec.get("nodename", ""),
                "funcname": p.spec["funcname"],
                "executortype": p.executortype,
                "state": p.state,
                "waitforparents": p.waitforparents,
            }
        )
        edges.extend({"source": pid, "target": c} for c in p.children)
    reply["nodes"] = nodes
    reply["edges"] = edges
    return reply


def get_process_graphs(st: ColonyState, req: Request) -> Any:
    """Waiting and running graphs in submission order, finished ones (archived) newest end
    first, paged with beforetime/beforeid; all states: the unfinished ones first."""
    b = req.body
    colony, count = b["colonyname"], b["count"]
    states = ALL_STATES if b["state"] == -1 else (b["state"],)
    before = history.before_cursor(b)
    out: list[Any] = []
    unfinished = [s for s in states if s not in FINISHED_STATES]
    if unfinished and before is None:
        out = [st.graphs[gid].to_wire() for gid in st.graph_listing.page(colony, unfinished, "", count)]
    finished = [s for s in states if s in FINISHED_STATES]
    if finished and len(out) < count:
        found = history.newest_finished(st, colony, GRAPH, finished, "", count - len(out), before)
        out += [g.to_wire() for g in found]
    return out


WRITES: dict[str, Handler] = {
    "submitworkflowspecmsg": submit_workflow,
    "removeprocessgraphmsg": remove_process_graph,
    "removeallprocessgraphsmsg": remove_all_process_graphs,
    "cancelprocessgraphmsg": cancel_process_graph,
    "addchildmsg": add_child,
}

READS: dict[str, Query] = {
    "getprocessgraphmsg": get_process_graph,
    "getprocessgraphsmsg": get_process_graphs,
}
