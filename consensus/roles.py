"""Who may send which message: the role rules of Colonies (semantics notes 1.0 and 3.3).

One table, `RULES`, maps every message type the machine serves to a rule. The node checks a
write's rule before proposing it and the machine checks it again when applying (the state may
have changed in between); reads are checked when answered.

Order of checks: the object the call names must exist (404: colony, process, attribute), then
the caller must hold the role (403). Business checks (400) come after, in the handlers.

Symbols, as in the semantics notes: SO server owner, CO colony owner, M member in any state,
M✓ approved member, A the executor assigned to the process. Members are executors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from consensus.state import ColonyState
from protocol.errors import AccessDenied, NotFound, UnknownMessageType
from protocol.messages import APPROVED

Body = dict[str, Any]
ColonyOf = Callable[[ColonyState, Body], str]
Check = Callable[[ColonyState, str, Body], None]


@dataclass(frozen=True)
class Rule:
    symbol: str  # for docs and tests, e.g. "M✓|CO"
    check: Check


# Which colony a message is about.


def named_colony(name: str) -> ColonyOf:
    return lambda st, body: st.colony(body[name]).name


def executor_colony(st: ColonyState, body: Body) -> str:
    return st.colony(body["executor"]["colonyname"]).name


def spec_colony(st: ColonyState, body: Body) -> str:
    return st.colony(body["spec"]["conditions"]["colonyname"]).name


def process_colony(st: ColonyState, body: Body) -> str:
    return st.process(body["processid"]).colonyname


def attribute_colony(st: ColonyState, body: Body) -> str:
    return st.attribute(body["attributeid"]).targetcolonyname


def workflow_colony(st: ColonyState, body: Body) -> str:
    return st.colony(body["spec"]["colonyname"]).name


def graph_colony(st: ColonyState, body: Body) -> str:
    return st.graph(body["processgraphid"]).colonyname


# Generators and crons.


def generator_colony(st: ColonyState, body: Body) -> str:
    g = st.generators.get(body["generatorid"])
    if g is None:
        raise NotFound(f"generator {body['generatorid']} not found")
    return g.colonyname


def cron_colony(st: ColonyState, body: Body) -> str:
    c = st.crons.get(body["cronid"])
    if c is None:
        raise NotFound(f"cron {body['cronid']} not found")
    return c.colonyname


def new_schedule_colony(field: str) -> ColonyOf:
    return lambda st, body: st.colony(body[field]["colonyname"]).name


def process_id(body: Body) -> str:
    return body["processid"]


def attribute_target(body: Body) -> str:
    return body["attribute"]["targetid"]


def parent_process_id(body: Body) -> str:
    return body["parentprocessid"]


# The roles.


def is_colony_owner(st: ColonyState, caller: str, colony: str) -> bool:
    return st.colonies[colony].colonyid == caller


def is_member(st: ColonyState, caller: str, colony: str, approved: bool) -> bool:
    ex = st.executors.get(caller)
    return ex is not None and ex.colonyname == colony and (not approved or ex.state == APPROVED)


def server_owner() -> Rule:
    def check(st: ColonyState, caller: str, body: Body) -> None:
        # An unbootstrapped server has no owner: nobody passes.
        if not st.server_id or caller != st.server_id:
            raise AccessDenied("access denied: only the server owner may do this")

    return Rule("SO", check)


def colony_owner(colony_of: ColonyOf) -> Rule:
    def check(st: ColonyState, caller: str, body: Body) -> None:
        colony = colony_of(st, body)
        if not is_colony_owner(st, caller, colony):
            raise AccessDenied(f"access denied: only the owner of colony '{colony}' may do this")

    return Rule("CO", check)


def member(colony_of: ColonyOf, approved: bool, or_owner: bool = False) -> Rule:
    who = "an approved member" if approved else "a member"

    def check(st: ColonyState, caller: str, body: Body) -> None:
        colony = colony_of(st, body)
        if is_member(st, caller, colony, approved):
            return
        if or_owner and is_colony_owner(st, caller, colony):
            return
        owner = " or its owner" if or_owner else ""
        raise AccessDenied(f"access denied: the caller is not {who} of colony '{colony}'{owner}")

    symbol = ("M✓" if approved else "M") + ("|CO" if or_owner else "")
    return Rule(symbol, check)


def assigned(process_of: Callable[[Body], str]) -> Rule:
    """M✓ of the process's colony and its assigned executor (as Colonies: M✓ + A)."""

    def check(st: ColonyState, caller: str, body: Body) -> None:
        p = st.process(process_of(body))
        if not is_member(st, caller, p.colonyname, approved=True):
            raise AccessDenied(
                f"access denied: the caller is not an approved member of colony '{p.colonyname}'"
            )
        if not (p.isassigned and p.assignedexecutorid == caller):
            raise AccessDenied(
                f"access denied: process {p.processid} is not assigned to the caller"
            )

    return Rule("M✓+A", check)


# Logs, functions, pause, executor liveness.


def function_colony(st: ColonyState, body: Body) -> str:
    return st.colony(body["fun"]["colonyname"]).name


def self_executor(ref_of: Callable[[Body], Body]) -> Rule:
    """SELF: the executor the body names (colonyname, executorname) must be the caller."""

    def check(st: ColonyState, caller: str, body: Body) -> None:
        ref = ref_of(body)
        ex = st.executor_named(ref["colonyname"], ref["executorname"])
        if ex.executorid != caller:
            raise AccessDenied(
                f"access denied: the caller is not executor '{ex.executorname}' "
                "(an executor registers only its own functions)"
            )

    return Rule("SELF", check)


def function_owner() -> Rule:
    """M✓ of the function's colony, and the executor that registered it."""

    def check(st: ColonyState, caller: str, body: Body) -> None:
        f = st.functions.get(body["functionid"])
        if f is None:
            raise NotFound(f"function {body['functionid']} not found")
        if not is_member(st, caller, f.colonyname, approved=True):
            raise AccessDenied(
                f"access denied: the caller is not an approved member of colony '{f.colonyname}'"
            )
        if f.executorid != caller:
            raise AccessDenied(
                f"access denied: function {f.functionid} belongs to executor '{f.executorname}'"
            )

    return Rule("M✓+SELF", check)


def all_of(*rules: Rule) -> Rule:
    def check(st: ColonyState, caller: str, body: Body) -> None:
        for r in rules:
            r.check(st, caller, body)

    return Rule(" & ".join(r.symbol for r in rules), check)


RULES: dict[str, Rule] = {
    "getstatisticsmsg": server_owner(),
    "getstatedigestmsg": server_owner(),
    "addcolonymsg": server_owner(),
    "addmembermsg": server_owner(),
    "removemembermsg": server_owner(),
    "removecolonymsg": server_owner(),
    "getcoloniesmsg": server_owner(),
    "getcolonymsg": member(named_colony("colonyname"), approved=True),
    "getcolonystatsmsg": member(named_colony("colonyname"), approved=True, or_owner=True),
    "addexecutormsg": colony_owner(executor_colony),
    "approveexecutormsg": colony_owner(named_colony("colonyname")),
    "rejectexecutormsg": colony_owner(named_colony("colonyname")),
    "removeexecutormsg": colony_owner(named_colony("colonyname")),
    "getexecutorsmsg": member(named_colony("colonyname"), approved=False, or_owner=True),
    "getexecutormsg": member(named_colony("colonyname"), approved=True, or_owner=True),
    "submitfuncspecmsg": member(spec_colony, approved=True),
    "assignprocessmsg": member(named_colony("colonyname"), approved=True),
    "closesuccessfulmsg": assigned(process_id),
    "closefailedmsg": assigned(process_id),
    # The close half needs A on the process, the assign half M✓ of the named colony; both
    # are checked before either half runs, so a refusal changes nothing.
    "closeassignmsg": all_of(
        assigned(process_id), member(named_colony("colonyname"), approved=True)
    ),
    "getprocessmsg": member(process_colony, approved=True),
    "getprocessesmsg": member(named_colony("colonyname"), approved=True),
    "removeprocessmsg": member(process_colony, approved=True),
    "removeallprocessesmsg": colony_owner(named_colony("colonyname")),
    # Any approved member may cancel (as Colonies); workflow members only with their graph.
    "cancelprocessmsg": member(process_colony, approved=True),
    "addattributemsg": assigned(attribute_target),
    "getattributemsg": member(attribute_colony, approved=True),
    # Workflows.
    "submitworkflowspecmsg": member(workflow_colony, approved=True),
    "getprocessgraphmsg": member(graph_colony, approved=True),
    "getprocessgraphsmsg": member(named_colony("colonyname"), approved=True),
    "removeprocessgraphmsg": member(graph_colony, approved=True),
    "removeallprocessgraphsmsg": colony_owner(named_colony("colonyname")),
    "cancelprocessgraphmsg": member(graph_colony, approved=True),
    # Only the executor running the parent extends the graph from it.
    "addchildmsg": assigned(parent_process_id),
    # Generators and crons: any approved member of the colony, as in Colonies.
    "addgeneratormsg": member(new_schedule_colony("generator"), approved=True),
    "getgeneratormsg": member(generator_colony, approved=True),
    "getgeneratorsmsg": member(named_colony("colonyname"), approved=True),
    "removegeneratormsg": member(generator_colony, approved=True),
    "packgeneratormsg": member(generator_colony, approved=True),
    "addcronmsg": member(new_schedule_colony("cron"), approved=True),
    "getcronmsg": member(cron_colony, approved=True),
    "getcronsmsg": member(named_colony("colonyname"), approved=True),
    "removecronmsg": member(cron_colony, approved=True),
    "runcronmsg": member(cron_colony, approved=True),
    # Logs, functions, pause, executor liveness.
    "addlogmsg": assigned(process_id),
    "getlogsmsg": member(process_colony, approved=True),
    "addfunctionmsg": all_of(
        member(function_colony, approved=True), self_executor(lambda b: b["fun"])
    ),
    "removefunctionmsg": function_owner(),
    "getfunctionsmsg": member(named_colony("colonyname"), approved=True),
    "pauseassignmentsmsg": colony_owner(named_colony("colonyname")),
    "resumeassignmentsmsg": colony_owner(named_colony("colonyname")),
    "getpausestatusmsg": member(named_colony("colonyname"), approved=False, or_owner=True),
    # Any executor of the colony, approved or not, may say it is alive.
    "executorheartbeatmsg": member(named_colony("colonyname"), approved=False),
    "setexecutorstaleaftermsg": colony_owner(named_colony("colonyname")),
    # Beyond Colonies: retention (the owner sets it, members and the owner read and export
    # the history), subscriptions (like the reads they wait on, plus the owner).
    "setretentionmsg": colony_owner(named_colony("colonyname")),
    "getretentionmsg": member(named_colony("colonyname"), approved=True, or_owner=True),
    "exportprocessesmsg": member(named_colony("colonyname"), approved=True, or_owner=True),
    "waitprocessmsg": member(process_colony, approved=True, or_owner=True),
    "followprocessesmsg": member(named_colony("colonyname"), approved=True, or_owner=True),
}


def authorize(st: ColonyState, msgtype: str, caller: str, body: Body) -> None:
    """Raise NotFound/AccessDenied unless `caller` may send `msgtype` with `body` now."""
    rule = RULES.get(msgtype)
    if rule is None:
        raise UnknownMessageType(f"unknown message type: {msgtype[:64]}")
    rule.check(st, caller, body)
