"""Benchmarks of colonyd on 127.0.0.1, one node and a 3-node Raft cluster, driven through the
real SDK (node/client.py).

    make bench                                   # = .venv/bin/python simulations/bench.py
    .venv/bin/python simulations/bench.py --only roundtrip --rounds 1000
    .venv/bin/python simulations/bench.py --only lifecycle --executors 8 --probe
    .venv/bin/python simulations/bench.py --only lifecycle --nodes 3 --executors 8 --probe
    .venv/bin/python simulations/bench.py --only failover --kills 10
    .venv/bin/python simulations/bench.py --only lifecycle --executors 8 --py-spy /tmp/prof
    .venv/bin/python simulations/stacks.py /tmp/prof/lifecycle-E8-node.txt

Prints one JSON object per line on stdout (progress and warnings on stderr), in this order:
for each cluster size in --nodes (default 1,3) its lifecycle lines and its roundtrip line (the
floor lines right after the first size), then a failover line per size >= 3. Every line of a
run against nodes says `nodes`.

- machine:   CPU count and model, Python, platform, load average, git commit.
- lifecycle: N processes submitted by S submitters and run by E executors, one line per E in
             --executors. Every executor is a registered, approved executor with its own key,
             and so is every submitter (of another executor type, so it is never assigned
             work). They share one connection per node (Client.with_key), as an SDK user with
             several identities in one process would; on a cluster executor i uses node
             i mod n and submitter j node (j+1) mod n, so every node serves clients and
             forwards their writes (`placement`, `node_roles`, `node_cpu_s_each`).
             --executor-procs K moves the executors to K child processes (one connection
             each, worker k on node k mod n). proc_per_s is end to end, from the first submit
             to the moment the N-th process is known closed SUCCESS (see end_detection), then
             checked against the colony statistics. `method` says how the executors run and how
             assign_ms / close_ms are timed (METHODS below).
- roundtrip: one process at a time, submit -> assign -> close, on an otherwise idle node or
             cluster; on a cluster the submitter and the executor use the two followers
             (`submitter_node`, `executor_node`): every write is forwarded, and the executor's
             node must apply the submit before its long-poll sees it.
- floor:     the same request count and concurrency shape as a one-node lifecycle run, over a
             plain trio TCP socket with the same framing and client code, to an echo-like
             server in another process (no signatures checked, no consensus). See
             simulations/floor.py. ratio = lifecycle_req_per_s / floor_req_per_s;
             overhead_ratio = its inverse.
- failover:  --kills times: SIGKILL the leader while a writer on the surviving nodes submits
             one process after another; seconds from the kill to the first acknowledged write
             sent after it (seconds_p50, seconds_max, and each in `seconds`). The killed node
             is restarted on its address and caught up before the next kill; at the end every
             acknowledged write is looked up on every node (lost_acked_writes).

Each run gets fresh colonyd processes (started with `python -m cli.daemon`, stopped with
SIGTERM and a bounded wait, SIGKILL if one hangs), so the nodes and the clients share the
cores as they would on one machine. CPU is measured per process (node_cpu_us_per_req,
client_cpu_us_per_req; on a cluster the sum over its nodes), which is steadier than wall-clock
rates; other_cpu_util says how many cores other programs took during the run (a run with
other_cpu_util above ~0.2 is skewed).

Every run is bounded by --timeout; a failed or timed-out run prints
{"bench": ..., "error": ...} and the script exits 1. Environment variables are passed on to the
node, so e.g. `PY_YAMUX_DATA_READ_TIMEOUT=30 make bench` measures a libp2p setting on both sides.

Diagnostics: --probe runs the node(s) with batching counters (simulations/node_probe.py:
requests per frame, commands per Raft entry, Raft messages and libp2p writes, relays, yamux
window updates, refused commands, snapshot pauses) and adds them
as `node_batching` (per node on a cluster); --py-spy DIR records the node(s) and the client(s)
during lifecycle runs (collapsed stacks; summarize with simulations/stacks.py);
--cprofile-node DIR writes a cProfile of each lifecycle node.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

# `python simulations/bench.py` puts simulations/ on sys.path (benchkit, floor); the project
# packages come from the editable install (`make dev` / `make bench`).
from benchkit import (
    PYTHON,
    BenchError,
    ChildProcess,
    ClusterProcess,
    NodeProcess,
    OtherLoad,
    PySpy,
    emit,
    machine_line,
    ms_stats,
    percentile,
    progress,
    wait_ready_file,
)
from floor import bench_spec, run_floor

from node.client import Client
from node.executor import Executor
from protocol.errors import ColoniesError, NotFound
from protocol.identity import PrivateKey
from protocol.messages import SUCCESS

COLONY = "bench"
EXECUTOR_TYPE = "bench"
SUBMITTER_TYPE = "bench-submitter"
POLL_TIMEOUT_S = 5  # executors' long-poll; a run ends by cancelling them, not by waiting
SUBMIT_RETRIES = 3
WORKER_START_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 0.02  # end-of-run polling (helper method, --executor-procs)
FLOOR_MIN_SECONDS = 1.0
FLOOR_MAX_REPEATS = 20
FAILOVER_CALL_TIMEOUT_S = 2.0  # the failover writer's call timeout (then it retries)
FAILOVER_GIVE_UP_S = 30.0

METHODS = {
    "split": (
        "custom executor loop over the SDK Client: assign_ms = long-poll assign(timeout=5) "
        "calls that returned a process (made when the executor has nothing in hand; they "
        "include waiting for a submit, and count from the run's start at the earliest); "
        "close_ms = fused close_and_assign(timeout=-1), which closes the attempt and assigns "
        "the next process in the same command, with no server-side wait"
    ),
    "helper": (
        "node.executor.Executor (the SDK's executor helper) with a timing Client: assign_ms = "
        "its standalone long-poll assign calls (the first per executor, and after an empty "
        "poll; counted from the run's start at the earliest); close_ms = its fused "
        "close_and_assign(timeout=5), which includes the server-side wait for the next "
        "process when the queue is empty"
    ),
}


# --- recording ---------------------------------------------------------------------------------


@dataclass
class Recorder:
    """What one client process measures; `target` closes end the run (None: never)."""

    target: int | None
    submit: list[float] = field(default_factory=list)
    close: list[float] = field(default_factory=list)
    completed: int = 0
    fused_next: int = 0  # fused calls that came back with the next process
    assign_calls: int = 0  # every assign call, including the ones that found nothing
    errors: list[str] = field(default_factory=list)
    last_close: float = 0.0  # time.monotonic() of the last successful close
    # Assign calls are timed from max(call start, run start), so the long-polls that executors
    # open before the first submit count from the first submit, not from before the clock.
    assign_spans: list[tuple[float, float]] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)

    def closed_one(self) -> None:
        self.completed += 1
        self.last_close = time.monotonic()
        if self.target is not None and self.completed >= self.target:
            self.done.set()

    def assigned(self, started: float) -> None:
        self.assign_spans.append((started, time.monotonic()))

    def assign_latencies(self, t0: float) -> list[float]:
        return [end - max(start, t0) for start, end in self.assign_spans]

    def error(self, where: str, e: BaseException) -> None:
        if len(self.errors) < 20:
            self.errors.append(f"{where}: {type(e).__name__}: {e}")
        else:
            self.errors.append("")

    def as_json(self) -> dict[str, Any]:
        return {
            "assign_spans": self.assign_spans,
            "close": self.close,
            "completed": self.completed,
            "fused_next": self.fused_next,
            "assign_calls": self.assign_calls,
            "errors": self.errors,
            "last_close": self.last_close,
        }


class TimedClient(Client):
    """The SDK client, timing the executor calls into a Recorder (used with Executor)."""

    rec: Recorder

    @classmethod
    def wrap(cls, base: Client, rec: Recorder) -> TimedClient:
        c = cls(base._link, base.key, base.cluster_id, base.server_info)
        c.rec = rec
        return c

    def with_key(self, key: PrivateKey | str) -> TimedClient:
        key = key if isinstance(key, PrivateKey) else PrivateKey.from_hex(key)
        c = TimedClient(self._link, key, self.cluster_id, self.server_info)
        c.rec = self.rec
        return c

    async def assign(self, colonyname: str, timeout: int = 10) -> dict:
        self.rec.assign_calls += 1
        t = time.monotonic()
        p = await super().assign(colonyname, timeout)
        self.rec.assigned(t)
        return p

    async def close_and_assign(self, process: dict, colonyname: str, **kw: Any) -> dict | None:
        t = time.perf_counter()
        try:
            nxt = await super().close_and_assign(process, colonyname, **kw)
        except ColoniesError as e:
            self.rec.error("close_and_assign", e)
            raise
        self.rec.close.append(time.perf_counter() - t)
        self.rec.closed_one()
        if nxt is not None:
            self.rec.fused_next += 1
        return nxt


class FrameCounter:
    """Counts the client's frame writes (each carries one or more envelopes)."""

    def __init__(self, client: Client) -> None:
        self.writes = 0
        stream = getattr(client.conn, "_stream", None)
        inner = getattr(stream, "write", None)
        if inner is None:
            self.writes = -1
            return

        async def write(data: bytes) -> None:
            self.writes += 1
            await inner(data)

        try:
            stream.write = write
        except AttributeError:
            self.writes = -1


# --- executors -----------------------------------------------------------------------------------


async def split_executor(client: Client, rec: Recorder, max_calls: int) -> None:
    """assign (long-poll) when empty-handed, then fused close_and_assign(timeout=-1)."""
    process: dict | None = None
    for _ in range(max_calls):
        if process is None:
            rec.assign_calls += 1
            t = time.monotonic()
            try:
                process = await client.assign(COLONY, timeout=POLL_TIMEOUT_S)
            except NotFound:
                continue
            except ColoniesError as e:
                rec.error("assign", e)
                await trio.sleep(0.05)
                continue
            rec.assigned(t)
        out = list(process["spec"]["args"])  # the "function": echo its arguments
        t = time.perf_counter()
        try:
            nxt = await client.close_and_assign(process, COLONY, successful=True, out=out, timeout=-1)
        except ColoniesError as e:
            rec.error("close_and_assign", e)
            process = None
            continue
        rec.close.append(time.perf_counter() - t)
        rec.closed_one()
        if nxt is not None:
            rec.fused_next += 1
        process = nxt
    raise BenchError(f"an executor made {max_calls} calls without the run ending")


async def run_executors(
    clients: list[Client], keys: list[PrivateKey], rec: Recorder, method: str, max_calls: int
) -> None:
    """Serve until cancelled. Executor i uses connection i % len(clients) (with_key), so on a
    cluster the executors spread over the nodes."""
    async with trio.open_nursery() as n:
        for i, k in enumerate(keys):
            client = clients[i % len(clients)]
            if method == "split":
                n.start_soon(split_executor, client.with_key(k), rec, max_calls)
            else:
                ex = Executor(
                    client.conn.addr, k, colonyname=COLONY, executortype=EXECUTOR_TYPE,
                    poll_timeout=POLL_TIMEOUT_S,
                )

                @ex.function(name="bench")
                async def bench(*args: Any) -> list:
                    return list(args)

                n.start_soon(ex.run, TimedClient.wrap(client, rec))


# --- submitters ----------------------------------------------------------------------------------


async def submitter(client: Client, first: int, count: int, rec: Recorder) -> None:
    for i in range(first, first + count):
        spec = bench_spec(i)
        for attempt in range(SUBMIT_RETRIES + 1):
            t = time.perf_counter()
            try:
                await client.submit_spec(spec)
            except ColoniesError as e:
                rec.error("submit", e)
                if attempt == SUBMIT_RETRIES:
                    raise BenchError(f"submit failed {SUBMIT_RETRIES + 1} times: {e}") from e
                await trio.sleep(0.05)
                continue
            rec.submit.append(time.perf_counter() - t)
            break


# --- setup ---------------------------------------------------------------------------------------


@dataclass
class Setup:
    owner: PrivateKey
    submitters: list[PrivateKey]
    executors: list[PrivateKey]


async def setup_colony(admin: Client, n_submitters: int, n_executors: int) -> Setup:
    s = Setup(
        PrivateKey.generate(),
        [PrivateKey.generate() for _ in range(n_submitters)],
        [PrivateKey.generate() for _ in range(n_executors)],
    )
    await admin.add_colony(s.owner.id, COLONY)
    owner = admin.with_key(s.owner)
    for kind, keys, etype in (
        ("submitter", s.submitters, SUBMITTER_TYPE),
        ("executor", s.executors, EXECUTOR_TYPE),
    ):
        for i, k in enumerate(keys):
            await owner.add_executor(k.id, f"{kind}-{i}", etype, COLONY)
            await owner.approve_executor(COLONY, f"{kind}-{i}")
    return s


# --- lifecycle -----------------------------------------------------------------------------------


class WorkerProcess:
    """A child client process running some of the executors (--executor-procs)."""

    def __init__(self, index: int, workdir: Path, config: dict[str, Any]) -> None:
        self.index = index
        self.control = workdir / f"worker-{index}.stop"
        self.ready = workdir / f"worker-{index}.ready"
        self.result = workdir / f"worker-{index}.json"
        config = dict(config, stop_file=str(self.control), ready_file=str(self.ready),
                      result_file=str(self.result))
        cfg = workdir / f"worker-{index}.cfg"
        cfg.write_text(json.dumps(config))
        self.child = ChildProcess(
            f"bench-worker-{index}",
            [PYTHON, str(Path(__file__).resolve()), "--worker", str(cfg)],
            workdir,
            dict(os.environ),
        )

    async def wait_ready(self) -> None:
        await wait_ready_file(self.child, self.ready, WORKER_START_TIMEOUT_S)

    async def finish(self, timeout: float) -> dict[str, Any]:
        self.control.write_text("stop\n")
        with trio.move_on_after(timeout):
            while self.child.proc.poll() is None:
                await trio.sleep(0.02)
        if not self.result.exists():
            raise BenchError(f"executor worker {self.index} left no result:\n{self.child.tail()}")
        return json.loads(self.result.read_text())


def start_nodes(
    n_nodes: int, server: PrivateKey, probe: bool = False, cprofile_dir: Path | None = None,
    tag: str = "",
) -> NodeProcess | ClusterProcess:
    """One colonyd (n_nodes 1) or a cluster of them; cProfiles go to cprofile_dir/<tag>-*."""
    if cprofile_dir is not None:
        cprofile_dir.mkdir(parents=True, exist_ok=True)
    if n_nodes == 1:
        cprofile = cprofile_dir / f"{tag}-node.pstats" if cprofile_dir else None
        return NodeProcess(server.hex, probe=probe, cprofile=cprofile)
    return ClusterProcess(server.hex, n_nodes, probe=probe, cprofile_dir=cprofile_dir,
                          cprofile_prefix=f"{tag}-")


@asynccontextmanager
async def connect_all(addrs: list[str], key: PrivateKey) -> AsyncIterator[list[Client]]:
    """One connection per node (clients spread over the nodes as in a real deployment)."""
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(Client.connect(a, key)) for a in addrs]


async def roles(nodes: NodeProcess | ClusterProcess) -> list[str]:
    """"leader"/"follower" per node address (a single node is its own leader)."""
    if isinstance(nodes, NodeProcess):
        return ["leader"]
    leader = await nodes.leader()
    return ["leader" if m is leader else "follower" for m in nodes.members]


async def lifecycle(args: argparse.Namespace, n_executors: int, n_nodes: int) -> dict[str, Any]:
    n, n_sub = args.processes, args.submitters
    server = PrivateKey.generate()
    tag = f"lifecycle-E{n_executors}" + (f"-N{n_nodes}" if n_nodes > 1 else "")
    label = f"lifecycle E={n_executors} nodes={n_nodes}"
    async with start_nodes(n_nodes, server, args.probe, args.cprofile_node, tag) as node:
        progress(f"{label}: up at {', '.join(node.addrs)}")
        node_roles = await roles(node)
        async with connect_all(node.addrs, server) as clients:
            admin = clients[0]
            setup = await setup_colony(admin, n_sub, n_executors)
            counters = [FrameCounter(c) for c in clients]
            owner = admin.with_key(setup.owner)
            # How the end is detected. split: the executors' own count of acknowledged
            # closes (exact; each process's close is acknowledged as soon as it commits).
            # helper: the fused call's reply also waits for the next process (up to its
            # long-poll timeout), so the last closes are acknowledged late; poll the node.
            by_poll = args.method == "helper"
            end_detection = (
                f"node colony stats polled every {POLL_INTERVAL_S * 1000:g} ms" if by_poll
                else "executors' count of acknowledged closes"
            )
            rec = Recorder(target=n if args.executor_procs == 0 and not by_poll else None)
            subs = Recorder(target=None)
            per_sub = [n // n_sub + (1 if i < n % n_sub else 0) for i in range(n_sub)]
            max_calls = 4 * n + 100
            workers: list[WorkerProcess] = []
            t_polled = 0.0
            spies: list[PySpy] = []
            results: list[dict[str, Any]] = []
            with tempfile.TemporaryDirectory(prefix="colonies-bench-workers-") as tmp:
                try:
                    async with trio.open_nursery() as nursery:
                        if args.executor_procs == 0:
                            nursery.start_soon(
                                run_executors, clients, setup.executors, rec, args.method,
                                max_calls,
                            )
                        else:
                            groups = [setup.executors[i :: args.executor_procs]
                                      for i in range(args.executor_procs)]
                            for i, group in enumerate(g for g in groups if g):
                                workers.append(WorkerProcess(i, Path(tmp), {
                                    "addr": node.addrs[i % n_nodes],
                                    "keys": [k.hex for k in group],
                                    "method": args.method,
                                    "max_calls": max_calls,
                                }))
                            for w in workers:
                                await w.wait_ready()
                        # Let every executor reach its first long-poll before the clock starts.
                        await trio.sleep(0.3)
                        if args.py_spy:
                            spies = start_profilers(args.py_spy, tag, node.pids, workers)
                        probe0 = await node.probe_stats() if node.probe else None
                        node_cpu0, cpu0 = node.cpu_seconds(), time.process_time()
                        each0 = node.cpu_each() if isinstance(node, ClusterProcess) else []
                        load = OtherLoad(
                            [*node.pids, os.getpid()] + [w.child.pid for w in workers]
                        )
                        frames0 = sum(f.writes for f in counters)
                        t0 = time.monotonic()
                        async with trio.open_nursery() as subs_nursery:
                            first = 0
                            for j, (k, count) in enumerate(
                                zip(setup.submitters, per_sub, strict=True)
                            ):
                                # Submitter j on node j+1: with one executor, the
                                # submitters are not all on the executor's node.
                                sub_client = clients[(j + 1) % len(clients)].with_key(k)
                                subs_nursery.start_soon(submitter, sub_client, first, count, subs)
                                first += count
                        t_submitted = time.monotonic()
                        progress(f"{label}: {n} submitted in {t_submitted - t0:.2f} s")
                        if by_poll or workers:
                            t_polled = await wait_all_closed(owner, n)
                        else:
                            await rec.done.wait()
                        node_cpu = node.cpu_seconds() - node_cpu0
                        each = ([round(b - a, 2) for a, b in zip(each0, node.cpu_each(), strict=True)]
                                if each0 else [])
                        cpu = time.process_time() - cpu0
                        other_util = load.util()
                        probe1 = await node.probe_stats() if node.probe else None
                        for spy in spies:
                            spy.stop()
                        nursery.cancel_scope.cancel()
                    for w in workers:
                        results.append(await w.finish(20))
                finally:
                    for spy in spies:
                        spy.stop()
                    for w in workers:
                        w.child.stop()
            frame_writes = [f.writes for f in counters]
            client_frames = (sum(frame_writes) - frames0) if min(frame_writes) >= 0 else None
            for r in results:
                rec.assign_spans += [tuple(x) for x in r["assign_spans"]]
                rec.close += r["close"]
                rec.completed += r["completed"]
                rec.fused_next += r["fused_next"]
                rec.assign_calls += r["assign_calls"]
                rec.errors += r["errors"]
                rec.last_close = max(rec.last_close, r["last_close"])
                cpu += r["cpu_s"]  # client CPU of all client processes (whole worker life)
            t_end = t_polled if by_poll else rec.last_close
            # The owner's node may be a follower a few ms behind the closes it acknowledged.
            with trio.move_on_after(10):
                await wait_all_closed(owner, n)
            stats = await owner.colony_stats(COLONY)
            if stats["successfulprocesses"] != n:
                raise BenchError(f"expected {n} successful processes, the node counts {stats}")
    seconds = t_end - t0
    requests = len(subs.submit) + rec.assign_calls + len(rec.close)
    line: dict[str, Any] = {
        "bench": "lifecycle",
        "nodes": n_nodes,
        "executors": n_executors,
        "submitters": n_sub,
        "processes": n,
        "proc_per_s": round(n / seconds, 1),
        **ms_stats(subs.submit, "submit_"),
        **ms_stats(rec.assign_latencies(t0), "assign_"),
        **ms_stats(rec.close, "close_"),
        "seconds": round(seconds, 3),
        "method": args.method,
        "method_detail": METHODS[args.method],
        "end_detection": end_detection,
        "client_procs": 1 + len(workers),
        "requests": requests,
        "req_per_s": round(requests / seconds, 1),
        "submit_phase_s": round(t_submitted - t0, 3),
        "assign_calls": rec.assign_calls,
        "assign_samples": len(rec.assign_spans),
        "close_samples": len(rec.close),
        "fused_returned_next": rec.fused_next,
        "node_cpu_s": round(node_cpu, 2),
        "node_cpu_us_per_req": round(node_cpu / requests * 1e6, 1),
        "node_cpu_util": round(node_cpu / seconds, 2),
        "client_cpu_s": round(cpu, 2),
        "client_cpu_us_per_req": round(cpu / requests * 1e6, 1),
        "client_envelopes_per_frame": (
            round(requests / client_frames, 2) if client_frames and not workers else None
        ),
        "other_cpu_util": other_util,
        "errors": len(rec.errors) + len(subs.errors),
    }
    if n_nodes > 1:
        line["node_roles"] = node_roles
        line["node_cpu_s_each"] = each
        line["placement"] = (
            f"executor i on node i mod {n_nodes}, submitter j on node (j+1) mod {n_nodes}, "
            "one connection per node shared with with_key"
            if not workers else f"executor worker k on node k mod {n_nodes}; "
            f"submitter j on node (j+1) mod {n_nodes}"
        )
    if probe0 is not None and probe1 is not None:
        if n_nodes == 1:
            line["node_batching"] = batching(probe0, probe1)
        else:
            line["node_batching"] = {m: batching(probe0[m], probe1[m]) for m in probe1}
    first_errors = [e for e in rec.errors + subs.errors if e][:3]
    if first_errors:
        line["first_errors"] = first_errors
    # What the floor run needs to mirror this run's shape.
    line["_shape"] = {
        "submit_requests": len(subs.submit),
        "executor_requests": rec.assign_calls + len(rec.close),
    }
    return line


def batching(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What node_probe counted during the measured phase."""
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after if k not in ("hist", "lags")}

    def per(a: str, b: str) -> float | None:
        return round(d[a] / d[b], 2) if d.get(b) else None

    return {
        "request_frames_in": d.get("frames_in", 0),
        "requests_per_frame_in": per("requests_in", "frames_in"),
        "reply_frames_out": d.get("frames_out", 0),
        "replies_per_frame_out": per("replies_out", "frames_out"),
        "raft_entries": d.get("entries", 0),
        "commands_per_entry": per("commands", "entries"),
        "ticks": d.get("ticks", 0),
        "ticks_per_request": per("ticks", "requests_in"),
        "raft_messages_sent": d.get("raft_sent", 0),
        "raft_writes": d.get("raft_writes", 0),
        "yamux_window_updates": d.get("yamux_window_updates", 0),
        "raft_sent_by_type": {k.split(":", 1)[1]: v for k, v in sorted(d.items())
                              if k.startswith("raft_sent:") and v},
        "applied": {k.split(":", 1)[1]: v for k, v in sorted(d.items())
                    if k.startswith("apply:") and v},
        "refused": {k.split(":", 1)[1]: v for k, v in sorted(d.items())
                    if k.startswith("refused:") and v},
        "snapshot_dumps": d.get("dumps", 0),
        "snapshot_dump_ms_total": round(d.get("dump_ms_total", 0), 1),
        # The maxima are over the node's life (a counter), not only the measured phase.
        "snapshot_dump_ms_max": after.get("dump_ms_max", 0),
        "gc2_collections": d.get("gc2", 0),
        "gc2_ms_total": round(d.get("gc2_ms_total", 0), 1),
        "gc_ms_max": max(after.get(f"gc{g}_ms_max", 0) for g in range(3)),
    }


def start_profilers(
    out_dir: Path, tag: str, node_pids: list[int], workers: list[WorkerProcess]
) -> list[PySpy]:
    """py-spy on the node(s) and on every client process, for the measured phase only."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if len(node_pids) == 1:
        targets = [("node", node_pids[0])]
    else:
        targets = [(f"node-n{i + 1}", pid) for i, pid in enumerate(node_pids)]
    targets += [("client", os.getpid())]
    targets += [(f"worker{w.index}", w.child.pid) for w in workers]
    return [PySpy(pid, out_dir / f"{tag}-{name}.txt", out_dir) for name, pid in targets]


async def wait_all_closed(owner: Client, n: int) -> float:
    """Poll the node (a local read) until n processes are SUCCESS; when it saw them."""
    while True:
        stats = await owner.colony_stats(COLONY)
        if stats["successfulprocesses"] >= n:
            return time.monotonic()
        await trio.sleep(POLL_INTERVAL_S)


async def worker_main(cfg_path: str) -> None:
    """A child client process: one connection, with_key per executor; results to a file."""
    cfg = json.loads(Path(cfg_path).read_text())
    keys = [PrivateKey.from_hex(k) for k in cfg["keys"]]
    rec = Recorder(target=None)
    stop_file = Path(cfg["stop_file"])
    cpu0 = time.process_time()
    async with Client.connect(cfg["addr"], keys[0]) as client:
        async with trio.open_nursery() as n:
            n.start_soon(run_executors, [client], keys, rec, cfg["method"], cfg["max_calls"])
            await trio.sleep(0.1)
            Path(cfg["ready_file"]).write_text("ready\n")
            while not stop_file.exists():
                await trio.sleep(0.05)
            n.cancel_scope.cancel()
    out = rec.as_json()
    out["cpu_s"] = time.process_time() - cpu0
    tmp = Path(cfg["result_file"] + ".tmp")
    tmp.write_text(json.dumps(out))
    tmp.rename(cfg["result_file"])


# --- roundtrip -----------------------------------------------------------------------------------


async def roundtrip(args: argparse.Namespace, n_nodes: int) -> dict[str, Any]:
    """On a cluster the submitter and the executor use two different followers (when there
    are two), the longest path: both forward their writes, and the executor's node must apply
    the submit before its long-poll sees the process."""
    server = PrivateKey.generate()
    async with start_nodes(n_nodes, server) as node:
        progress(f"roundtrip nodes={n_nodes}: up at {', '.join(node.addrs)}")
        node_roles = await roles(node)
        followers = [i for i, r in enumerate(node_roles) if r == "follower"]
        sub_i, ex_i = (followers[0], followers[1]) if len(followers) >= 2 else (0, 0)
        async with connect_all(node.addrs, server) as clients:
            setup = await setup_colony(clients[0], 1, 1)
            sub = clients[sub_i].with_key(setup.submitters[0])
            ex = clients[ex_i].with_key(setup.executors[0])
            total: list[float] = []
            steps: dict[str, list[float]] = {"submit": [], "assign": [], "close": []}
            warmup = min(20, args.rounds)
            node_cpu0 = 0.0
            for i in range(warmup + args.rounds):
                if i == warmup:
                    node_cpu0 = node.cpu_seconds()
                    load = OtherLoad([*node.pids, os.getpid()])
                t0 = time.perf_counter()
                p = await sub.submit_spec(bench_spec(i))
                t1 = time.perf_counter()
                got = await ex.assign(COLONY, timeout=POLL_TIMEOUT_S)
                t2 = time.perf_counter()
                await ex.close(got, [i])
                t3 = time.perf_counter()
                if got["processid"] != p["processid"]:
                    raise BenchError("assign returned another process than the one submitted")
                if i >= warmup:
                    total.append(t3 - t0)
                    steps["submit"].append(t1 - t0)
                    steps["assign"].append(t2 - t1)
                    steps["close"].append(t3 - t2)
            node_cpu = node.cpu_seconds() - node_cpu0
            other_util = load.util()
            last = await sub.process(p["processid"])
            if last["state"] != SUCCESS:
                raise BenchError(f"the last process ended in state {last['state']}, not SUCCESS")
    stats = ms_stats(total, "")
    line: dict[str, Any] = {
        "bench": "roundtrip",
        "nodes": n_nodes,
        "ms_p50": stats["ms_p50"],
        "ms_p99": stats["ms_p99"],
        "ms_max": stats["ms_max"],
        "rounds": args.rounds,
        "warmup_rounds": warmup,
        **ms_stats(steps["submit"], "submit_"),
        **ms_stats(steps["assign"], "assign_"),
        **ms_stats(steps["close"], "close_"),
        "node_cpu_us_per_round": round(node_cpu / args.rounds * 1e6, 1),
        "other_cpu_util": other_util,
    }
    if n_nodes > 1:
        line["submitter_node"] = node_roles[sub_i]
        line["executor_node"] = node_roles[ex_i]
    return line


# --- failover ------------------------------------------------------------------------------------


async def failover(args: argparse.Namespace, n_nodes: int) -> dict[str, Any]:
    """kill -9 the leader `--kills` times. Each time a writer on the surviving nodes submits
    one process after another (call timeout FAILOVER_CALL_TIMEOUT_S, retrying at once on
    errors); seconds = from the SIGKILL to the first acknowledged write sent after it. The
    killed node is then restarted and caught up, and all nodes agree on a leader, before the
    next kill. At the end every acknowledged write is looked up on every node."""
    server = PrivateKey.generate()
    async with ClusterProcess(server.hex, n_nodes) as cluster:
        progress(f"failover nodes={n_nodes}: up at {', '.join(cluster.addrs)}")
        async with Client.connect(cluster.addrs, server) as admin:
            setup = await setup_colony(admin, 1, 0)
        writer_key = setup.submitters[0]
        acked: list[str] = []
        gaps: list[float] = []
        errors: list[str] = []
        leaders: list[str] = []
        for k in range(args.kills):
            leader = await cluster.leader()
            survivors = [m for m in cluster.members if m is not leader]
            async with Client.connect([m.addr for m in survivors], writer_key) as w:
                w.timeout = FAILOVER_CALL_TIMEOUT_S
                acked.append((await w.submit_spec(bench_spec(k)))["processid"])  # warm
                t_kill = time.monotonic()
                leader.kill()
                with trio.move_on_after(FAILOVER_GIVE_UP_S):
                    while True:
                        try:
                            p = await w.submit_spec(bench_spec(k))
                        except ColoniesError as e:
                            if len(errors) < 20:
                                errors.append(f"{type(e).__name__}: {e}")
                            await trio.sleep(0.005)
                            continue
                        gaps.append(time.monotonic() - t_kill)
                        acked.append(p["processid"])
                        break
                if len(gaps) <= k:
                    raise BenchError(f"no write acknowledged within {FAILOVER_GIVE_UP_S:g} s "
                                     f"of killing the leader {leader.name}: {errors[-3:]}")
            new_leader = await cluster.leader()
            leaders.append(f"{leader.name}->{new_leader.name}")
            progress(f"failover {k + 1}/{args.kills}: killed leader {leader.name}, next write "
                     f"acknowledged after {gaps[-1]:.3f} s (new leader {new_leader.name})")
            leader.start()
            await leader.wait_ready()
            await cluster.wait_caught_up(leader)
        await cluster.leader()
        lost = 0
        for m in cluster.members:
            await cluster.wait_caught_up(m)
            async with Client.connect(m.addr, writer_key) as c:
                for pid in acked:
                    try:
                        await c.process(pid)
                    except NotFound:
                        lost += 1
    s = sorted(gaps)
    return {
        "bench": "failover",
        "nodes": n_nodes,
        "kills": args.kills,
        "seconds_p50": round(percentile(s, 50), 3),
        "seconds_max": round(s[-1], 3),
        "seconds": [round(g, 3) for g in gaps],
        "leaders": leaders,
        "acked_writes": len(acked),
        "lost_acked_writes": lost,
        "writer_errors": len(errors),
        "first_errors": list(dict.fromkeys(e.split(":")[0] + ":" + e.split(":", 1)[1][:80]
                                           for e in errors))[:3],
        "method": ("SIGKILL the leader; a writer connected to the survivors submits one "
                   f"process after another (call timeout {FAILOVER_CALL_TIMEOUT_S:g} s); "
                   "seconds = kill to the first acknowledged write sent after it; the killed "
                   "node restarts and catches up before the next kill"),
        "raft_timeouts": "node/raft_replica.py GROUP_TIMEOUTS",
    }


# --- floor ---------------------------------------------------------------------------------------


async def floor(args: argparse.Namespace, n_executors: int, life: dict | None) -> dict[str, Any]:
    if life is not None:
        shape = life["_shape"]
    else:  # no lifecycle run to copy: its typical counts
        shape = {"submit_requests": args.processes,
                 "executor_requests": args.processes + n_executors}
    with tempfile.TemporaryDirectory(prefix="colonies-bench-floor-") as tmp:
        ready = Path(tmp) / "ready"
        child = ChildProcess(
            "floor-server",
            [PYTHON, str(Path(__file__).resolve().parent / "floor.py"), "--ready-file", str(ready)],
            Path(tmp),
            dict(os.environ),
        )
        try:
            host, port = (await wait_ready_file(child, ready, 30))[0].split()
            cpu0 = child.cpu_seconds()
            load = OtherLoad([child.pid, os.getpid()])
            # One pass takes a fraction of a second: repeat it (bounded) so that the CPU
            # figures, read from /proc at 10 ms resolution, cover at least a second.
            runs: list[dict[str, Any]] = []
            while len(runs) < FLOOR_MAX_REPEATS and (
                not runs or sum(r["seconds"] for r in runs) < FLOOR_MIN_SECONDS
            ):
                runs.append(await run_floor(
                    host, int(port),
                    submit_requests=shape["submit_requests"],
                    executor_requests=shape["executor_requests"],
                    submitters=args.submitters,
                    executors=n_executors,
                    timeout=30,
                ))
            server_cpu = child.cpu_seconds() - cpu0
            other_util = load.util()
        finally:
            child.stop()
    total = sum(r["requests"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    req_s = total / seconds
    line: dict[str, Any] = {
        "bench": "floor",
        "executors": n_executors,
        "submitters": args.submitters,
        "requests": runs[0]["requests"],
        "req_per_s": round(req_s, 1),
        **ms_stats([x for r in runs for x in r["latencies"]], ""),
        "seconds": round(seconds / len(runs), 3),
        "repeats": len(runs),
        "client_cpu_us_per_req": round(sum(r["client_cpu_s"] for r in runs) / total * 1e6, 1),
        "server_cpu_us_per_req": round(server_cpu / total * 1e6, 1),
        "client_envelopes_per_frame": round(total / max(1, sum(r["frames"] for r in runs)), 2),
        "floor_req_per_s": round(req_s, 1),
        "other_cpu_util": other_util,
    }
    if life is not None:
        lreq = life["req_per_s"]
        line.update(
            lifecycle_req_per_s=lreq,
            ratio=round(lreq / req_s, 4),
            overhead_ratio=round(req_s / lreq, 1),
            ratio_def=(
                "ratio = lifecycle_req_per_s / floor_req_per_s (the fraction of the plain-TCP "
                "framing floor that libp2p + signatures + dispatch + Raft reach); "
                "overhead_ratio = its inverse (how many times slower the real stack is). "
                "lifecycle_req_per_s counts every client call of the lifecycle run with the "
                "same executors (submits, assigns, fused close-and-assigns) over its seconds"
            ),
        )
    return line


# --- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=2000, help="processes per lifecycle run")
    p.add_argument("--submitters", type=int, default=4)
    p.add_argument("--executors", default="1,8", help="comma-separated: one lifecycle run each")
    p.add_argument("--rounds", type=int, default=300, help="roundtrip rounds (after 20 warm-up)")
    p.add_argument("--only", choices=["lifecycle", "roundtrip", "floor", "failover"])
    p.add_argument("--nodes", default="1,3",
                   help="comma-separated cluster sizes: lifecycle and roundtrip run on each; "
                        "failover runs on each size >= 3; floor once")
    p.add_argument("--kills", type=int, default=5, help="leader kills in the failover run")
    p.add_argument("--method", choices=sorted(METHODS), default="split",
                   help="how executors run and are timed (see the method_detail key)")
    p.add_argument("--executor-procs", type=int, default=0,
                   help="run the executors in K child processes (0: in this process)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    p.add_argument("--py-spy", type=Path, metavar="DIR",
                   help="profile the node and the client(s) during lifecycle runs with py-spy "
                        "(collapsed stacks in DIR; needs `.venv/bin/pip install py-spy`)")
    p.add_argument("--probe", action="store_true",
                   help="run the node with batching counters (simulations/node_probe.py) and "
                        "report them as node_batching in lifecycle lines")
    p.add_argument("--cprofile-node", type=Path, metavar="DIR",
                   help="cProfile the whole node process of each lifecycle run into DIR "
                        "(implies --probe; slows the node)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.executors = [int(x) for x in str(args.executors).split(",") if x.strip()]
    except ValueError:
        p.error("--executors takes a comma-separated list of integers")
    if not args.executors or min(args.executors) < 1:
        p.error("--executors needs at least one count, each >= 1")
    try:
        args.nodes = [int(x) for x in str(args.nodes).split(",") if x.strip()]
    except ValueError:
        p.error("--nodes takes a comma-separated list of integers")
    if not args.nodes or min(args.nodes) < 1:
        p.error("--nodes needs at least one size, each >= 1")
    if args.processes < 1 or args.submitters < 1 or args.rounds < 1 or args.executor_procs < 0:
        p.error("--processes, --submitters and --rounds must be >= 1, --executor-procs >= 0")
    if args.kills < 1:
        p.error("--kills must be >= 1")
    return args


async def run_all(args: argparse.Namespace) -> int:
    emit(machine_line())
    # (bench, executors, nodes), in this order: per cluster size its lifecycles and roundtrip
    # (the floor right after the smallest size, whose lifecycle shapes it copies), then the
    # failover runs.
    runs: list[tuple[str, int | None, int]] = []
    for size in args.nodes:
        if args.only in (None, "lifecycle"):
            runs += [("lifecycle", e, size) for e in args.executors]
        if args.only in (None, "roundtrip"):
            runs.append(("roundtrip", None, size))
        if args.only in (None, "floor") and size == args.nodes[0]:
            runs += [("floor", e, 1) for e in args.executors]
    if args.only in (None, "failover"):
        runs += [("failover", None, size) for size in args.nodes if size >= 3]
    if not runs:
        progress(f"nothing to run: --only {args.only} with --nodes {args.nodes}")
        return 1
    lifecycles: dict[int, dict] = {}
    for name, e, size in runs:
        label = (name if e is None else f"{name} E={e}") + f" nodes={size}"
        progress(f"{label}: starting")
        try:
            with trio.fail_after(args.timeout):
                if name == "lifecycle":
                    assert e is not None
                    line = await lifecycle(args, e, size)
                    lifecycles.setdefault(e, line)  # the floor mirrors the first size's shape
                elif name == "roundtrip":
                    line = await roundtrip(args, size)
                elif name == "failover":
                    line = await failover(args, size)
                else:
                    assert e is not None
                    line = await floor(args, e, lifecycles.get(e))
        except Exception as group:
            err = _leaf(group)
            fail: dict[str, Any] = {"bench": name, "executors": e, "nodes": size}
            if isinstance(err, trio.TooSlowError):
                emit({**fail, "error": f"timed out after {args.timeout:g} s (see --timeout)"})
                return 1
            emit({**fail, "error": f"{type(err).__name__}: {err}"})
            if not isinstance(err, BenchError | ColoniesError):
                traceback.print_exc()  # a bug in the bench or the SDK: show where
            return 1
        emit({k: v for k, v in line.items() if not k.startswith("_")})
        if line.get("other_cpu_util", 0) > 0.25:
            progress(f"{label}: warning: other processes used {line['other_cpu_util']} cores "
                     "during the run; its numbers are skewed by them")
    return 0


def _leaf(e: BaseException) -> BaseException:
    """The one exception inside (nested) single-exception groups, or `e` itself."""
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        trio.run(worker_main, args.worker)
        return 0
    try:
        return trio.run(run_all, args)
    except BaseException as e:  # Ctrl-C may come wrapped in an exception group
        interrupted = isinstance(e, KeyboardInterrupt) or (
            isinstance(e, BaseExceptionGroup) and e.subgroup(KeyboardInterrupt) is not None
        )
        if not interrupted:
            raise
        progress("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())

