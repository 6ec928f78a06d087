"""`colonies workflow ...`: submit, list, show, cancel and remove workflows (process graphs).

    colonies workflow submit --spec wf.json --wait
    colonies workflow ls --state running -o json
    colonies workflow get ID
    colonies workflow cancel ID
    colonies workflow remove ID
    colonies workflow removeall --successful        (colony owner key)

A spec file holds a Colonies workflow spec, {"colonyname": ..., "functionspecs": [...]}, or
just the list of function specs. The colony defaults to the configured one, each spec's
executor type to the configured executor type; each spec needs a unique `nodename`, and
lists the nodenames it depends on in `conditions.dependencies`. The node decides the rest.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from cli import json_text, workflow_render
from cli.errors import UsageError
from protocol.errors import ColoniesError
from protocol.messages import CANCELLED, FAILED, STATE_NAMES, SUCCESS

if TYPE_CHECKING:
    from cli.main import Context

PROG = "colonies"
STATES = {name: state for state, name in STATE_NAMES.items()}  # "waiting" -> 0, ...
MAX_FAILURES_SHOWN = 10

Handler = Callable[["Context"], Awaitable[int]]
Group = Callable[[str, str], argparse._SubParsersAction]
Leaf = Callable[..., argparse.ArgumentParser]


def workflow_from_file(ctx: Context, path: str) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as e:
        raise UsageError(f"cannot read workflow spec file {path}: {e.strerror}") from None
    try:
        data = json_text.loads(text)
    except ValueError as e:
        raise UsageError(f"workflow spec file {path} is not valid JSON: {e}") from None
    if isinstance(data, list):
        data = {"functionspecs": data}
    if not isinstance(data, dict) or not isinstance(data.get("functionspecs"), list):
        raise UsageError(
            f"workflow spec file {path} must hold {{\"colonyname\": ..., \"functionspecs\": "
            "[...]}} or a list of function specs"
        )
    if not data.get("colonyname"):
        data["colonyname"] = ctx.cfg.colony_name()
    for i, spec in enumerate(data["functionspecs"]):
        if not isinstance(spec, dict):
            raise UsageError(f"workflow spec file {path}: function spec {i} is not an object")
        cond = spec.setdefault("conditions", {})
        if not isinstance(cond, dict):
            raise UsageError(
                f"workflow spec file {path}: 'conditions' of function spec {i} must be an object"
            )
        if not cond.get("executortype"):
            cond["executortype"] = ctx.cfg.executor_type()
    return data


async def cmd_submit(ctx: Context) -> int:
    spec = workflow_from_file(ctx, ctx.args.spec)
    key = ctx.cfg.key("prvkey")
    async with ctx.client(key) as c:
        graph = await c.submit_workflow_spec(spec)
        gid = graph["processgraphid"]
        if not ctx.args.wait:
            if ctx.json:
                ctx.show(graph, workflow_render.graph_tables)
            else:
                print(gid, flush=True)
            return 0
        timeout = ctx.args.timeout if ctx.args.timeout and ctx.args.timeout > 0 else math.inf
        try:
            graph = await c.wait_process_graph(gid, timeout)
        except trio.TooSlowError:
            raise ColoniesError(f"workflow {gid} did not finish within {timeout:g} s") from None
        failures = await _failures(c, graph) if graph["state"] == FAILED else []
    ctx.show(graph, workflow_render.graph_tables)
    if graph["state"] == SUCCESS:
        return 0
    what = "failed" if graph["state"] == FAILED else STATE_NAMES.get(graph["state"], "?")
    print(f"{PROG}: error: workflow {gid} {what}", file=sys.stderr)
    for line in failures:
        print(f"  {line}", file=sys.stderr)
    sys.stderr.flush()
    return 1


async def _failures(c: Any, graph: dict) -> list[str]:
    """'node: error' for the members that failed on their own (not with their workflow)."""
    lines = []
    for n in graph.get("nodes", []):
        if n.get("state") != FAILED or len(lines) >= MAX_FAILURES_SHOWN:
            continue
        p = await c.process(n["processid"])
        errors = p.get("errors", [])
        if errors and errors[0].startswith(f"workflow {graph['processgraphid']} failed"):
            continue
        name = n.get("nodename") or n["processid"]
        lines.append(f"{name}: {'; '.join(errors) or 'no error given'}")
    return lines


async def cmd_ls(ctx: Context) -> int:
    colony = ctx.cfg.colony_name()
    state = -1 if ctx.args.state == "all" else STATES[ctx.args.state]
    key = ctx.cfg.key("prvkey")
    async with ctx.client(key) as c:
        graphs = await c.process_graphs(colony, state, ctx.args.count)
    ctx.show(graphs, workflow_render.graphs_table)
    return 0


async def cmd_get(ctx: Context) -> int:
    key = ctx.cfg.key("prvkey")
    async with ctx.client(key) as c:
        graph = await c.process_graph(ctx.args.processgraphid)
    ctx.show(graph, workflow_render.graph_tables)
    return 0


async def cmd_cancel(ctx: Context) -> int:
    gid = ctx.args.processgraphid
    key = ctx.cfg.key("prvkey")
    async with ctx.client(key) as c:
        await c.cancel_process_graph(gid)
    ctx.say(f"workflow {gid} cancelled", {"processgraphid": gid, "state": CANCELLED})
    return 0


async def cmd_remove(ctx: Context) -> int:
    gid = ctx.args.processgraphid
    key = ctx.cfg.key("prvkey")
    async with ctx.client(key) as c:
        await c.remove_process_graph(gid)
    ctx.say(f"workflow {gid} removed", {"processgraphid": gid, "removed": True})
    return 0


async def cmd_removeall(ctx: Context) -> int:
    a = ctx.args
    state = -1
    for flag in ("waiting", "successful", "failed", "cancelled"):
        if getattr(a, flag):
            state = STATES[flag]
    colony = ctx.cfg.colony_name()
    key = ctx.cfg.key("colony_prvkey")
    async with ctx.client(key) as c:
        await c.remove_all_process_graphs(colony, state)
    which = "all" if state < 0 else "all " + STATE_NAMES[state]
    ctx.say(f"{which} workflows of colony {colony} removed (running ones are kept)",
            {"colonyname": colony, "state": state, "removed": True})
    return 0


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def add_parser(group: Group, leaf: Leaf) -> None:
    """Register `colonies workflow` with cli.main's `group` and `leaf` builders."""
    g = group("workflow", "workflows: DAGs of processes (process graphs)")
    p = leaf(g, "submit", cmd_submit, "submit a workflow spec from a JSON file")
    p.add_argument("--spec", required=True, metavar="FILE",
                   help="workflow spec (JSON: {colonyname, functionspecs} or a list of "
                   "function specs with nodename and conditions.dependencies; - = stdin)")
    p.add_argument("--wait", action="store_true",
                   help="wait until it finishes and show it; exit 1 unless it succeeded")
    p.add_argument("--timeout", type=float, default=0, metavar="S",
                   help="with --wait: give up after S seconds (default: no limit)")
    p = leaf(g, "ls", cmd_ls, "list the colony's workflows, oldest first")
    p.add_argument("--state", choices=["all", *STATES], default="all",
                   help="only workflows in this state")
    p.add_argument("--count", type=positive_int, default=100, help="at most this many")
    p = leaf(g, "get", cmd_get, "show a workflow and its processes")
    p.add_argument("processgraphid", metavar="ID")
    p = leaf(g, "cancel", cmd_cancel, "cancel a workflow's waiting and running processes")
    p.add_argument("processgraphid", metavar="ID")
    p = leaf(g, "remove", cmd_remove, "remove a workflow and its processes (not while running)")
    p.add_argument("processgraphid", metavar="ID")
    p = leaf(g, "removeall", cmd_removeall,
             "remove the colony's workflows but running ones (colony owner key)",
             aliases=("remove-all",))
    which = p.add_mutually_exclusive_group()
    for flag in ("waiting", "successful", "failed", "cancelled"):
        which.add_argument(f"--{flag}", action="store_true", help=f"only {flag} ones")

