"""Pause and resume assignment per colony (colony owner; Colonies HEAD message names).

While a colony is paused, assign hands out nothing (process_ops.assign_next); submits, closes
and everything else go on. A long-polling assign keeps waiting (the node sees nothing
assignable, ColonyMachine.assignable) and is woken by the resume's apply. Pausing a paused
colony, or resuming a running one, is accepted and changes nothing, so a retried call is safe.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from consensus.request import Request
from consensus.state import ColonyState

Handler = Callable[[ColonyState, Request, int], Any]
Query = Callable[[ColonyState, Request], Any]


def paused_reason(colonyname: str) -> str:
    return f"assignments in colony '{colonyname}' are paused (resumeassignmentsmsg resumes them)"


def pause(st: ColonyState, req: Request, now: int) -> Any:
    st.paused[req.body["colonyname"]] = None
    return {}


def resume(st: ColonyState, req: Request, now: int) -> Any:
    if st.paused.pop(req.body["colonyname"], False) is None:
        st.applied_changes += 1  # its queue is assignable again: wake the long-pollers
    return {}


def pause_status(st: ColonyState, req: Request) -> Any:
    """Colonies' pausestatusreply, plus the colony's executor stale-after (liveness.py;
    0 = off), the other colony-wide assignment setting."""
    name = req.body["colonyname"]
    return {"colonyname": name, "ispaused": name in st.paused,
            "staleafter": st.stale_after.get(name, 0)}


WRITES: dict[str, Handler] = {
    "pauseassignmentsmsg": pause,
    "resumeassignmentsmsg": resume,
}
READS: dict[str, Query] = {"getpausestatusmsg": pause_status}
