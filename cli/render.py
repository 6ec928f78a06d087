"""How `colonies` shows results: rich tables for people, JSON for programs.

Nothing here talks to a node or decides anything; each function takes what a call returned.
JSON output is the reply as the node sent it (timestamps stay int unix nanoseconds, 0 =
unset); tables show times in local time and states by name.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Iterable
from datetime import datetime
from typing import Any, TextIO

from rich import box
from rich.console import Console
from rich.table import Table

from protocol.messages import EXECUTOR_STATE_NAMES, STATE_NAMES

NEVER_NS = 2**63 - 1  # the machine's "no deadline" clamp


def console(file: TextIO | None = None) -> Console:
    """A console that does not fold 64-character IDs when stdout is a pipe or a file."""
    file = file or sys.stdout
    width = None
    if not file.isatty():
        width = int(os.environ.get("COLUMNS", "0") or 0) or 240
    return Console(file=file, width=width, highlight=False, soft_wrap=False)


# Values.


def fmt_time(ns: Any) -> str:
    if not isinstance(ns, int) or isinstance(ns, bool) or ns <= 0:
        return "-"
    if ns >= NEVER_NS:
        return "never"
    dt = datetime.fromtimestamp(ns / 1e9).astimezone()
    return dt.strftime("%Y-%m-%d %H:%M:%S")


def fmt_value(v: Any) -> str:
    """One user value (an arg, an output item) as text: strings as they are, the rest as JSON."""
    if isinstance(v, str):
        return v
    return json.dumps(v, default=_json_default, ensure_ascii=False)


def fmt_list(values: Iterable[Any], limit: int = 60) -> str:
    text = " ".join(fmt_value(v) for v in values)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def state_name(state: Any) -> str:
    return STATE_NAMES.get(state, str(state))


def executor_state_name(state: Any) -> str:
    return EXECUTOR_STATE_NAMES.get(state, str(state))


def _json_default(v: Any) -> Any:
    if isinstance(v, bytes | bytearray):
        try:
            return bytes(v).decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(bytes(v)).decode("ascii")}
    raise TypeError(f"cannot show a value of type {type(v).__name__} as JSON")


def print_json(value: Any, file: TextIO | None = None) -> None:
    file = file or sys.stdout
    file.write(json.dumps(value, indent=2, default=_json_default, ensure_ascii=False) + "\n")
    file.flush()


# Tables.


def _table(title: str | None, *columns: str) -> Table:
    t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", title_style="bold")
    for c in columns:
        t.add_column(c, overflow="fold")
    return t


def _kv_table(title: str, rows: Iterable[tuple[str, Any]]) -> Table:
    t = Table(title=title, box=box.SIMPLE, show_header=False, title_justify="left",
              title_style="bold")
    t.add_column("field", style="bold")
    t.add_column("value", overflow="fold")
    for k, v in rows:
        t.add_row(k, v if isinstance(v, str) else fmt_value(v))
    return t


def key_table(prvkey: str, key_id: str) -> Table:
    return _kv_table("Key", [("prvkey", prvkey), ("id", key_id)])


def colonies_table(colonies: list[dict]) -> Table:
    t = _table(None, "Name", "Colony ID")
    for c in colonies:
        t.add_row(c.get("name", ""), c.get("colonyid", ""))
    return t


def colony_table(colony: dict) -> Table:
    return _kv_table("Colony", [("name", colony.get("name", "")),
                                ("colonyid", colony.get("colonyid", ""))])


def executors_table(executors: list[dict]) -> Table:
    t = _table(None, "Name", "Type", "State", "Executor ID", "Registered", "Last heard from")
    for e in executors:
        t.add_row(
            e.get("executorname", ""),
            e.get("executortype", ""),
            executor_state_name(e.get("state")),
            e.get("executorid", ""),
            fmt_time(e.get("commissiontime")),
            fmt_time(e.get("lastheardfromtime")),
        )
    return t


def executor_table(e: dict) -> Table:
    return _kv_table(
        "Executor",
        [
            ("name", e.get("executorname", "")),
            ("type", e.get("executortype", "")),
            ("colony", e.get("colonyname", "")),
            ("state", executor_state_name(e.get("state"))),
            ("executorid", e.get("executorid", "")),
            ("registered", fmt_time(e.get("commissiontime"))),
            ("last heard from", fmt_time(e.get("lastheardfromtime"))),
        ],
    )


def processes_table(processes: list[dict]) -> Table:
    t = _table(None, "Process ID", "Func", "Args", "Type", "State", "Submitted", "Started",
               "Ended")
    for p in processes:
        spec = p.get("spec", {})
        t.add_row(
            p.get("processid", ""),
            spec.get("funcname", ""),
            fmt_list(spec.get("args", []), 40),
            spec.get("conditions", {}).get("executortype", ""),
            state_name(p.get("state")),
            fmt_time(p.get("submissiontime")),
            fmt_time(p.get("starttime")),
            fmt_time(p.get("endtime")),
        )
    return t


def process_tables(p: dict) -> list[Table]:
    spec = p.get("spec", {})
    cond = spec.get("conditions", {})
    tables = [
        _kv_table(
            "Process",
            [
                ("processid", p.get("processid", "")),
                ("state", state_name(p.get("state"))),
                ("attempt", str(p.get("attempt", 0))),
                ("assigned executor", p.get("assignedexecutorid") or "-"),
                ("initiator", p.get("initiatorname") or p.get("initiatorid", "")),
                ("submitted", fmt_time(p.get("submissiontime"))),
                ("started", fmt_time(p.get("starttime"))),
                ("ended", fmt_time(p.get("endtime"))),
                ("wait deadline", fmt_time(p.get("waitdeadline"))),
                ("exec deadline", fmt_time(p.get("execdeadline"))),
                ("retries", str(p.get("retries", 0))),
            ],
        ),
        _kv_table(
            "Function spec",
            [
                ("func", spec.get("funcname", "")),
                ("args", fmt_list(spec.get("args", []), 400)),
                ("kwargs", fmt_value(spec.get("kwargs", {}))),
                ("colony", cond.get("colonyname", "")),
                ("executor type", cond.get("executortype", "")),
                ("executor names", ",".join(cond.get("executornames", [])) or "-"),
                ("priority", str(spec.get("priority", 0))),
                ("max wait time", _seconds(spec.get("maxwaittime"))),
                ("max exec time", _seconds(spec.get("maxexectime"))),
                ("max retries", _limit(spec.get("maxretries"))),
                ("label", spec.get("label") or "-"),
                ("env", " ".join(f"{k}={v}" for k, v in spec.get("env", {}).items()) or "-"),
            ],
        ),
    ]
    if p.get("out"):
        tables.append(_kv_table("Output", [(str(i), v) for i, v in enumerate(p["out"])]))
    if p.get("errors"):
        tables.append(_kv_table("Errors", [(str(i), v) for i, v in enumerate(p["errors"])]))
    if p.get("attributes"):
        tables.append(attributes_table(p["attributes"]))
    return tables


def _seconds(v: Any) -> str:
    return "unlimited" if not isinstance(v, int) or v < 0 else f"{v} s"


def _limit(v: Any) -> str:
    return "unlimited" if not isinstance(v, int) or v < 0 else str(v)


ATTRIBUTE_TYPES = {0: "in", 1: "out", 2: "err", 3: "env"}


def attributes_table(attributes: list[dict]) -> Table:
    t = _table("Attributes", "Key", "Value", "Type", "Attribute ID")
    for a in attributes:
        t.add_row(
            a.get("key", ""),
            a.get("value", ""),
            ATTRIBUTE_TYPES.get(a.get("attributetype"), str(a.get("attributetype"))),
            a.get("attributeid", ""),
        )
    return t


def attribute_table(a: dict) -> Table:
    return _kv_table(
        "Attribute",
        [
            ("attributeid", a.get("attributeid", "")),
            ("process", a.get("targetid", "")),
            ("colony", a.get("targetcolonyname", "")),
            ("type", ATTRIBUTE_TYPES.get(a.get("attributetype"), str(a.get("attributetype")))),
            ("key", a.get("key", "")),
            ("value", a.get("value", "")),
        ],
    )


STAT_ROWS = [
    ("colonies", "colonies"),
    ("executors", "executors"),
    ("waiting processes", "waitingprocesses"),
    ("running processes", "runningprocesses"),
    ("successful processes", "successfulprocesses"),
    ("failed processes", "failedprocesses"),
]

# Shown first, in this order, when the replicator reports them; the rest follow by name.
RAFT_FIRST = ("role", "state", "leader", "term", "commit_index", "last_applied", "has_quorum",
              "members", "connected", "self")


def stats_table(title: str, stats: dict, skip: tuple[str, ...] = ()) -> Table:
    rows = [(label, str(stats[k])) for label, k in STAT_ROWS if k in stats and k not in skip]
    rows += [(k, fmt_value(v)) for k, v in sorted(stats.items()) if k not in dict(STAT_ROWS).values()]
    return _kv_table(title, rows)


def status_tables(status: dict) -> list[Table]:
    """`status`: {"server": getserverinfomsg, "statistics": ..., "colony": ..., "notes": [...]}."""
    info = status.get("server", {})
    rows: list[tuple[str, Any]] = [
        ("version", info.get("version", "")),
        ("peer id", info.get("peerid", "")),
        ("addresses", "\n".join(info.get("addrs", [])) or "-"),
        ("cluster id", info.get("clusterid", "")),
        ("server owner id", info.get("serverid", "")),
    ]
    raft = info.get("raft") or {}
    if isinstance(raft, dict):
        keys = [k for k in RAFT_FIRST if k in raft] + sorted(k for k in raft if k not in RAFT_FIRST)
        rows += [(f"raft {k}", _raft_value(raft[k])) for k in keys]
    tables = [_kv_table("Node", rows)]
    if "statistics" in status:
        tables.append(stats_table("Server statistics", status["statistics"]))
    if "colony" in status:
        tables.append(
            stats_table(f"Colony {status.get('colonyname', '')}", status["colony"], ("colonies",))
        )
    return tables


def _raft_value(v: Any) -> str:
    if isinstance(v, list | tuple):
        return "\n".join(fmt_value(x) for x in v) or "-"
    return fmt_value(v)
