"""`colonies cron ...`: workflows started on a schedule.

    colonies cron add --name nightly --spec wf.json --cron '0 0 2 * * *'
    colonies cron add --name poll --spec wf.json --interval 30 --wait-for-prev
    colonies cron ls -o json
    colonies cron get ID
    colonies cron run ID
    colonies cron remove ID

Expressions have 6 fields, seconds first (second minute hour day-of-month month
day-of-week), in UTC; or use --interval S. Each run's root processes get the previous run's
output as input. --wait-for-prev skips a run while the previous one is waiting or running.
The node checks the expression and the workflow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cli import schedule_render
from cli.workflow_cmds import Group, Leaf, positive_int, workflow_from_file

if TYPE_CHECKING:
    from cli.main import Context


async def cmd_add(ctx: Context) -> int:
    a = ctx.args
    spec = workflow_from_file(ctx, a.spec)
    key = ctx.cfg.key("prvkey")
    async with ctx.client(key) as c:
        cron = await c.add_cron(
            spec["colonyname"],
            a.name,
            spec["functionspecs"],
            cron_expression=a.cron or "",
            interval=a.interval if a.interval is not None else -1,
            wait_for_prev=a.wait_for_prev,
        )
    if ctx.json:
        ctx.show(cron, schedule_render.cron_table)
    else:
        print(cron["cronid"], flush=True)
    return 0


async def cmd_ls(ctx: Context) -> int:
    colony = ctx.cfg.colony_name()
    key = ctx.cfg.key("prvkey")
    async with ctx.client(key) as c:
        crons = await c.crons(colony, ctx.args.count)
    ctx.show(crons, schedule_render.crons_table)
    return 0


async def cmd_get(ctx: Context) -> int:
    key = ctx.cfg.key("prvkey")
    async with ctx.client(key) as c:
        cron = await c.cron(ctx.args.cronid)
    ctx.show(cron, schedule_render.cron_table)
    return 0


async def cmd_run(ctx: Context) -> int:
    key = ctx.cfg.key("prvkey")
    async with ctx.client(key) as c:
        cron = await c.run_cron(ctx.args.cronid)
    ctx.say(f"cron {cron['name']} started workflow {cron['prevprocessgraphid']}", cron)
    return 0


async def cmd_remove(ctx: Context) -> int:
    cid = ctx.args.cronid
    key = ctx.cfg.key("prvkey")
    async with ctx.client(key) as c:
        await c.remove_cron(cid)
    ctx.say(f"cron {cid} removed (its past runs are kept)", {"cronid": cid, "removed": True})
    return 0


def add_parser(group: Group, leaf: Leaf) -> None:
    """Register `colonies cron` with cli.main's `group` and `leaf` builders."""
    g = group("cron", "crons: a workflow run on a schedule")
    p = leaf(g, "add", cmd_add, "add a cron for a workflow spec from a JSON file")
    p.add_argument("--name", required=True, help="a name, unique in the colony")
    p.add_argument("--spec", required=True, metavar="FILE",
                   help="workflow spec (JSON, as for 'workflow submit'; - = stdin)")
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", metavar="EXPR",
                      help="6 fields, seconds first, UTC: e.g. '0/5 * * * * *' (every 5 s), "
                      "'0 30 9 * * MON-FRI'")
    when.add_argument("--interval", type=positive_int, metavar="S", help="every S seconds")
    p.add_argument("--wait-for-prev", action="store_true",
                   help="skip a run while the previous one is waiting or running")
    p = leaf(g, "ls", cmd_ls, "list the colony's crons by name")
    p.add_argument("--count", type=positive_int, default=100, help="at most this many")
    p = leaf(g, "get", cmd_get, "show a cron")
    p.add_argument("cronid", metavar="ID")
    p = leaf(g, "run", cmd_run, "start a run now")
    p.add_argument("cronid", metavar="ID")
    p = leaf(g, "remove", cmd_remove, "remove a cron (its past runs stay)")
    p.add_argument("cronid", metavar="ID")
