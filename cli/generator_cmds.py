"""`colonies generator ...`: workflows started by batches of packed arguments.

    colonies generator add --name resize --spec wf.json --trigger 10 --timeout 30
    colonies generator pack ID --arg photo-1.jpg
    colonies generator pack ID --arg '{"w": 640}' --json
    colonies generator ls -o json
    colonies generator get ID
    colonies generator remove ID

The spec file is a workflow spec as for `colonies workflow submit`. Every `--trigger` packed
arguments start one run whose root processes get them as args; with `--timeout S`, a partial
batch runs S seconds after its first argument was packed. The node decides the rest.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from cli import json_text, schedule_render
from cli.errors import UsageError
from cli.workflow_cmds import Group, Leaf, positive_int, workflow_from_file

if TYPE_CHECKING:
    from cli.main import Context


async def cmd_add(ctx: Context) -> int:
    a = ctx.args
    spec = workflow_from_file(ctx, a.spec)
    colony = spec["colonyname"]
    key = ctx.cfg.key("prvkey")
    async with ctx.client(key) as c:
        g = await c.add_generator(colony, a.name, spec["functionspecs"], a.trigger, a.timeout)
    if ctx.json:
        ctx.show(g, schedule_render.generator_table)
    else:
        print(g["generatorid"], flush=True)
    return 0


def _arg(ctx: Context) -> Any:  # noqa: ANN401 - any JSON value
    if not ctx.args.json:
        return ctx.args.arg
    try:
        return json_text.loads(ctx.args.arg)
    except ValueError as e:
        raise UsageError(f"--arg is not valid JSON (drop --json to pack it as text): {e}") from None


async def cmd_pack(ctx: Context) -> int:
    gid = ctx.args.generatorid
    arg = _arg(ctx)
    key = ctx.cfg.key("prvkey")
    async with ctx.client(key) as c:
        reply = await c.pack_generator(gid, arg)
    run = reply.get("processgraphid")
    if run:
        text = f"packed; the batch is complete: workflow {run} started"
    else:
        text = f"packed; {reply.get('queuesize', '?')} argument(s) waiting"
    ctx.say(text, {"generatorid": gid, **reply})
    return 0


async def cmd_ls(ctx: Context) -> int:
    colony = ctx.cfg.colony_name()
    key = ctx.cfg.key("prvkey")
    async with ctx.client(key) as c:
        gens = await c.generators(colony, ctx.args.count)
    ctx.show(gens, schedule_render.generators_table)
    return 0


async def cmd_get(ctx: Context) -> int:
    key = ctx.cfg.key("prvkey")
    async with ctx.client(key) as c:
        g = await c.generator(ctx.args.generatorid)
    ctx.show(g, schedule_render.generator_table)
    return 0


async def cmd_remove(ctx: Context) -> int:
    gid = ctx.args.generatorid
    key = ctx.cfg.key("prvkey")
    async with ctx.client(key) as c:
        await c.remove_generator(gid)
    ctx.say(f"generator {gid} removed (its waiting arguments with it)",
            {"generatorid": gid, "removed": True})
    return 0


def timeout_seconds(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (no timeout) or more, got {v}")
    return v


def add_parser(group: Group, leaf: Leaf) -> None:
    """Register `colonies generator` with cli.main's `group` and `leaf` builders."""
    g = group("generator", "generators: a workflow run per batch of packed arguments")
    p = leaf(g, "add", cmd_add, "add a generator for a workflow spec from a JSON file")
    p.add_argument("--name", required=True, help="a name, unique in the colony")
    p.add_argument("--spec", required=True, metavar="FILE",
                   help="workflow spec (JSON, as for 'workflow submit'; - = stdin)")
    p.add_argument("--trigger", required=True, type=positive_int, metavar="N",
                   help="start a run every N packed arguments")
    p.add_argument("--timeout", type=timeout_seconds, default=0, metavar="S",
                   help="run a partial batch S seconds after its first argument (0: never)")
    p = leaf(g, "pack", cmd_pack, "queue one argument for the generator's next run")
    p.add_argument("generatorid", metavar="ID")
    p.add_argument("--arg", required=True, metavar="VALUE", help="the argument (text)")
    p.add_argument("--json", action="store_true", help="parse --arg as a JSON value")
    p = leaf(g, "ls", cmd_ls, "list the colony's generators by name")
    p.add_argument("--count", type=positive_int, default=100, help="at most this many")
    p = leaf(g, "get", cmd_get, "show a generator")
    p.add_argument("generatorid", metavar="ID")
    p = leaf(g, "remove", cmd_remove, "remove a generator and its waiting arguments")
    p.add_argument("generatorid", metavar="ID")
