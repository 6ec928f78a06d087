"""How `colonies` shows results: rich tables for people, JSON for programs.

Nothing here talks to a node or decides anything; each function takes what a call returned.
JSON output is the reply as the node sent it (timestamps stay int unix nanoseconds, 0 =
unset); tables show times in local time and states by name.
"""

from __future__ import annotations

import base64
import os
import sys
from collections.abc import Iterable
from datetime import datetime
from typing import Any, TextIO

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cli import json_text
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
    return json_text.dumps(v, default=_json_default, ensure_ascii=False)


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
    file.write(json_text.dumps(value, default=_json_default, indent=2, ensure_ascii=False) + "\n")
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
    rows = [("name", colony.get("name", "")), ("colonyid", colony.get("colonyid", ""))]
    if "paused" in colony:  # `colony get` adds the assignment settings
        rows.append(("assignments", "paused" if colony["paused"] else "running"))
    if "staleafter" in colony:
        after = colony["staleafter"]
        rows.append(("executors stale after", f"{after} s" if after else "off"))
    return _kv_table("Colony", rows)


def executors_table(executors: list[dict]) -> Table:
    t = _table(None, "Name", "Type", "State", "Executor ID", "Registered", "Last heard from",
               "Liveness")
    for e in executors:
        t.add_row(
            e.get("executorname", ""),
            e.get("executortype", ""),
            executor_state_name(e.get("state")),
            e.get("executorid", ""),
            fmt_time(e.get("commissiontime")),
            fmt_time(e.get("lastheardfromtime")),
            e.get("liveness") or ("stale" if e.get("stale") else "-"),
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
                # Retries with backoff: when a requeued process becomes assignable.
                *([("backing off until", fmt_time(p["backoffuntil"]))]
                  if p.get("backoffuntil") else []),
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
    if p.get("processgraphid"):
        tables.append(_kv_table("Workflow", [
            ("processgraphid", p["processgraphid"]),
            ("node", spec.get("nodename") or "-"),
            ("waits for parents", "yes" if p.get("waitforparents") else "no"),
            ("parents", "\n".join(p.get("parents", [])) or "-"),
            ("children", "\n".join(p.get("children", [])) or "-"),
            ("in", fmt_list(p.get("in", []), 400) or "-"),
        ]))
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
    ("cancelled processes", "cancelledprocesses"),
    ("waiting workflows", "waitingworkflows"),
    ("running workflows", "runningworkflows"),
    ("successful workflows", "successfulworkflows"),
    ("failed workflows", "failedworkflows"),
    ("cancelled workflows", "cancelledworkflows"),
]


def stats_table(title: str, stats: dict, skip: tuple[str, ...] = ()) -> Table:
    rows = [(label, str(stats[k])) for label, k in STAT_ROWS if k in stats and k not in skip]
    rows += [(k, fmt_value(v)) for k, v in sorted(stats.items()) if k not in dict(STAT_ROWS).values()]
    return _kv_table(title, rows)


def short_peer(pid: Any) -> str:
    """A peer id for a table: its tail (secp256k1 peer ids all start with 16Uiu2HA)."""
    if not isinstance(pid, str) or not pid:
        return "-"
    return pid if len(pid) <= 16 else ".." + pid[-10:]


def short_addr(addr: Any) -> str:
    """A member address without its /p2p/<peer id> tail (the peer id has its own column)."""
    if not isinstance(addr, str) or not addr:
        return "-"
    return addr.rsplit("/p2p/", 1)[0]


def fmt_seconds(v: Any) -> str:
    if not isinstance(v, int | float) or isinstance(v, bool):
        return "-"
    if v < 1:
        return f"{v * 1000:.0f} ms"
    if v < 120:
        return f"{v:.1f} s"
    if v < 7200:
        return f"{v / 60:.1f} min"
    return f"{v / 3600:.1f} h"


def _stall(ms: Any) -> str:
    """An event-loop stall in ms; red past 100 ms (heartbeats and elections suffer)."""
    if not isinstance(ms, int | float):
        return "-"
    text = f"{ms:.0f} ms"
    return f"[bold red]{text}[/bold red]" if ms >= 100 else text


def _num(v: Any) -> str:
    return "-" if v is None else str(v)


ROLE_STYLES = {"leader": "bold green", "follower": "", "candidate": "yellow", "down": "bold red"}


def _role(role: Any) -> str:
    role = str(role or "unknown")
    style = ROLE_STYLES.get(role, "")
    return f"[{style}]{role}[/{style}]" if style else role


def cluster_members_table(view: dict) -> Table:
    """`cluster ls`: {"clusterid", "leader", "term", "members": [rows from cli/cluster.py]}."""
    t = _table(None, "Peer ID", "Address", "Reachable", "Role", "Term", "Raft")
    for m in view.get("members", []):
        reachable = m.get("reachable")
        t.add_row(
            m.get("peerid", ""),
            short_addr(m.get("addr")),
            "-" if reachable is None else "yes" if reachable else "[bold red]no[/bold red]",
            _role(m.get("role")),
            _num(m.get("term")),
            m.get("raft") or "-",
        )
    return t


def status_tables(status: dict) -> list[Table]:
    """`status`: the cluster, its members, and the statistics the configured keys may see
    (the shape cli/status.py builds)."""
    nodes = status.get("nodes", [])
    leader = status.get("leader")
    versions = sorted({str(n["version"]) for n in nodes if n.get("version")})
    tables = [
        _kv_table(
            "Cluster",
            [
                ("cluster id", status.get("clusterid") or "-"),
                ("server owner id", status.get("serverid") or "-"),
                ("leader", f"{leader} (term {status.get('term')})" if leader
                 else "[bold red]none reachable[/bold red]"),
                ("members", f"{status.get('reachable', 0)} of {status.get('members', 0)} reachable"),
                ("version", ", ".join(versions) or "-"),
            ],
        )
    ]
    problems = any(not n.get("reachable") for n in nodes)
    columns = ["Peer ID", "Address", "Role", "Term", "Commit", "Applied", "Lag",
               "Leader contact", "Queued", "In flight", "Loop stall 1m"]
    t = _table("Nodes", *columns, *(["Problem"] if problems else []))
    for n in nodes:
        row = [short_peer(n.get("peerid")), short_addr(n.get("addr")), _role(n.get("role"))]
        if n.get("reachable"):
            contact = ("self" if n.get("peerid") == leader
                       else fmt_seconds(n.get("leader_contact_s")))
            row += [_num(n.get("term")), _num(n.get("commit_index")), _num(n.get("applied_index")),
                    _num(n.get("lag")), contact, _num(n.get("queued")), _num(n.get("in_flight")),
                    _stall(n.get("loop_lag_max_ms"))]
            row += [""] if problems else []
        else:
            row += ["-"] * 8 + [escape(str(n.get("error") or "unreachable"))]
        t.add_row(*row)
    tables.append(t)
    if "statistics" in status:
        tables.append(stats_table("Server statistics", status["statistics"]))
    if "colonyview" in status:
        tables.append(colony_view_table(status.get("colonyname", ""), status["colonyview"],
                                        status.get("colony", {})))
    elif "colony" in status:
        tables.append(
            stats_table(f"Colony {status.get('colonyname', '')}", status["colony"], ("colonies",))
        )
    return tables


def colony_view_table(name: str, view: dict, stats: dict) -> Table:
    ex = view.get("executors", {})
    procs = view.get("processes", {})
    oldest = view.get("oldest_waiting_s")
    rule = ("colony rule: not heard from in" if ex.get("stale_rule") == "colony"
            else "staleness off; not heard from in")
    rows: list[tuple[str, Any]] = [
        ("assignments", "paused" if view.get("paused") else "running"),
        ("executors",
         f"{ex.get('online', 0)} online, {ex.get('stale', 0)} stale "
         f"({rule} {fmt_seconds(ex.get('stale_after_s'))}), "
         f"{ex.get('pending', 0)} pending, {ex.get('rejected', 0)} rejected"),
        ("processes", ", ".join(f"{k} {v}" for k, v in procs.items()) or "-"),
        ("oldest waiting",
         f"{fmt_seconds(oldest)} ({view.get('oldest_waiting_processid')})"
         if oldest is not None else "-"),
        ("assigns/s", _num(view.get("assigns_per_s"))),
    ]
    flows = {k[: -len("workflows")]: v for k, v in stats.items()
             if k.endswith("workflows") and isinstance(v, int)}
    if any(flows.values()):
        rows.append(("workflows", ", ".join(f"{k} {v}" for k, v in flows.items())))
    return _kv_table(f"Colony {name}", rows)
