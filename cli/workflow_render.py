"""How `colonies workflow` shows process graphs (rich tables); JSON output is the reply as is."""

from __future__ import annotations

from rich.table import Table

from cli.render import _kv_table, _table, fmt_time, state_name


def graphs_table(graphs: list[dict]) -> Table:
    t = _table(None, "Graph ID", "State", "Processes", "Initiator", "Submitted", "Started",
               "Ended")
    for g in graphs:
        t.add_row(
            g.get("processgraphid", ""),
            state_name(g.get("state")),
            str(len(g.get("processids", []))),
            g.get("initiatorname") or g.get("initiatorid", ""),
            fmt_time(g.get("submissiontime")),
            fmt_time(g.get("starttime")),
            fmt_time(g.get("endtime")),
        )
    return t


def graph_tables(g: dict) -> list[Table]:
    """The graph, then one row per process with what it depends on (from `edges`)."""
    tables = [
        _kv_table(
            "Workflow",
            [
                ("processgraphid", g.get("processgraphid", "")),
                ("colony", g.get("colonyname", "")),
                ("state", state_name(g.get("state"))),
                ("initiator", g.get("initiatorname") or g.get("initiatorid", "")),
                ("submitted", fmt_time(g.get("submissiontime"))),
                ("started", fmt_time(g.get("starttime"))),
                ("ended", fmt_time(g.get("endtime"))),
                ("processes", str(len(g.get("processids", [])))),
            ],
        )
    ]
    nodes = g.get("nodes")
    if nodes is None:
        return tables
    names = {n.get("processid"): n.get("nodename") or n.get("processid", "")[:12] for n in nodes}
    parents: dict[str, list[str]] = {}
    for e in g.get("edges", []):
        parents.setdefault(e.get("target", ""), []).append(names.get(e.get("source"), "?"))
    t = _table("Processes", "Node", "Func", "Type", "State", "Depends on", "Process ID")
    for n in nodes:
        state = state_name(n.get("state"))
        if n.get("waitforparents") and n.get("state") == 0:
            state += " (for parents)"
        t.add_row(
            n.get("nodename") or "-",
            n.get("funcname", ""),
            n.get("executortype", ""),
            state,
            ", ".join(parents.get(n.get("processid", ""), [])) or "-",
            n.get("processid", ""),
        )
    tables.append(t)
    return tables
