"""Workflow rules: what a valid workflow is, and what a member's end does to its graph.

A workflow is a DAG of function specs named by `nodename`, each listing the nodenames it
depends on (`conditions.dependencies`). It becomes a ProcessGraph whose processes carry
`parents` (in dependency order), `children` and `waitforparents`.

The rules, with the upstream quirks (semantics notes 2.5 and 9) fixed:
- A workflow is refused whole (400, nothing stored) when it is empty, larger than
  MAX_WORKFLOW_SPECS, has a spec without a nodename, a nodename used twice, a dependency
  named twice or not in the workflow, or a cycle (quirk 18: upstream stored an orphan graph
  and answered 500).
- A process is assignable only when every parent has succeeded. Then, in one step, it
  leaves `waitforparents`, gets `in` = its parents' `out` concatenated in dependency order,
  and its wait deadline starts (quirk 9 decided: `maxwaittime` counts the time a process
  could have been assigned, not the time its parents ran; upstream starts it at submit, so a
  child of a slow parent could fail before it was ever assignable).
- When a member fails (closed as failed, exec timeout with no retries left, wait timeout),
  the graph fails, and with it every member that has not finished: WAITING and RUNNING ones
  become FAILED, members that already succeeded stay SUCCESS (quirk 10: upstream marks every
  member FAILED, successes included, and a failed leaf did not propagate at all). A running
  member keeps its assignment, so its executor's close is refused with a reason.
- Cancelling a graph cancels its WAITING and RUNNING members.

Costs: a success looks at the member's children and their parents (O(children x parents)),
never at the whole graph; a failure or a cancel touches every member once, once per graph.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from consensus.lifecycle import Event
from consensus.records import Process, ProcessGraph, deadline_after
from consensus.state import ColonyState
from protocol.errors import BadRequest
from protocol.messages import MAX_WORKFLOW_SPECS, RUNNING, SUCCESS, WAITING

SHOWN_CYCLE_NODES = 10  # a cycle in an error message is cut after this many nodes


def member_id(gen: str, index: int) -> str:
    """The id of the index-th process of a workflow submitted with generated id `gen` (the
    graph's own id): deterministic, so every replica derives the same ids."""
    return hashlib.sha3_256(f"{gen}/{index}".encode()).hexdigest()


def _label(spec: dict[str, Any], index: int) -> str:
    name = spec.get("nodename") or ""
    return f"'{name}'" if name else f"#{index} (funcname '{spec.get('funcname', '')}')"


def validate_workflow(specs: Sequence[dict[str, Any]]) -> list[list[int]]:
    """Check a workflow's function specs; return each spec's parents as indexes, in the
    order its dependencies are listed. Raises BadRequest naming the first problem."""
    if not specs:
        raise BadRequest("a workflow needs at least one function spec")
    if len(specs) > MAX_WORKFLOW_SPECS:
        raise BadRequest(
            f"a workflow holds at most {MAX_WORKFLOW_SPECS} function specs, got {len(specs)}"
        )
    index: dict[str, int] = {}
    for i, spec in enumerate(specs):
        name = spec["nodename"]
        if not name:
            raise BadRequest(
                f"function spec {_label(spec, i)} has no nodename: every spec in a workflow "
                "needs a unique nodename"
            )
        if name in index:
            raise BadRequest(f"nodename '{name}' is used by more than one function spec")
        index[name] = i
    parents: list[list[int]] = []
    for spec in specs:
        mine: list[int] = []
        for dep in spec["conditions"]["dependencies"]:
            j = index.get(dep)
            if j is None:
                raise BadRequest(
                    f"function spec '{spec['nodename']}' depends on '{dep}', which is not a "
                    "nodename in this workflow"
                )
            if j in mine:
                raise BadRequest(
                    f"function spec '{spec['nodename']}' lists dependency '{dep}' twice"
                )
            mine.append(j)
        parents.append(mine)
    cycle = find_cycle(parents)
    if cycle:
        names = [specs[i]["nodename"] for i in cycle]
        shown = names[:SHOWN_CYCLE_NODES] + (["..."] if len(names) > SHOWN_CYCLE_NODES else [])
        raise BadRequest(
            "the workflow's dependencies form a cycle: " + " -> ".join([*shown, names[0]])
        )
    return parents


def find_cycle(parents: list[list[int]]) -> list[int]:
    """A dependency cycle as node indexes (each depends on the next... wrapping around), or
    [] when the graph is acyclic. Iterative (no recursion limit), deterministic."""
    done = [False] * len(parents)
    on_path = [False] * len(parents)
    for start in range(len(parents)):
        if done[start]:
            continue
        path = [start]
        iters = [iter(parents[start])]
        on_path[start] = True
        while path:
            nxt = next(iters[-1], None)
            if nxt is None:
                node = path.pop()
                iters.pop()
                on_path[node] = False
                done[node] = True
            elif on_path[nxt]:
                return path[path.index(nxt):]
            elif not done[nxt]:
                path.append(nxt)
                iters.append(iter(parents[nxt]))
                on_path[nxt] = True
    return []


def all_parents_succeeded(st: ColonyState, p: Process) -> bool:
    return all(st.processes[q].state == SUCCESS for q in p.parents)


def release(st: ColonyState, p: Process, now: int) -> None:
    """Make a WAITING member whose parents all succeeded assignable: its input, its wait
    deadline from now, into the assign queue."""
    inputs: list[Any] = []
    for q in p.parents:
        inputs.extend(st.processes[q].out)
    st.update(
        p,
        {
            "waitforparents": False,
            "inputs": inputs,
            "waitdeadline": deadline_after(now, p.spec["maxwaittime"]),
        },
        now,
    )


def member_succeeded(st: ColonyState, p: Process, now: int) -> list[str]:
    """After `p` succeeded: release each child whose parents have now all succeeded."""
    released: list[str] = []
    for cid in p.children:
        c = st.processes[cid]
        if c.state == WAITING and c.waitforparents and all_parents_succeeded(st, c):
            release(st, c, now)
            released.append(cid)
    if released:
        st.applied_changes += 1  # new assignable processes: wake long-polling executors
    return released


def member_failed(st: ColonyState, p: Process, now: int) -> list[str]:
    """After `p` failed: fail every unfinished member of its graph. Returns their ids."""
    if not p.processgraphid:
        return []
    g = st.graphs[p.processgraphid]
    why = f"workflow {g.processgraphid} failed: process {p.processid}"
    name = p.spec.get("nodename")
    why += f" ('{name}') failed" if name else " failed"
    failed: list[str] = []
    for pid in g.processids:
        q = st.processes[pid]
        if q.state in (WAITING, RUNNING):
            st.transition(q, Event.WORKFLOW_FAILED, {"endtime": now, "errors": [why]}, now)
            failed.append(pid)
    if failed:
        st.applied_changes += 1
    return failed


def cancel_graph(st: ColonyState, g: ProcessGraph, now: int) -> list[str]:
    """Cancel every WAITING or RUNNING member; the graph becomes CANCELLED."""
    cancelled: list[str] = []
    for pid in g.processids:
        q = st.processes[pid]
        if q.state in (WAITING, RUNNING):
            st.transition(q, Event.CANCEL, {"endtime": now}, now)
            cancelled.append(pid)
    return cancelled
