"""Message schemas: every request type this node serves, validated at decode.

Names and field names follow Colonies (HEAD) so a future HTTP gateway maps them one to one.
Each entry says whether the message is a write (goes through the Raft log, its nonce is
remembered) or a read (answered from the local replica).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol.errors import UnknownMessageType
from protocol.schema import (
    F,
    Schema,
    at_least,
    between,
    hex64,
    hex64_or_empty,
    multiaddr,
    name,
    name_or_empty,
    peer_id,
)

# Process (and process graph) states, as numbered in Colonies HEAD.
WAITING, RUNNING, SUCCESS, FAILED, CANCELLED = 0, 1, 2, 3, 4
STATE_NAMES = {
    WAITING: "waiting",
    RUNNING: "running",
    SUCCESS: "successful",
    FAILED: "failed",
    CANCELLED: "cancelled",
}
FINISHED_STATES = (SUCCESS, FAILED, CANCELLED)

# Executor states.
PENDING, APPROVED, REJECTED = 0, 1, 2
EXECUTOR_STATE_NAMES = {PENDING: "pending", APPROVED: "approved", REJECTED: "rejected"}

# Attribute types (HEAD numbering).
IN, OUT, ERR, ENV = 0, 1, 2, 3

MAX_PRIORITY = 50_000
MAX_LIST_COUNT = 100
MAX_ASSIGN_TIMEOUT_S = 600
# A submitted workflow holds at most this many function specs; a graph grows (addchildmsg)
# to at most MAX_GRAPH_PROCESSES. Failing or cancelling a graph touches every member once, so
# the bound keeps one log entry cheap to apply.
MAX_WORKFLOW_SPECS = 1_000
MAX_GRAPH_PROCESSES = 10_000

COLONY = Schema({"colonyid": F("str", True, check=hex64), "name": F("str", True, check=name)})

EXECUTOR = Schema(
    {
        "executorid": F("str", True, check=hex64),
        "executortype": F("str", True, check=name),
        "executorname": F("str", True, check=name),
        "colonyname": F("str", True, check=name),
    }
)

CONDITIONS = Schema(
    {
        "colonyname": F("str", True, check=name),
        "executortype": F("str", True, check=name),
        "executornames": F("strlist", default=list),
        "dependencies": F("strlist", default=list),
    }
)

FUNCTION_SPEC = Schema(
    {
        "nodename": F("str", default=""),
        "funcname": F("str", True, check=name),
        "args": F("anylist", default=list),
        "kwargs": F("anymap", default=dict),
        "priority": F("int", default=0, check=between(-MAX_PRIORITY, MAX_PRIORITY)),
        "maxwaittime": F("int", default=-1, check=at_least(-1)),
        "maxexectime": F("int", default=-1, check=at_least(-1)),
        "maxretries": F("int", default=-1, check=at_least(-1)),
        "label": F("str", default=""),
        "conditions": F("obj", True, schema=CONDITIONS),
        "env": F("strmap", default=dict),
    }
)

# In a workflow the workflow's colony is the colony of every spec, so a spec may leave
# conditions.colonyname out (as in Colonies workflow JSON); the machine fills it in.
WORKFLOW_CONDITIONS = Schema(
    {**CONDITIONS.fields, "colonyname": F("str", default="", check=name_or_empty)}
)
WORKFLOW_FUNCTION_SPEC = Schema(
    {**FUNCTION_SPEC.fields, "conditions": F("obj", True, schema=WORKFLOW_CONDITIONS)}
)
WORKFLOW_SPEC = Schema(
    {
        "colonyname": F("str", True, check=name),
        # The rules (at least one spec, at most MAX_WORKFLOW_SPECS, unique nodenames, known
        # dependencies, no cycles) are checked by the machine, with messages about the graph.
        "functionspecs": F("objlist", True, schema=WORKFLOW_FUNCTION_SPEC),
    }
)

ATTRIBUTE = Schema(
    {
        "targetid": F("str", True, check=hex64),
        "attributetype": F("int", True, check=between(IN, ENV)),
        "key": F("str", True, check=name),
        "value": F("str", True),
    }
)

_COLONY_NAME = {"colonyname": F("str", True, check=name)}
_EXECUTOR_REF = {**_COLONY_NAME, "executorname": F("str", True, check=name)}
_PROCESS_REF = {"processid": F("str", True, check=hex64)}
_ATTEMPT = {**_PROCESS_REF, "attempt": F("int", True, check=at_least(1))}
_ASSIGN = {
    **_COLONY_NAME,
    # Seconds; < 0 tries once, > 0 long-polls. 0 is refused as in Colonies.
    "timeout": F("int", True, check=lambda v: "must not be 0" if v == 0 else (
        f"must be at most {MAX_ASSIGN_TIMEOUT_S}" if v > MAX_ASSIGN_TIMEOUT_S else None)),
}
_STATE_FILTER = F("int", default=-1, check=between(-1, CANCELLED))
_GRAPH_REF = {"processgraphid": F("str", True, check=hex64)}


@dataclass(frozen=True)
class MessageType:
    name: str
    schema: Schema
    write: bool


# Every read may ask to be consistent: the node then reads after a no-op has gone through the
# leader's log, so the answer includes every write acknowledged before the read was sent.
CONSISTENT = {"consistent": F("bool", omit=True)}


def _m(name_: str, write: bool, fields: dict[str, F] | None = None) -> MessageType:
    fields = dict(fields or {})
    if not write:
        fields.update(CONSISTENT)
    return MessageType(name_, Schema(fields), write)


MESSAGES: dict[str, MessageType] = {
    m.name: m
    for m in [
        # Server.
        _m("getserverinfomsg", False),
        _m("getstatisticsmsg", False),
        # Colonies.
        _m("addcolonymsg", True, {"colony": F("obj", True, schema=COLONY)}),
        _m("removecolonymsg", True, _COLONY_NAME),
        _m("getcoloniesmsg", False),
        _m("getcolonymsg", False, _COLONY_NAME),
        _m("getcolonystatsmsg", False, _COLONY_NAME),
        # Executors.
        _m("addexecutormsg", True, {"executor": F("obj", True, schema=EXECUTOR)}),
        _m("approveexecutormsg", True, _EXECUTOR_REF),
        _m("rejectexecutormsg", True, _EXECUTOR_REF),
        _m("removeexecutormsg", True, _EXECUTOR_REF),
        _m("getexecutorsmsg", False, _COLONY_NAME),
        _m("getexecutormsg", False, _EXECUTOR_REF),
        # Processes.
        _m("submitfuncspecmsg", True, {"spec": F("obj", True, schema=FUNCTION_SPEC)}),
        _m("assignprocessmsg", True, _ASSIGN),
        _m("closesuccessfulmsg", True, {**_ATTEMPT, "out": F("anylist", default=list)}),
        _m("closefailedmsg", True, {**_ATTEMPT, "errors": F("strlist", default=list)}),
        # Fused: close this attempt (successfully or not) and assign the next process.
        _m(
            "closeassignmsg",
            True,
            {
                **_ATTEMPT,
                **_ASSIGN,
                "successful": F("bool", True),
                "out": F("anylist", default=list),
                "errors": F("strlist", default=list),
            },
        ),
        _m("getprocessmsg", False, _PROCESS_REF),
        _m(
            "getprocessesmsg",
            False,
            {
                **_COLONY_NAME,
                "count": F("int", default=MAX_LIST_COUNT, check=between(1, MAX_LIST_COUNT)),
                "state": _STATE_FILTER,
                "executortype": F("str", default="", check=name_or_empty),
            },
        ),
        _m("removeprocessmsg", True, _PROCESS_REF),
        _m("removeallprocessesmsg", True, {**_COLONY_NAME, "state": _STATE_FILTER}),
        _m("cancelprocessmsg", True, _PROCESS_REF),
        # Workflows (process graphs).
        _m("submitworkflowspecmsg", True, {"spec": F("obj", True, schema=WORKFLOW_SPEC)}),
        _m("getprocessgraphmsg", False, _GRAPH_REF),
        _m(
            "getprocessgraphsmsg",
            False,
            {
                **_COLONY_NAME,
                "count": F("int", default=MAX_LIST_COUNT, check=between(1, MAX_LIST_COUNT)),
                "state": _STATE_FILTER,
            },
        ),
        _m("removeprocessgraphmsg", True, _GRAPH_REF),
        _m("removeallprocessgraphsmsg", True, {**_COLONY_NAME, "state": _STATE_FILTER}),
        _m("cancelprocessgraphmsg", True, _GRAPH_REF),
        _m(
            "addchildmsg",
            True,
            {
                **_GRAPH_REF,
                "parentprocessid": F("str", True, check=hex64),
                # An existing, not yet started process of the graph that becomes the new
                # process's child ("" = none). Not with insert.
                "childprocessid": F("str", default="", check=hex64_or_empty),
                "spec": F("obj", True, schema=WORKFLOW_FUNCTION_SPEC),
                # True: splice the new process between the parent and all its children.
                "insert": F("bool", default=False),
            },
        ),
        # Cluster membership (server owner).
        _m(
            "addmembermsg",
            True,
            {"peerid": F("str", True, check=peer_id), "addr": F("str", True, check=multiaddr)},
        ),
        _m("removemembermsg", True, {"peerid": F("str", True, check=peer_id)}),
        # Attributes.
        _m("addattributemsg", True, {"attribute": F("obj", True, schema=ATTRIBUTE)}),
        _m("getattributemsg", False, {"attributeid": F("str", True, check=hex64)}),
    ]
}

# Keys the node fills into a write before proposing it (never taken from the client).
GENERATED_ID = "generatedid"

__all__ = ["MESSAGES", "MessageType", "validate_body", "hex64_or_empty"]


def message_type(msgtype: Any) -> MessageType:
    if not isinstance(msgtype, str) or msgtype not in MESSAGES:
        shown = msgtype if isinstance(msgtype, str) else type(msgtype).__name__
        raise UnknownMessageType(f"unknown message type: {str(shown)[:64]}")
    return MESSAGES[msgtype]


def validate_body(msgtype: str, body: Any) -> dict[str, Any]:
    """Validate a request body for `msgtype`; returns the normalized dict or raises 400."""
    return message_type(msgtype).schema.validate(body)
