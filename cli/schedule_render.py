"""How `colonies generator` and `colonies cron` show their records (rich tables); JSON output
is the reply as is."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from cli.render import _kv_table, _table, fmt_time


def _funcs(record: dict) -> str:
    specs = record.get("workflowspec", {}).get("functionspecs", [])
    return ", ".join(s.get("nodename") or s.get("funcname", "?") for s in specs) or "-"


def _timeout(v: Any) -> str:  # noqa: ANN401 - a reply field
    return f"{v} s" if isinstance(v, int) and v > 0 else "none"


def generators_table(generators: list[dict]) -> Table:
    t = _table(None, "Name", "Generator ID", "Trigger", "Timeout", "Waiting", "Runs",
               "Last run")
    for g in generators:
        t.add_row(
            g.get("name", ""),
            g.get("generatorid", ""),
            str(g.get("trigger", "")),
            _timeout(g.get("timeout")),
            str(g.get("queuesize", 0)),
            str(g.get("runs", 0)),
            fmt_time(g.get("lastrun")),
        )
    return t


def generator_table(g: dict) -> Table:
    return _kv_table(
        "Generator",
        [
            ("generatorid", g.get("generatorid", "")),
            ("name", g.get("name", "")),
            ("colony", g.get("colonyname", "")),
            ("initiator", g.get("initiatorname") or g.get("initiatorid", "")),
            ("workflow", _funcs(g)),
            ("trigger", str(g.get("trigger", ""))),
            ("timeout", _timeout(g.get("timeout"))),
            ("waiting args", str(g.get("queuesize", 0))),
            ("first waiting since", fmt_time(g.get("firstpack"))),
            ("runs", str(g.get("runs", 0))),
            ("last run", fmt_time(g.get("lastrun"))),
        ],
    )


def schedule(c: dict) -> str:
    """'every 10 s' or the expression."""
    interval = c.get("interval")
    if isinstance(interval, int) and interval > 0:
        return f"every {interval} s"
    return c.get("cronexpression") or "-"


def crons_table(crons: list[dict]) -> Table:
    t = _table(None, "Name", "Cron ID", "Schedule", "Waits", "Next run", "Last run", "Runs",
               "Skipped")
    for c in crons:
        t.add_row(
            c.get("name", ""),
            c.get("cronid", ""),
            schedule(c),
            "yes" if c.get("waitforprevprocessgraph") else "no",
            fmt_time(c.get("nextrun")),
            fmt_time(c.get("lastrun")),
            str(c.get("runs", 0)),
            str(c.get("skipped", 0)),
        )
    return t


def cron_table(c: dict) -> Table:
    return _kv_table(
        "Cron",
        [
            ("cronid", c.get("cronid", "")),
            ("name", c.get("name", "")),
            ("colony", c.get("colonyname", "")),
            ("initiator", c.get("initiatorname") or c.get("initiatorid", "")),
            ("workflow", _funcs(c)),
            ("schedule", schedule(c) + (" (UTC)" if c.get("cronexpression") else "")),
            ("wait for previous", "yes" if c.get("waitforprevprocessgraph") else "no"),
            ("next run", fmt_time(c.get("nextrun"))),
            ("last run", fmt_time(c.get("lastrun"))),
            ("runs", str(c.get("runs", 0))),
            ("skipped", str(c.get("skipped", 0))),
            ("previous run", c.get("prevprocessgraphid") or "-"),
        ],
    )
