"""`colonies function ls`: the functions the colony's executors registered.

    colonies function ls [--executor NAME] [-o json]

Executors register their functions themselves (the executor helper does it when it starts).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cli.render import _table, fmt_seconds

if TYPE_CHECKING:
    from rich.table import Table

    from cli.main import Context

Group = Callable[[str, str], argparse._SubParsersAction]
Leaf = Callable[..., argparse.ArgumentParser]


def functions_table(functions: list[dict[str, Any]]) -> Table:
    t = _table(None, "Function", "Executor", "Type", "Description", "Runs", "Avg exec",
               "Function ID")
    for f in functions:
        runs = f.get("counter", 0)
        t.add_row(f.get("funcname", ""), f.get("executorname", ""), f.get("executortype", ""),
                  f.get("description", ""), str(runs),
                  fmt_seconds(f.get("avgexectime")) if runs else "-", f.get("functionid", ""))
    return t


async def cmd_ls(ctx: Context) -> int:
    colony = ctx.cfg.colony_name()
    key = ctx.cfg.key("prvkey")
    async with ctx.client(key) as c:
        functions = await c.functions(colony, ctx.args.executor or "")
    ctx.show(functions, functions_table)
    return 0


def add_parser(group: Group, leaf: Leaf) -> None:
    """Register `colonies function` with cli.main's `group` and `leaf` builders."""
    g = group("function", "functions the colony's executors serve")
    p = leaf(g, "ls", cmd_ls, "list the colony's functions, by executor then name")
    p.add_argument("--executor", metavar="NAME", help="only this executor's functions")
