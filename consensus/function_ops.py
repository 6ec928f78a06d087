"""The functions registry: executors register the functions they serve, members list them.

addfunctionmsg registers a function of the caller itself (the executor named in it must be
the caller, as Colonies checks); registering the same funcname again updates its description
and args and keeps its id, so an executor can register everything each time it starts.
Functions go when their executor is removed (ColonyState.remove_executor). Role rules in
roles.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from consensus.function_record import Function, function_id
from consensus.records import Process
from consensus.request import Request
from consensus.state import ColonyState
from protocol.errors import BadRequest

Handler = Callable[[ColonyState, Request, int], Any]
Query = Callable[[ColonyState, Request], Any]

# An executor serves at most this many functions: a listing stays cheap, and a runaway
# registration loop is refused instead of growing the replicated state.
MAX_FUNCTIONS_PER_EXECUTOR = 1000


def add_function(st: ColonyState, req: Request, now: int) -> Any:
    fun = req.body["fun"]
    ex = st.executors[req.caller]  # the role rule: the caller is the executor named in `fun`
    fid = function_id(ex.executorid, fun["funcname"])
    existing = st.functions.get(fid)
    if existing is not None:
        existing.description = fun["description"]
        existing.args = list(fun["args"])
        return existing.to_wire()
    if len(st.executor_functions.get(ex.executorid, {})) >= MAX_FUNCTIONS_PER_EXECUTOR:
        raise BadRequest(
            f"executor '{ex.executorname}' already serves {MAX_FUNCTIONS_PER_EXECUTOR} "
            "functions, the most one may register (remove some first)"
        )
    f = Function(
        functionid=fid,
        executorid=ex.executorid,
        executorname=ex.executorname,
        executortype=ex.executortype,
        colonyname=ex.colonyname,
        funcname=fun["funcname"],
        description=fun["description"],
        args=list(fun["args"]),
    )
    st.add_function(f)
    return f.to_wire()


def record_success(st: ColonyState, p: Process, now: int) -> None:
    """The statistics of the function `p` ran as, if its executor registered it (called
    when its attempt has closed successfully: `p` still names its executor and start)."""
    mine = st.executor_functions.get(p.assignedexecutorid)
    fid = mine.get(p.spec["funcname"]) if mine else None
    if fid is not None:
        st.functions[fid].record(max(0, p.starttime - p.submissiontime), max(0, now - p.starttime))


def remove_function(st: ColonyState, req: Request, now: int) -> Any:
    st.remove_function(st.functions[req.body["functionid"]])  # the role rule: it exists
    return {}


def get_functions(st: ColonyState, req: Request) -> Any:
    """The colony's functions (or one executor's), by executor name then function name."""
    colony, name = req.body["colonyname"], req.body["executorname"]
    names = [name] if name else sorted(st.colony_executors[colony])
    out = []
    for n in names:
        ex = st.executor_named(colony, n)  # 404 for an unknown executor name
        mine = st.executor_functions.get(ex.executorid, {})
        out.extend(st.functions[mine[f]].to_wire() for f in sorted(mine))
    return out


WRITES: dict[str, Handler] = {
    "addfunctionmsg": add_function,
    "removefunctionmsg": remove_function,
}
READS: dict[str, Query] = {"getfunctionsmsg": get_functions}
