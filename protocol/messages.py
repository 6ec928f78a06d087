"""Message schemas: every request type this node serves, validated at decode.

Names and field names follow Colonies (HEAD) so a future HTTP gateway maps them one to one.
Each entry says whether the message is a write (goes through the Raft log, its nonce is
remembered) or a read (answered from the local replica).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

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

# Beyond Colonies: retries with backoff, idempotency keys, concurrency limits (optional spec
# fields, left out of the stored spec when absent, so specs that do not use them keep their
# exact bytes), retention and subscriptions (messages below).
MAX_BACKOFF_S = 7 * 86_400
DEFAULT_BACKOFF_MAX_S = 3600
MAX_BACKOFF_MULTIPLIER = 100
MAX_IDEMPOTENCY_KEY = 256
MAX_CONCURRENCY_LIMIT = 100_000
MAX_RETENTION_S = 10 * 365 * 86_400
MAX_RETENTION_COUNT = 10**9
MAX_SUBSCRIBE_TIMEOUT_S = 600


def number_between(lo: float, hi: float) -> Callable[[Any], str | None]:
    """An int or a finite float in [lo, hi] (msgpack carries both; seconds may be 0.5)."""

    def check(v: Any) -> str | None:  # noqa: ANN401 - any decoded value
        if isinstance(v, bool) or not isinstance(v, int | float) or v != v:
            return "expected a number"
        return None if lo <= v <= hi else f"must be between {lo:g} and {hi:g}"

    return check


def _backoff_bounds(b: dict[str, Any]) -> str | None:
    if b["max"] < b["initial"]:
        return f"max ({b['max']:g} s) must be at least initial ({b['initial']:g} s)"
    return None


# Seconds; delay before retry r = min(max, initial * multiplier**r), less up to `jitter` of it
# (consensus/backoff.py).
BACKOFF = Schema(
    {
        "initial": F("any", True, check=number_between(0.001, MAX_BACKOFF_S)),
        "multiplier": F("any", default=2, check=number_between(1, MAX_BACKOFF_MULTIPLIER)),
        "max": F("any", default=DEFAULT_BACKOFF_MAX_S, check=number_between(0.001, MAX_BACKOFF_S)),
        "jitter": F("any", default=0.5, check=number_between(0, 1)),
    }
)


def _idempotency_key(v: str) -> str | None:
    if 1 <= len(v) <= MAX_IDEMPOTENCY_KEY:
        return None
    return f"must be 1-{MAX_IDEMPOTENCY_KEY} characters"


def retention_seconds(v: int) -> str | None:
    if 0 <= v <= MAX_RETENTION_S:
        return None
    return f"must be 0 (no age limit) or at most {MAX_RETENTION_S} seconds"


def retention_count(v: int) -> str | None:
    if 0 <= v <= MAX_RETENTION_COUNT:
        return None
    return f"must be 0 (no count limit) or at most {MAX_RETENTION_COUNT}"


BEYOND_SPEC_FIELDS = {
    "backoff": F("obj", omit=True, schema=BACKOFF, check=_backoff_bounds),
    "idempotencykey": F("str", omit=True, check=_idempotency_key),
    "concurrencykey": F("str", omit=True, check=name),
    "concurrencylimit": F("int", omit=True, check=between(1, MAX_CONCURRENCY_LIMIT)),
}

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
        **BEYOND_SPEC_FIELDS,
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
# Paging through finished work, newest first: the end time and id of the last item of the
# previous page (0 and "": from the newest).
_BEFORE = {
    "beforetime": F("int", default=0, check=at_least(0)),
    "beforeid": F("str", default="", check=hex64_or_empty),
}

# Logs, functions, pause, executor liveness.
# A log line is at most MAX_LOG_LINE_BYTES of UTF-8 (longer ones are refused, 400); a process
# keeps its last MAX_LOG_LINES lines (older ones are dropped, see consensus/log_ops.py).
MAX_LOG_LINE_BYTES = 4096
MAX_LOG_LINES = 1000
MAX_LOG_COUNT = 500  # lines per getlogsmsg reply, as Colonies
MAX_LOG_WAIT_S = 60
MAX_MEMBER_WAIT_S = 600  # how long an addmembermsg reply may wait for the member to vote
MAX_FUNCTION_DESCRIPTION = 1024
MAX_FUNCTION_ARGS = 64
# Executor staleness, per colony: 0 = off, else seconds in [MIN, MAX].
MIN_STALE_AFTER_S = 5
MAX_STALE_AFTER_S = 86_400


def log_message(v: str) -> str | None:
    if len(v.encode("utf-8", "surrogatepass")) > MAX_LOG_LINE_BYTES:
        return f"longer than {MAX_LOG_LINE_BYTES} bytes (split it into several lines)"
    return None


def stale_after(v: int) -> str | None:
    if v == 0 or MIN_STALE_AFTER_S <= v <= MAX_STALE_AFTER_S:
        return None
    return f"must be 0 (off) or between {MIN_STALE_AFTER_S} and {MAX_STALE_AFTER_S} seconds"


def _function_args(v: list) -> str | None:
    return f"at most {MAX_FUNCTION_ARGS} items" if len(v) > MAX_FUNCTION_ARGS else None


FUNCTION = Schema(
    {
        "executorname": F("str", True, check=name),
        "colonyname": F("str", True, check=name),
        "funcname": F("str", True, check=name),
        "description": F(
            "str",
            default="",
            check=lambda v: f"longer than {MAX_FUNCTION_DESCRIPTION} characters"
            if len(v) > MAX_FUNCTION_DESCRIPTION
            else None,
        ),
        "args": F("anylist", default=list, check=_function_args),
    }
)
_GRAPH_REF = {"processgraphid": F("str", True, check=hex64)}

# Generators and crons.
# A generator's trigger is at most MAX_GENERATOR_QUEUE (its queue holds fewer arguments than
# its trigger), an argument at most MAX_GENERATOR_ARG_BYTES once msgpack-encoded (the queue's
# total is bounded in consensus/generators.py), so its record stays small in the replicated
# state; a colony holds at most MAX_SCHEDULES_PER_COLONY generators and as many crons.
MAX_GENERATOR_QUEUE = 1_000
MAX_GENERATOR_ARG_BYTES = 4_096
MAX_SCHEDULES_PER_COLONY = 1_000
MAX_CRON_INTERVAL_S = 366 * 86_400


def _packed_size(v: Any) -> str | None:
    if len(msgpack.packb(v)) > MAX_GENERATOR_ARG_BYTES:
        return f"larger than {MAX_GENERATOR_ARG_BYTES} bytes once encoded"
    return None


def _cron_interval(v: int) -> str | None:
    if v == -1 or 1 <= v <= MAX_CRON_INTERVAL_S:
        return None
    return f"must be -1 (use the cron expression) or 1 to {MAX_CRON_INTERVAL_S} seconds"


# A generator's or cron's workflow: its colony is the generator's (or cron's), so it may be
# left out; the machine checks the graph rules when it is added.
SCHEDULED_WORKFLOW_SPEC = Schema(
    {
        "colonyname": F("str", default="", check=name_or_empty),
        "functionspecs": F("objlist", True, schema=WORKFLOW_FUNCTION_SPEC),
    }
)
GENERATOR = Schema(
    {
        "colonyname": F("str", True, check=name),
        "name": F("str", True, check=name),
        "workflowspec": F("obj", True, schema=SCHEDULED_WORKFLOW_SPEC),
        "trigger": F("int", True, check=between(1, MAX_GENERATOR_QUEUE)),
        # Seconds a partial batch waits for more arguments before it runs; <= 0: no limit.
        "timeout": F("int", default=-1, check=at_least(-1)),
    }
)
CRON = Schema(
    {
        "colonyname": F("str", True, check=name),
        "name": F("str", True, check=name),
        "workflowspec": F("obj", True, schema=SCHEDULED_WORKFLOW_SPEC),
        # Either an expression (6 fields, seconds first) or an interval in seconds.
        "cronexpression": F("str", default=""),
        "interval": F("int", default=-1, check=_cron_interval),
        "waitforprevprocessgraph": F("bool", default=False),
    }
)
_GENERATOR_REF = {"generatorid": F("str", True, check=hex64)}
_CRON_REF = {"cronid": F("str", True, check=hex64)}
_SCHEDULE_LIST = {
    "colonyname": F("str", True, check=name),
    "count": F("int", default=MAX_LIST_COUNT, check=between(1, MAX_LIST_COUNT)),
}


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
        # This node's own state digest and applied index (chaos runs compare the nodes).
        _m("getstatedigestmsg", False),
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
                **_BEFORE,
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
                **_BEFORE,
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
        # Generators and crons.
        _m("addgeneratormsg", True, {"generator": F("obj", True, schema=GENERATOR)}),
        _m("getgeneratormsg", False, _GENERATOR_REF),
        _m("getgeneratorsmsg", False, _SCHEDULE_LIST),
        _m("removegeneratormsg", True, _GENERATOR_REF),
        _m(
            "packgeneratormsg",
            True,
            {**_GENERATOR_REF, "arg": F("any", True, check=_packed_size)},
        ),
        _m("addcronmsg", True, {"cron": F("obj", True, schema=CRON)}),
        _m("getcronmsg", False, _CRON_REF),
        _m("getcronsmsg", False, _SCHEDULE_LIST),
        _m("removecronmsg", True, _CRON_REF),
        _m("runcronmsg", True, _CRON_REF),
        # Cluster membership (server owner).
        _m(
            "addmembermsg",
            True,
            {
                "peerid": F("str", True, check=peer_id),
                "addr": F("str", True, check=multiaddr),
                # Seconds the reply waits for the new member to become a voter (node side).
                "wait": F("int", default=0, check=between(0, MAX_MEMBER_WAIT_S)),
            },
        ),
        _m("removemembermsg", True, {"peerid": F("str", True, check=peer_id)}),
        # Attributes.
        _m("addattributemsg", True, {"attribute": F("obj", True, schema=ATTRIBUTE)}),
        _m("getattributemsg", False, {"attributeid": F("str", True, check=hex64)}),
        # Logs, functions, pause, executor liveness.
        _m("addlogmsg", True, {**_PROCESS_REF, "message": F("str", True, check=log_message)}),
        _m(
            "getlogsmsg",
            False,
            {
                **_PROCESS_REF,
                # Optional; when given it must be the process's colony (as Colonies sends it).
                "colonyname": F("str", default="", check=name_or_empty),
                "count": F("int", default=MAX_LOG_COUNT, check=between(1, MAX_LOG_COUNT)),
                # Cursors: lines after this sequence number, and/or newer than this time (ns).
                "afterseq": F("int", default=0, check=at_least(0)),
                "since": F("int", default=0, check=at_least(0)),
                "latest": F("bool", default=False),  # the last `count` lines, not the first
                # Seconds to wait for a line when there is none yet (0: answer at once).
                "timeout": F("int", default=0, check=between(0, MAX_LOG_WAIT_S)),
            },
        ),
        _m("addfunctionmsg", True, {"fun": F("obj", True, schema=FUNCTION)}),
        _m("removefunctionmsg", True, {"functionid": F("str", True, check=hex64)}),
        _m(
            "getfunctionsmsg",
            False,
            {**_COLONY_NAME, "executorname": F("str", default="", check=name_or_empty)},
        ),
        _m("pauseassignmentsmsg", True, _COLONY_NAME),
        _m("resumeassignmentsmsg", True, _COLONY_NAME),
        _m("getpausestatusmsg", False, _COLONY_NAME),
        _m("executorheartbeatmsg", True, _COLONY_NAME),
        _m(
            "setexecutorstaleaftermsg",
            True,
            {**_COLONY_NAME, "staleafter": F("int", True, check=stale_after)},
        ),
        # Beyond Colonies: retention and export (consensus/retention.py), subscriptions
        # (consensus/subscriptions.py, long-polled by node/subscriptions.py).
        _m(
            "setretentionmsg",
            True,
            {
                **_COLONY_NAME,
                # Keep finished work this long, and at most this many of each kind (processes,
                # workflows); both 0: keep everything. `default` goes back to the default.
                "seconds": F("int", default=0, check=retention_seconds),
                "count": F("int", default=0, check=retention_count),
                "default": F("bool", default=False),
            },
        ),
        _m("getretentionmsg", False, _COLONY_NAME),
        _m(
            "exportprocessesmsg",
            False,
            {
                **_COLONY_NAME,
                "afterseq": F("int", default=0, check=at_least(0)),  # the cursor
                "since": F("int", default=0, check=at_least(0)),  # ended at or after (ns)
                "count": F("int", default=MAX_LIST_COUNT, check=between(1, MAX_LIST_COUNT)),
            },
        ),
        _m(
            "waitprocessmsg",
            False,
            {
                **_PROCESS_REF,
                "state": F("int", True, check=between(-1, CANCELLED)),  # -1: any finished
                "timeout": F("int", True, check=between(0, MAX_SUBSCRIBE_TIMEOUT_S)),
            },
        ),
        _m(
            "followprocessesmsg",
            False,
            {
                **_COLONY_NAME,
                "executortype": F("str", default="", check=name_or_empty),
                "afterseq": F("int", default=-1, check=at_least(-1)),  # -1: from now
                "count": F("int", default=MAX_LIST_COUNT, check=between(1, MAX_LIST_COUNT)),
                "timeout": F("int", default=0, check=between(0, MAX_SUBSCRIBE_TIMEOUT_S)),
            },
        ),
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
