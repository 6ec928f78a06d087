"""The read messages, answered from the local replica. They never change the state.

The machine has validated the body and checked the role rule (roles.py) before a handler
runs. Lists come back in a stable order: colonies and executors by name, processes by
submission order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from consensus import (  # Beyond Colonies
    canonical,
    function_ops,
    history,
    log_ops,
    pause_ops,
    retention,
    snapshot,
    subscriptions,
    workflows,
)
from consensus.archive import PROCESS
from consensus.crons import READS as CRON_READS
from consensus.generators import READS as GENERATOR_READS
from consensus.listing import ALL_STATES
from consensus.request import Request
from consensus.state import ColonyState
from protocol.messages import FINISHED_STATES

Query = Callable[[ColonyState, Request], Any]


def get_statistics(st: ColonyState, req: Request) -> Any:
    return st.statistics()


def get_state_digest(st: ColonyState, req: Request) -> Any:
    """The canonical digest of the whole state (ColonyMachine.digest): equal on replicas
    that applied the same log prefix. The node adds the applied index it reflects."""
    return {"digest": canonical.digest(snapshot.to_snapshot(st))}


def get_colonies(st: ColonyState, req: Request) -> Any:
    return [st.colonies[n].to_wire() for n in sorted(st.colonies)]


def get_colony(st: ColonyState, req: Request) -> Any:
    return st.colony(req.body["colonyname"]).to_wire()


def get_colony_stats(st: ColonyState, req: Request) -> Any:
    return st.colony_statistics(st.colony(req.body["colonyname"]).name)


def get_executors(st: ColonyState, req: Request) -> Any:
    names = st.colony_executors[req.body["colonyname"]]
    return [st.executors[names[n]].to_wire() for n in sorted(names)]


def get_executor(st: ColonyState, req: Request) -> Any:
    return st.executor_named(req.body["colonyname"], req.body["executorname"]).to_wire()


def get_process(st: ColonyState, req: Request) -> Any:
    return st.process(req.body["processid"]).to_wire()


def get_processes(st: ColonyState, req: Request) -> Any:
    """Waiting and running processes in submission order, finished ones newest end first
    (paged with beforetime/beforeid); all states: the unfinished ones first."""
    b = req.body
    colony, count, etype = b["colonyname"], b["count"], b["executortype"]
    states = ALL_STATES if b["state"] == -1 else (b["state"],)
    before = history.before_cursor(b)
    out: list[Any] = []
    unfinished = [s for s in states if s not in FINISHED_STATES]
    if unfinished and before is None:
        out = [st.processes[pid].to_wire() for pid in st.listing.page(colony, unfinished, etype, count)]
    finished = [s for s in states if s in FINISHED_STATES]
    if finished and len(out) < count:
        found = history.newest_finished(
            st, colony, PROCESS, finished, etype, count - len(out), before
        )
        out += [p.to_wire() for p in found]
    return out



def get_attribute(st: ColonyState, req: Request) -> Any:
    return st.attribute(req.body["attributeid"]).to_wire()


READS: dict[str, Query] = {
    "getstatisticsmsg": get_statistics,
    "getstatedigestmsg": get_state_digest,
    "getcoloniesmsg": get_colonies,
    "getcolonymsg": get_colony,
    "getcolonystatsmsg": get_colony_stats,
    "getexecutorsmsg": get_executors,
    "getexecutormsg": get_executor,
    "getprocessmsg": get_process,
    "getprocessesmsg": get_processes,
    "getattributemsg": get_attribute,
    **workflows.READS,
    # Generators and crons.
    **GENERATOR_READS,
    **CRON_READS,
    # Logs, functions, pause.
    **log_ops.READS,
    **function_ops.READS,
    **pause_ops.READS,
    # Beyond Colonies: retention and export, subscriptions (long-polled by the node).
    **retention.READS,
    **subscriptions.READS,
}
