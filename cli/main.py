"""`colonies`: the command-line client (and `colonies dev`, a one-process dev colony).

    colonies key generate
    colonies colony add --name dev --colonyid ID          (server owner key)
    colonies executor add --name w1 --type cli --executorid ID --approve   (colony owner key)
    colonies process run --func echo --args hello --wait
    colonies process ps -o json
    colonies status [--watch]                              (the cluster at a glance)
    colonies cluster ls | add MULTIADDR | remove PEERID   (members; add/remove: server owner key)

Settings come from flags, then COLONIES_* environment variables, then a TOML config file (see
cli/config.py). Which key signs: colony add/ls/remove and server statistics use the server
owner key; executor add/approve/reject/remove and process removeall the colony owner key;
cluster add/remove the server owner key too;
everything else the acting key (COLONIES_PRVKEY). This module only parses, resolves settings,
calls the node through node.client and hands replies to cli/render.py; the node decides.

Errors are one line on stderr, `colonies: error: <message> (<status>)`; exit status 2 for
usage and configuration errors, 1 for errors from the node, 3 when `status` finds no
reachable node that reports a leader, 130 on Ctrl-C (`status --watch` ends on Ctrl-C with 0).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from cli import json_text, process_follow, render
from cli.config import Config, ConfigError, load_config
from cli.errors import UsageError
from protocol.errors import ColoniesError
from protocol.identity import PrivateKey
from protocol.messages import CANCELLED, FAILED, MAX_MEMBER_WAIT_S, RUNNING, SUCCESS, WAITING

if TYPE_CHECKING:
    from node.client import Client

PROG = "colonies"
CONNECT_TIMEOUT_S = 10.0
NO_LEADER_EXIT = 3


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (usage goes to --help) and raises instead of exiting,
    and a flag must be spelled out: no prefix matching (`--server` must not quietly mean
    `--server-prvkey`). Subparsers are made with this class, so the rule holds everywhere."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401 - argparse's
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:  # noqa: ANN401 - argparse's signature
        raise UsageError(f"{message} (see '{self.prog} --help')")


# Global options are accepted before the verb and after it (`colonies process ps -o json`).
# On the leaves they default to SUPPRESS so a leaf never overwrites what was given before.
def add_global_options(p: argparse.ArgumentParser, leaf: bool) -> None:
    d = argparse.SUPPRESS if leaf else None
    g = p.add_argument_group("global options")
    g.add_argument("--addr", default=d, metavar="MULTIADDR",
                   help="node address /ip4/HOST/tcp/PORT/p2p/PEERID [COLONIES_SERVER_ADDR]")
    g.add_argument("--colony", default=d, metavar="NAME", help="colony name [COLONIES_COLONY_NAME]")
    g.add_argument("--prvkey", default=d, metavar="HEX",
                   help="acting user or executor key [COLONIES_PRVKEY]")
    g.add_argument("--colony-prvkey", default=d, metavar="HEX",
                   help="colony owner key [COLONIES_COLONY_PRVKEY]")
    g.add_argument("--server-prvkey", default=d, metavar="HEX",
                   help="server owner key [COLONIES_SERVER_PRVKEY]")
    g.add_argument("--config", default=d, metavar="FILE",
                   help="TOML config file [COLONIES_CONFIG, ~/.colonies/config.toml]")
    g.add_argument("-o", "--output", default=d, choices=render_formats(), help="output format")


def render_formats() -> tuple[str, ...]:
    return ("table", "json")


# The context a command runs in.


@dataclass
class Context:
    args: argparse.Namespace
    cfg: Config

    @property
    def json(self) -> bool:
        return self.cfg.output == "json"

    def show(self, value: Any, tables: Callable[[Any], Any]) -> None:  # noqa: ANN401
        if self.json:
            render.print_json(value)
            return
        con = render.console()
        made = tables(value)
        for t in made if isinstance(made, list) else [made]:
            con.print(t)

    def say(self, text: str, value: Any = None) -> None:  # noqa: ANN401
        """A confirmation: the text for people, `value` (if any) as JSON for programs."""
        if self.json:
            render.print_json(value if value is not None else {"message": text})
        else:
            print(text, flush=True)

    @asynccontextmanager
    async def client(self, key: PrivateKey) -> AsyncIterator[Client]:
        addr = self.cfg.server_addrs()  # checked before libp2p is imported or dialled
        from node.client import Client

        async with Client.connect(addr, key, CONNECT_TIMEOUT_S) as c:
            yield c


Handler = Callable[[Context], Awaitable[int]]


def kv_pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise UsageError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[k] = v
    return out


def csv_names(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def _arg_or(ctx: Context, value: str | None, setting: str, flag: str) -> str:
    """A command flag, else the configured setting (e.g. --name, else COLONIES_COLONY_NAME)."""
    if value:
        return value
    if ctx.cfg.has(setting):
        return ctx.cfg.require(setting)
    raise UsageError(f"{flag} is required")


# key


async def cmd_key_generate(ctx: Context) -> int:
    key = PrivateKey.generate()
    ctx.show({"prvkey": key.hex, "id": key.id}, lambda v: render.key_table(v["prvkey"], v["id"]))
    return 0


async def cmd_key_id(ctx: Context) -> int:
    key = ctx.cfg.key("prvkey")
    ctx.say(key.id, {"id": key.id})
    return 0


# colony


async def cmd_colony_add(ctx: Context) -> int:
    a = ctx.args
    name = _arg_or(ctx, a.name, "colony_name", "--name")
    key = ctx.cfg.key("server_prvkey")
    if a.colonyid:
        colony_id = a.colonyid
    elif ctx.cfg.has("colony_prvkey"):
        colony_id = ctx.cfg.key("colony_prvkey").id
    else:
        raise UsageError("--colonyid is required (or set the colony owner key to use its id)")
    async with ctx.client(key) as c:
        colony = await c.add_colony(colony_id, name)
    ctx.show(colony, render.colony_table)
    return 0


async def cmd_colony_ls(ctx: Context) -> int:
    key = ctx.cfg.key("server_prvkey")
    async with ctx.client(key) as c:
        colonies = await c.colonies()
    ctx.show(colonies, render.colonies_table)
    return 0


async def cmd_colony_get(ctx: Context) -> int:
    name = _arg_or(ctx, ctx.args.name, "colony_name", "--name")
    key = ctx.cfg.key("prvkey")
    async with ctx.client(key) as c:
        colony = await c.colony(name)
        status = await c.pause_status(name)
    colony = {**colony, "paused": status["ispaused"], "staleafter": status["staleafter"]}
    ctx.show(colony, render.colony_table)
    return 0


async def cmd_colony_remove(ctx: Context) -> int:
    name = ctx.args.name
    key = ctx.cfg.key("server_prvkey")
    async with ctx.client(key) as c:
        await c.remove_colony(name)
    ctx.say(f"colony {name} removed", {"colonyname": name, "removed": True})
    return 0


# executor


async def cmd_executor_add(ctx: Context) -> int:
    a = ctx.args
    colony = ctx.cfg.colony_name()
    name = _arg_or(ctx, a.name, "executor_name", "--name")
    etype = a.type or ctx.cfg.executor_type()
    key = ctx.cfg.key("colony_prvkey")
    async with ctx.client(key) as c:
        executor = await c.add_executor(a.executorid, name, etype, colony)
        if a.approve:
            await c.approve_executor(colony, name)
            executor = await c.executor(colony, name)
    ctx.show(executor, render.executor_table)
    return 0


def _executor_change(verb: str) -> Handler:
    async def run(ctx: Context) -> int:
        colony = ctx.cfg.colony_name()
        name = ctx.args.name
        key = ctx.cfg.key("colony_prvkey")
        async with ctx.client(key) as c:
            call = {"approve": c.approve_executor, "reject": c.reject_executor,
                    "remove": c.remove_executor}[verb]
            await call(colony, name)
        past = {"approve": "approved", "reject": "rejected", "remove": "removed"}[verb]
        ctx.say(f"executor {name} {past}", {"executorname": name, "colonyname": colony,
                                             past: True})
        return 0

    return run


async def cmd_executor_ls(ctx: Context) -> int:
    colony = ctx.cfg.colony_name()
    key = ctx.cfg.key("prvkey")
    async with ctx.client(key) as c:
        executors = await c.executors(colony)
        staleafter = (await c.pause_status(colony))["staleafter"]
    from cli.colony_cmds import liveness

    executors = [{**e, "liveness": liveness(e, staleafter)} for e in executors]
    ctx.show(executors, render.executors_table)
    return 0


async def cmd_executor_get(ctx: Context) -> int:
    colony = ctx.cfg.colony_name()
    key = ctx.cfg.key("prvkey")
    async with ctx.client(key) as c:
        executor = await c.executor(colony, ctx.args.name)
    ctx.show(executor, render.executor_table)
    return 0


# process


def spec_from_flags(ctx: Context) -> dict[str, Any]:
    a = ctx.args
    return {
        "funcname": a.func,
        "args": list(a.args or []),
        "kwargs": kv_pairs(a.kwargs, "--kwargs"),
        "priority": a.priority,
        "maxwaittime": a.maxwaittime,
        "maxexectime": a.maxexectime,
        "maxretries": a.maxretries,
        "label": a.label or "",
        "env": kv_pairs(a.env, "--env"),
        "conditions": {
            "colonyname": ctx.cfg.colony_name(),
            "executortype": a.type or ctx.cfg.executor_type(),
            "executornames": csv_names(a.targetnames),
        },
        **process_follow.spec_extras(a),  # Beyond Colonies: backoff, idempotency, limits
    }


def spec_from_file(ctx: Context, path: str) -> dict[str, Any]:
    """A function spec (Colonies JSON); the colony and executor type default to the settings."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as e:
        raise UsageError(f"cannot read spec file {path}: {e.strerror}") from None
    try:
        spec = json_text.loads(text)
    except ValueError as e:
        raise UsageError(f"spec file {path} is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise UsageError(f"spec file {path} must hold a JSON object (a function spec)")
    cond = spec.setdefault("conditions", {})
    if not isinstance(cond, dict):
        raise UsageError(f"spec file {path}: 'conditions' must be an object")
    if not cond.get("colonyname"):
        cond["colonyname"] = ctx.cfg.colony_name()
    if not cond.get("executortype"):
        cond["executortype"] = ctx.cfg.executor_type()
    return spec


async def _submit(ctx: Context, spec: dict[str, Any]) -> int:
    key = ctx.cfg.key("prvkey")
    async with ctx.client(key) as c:
        process = await c.submit_spec(spec)
        if not ctx.args.wait:
            if ctx.json:
                render.print_json(process)
            else:
                print(process["processid"], flush=True)
            return 0
        timeout = ctx.args.timeout if ctx.args.timeout and ctx.args.timeout > 0 else math.inf
        try:
            process = await c.wait(process["processid"], timeout)
        except trio.TooSlowError:
            raise ColoniesError(
                f"process {process['processid']} did not finish within {timeout:g} s"
            ) from None
    if ctx.json:
        render.print_json(process)
    elif process["state"] == SUCCESS:
        for item in process.get("out", []):
            print(render.fmt_value(item))
        sys.stdout.flush()
    if process["state"] == FAILED:
        errors = "; ".join(process.get("errors", [])) or "no error given"
        print(f"{PROG}: error: process {process['processid']} failed: {errors}", file=sys.stderr)
        return 1
    if process["state"] == CANCELLED:
        print(f"{PROG}: error: process {process['processid']} was cancelled", file=sys.stderr)
        return 1
    return 0


async def cmd_process_run(ctx: Context) -> int:
    return await _submit(ctx, spec_from_flags(ctx))


async def cmd_process_submit(ctx: Context) -> int:
    return await _submit(ctx, spec_from_file(ctx, ctx.args.spec))


async def cmd_process_assign(ctx: Context) -> int:
    colony = ctx.cfg.colony_name()
    key = ctx.cfg.key("prvkey")
    async with ctx.client(key) as c:
        process = await c.assign(colony, ctx.args.timeout)
    ctx.show(process, render.process_tables)
    return 0


async def cmd_process_close(ctx: Context) -> int:
    a = ctx.args
    key = ctx.cfg.key("prvkey")
    attempt = {"processid": a.processid, "attempt": a.attempt}
    async with ctx.client(key) as c:
        await c.close(attempt, list(a.out or []))
    ctx.say(f"process {a.processid} closed as successful", {**attempt, "state": SUCCESS})
    return 0


async def cmd_process_fail(ctx: Context) -> int:
    a = ctx.args
    key = ctx.cfg.key("prvkey")
    attempt = {"processid": a.processid, "attempt": a.attempt}
    async with ctx.client(key) as c:
        await c.fail(attempt, list(a.errors or []))
    ctx.say(f"process {a.processid} closed as failed", {**attempt, "state": FAILED})
    return 0


async def cmd_process_get(ctx: Context) -> int:
    key = ctx.cfg.key("prvkey")
    async with ctx.client(key) as c:
        process = await c.process(ctx.args.processid)
    ctx.show(process, render.process_tables)
    return 0


def _process_list(state: int) -> Handler:
    async def run(ctx: Context) -> int:
        colony = ctx.cfg.colony_name()
        key = ctx.cfg.key("prvkey")
        async with ctx.client(key) as c:
            processes = await c.processes(colony, state, ctx.args.count, ctx.args.type or "")
        ctx.show(processes, render.processes_table)
        return 0

    return run


async def cmd_process_remove(ctx: Context) -> int:
    pid = ctx.args.processid
    key = ctx.cfg.key("prvkey")
    async with ctx.client(key) as c:
        await c.remove_process(pid)
    ctx.say(f"process {pid} removed", {"processid": pid, "removed": True})
    return 0


async def cmd_process_cancel(ctx: Context) -> int:
    pid = ctx.args.id or ctx.args.processid
    if not pid:
        raise UsageError("the process id is required (colonies process cancel ID)")
    key = ctx.cfg.key("prvkey")
    async with ctx.client(key) as c:
        await c.cancel_process(pid)
    ctx.say(f"process {pid} cancelled", {"processid": pid, "state": CANCELLED})
    return 0


async def cmd_process_removeall(ctx: Context) -> int:
    a = ctx.args
    state = (WAITING if a.waiting else SUCCESS if a.successful else FAILED if a.failed
             else RUNNING if a.running else CANCELLED if a.cancelled else -1)
    colony = ctx.cfg.colony_name()
    key = ctx.cfg.key("colony_prvkey")
    async with ctx.client(key) as c:
        await c.remove_all_processes(colony, state)
    which = "all" if state < 0 else "all " + render.state_name(state)
    ctx.say(f"{which} processes of colony {colony} removed",
            {"colonyname": colony, "state": state, "removed": True})
    return 0


# attribute

ATTRIBUTE_TYPES = {"in": 0, "out": 1, "err": 2, "env": 3}


async def cmd_attribute_add(ctx: Context) -> int:
    a = ctx.args
    key = ctx.cfg.key("prvkey")
    async with ctx.client(key) as c:
        attribute = await c.add_attribute(a.processid, a.key, a.value, ATTRIBUTE_TYPES[a.type])
    ctx.show(attribute, render.attribute_table)
    return 0


async def cmd_attribute_get(ctx: Context) -> int:
    key = ctx.cfg.key("prvkey")
    async with ctx.client(key) as c:
        attribute = await c.attribute(ctx.args.attributeid)
    ctx.show(attribute, render.attribute_table)
    return 0


# cluster and status


def _any_key(cfg: Config) -> PrivateKey:
    """Server info answers any key: the acting key if set, else the server key, else a
    throwaway one."""
    for name in ("prvkey", "server_prvkey"):
        if cfg.has(name):
            return cfg.key(name)
    return PrivateKey.generate()


async def cmd_cluster_ls(ctx: Context) -> int:
    seed = ctx.cfg.server_addr()
    key = _any_key(ctx.cfg)
    from cli.cluster import ClusterView, member_rows

    async with ClusterView.open(seed, key, ctx.args.timeout) as view:
        probes = await view.refresh()
        info = view.first_info() or {}
        leader, term = view.leader, view.term
    if not any(p.reachable for p in probes):
        why = probes[0].error if probes else "no answer"
        raise ColoniesError(f"cannot reach {seed}: {why}")
    listing = {
        "clusterid": info.get("clusterid"),
        "leader": leader,
        "term": term,
        "members": member_rows(probes, leader),
    }
    ctx.show(listing, render.cluster_members_table)
    return 0


async def cmd_cluster_add(ctx: Context) -> int:
    from cli.cluster import check_member_addr

    try:
        pid, addr = check_member_addr(ctx.args.multiaddr)
    except ValueError as e:
        raise UsageError(str(e)) from None
    key = ctx.cfg.key("server_prvkey")
    async with ctx.client(key) as c:
        reply = await c.add_member(pid, addr, wait=ctx.args.wait)
    voter = bool(reply.get("voter"))
    ctx.say(
        f"member {pid} added at {addr}: "
        + ("a voter now" if voter else "a learner, catching up; it becomes a voter once it "
           "has the log (see `colonies cluster ls`)"),
        {"peerid": pid, "addr": addr, "voter": voter, "members": reply.get("members", {})},
    )
    return 0


async def cmd_cluster_remove(ctx: Context) -> int:
    from cli.cluster import check_peer_id

    try:
        pid = check_peer_id(ctx.args.peerid)
    except ValueError as e:
        raise UsageError(str(e)) from None
    key = ctx.cfg.key("server_prvkey")
    async with ctx.client(key) as c:
        reply = await c.remove_member(pid)
    ctx.say(
        f"member {pid} removed (it leaves the Raft group and stops serving)",
        {"peerid": pid, "removed": True, "members": reply.get("members", {})},
    )
    return 0


async def cmd_status(ctx: Context) -> int:
    """Every member's Raft view, plus the statistics the configured keys may see: server
    statistics with the server key, the colony's with a colony and a member key."""
    cfg, a = ctx.cfg, ctx.args
    seed = cfg.server_addr()
    if a.watch and a.interval <= 0:
        raise UsageError("--watch needs an --interval above 0")
    from cli.status import StatusOptions, StatusReader, watch

    member_key = cfg.key("prvkey") if cfg.has("prvkey") else None
    opts = StatusOptions(
        seed=seed,
        key=_any_key(cfg),
        timeout=a.timeout,
        server_key=cfg.key("server_prvkey") if cfg.has("server_prvkey") else None,
        member_key=member_key,
        colony=cfg.colony_name() if cfg.has("colony_name") and member_key is not None else None,
        stale_after=a.stale_after,
    )
    async with StatusReader.open(opts) as reader:
        if a.watch:
            await watch(reader, a.interval, ctx.json, render.status_tables, render.console)
            return 0
        status = await reader.round()
        if a.interval > 0:
            await reader.sample_rate(status, a.interval)
    ctx.show(status, render.status_tables)
    if not ctx.json:
        for n in status.get("notes", []):
            print(f"note: {n}", file=sys.stderr)
    if status["leader"] is None:
        print(
            f"{PROG}: error: no reachable node reports a leader "
            f"({status['reachable']} of {status['members']} members answered)",
            file=sys.stderr,
            flush=True,
        )
        return NO_LEADER_EXIT
    return 0


# The command tree.


def seconds(minimum: float, inclusive: bool = True) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
        if not math.isfinite(v) or v < minimum or (v == minimum and not inclusive):
            bound = "at least" if inclusive else "above"
            raise argparse.ArgumentTypeError(f"must be {bound} {minimum:g}, got {text}")
        return v

    return parse


def int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
        if not low <= v <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {v}")
        return v

    return parse


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def build_parser() -> Parser:
    from cli import dev

    parser = Parser(
        prog=PROG,
        description="Colonies command-line client: colonies, executors, processes.",
        epilog="Settings: flags > COLONIES_* environment > config file > defaults.",
    )
    add_global_options(parser, leaf=False)
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)

    def group(name: str, help_: str) -> argparse._SubParsersAction:
        g = groups.add_parser(name, help=help_, description=help_)
        return g.add_subparsers(dest="verb", metavar="VERB", required=True)

    def leaf(sub: argparse._SubParsersAction, name: str, handler: Handler, help_: str,
             aliases: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, aliases=list(aliases))
        add_global_options(p, leaf=True)
        p.set_defaults(handler=handler)
        return p

    # key
    g = group("key", "private keys")
    leaf(g, "generate", cmd_key_generate, "generate a private key and print it with its id")
    leaf(g, "id", cmd_key_id, "print the id of the acting key (--prvkey / COLONIES_PRVKEY)")

    # colony
    g = group("colony", "colonies (server owner key)")
    p = leaf(g, "add", cmd_colony_add, "add a colony (server owner key)")
    p.add_argument("--name", help="colony name (default: --colony / COLONIES_COLONY_NAME)")
    p.add_argument("--colonyid", help="the colony owner's id (default: id of the colony key)")
    leaf(g, "ls", cmd_colony_ls, "list colonies (server owner key)")
    p = leaf(g, "get", cmd_colony_get, "show a colony (member key)")
    p.add_argument("--name", help="colony name (default: --colony / COLONIES_COLONY_NAME)")
    p = leaf(g, "remove", cmd_colony_remove, "remove a colony and all in it (server owner key)")
    p.add_argument("--name", required=True, help="colony name")
    # Logs, functions, pause, executor liveness.
    from cli import colony_cmds

    colony_cmds.add_leaves(g, leaf)
    # Beyond Colonies: retention.
    process_follow.add_colony_leaves(g, leaf)

    # executor
    g = group("executor", "executors of the colony")
    p = leaf(g, "add", cmd_executor_add, "register an executor (colony owner key)")
    p.add_argument("--name", help="executor name (default: COLONIES_EXECUTOR_NAME)")
    p.add_argument("--type", help="executor type (default: COLONIES_EXECUTOR_TYPE)")
    p.add_argument("--executorid", required=True, help="the executor's id (colonies key id)")
    p.add_argument("--approve", action="store_true", help="approve it right away")
    for verb in ("approve", "reject", "remove"):
        p = leaf(g, verb, _executor_change(verb), f"{verb} an executor (colony owner key)")
        p.add_argument("--name", required=True, help="executor name")
    leaf(g, "ls", cmd_executor_ls, "list the colony's executors")
    p = leaf(g, "get", cmd_executor_get, "show an executor")
    p.add_argument("--name", required=True, help="executor name")

    # process
    g = group("process", "processes: submit, assign, close, list")
    p = leaf(g, "run", cmd_process_run, "submit a function call (no spec file needed)")
    p.add_argument("--func", required=True, help="function name")
    p.add_argument("--args", nargs="*", default=[], metavar="ARG", help="positional arguments")
    p.add_argument("--kwargs", nargs="*", default=[], metavar="K=V", help="keyword arguments")
    p.add_argument("--type", help="executor type (default: COLONIES_EXECUTOR_TYPE)")
    p.add_argument("--targetnames", metavar="N1,N2", help="only these executors may run it")
    p.add_argument("--priority", type=int, default=0, help="higher runs first")
    p.add_argument("--maxwaittime", type=int, default=-1, metavar="S",
                   help="fail if not assigned within S seconds (-1: no limit)")
    p.add_argument("--maxexectime", type=int, default=-1, metavar="S",
                   help="re-queue if not closed within S seconds of assignment (-1: no limit)")
    p.add_argument("--maxretries", type=int, default=-1, help="re-queues before failing")
    p.add_argument("--env", nargs="*", default=[], metavar="K=V", help="environment")
    p.add_argument("--label", help="a label to filter by")
    process_follow.add_spec_flags(p)  # Beyond Colonies
    _wait_flags(p)
    p = leaf(g, "submit", cmd_process_submit, "submit a function spec from a JSON file")
    p.add_argument("--spec", required=True, metavar="FILE", help="function spec (JSON; - = stdin)")
    _wait_flags(p)
    p = leaf(g, "assign", cmd_process_assign, "take the next process (executor key)")
    p.add_argument("--timeout", type=int, default=10, metavar="S",
                   help="wait up to S seconds for one (negative: try once)")
    p = leaf(g, "close", cmd_process_close, "close an attempt as successful (assigned executor)")
    _attempt_flags(p)
    p.add_argument("--out", nargs="*", default=[], metavar="VALUE", help="output values")
    p = leaf(g, "fail", cmd_process_fail, "close an attempt as failed (assigned executor)")
    _attempt_flags(p)
    p.add_argument("--errors", nargs="*", default=[], metavar="ERROR", help="error messages")
    p = leaf(g, "get", cmd_process_get, "show a process")
    p.add_argument("--processid", required=True)
    for verb, state, what in (("ps", RUNNING, "running"), ("psw", WAITING, "waiting"),
                              ("pss", SUCCESS, "successful"), ("psf", FAILED, "failed"),
                              ("psc", CANCELLED, "cancelled")):
        p = leaf(g, verb, _process_list(state), f"list {what} processes")
        p.add_argument("--count", type=positive_int, default=100, help="at most this many")
        p.add_argument("--type", help="only this executor type")
    p = leaf(g, "remove", cmd_process_remove, "remove a process")
    p.add_argument("--processid", required=True)
    p = leaf(g, "cancel", cmd_process_cancel,
             "cancel a waiting or running process (workflow members: cancel the workflow)")
    p.add_argument("id", nargs="?", metavar="ID", help="the process id")
    p.add_argument("--processid", help="the process id (instead of ID)")
    p = leaf(g, "removeall", cmd_process_removeall,
             "remove the colony's processes, but workflow members (colony owner key)",
             aliases=("remove-all",))
    which = p.add_mutually_exclusive_group()
    for flag in ("waiting", "running", "successful", "failed", "cancelled"):
        which.add_argument(f"--{flag}", action="store_true", help=f"only {flag} ones")
    # Beyond Colonies: wait, follow, export.
    process_follow.add_process_leaves(g, leaf)

    # workflow
    from cli import workflow_cmds

    workflow_cmds.add_parser(group, leaf)

    # Generators and crons.
    from cli import cron_cmds, generator_cmds

    generator_cmds.add_parser(group, leaf)
    cron_cmds.add_parser(group, leaf)

    # Logs, functions, pause, executor liveness.
    from cli import function_cmds, log_cmds

    log_cmds.add_parser(group, leaf)
    function_cmds.add_parser(group, leaf)

    # attribute
    g = group("attribute", "process attributes")
    p = leaf(g, "add", cmd_attribute_add, "add an attribute (assigned executor)")
    p.add_argument("--processid", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--value", required=True)
    p.add_argument("--type", choices=sorted(ATTRIBUTE_TYPES), default="out")
    p = leaf(g, "get", cmd_attribute_get, "show an attribute")
    p.add_argument("--attributeid", required=True)

    # cluster
    g = group("cluster", "cluster members (add/remove: server owner key)")
    p = leaf(g, "ls", cmd_cluster_ls, "list the members: reachable?, role, term")
    p.add_argument("--timeout", type=seconds(0, inclusive=False), default=2.0, metavar="S",
                   help="give each member S seconds to answer (default 2)")
    p = leaf(g, "add", cmd_cluster_add, "add a member (server owner key)")
    p.add_argument("multiaddr", metavar="MULTIADDR",
                   help="the new member's full address /ip4/HOST/tcp/PORT/p2p/PEERID")
    p.add_argument("--wait", type=int_between(0, MAX_MEMBER_WAIT_S), default=30, metavar="S",
                   help="wait up to S seconds for it to catch up and become a voter "
                   "(default 30; it joins as a learner either way)")
    p = leaf(g, "remove", cmd_cluster_remove,
             "remove a member; it stops serving (server owner key)")
    p.add_argument("peerid", metavar="PEERID", help="the member's peer id (or full address)")

    # status
    p = groups.add_parser("status", help="the cluster at a glance: members, Raft, statistics",
                          description="Every member's role, term, indexes and lag, each asked "
                          "on its own connection (an unreachable one shows as down); server "
                          "statistics with the server key; the colony's executors and "
                          "processes with a colony and a member key. Exit status 3 when no "
                          "reachable node reports a leader.")
    add_global_options(p, leaf=True)
    p.add_argument("--watch", action="store_true",
                   help="redraw every --interval seconds until Ctrl-C")
    p.add_argument("--interval", type=seconds(0), default=1.0, metavar="S",
                   help="refresh period of --watch, and the window over which assigns/s is "
                   "measured (0: no rate; default 1)")
    p.add_argument("--timeout", type=seconds(0, inclusive=False), default=2.0, metavar="S",
                   help="give each member S seconds to answer (default 2)")
    p.add_argument("--stale-after", type=seconds(0, inclusive=False), default=60.0, metavar="S",
                   help="when the colony's own stale-after is off: an executor not heard "
                   "from in S seconds counts as stale (default 60)")
    p.set_defaults(handler=cmd_status)

    # dev
    dev.add_parser(groups)
    return parser


def _wait_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true",
                   help="wait until it finishes, print its output; exit 1 if it failed")
    p.add_argument("--timeout", type=float, default=0, metavar="S",
                   help="with --wait: give up after S seconds (default: no limit)")


def _attempt_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--processid", required=True)
    p.add_argument("--attempt", type=positive_int, required=True,
                   help="the attempt number it was assigned with")


GLOBAL_FLAGS = {
    "server_addr": "addr",
    "colony_name": "colony",
    "prvkey": "prvkey",
    "colony_prvkey": "colony_prvkey",
    "server_prvkey": "server_prvkey",
    "output": "output",
}


def config_from_args(args: argparse.Namespace, env: dict[str, str] | None = None) -> Config:
    flags = {name: getattr(args, attr, None) for name, attr in GLOBAL_FLAGS.items()}
    return load_config(flags, os.environ if env is None else env, getattr(args, "config", None))


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    run_sync = getattr(args, "run_sync", None)
    if run_sync is not None:  # `colonies dev` manages its own trio loop and settings
        return run_sync(args)
    if not logging.getLogger().handlers:  # leave a host program's (or pytest's) logging be
        from cli.logs import setup_logging

        setup_logging(os.environ.get("COLONIES_LOG_LEVEL", "error"))
    ctx = Context(args, config_from_args(args))
    return trio.run(args.handler, ctx)


# Errors: one line, never a traceback.


def _leaves(e: BaseException) -> list[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        return [leaf for sub in e.exceptions for leaf in _leaves(sub)]
    return [e]


def primary_error(e: BaseException) -> BaseException:
    """The exception worth reporting from what trio's nurseries wrapped in groups."""
    leaves = _leaves(e)
    for kind in (KeyboardInterrupt, SystemExit, UsageError, ConfigError, ColoniesError,
                 trio.TooSlowError, OSError):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    for leaf in leaves:
        if not isinstance(leaf, trio.Cancelled):
            return leaf
    return leaves[0]


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def report(e: BaseException) -> int:
    def err(msg: str) -> None:
        print(f"{PROG}: error: {one_line(msg)}", file=sys.stderr, flush=True)

    if isinstance(e, SystemExit):  # --help, or a message from setup_logging
        if isinstance(e.code, str):
            err(e.code)
            return 2
        return e.code or 0
    if isinstance(e, KeyboardInterrupt):
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    if isinstance(e, UsageError | ConfigError):
        err(e.message)
        return 2
    if isinstance(e, ColoniesError):
        # A status only when the node sent it (a locally raised ColoniesError has none).
        status = getattr(type(e), "status", None)
        err(f"{e.message} ({status})" if status and type(e) is not ColoniesError else e.message)
        return 1
    if isinstance(e, trio.TooSlowError):
        err("timed out")
        return 1
    if isinstance(e, OSError):
        err(f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
        return 1
    if isinstance(e, Exception):
        if os.environ.get("COLONIES_DEBUG"):
            traceback.print_exception(e)
        err(f"unexpected {type(e).__name__}: {e} (set COLONIES_DEBUG=1 for a traceback)")
        return 1
    raise e


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(argv)
    except BaseException as e:  # noqa: BLE001 - the one place that turns errors into a line
        return report(primary_error(e))


if __name__ == "__main__":
    sys.exit(main())
