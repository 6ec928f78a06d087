"""`make bench-scale`: a node that holds a million finished processes and 100,000 waiting.

    make bench-scale                               # 1,000,000 finished, 100,000 waiting
    .venv/bin/python simulations/bench_scale.py --finished 100000 --waiting 10000
    .venv/bin/python simulations/bench_scale.py --workdir /var/tmp/scale --keep   # reuse later

1. Data dirs are filled through the real apply path (simulations/scale_preload.py): a colonyd
   bootstraps and registers a colony and an executor over the network, stops, and the
   preloader proposes the processes' submit/assign/log/close commands through the node's own
   Raft replica, state machine and archive. With --keep the filled dirs stay in --workdir and
   a later run with the same sizes starts from them.
2. A small node (1,000 waiting) gives the assign latency at 1k.
3. The big node starts on its data dir; `restart_s` is from the process start to the first
   answered get of an archived process. Then, through the network and signed as the
   executor: gets of archived processes, pages of 100 finished processes (newest first, by
   cursor), and assign + close round trips against the 100,000 waiting.
4. A burst of writes makes the node compact its journal: `snapshot_s` is how long the
   snapshot took (the node forks; a child writes it).
5. A second node joins: as a learner it gets the snapshot and the archive streamed from the
   first, installs them, and is made a voter (`install_s`).

Both nodes run under simulations/node_probe.py, which keeps every event-loop lag of 5 ms or
more with its time: `max_loop_stall_ms` is the worst lag on either node while the snapshot
was taken and while the follower got and installed it. `rss_mb` is the larger node's largest
resident set size, sampled every 0.25 s from /proc. One JSON line on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.client import Client  # noqa: E402
from protocol.errors import ColoniesError  # noqa: E402
from protocol.identity import PrivateKey  # noqa: E402
from protocol.messages import SUCCESS  # noqa: E402
from simulations.benchkit import (  # noqa: E402
    BenchError,
    ClusterMember,
    emit,
    machine_line,
    percentile,
    progress,
)
from simulations.scale_preload import fill_member  # noqa: E402

COLONY = "scale"
EXECUTOR_TYPE = "scale-worker"
COMPACT_AFTER = 1000  # the big node snapshots after this many entries (the write burst)
RESTART_TIMEOUT_S = 300.0
JOIN_TIMEOUT_S = 1800.0
RSS_EVERY_S = 0.25
TARGETS = {  # from the issue: the numbers this machine is held to
    "rss_mb": 500,
    "max_loop_stall_ms": 100,
    "restart_s": 10,
    "archived_get_p50_ms": 5,
    "list_page_p50_ms": 20,
}


def ms(seconds: list[float]) -> float:
    return round(percentile(sorted(seconds), 50) * 1000, 2)


class Keys:
    def __init__(self, workdir: Path) -> None:
        path = workdir / "keys.json"
        if path.exists():
            saved = json.loads(path.read_text())
            self.server, self.owner, self.executor = (
                PrivateKey.from_hex(saved[k]) for k in ("server", "owner", "executor")
            )
        else:
            self.server, self.owner, self.executor = (PrivateKey.generate() for _ in range(3))
            path.write_text(json.dumps({"server": self.server.hex, "owner": self.owner.hex,
                                        "executor": self.executor.hex}))
            path.chmod(0o600)

    def env(self) -> dict[str, str]:
        return dict(os.environ, COLONIES_SERVER_PRVKEY=self.server.hex)


def member(workdir: Path, name: str, keys: Keys, extra: list[str] | None = None) -> ClusterMember:
    m = ClusterMember(name, workdir, keys.env(), "warning", probe=True, cprofile=None)
    m.extra_args = list(extra or [])
    return m


async def prepare(workdir: Path, name: str, keys: Keys, finished: int, waiting: int) -> dict:
    """A data dir with that much history (kept in `<name>.json` for --keep reruns)."""
    done = workdir / f"{name}.json"
    if done.exists():
        info = json.loads(done.read_text())
        if (info["finished"], info["waiting"]) == (finished, waiting):
            progress(f"{name}: reusing the data dir filled earlier")
            return info
        done.unlink()
    m = member(workdir, name, keys)
    shutil.rmtree(m.data_dir, ignore_errors=True)
    m.start()
    progress(f"{name}: preloading {finished} finished and {waiting} waiting processes")
    t0 = time.monotonic()
    step = max(50_000, finished // 20)

    def report(k: int) -> None:
        if k % step < 500:
            progress(f"{name}: {k} finished ({k / (time.monotonic() - t0):.0f}/s)")

    try:
        await m.wait_ready()
        stats = await fill_member(m, keys.server, keys.owner, keys.executor, COLONY,
                                  EXECUTOR_TYPE, finished, waiting, report)
    finally:
        m.stop()
    info = {"finished": finished, "waiting": waiting, "addr": m.addr, "listen": m.listen,
            "preload_s": round(stats.seconds, 1), "entries": stats.entries,
            "sample_ids": stats.sample_ids}
    done.write_text(json.dumps(info))
    return info


def fresh_copy(workdir: Path, name: str, keys: Keys, extra: list[str] | None = None) -> ClusterMember:
    """A member on a copy of the filled data dir: a run changes its dir (a follower joins),
    the next run with --keep starts from the filled state again."""
    m = member(workdir, f"{name}-run", keys, extra)
    shutil.rmtree(m.data_dir, ignore_errors=True)
    shutil.copytree(workdir / f"{name}-data", m.data_dir)
    return m


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class RssSampler:
    def __init__(self) -> None:
        self.max: dict[str, float] = {}
        self.members: list[ClusterMember] = []

    async def run(self) -> None:
        while True:
            for m in self.members:
                if m.running:
                    self.max[m.name] = max(self.max.get(m.name, 0.0), rss_mb(m.pid))
            await trio.sleep(RSS_EVERY_S)


async def timed(n: int, call: Callable[[int], Awaitable[Any]]) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        await call(i)
        out.append(time.perf_counter() - t)
    return out


async def assign_latencies(client: Client, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        p = await client.assign(COLONY, timeout=1)
        samples.append(time.perf_counter() - t)
        await client.close(p, ["done"])
    return samples


async def raft_status(m: ClusterMember, key: PrivateKey) -> dict[str, Any]:
    async with Client.connect(m.addr, key, timeout=10) as c:
        return (await c.server_info_fresh())["raft"]


async def wait_serving(m: ClusterMember, key: PrivateKey, pid: str, t0: float) -> float:
    """Seconds from `t0` until the node answers a get of archived process `pid`."""
    deadline = t0 + RESTART_TIMEOUT_S
    while time.monotonic() < deadline:
        if not m.running:
            raise BenchError(f"{m.name} exited while starting:\n{m.child.tail() if m.child else ''}")
        try:
            async with Client.connect(m.addr, key, timeout=2) as c:
                p = await c.process(pid)
                if p["state"] != SUCCESS:
                    raise BenchError(f"archived process {pid} is in state {p['state']}")
                return time.monotonic() - t0
        except (ColoniesError, OSError):
            await trio.sleep(0.05)
    raise BenchError(f"{m.name} did not serve within {RESTART_TIMEOUT_S:g} s")


def worst_lag(stats: dict[str, Any], window: tuple[float, float]) -> float:
    """The worst event-loop lag a node_probe recorded that overlaps `window` (unix times)."""
    a, b = window
    # A lag is recorded when it ends: it started lag_ms earlier.
    return max((lag for at, lag in stats.get("lags", []) if at >= a and at - lag / 1000 <= b),
               default=0.0)


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    keys = Keys(workdir)
    sampler = RssSampler()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sampler.run)
        small = await prepare(workdir, "small", keys, 0, min(1000, args.waiting) or 1000)
        m = fresh_copy(workdir, "small", keys)
        m.start()
        try:
            await m.wait_ready()
            async with Client.connect(m.addr, keys.executor) as c:
                at_1k = await assign_latencies(c, min(args.samples, small["waiting"]))
        finally:
            m.stop()
        progress(f"assign p50 at 1k: {ms(at_1k)} ms")

        big = await prepare(workdir, "big", keys, args.finished, args.waiting)
        leader = fresh_copy(workdir, "big", keys, ["--compact-after", str(COMPACT_AFTER)])
        sampler.members.append(leader)
        t0 = time.monotonic()
        leader.listen, leader.addr = big["listen"], big["addr"]  # its address in the book
        leader.start()
        try:
            restart_s = await wait_serving(leader, keys.executor, big["sample_ids"][0], t0)
            progress(f"restart: serving after {restart_s:.2f} s")
            ids = list(big["sample_ids"])
            random.Random(1).shuffle(ids)
            async with Client.connect(leader.addr, keys.executor, timeout=30) as c:
                gets = await timed(args.samples, lambda i: c.process(ids[i % len(ids)]))
                pages, cursor = [], None
                for _ in range(args.pages):
                    t = time.perf_counter()
                    page = await c.processes(COLONY, SUCCESS, 100, before=cursor)
                    pages.append(time.perf_counter() - t)
                    cursor = (page[-1]["endtime"], page[-1]["processid"])
                assigns = await assign_latencies(c, args.samples)
                progress(f"get p50 {ms(gets)} ms, page p50 {ms(pages)} ms, "
                         f"assign p50 {ms(assigns)} ms")

                before = (await raft_status(leader, keys.server))["snapshots"]
                snap_start = time.time()
                for i in range(COMPACT_AFTER + 100):
                    await c.submit("echo", colonyname=COLONY, executortype="nobody", args=[i])
                deadline = time.monotonic() + 300
                while (status := await raft_status(leader, keys.server))["snapshots"] == before:
                    if time.monotonic() > deadline:
                        raise BenchError("the node took no snapshot after the write burst")
                    await trio.sleep(0.2)
                snap_end = time.time()
                snapshot_s = status["snapshot_s"]
            progress(f"snapshot: {snapshot_s:.2f} s")

            follower = member(workdir, "follower", keys)
            shutil.rmtree(follower.data_dir, ignore_errors=True)
            sampler.members.append(follower)
            join_start = time.time()
            follower.start(join=leader.addr)
            try:
                await follower.wait_ready(JOIN_TIMEOUT_S)
                join_end = time.time()
                progress(f"follower installed the snapshot and votes after "
                         f"{join_end - join_start:.1f} s")
                stats = {"leader": await leader.probe_stats(),
                         "follower": await follower.probe_stats()}
                for name, counters in stats.items():  # for a closer look (--keep)
                    (workdir / f"probe-{name}.json").write_text(json.dumps(counters))
                installed = (await raft_status(follower, keys.server))["snapshot_transfers"]
            finally:
                follower.stop()
        finally:
            leader.stop()
        nursery.cancel_scope.cancel()

    stalls = {
        "leader_snapshot": worst_lag(stats["leader"], (snap_start, snap_end)),
        "leader_install": worst_lag(stats["leader"], (join_start, join_end)),
        "follower_install": worst_lag(stats["follower"], (join_start, join_end)),
    }
    archive_mb = (workdir / "big-run-data" / "archive.db").stat().st_size / 2**20
    line = {
        "bench": "scale",
        "finished": args.finished,
        "waiting": args.waiting,
        "rss_mb": round(max(sampler.max.values()), 1),
        "rss_mb_by_node": {k: round(v, 1) for k, v in sampler.max.items()},
        "max_loop_stall_ms": max(stalls.values()),
        "max_loop_stall_ms_by_phase": stalls,
        "snapshot_s": snapshot_s,
        "install_s": round(join_end - join_start, 2),
        "restart_s": round(restart_s, 2),
        "assign_p50_ms": ms(assigns),
        "assign_p50_ms_at_1k": ms(at_1k),
        "archived_get_p50_ms": ms(gets),
        "list_page_p50_ms": ms(pages),
        "archive_mb": round(archive_mb, 1),
        "preload_s": big["preload_s"],
        "snapshots_installed": installed.get("installed"),
        "phases": {"snapshot": [snap_start, snap_end], "install": [join_start, join_end]},
    }
    line["targets_met"] = {k: line[k] <= v for k, v in TARGETS.items()} | {
        "assign_within_2x_of_1k": line["assign_p50_ms"] <= 2 * line["assign_p50_ms_at_1k"]
    }
    return line


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--finished", type=int, default=1_000_000)
    p.add_argument("--waiting", type=int, default=100_000)
    p.add_argument("--samples", type=int, default=300, help="gets and assigns timed")
    p.add_argument("--pages", type=int, default=50, help="pages of 100 finished timed")
    p.add_argument("--workdir", type=Path, help="where the data dirs go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep --workdir's data for a rerun")
    args = p.parse_args()
    if args.finished < 1 or args.waiting < args.samples or args.samples < 1 or args.pages < 1:
        p.error("need --finished, --samples and --pages >= 1, and --waiting >= --samples")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="colonies-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    machine = {k: v for k, v in machine_line().items() if k != "bench"}
    try:
        emit({**trio.run(run, args, workdir), "machine": machine})
        return 0
    except BenchError as e:
        emit({"bench": "scale", "error": str(e)})
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
