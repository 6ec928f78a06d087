"""Generators: packed arguments become workflow runs, `trigger` arguments per run.

The rules (semantics notes 2.6, with upstream's quirks 5 and 15 fixed):
- A pack appends one argument to the generator's queue, which is replicated state: it
  survives restarts (snapshots) and failover (the log), and every node sees the same queue
  (upstream kept counters in memory, per server, and lost them).
- The pack that brings the queue to `trigger` arguments starts one workflow run at once, in
  the same command, with those arguments; so the queue always holds fewer than `trigger`.
- The run's root processes get the batch as their spec `args`; their kwargs are kept
  (upstream wiped them). Its initiator is the generator's creator.
- With `timeout` > 0, a partial batch runs `timeout` seconds after its first argument was
  packed: a timer (consensus/timers.py, kind "generator") that the leader's tick fires.
- The queue is bounded: `trigger` is at most MAX_GENERATOR_QUEUE, an argument at most
  MAX_GENERATOR_ARG_BYTES encoded, and the queue at most MAX_GENERATOR_QUEUE_BYTES; a pack
  that does not fit is refused (400) and changes nothing.

Ids: a generator's id is its add's generated id; its n-th run's graph id is sha3-256 of
"<generatorid>/run/<n>" (run_id), so every replica derives the same ids without a `gen`.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from typing import Any

from consensus import graphs, timers
from consensus.process_ops import normalized_spec
from consensus.records import deadline_after
from consensus.request import Request
from consensus.schedule_records import GENERATOR_TIMER, Generator, Registry, arg_size
from consensus.state import ColonyState
from consensus.workflows import create_graph
from protocol.errors import BadRequest, ColoniesError
from protocol.messages import MAX_SCHEDULES_PER_COLONY
from protocol.schema import HEX64

Handler = Callable[[ColonyState, Request, int], Any]
Query = Callable[[ColonyState, Request], Any]

# The encoded size of a generator's whole queue; with MAX_GENERATOR_ARG_BYTES per argument
# it keeps a generator's record small in the replicated state, whatever its trigger.
MAX_GENERATOR_QUEUE_BYTES = 256 * 1024


def generated_id(req: Request, what: str) -> str:
    gen = req.gen
    if not isinstance(gen, str) or not HEX64.match(gen):
        raise BadRequest(f"{what} needs a generated 64-hex id ('gen')")
    return gen


def run_id(ownerid: str, run: int) -> str:
    """The graph id of the run-th run of a generator or cron (deterministic)."""
    return hashlib.sha3_256(f"{ownerid}/run/{run}".encode()).hexdigest()


def scheduled_specs(
    workflowspec: dict[str, Any], colony: str, what: str
) -> list[dict[str, Any]]:
    """The normalized function specs of a generator's or cron's workflow, checked by the
    workflow rules now, so that its runs cannot be refused later."""
    named = workflowspec["colonyname"]
    if named and named != colony:
        raise BadRequest(
            f"the workflow spec names colony '{named}' but the {what} belongs to colony "
            f"'{colony}' (leave the workflow's colonyname out, or make them equal)"
        )
    specs = [normalized_spec(s, colony) for s in workflowspec["functionspecs"]]
    graphs.validate_workflow(specs)
    return specs


def check_new(registry: Registry[Any], rid: str, colony: str, name: str, what: str) -> None:
    if registry.get(rid) is not None:
        raise BadRequest(f"{what} id {rid} is already in use")
    if registry.named(colony, name) is not None:
        raise BadRequest(f"a {what} named '{name}' already exists in colony '{colony}'")
    if registry.count(colony) >= MAX_SCHEDULES_PER_COLONY:
        raise BadRequest(
            f"colony '{colony}' already has {MAX_SCHEDULES_PER_COLONY} {what}s, the most it "
            f"may have: remove one first"
        )


# Writes.


def add_generator(st: ColonyState, req: Request, now: int) -> Any:
    gid = generated_id(req, "adding a generator")
    b = req.body["generator"]
    colony = b["colonyname"]  # the role rule checked it exists
    specs = scheduled_specs(b["workflowspec"], colony, "generator")
    check_new(st.generators, gid, colony, b["name"], "generator")
    g = Generator(
        generatorid=gid,
        colonyname=colony,
        name=b["name"],
        initiatorid=req.caller,
        initiatorname=st.executors[req.caller].executorname,
        functionspecs=specs,
        trigger=b["trigger"],
        timeout=max(b["timeout"], 0),
        created=now,
    )
    st.generators.add(g)
    return g.to_wire()


def pack(st: ColonyState, req: Request, now: int) -> Any:
    g = st.generators.by_id[req.body["generatorid"]]  # the role rule checked it exists
    arg = req.body["arg"]
    if len(g.args) + 1 >= g.trigger:
        # The batch is complete: start its run first, which refuses before any change.
        graph = _start_run(st, g, [*g.args, arg], now)
        _empty(g)
        st.timers.clear(g.timer_key)
        return {"queuesize": 0, "processgraphid": graph}
    size = arg_size(arg)
    if g.queuebytes + size > MAX_GENERATOR_QUEUE_BYTES:
        raise BadRequest(
            f"generator '{g.name}' is full: its {len(g.args)} waiting arguments take "
            f"{g.queuebytes} of {MAX_GENERATOR_QUEUE_BYTES} bytes (pack smaller arguments, "
            "lower its trigger, or give it a timeout that runs partial batches)"
        )
    if not g.args and g.timeout > 0:
        st.timers.set(g.timer_key, deadline_after(now, g.timeout), GENERATOR_TIMER)
    g.args.append(arg)  # replies never hold these lists (to_snapshot copies them)
    g.packtimes.append(now)
    g.queuebytes += size
    return {"queuesize": len(g.args), "processgraphid": ""}


def _empty(g: Generator) -> None:
    g.args, g.packtimes, g.queuebytes = [], [], 0


def remove_generator(st: ColonyState, req: Request, now: int) -> Any:
    g = st.generators.by_id[req.body["generatorid"]]
    st.timers.clear(g.timer_key)
    st.generators.remove(g)  # its waiting arguments go with it
    return {}


def _start_run(st: ColonyState, g: Generator, args: list[Any], now: int) -> str:
    gid = run_id(g.generatorid, g.runs)
    create_graph(
        st,
        gid,
        g.colonyname,
        g.functionspecs,
        g.initiatorid,
        now,
        initiatorname=g.initiatorname,
        root_args=args,
    )
    g.runs += 1
    g.lastrun = now
    return gid


def timeout_due(st: ColonyState, key: str, now: int) -> list[str]:
    """The timer handler: run the partial batch whose first argument waited `timeout`."""
    g = st.generators.get(key.removeprefix(f"{GENERATOR_TIMER}:"))
    if g is None or not g.args:
        return []
    try:
        _start_run(st, g, list(g.args), now)
    except ColoniesError:
        # Cannot happen for a workflow checked at add; if it does, keep the arguments and
        # try again after another timeout rather than drop them or fail every tick.
        st.timers.set(g.timer_key, deadline_after(now, g.timeout), GENERATOR_TIMER)
        return []
    _empty(g)
    return [g.generatorid]


# Reads.


def get_generator(st: ColonyState, req: Request) -> Any:
    return st.generators.by_id[req.body["generatorid"]].to_wire()


def get_generators(st: ColonyState, req: Request) -> Any:
    found = st.generators.of_colony(req.body["colonyname"])
    return [g.to_wire() for g in itertools.islice(found, req.body["count"])]


WRITES: dict[str, Handler] = {
    "addgeneratormsg": add_generator,
    "packgeneratormsg": pack,
    "removegeneratormsg": remove_generator,
}

READS: dict[str, Query] = {
    "getgeneratormsg": get_generator,
    "getgeneratorsmsg": get_generators,
}

# The timer kind this module handles (consensus/timers.py); commands.py imports this module.
timers.HANDLERS[GENERATOR_TIMER] = timeout_due
