"""Chaos runs: a real cluster under faults, every client operation recorded, and the history
checked against what Colonies promises (simulations/checker.py).

    .venv/bin/python simulations/chaos.py                           # 60 s, seed 1, 3 nodes
    .venv/bin/python simulations/chaos.py --duration 300 --seed 7 --nodes 5 --executors 4
    make chaos ARGS="--duration 300 --seed 7"

It starts N colonyd processes on 127.0.0.1 (each with --fault-file), M executor processes
(simulations/chaos_worker.py, the node/executor.py helper; some overrun their deadline), and a
steady load of processes and workflows; then injects faults on a schedule drawn from the seed
(simulations/chaos_faults.py). At the end it heals everything, waits a quiet period and for the
work to drain, reads every acknowledged process (consistent reads) and every node's state
digest (getstatedigestmsg, retried until the nodes agree or a bound passes), writes the report
folder and runs the checker. Exit status: 0 every rule held, 1 a rule was violated (named on
the last line), 2 the run itself could not be carried out (bad options, nodes never started).

Report folder (default ./chaos-reports/<time>-seed<seed>/): history.jsonl, final.json,
summary.json, summary.txt, faults.jsonl, nodes/ (each node's log per start, and the fault
files), executors/ (each executor's log and own history).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from node.client import Client  # noqa: E402
from protocol.errors import ColoniesError  # noqa: E402
from protocol.identity import PrivateKey  # noqa: E402
from simulations import checker  # noqa: E402
from simulations.benchkit import (  # noqa: E402
    PYTHON,
    BenchError,
    ChildProcess,
    ClusterMember,
    ClusterProcess,
)
from simulations.chaos_faults import DEFAULT_MIX, Injector, parse_mix, plan_schedule  # noqa: E402
from simulations.chaos_history import (  # noqa: E402
    HistoryLog,
    Load,
    Session,
    merge_histories,
    read_processes,
    unfinished,
)
from simulations.chaos_view import ChaosView  # noqa: E402
from simulations.chaos_worker import KEY_ENV  # noqa: E402
from simulations.scale_preload import fill_member  # noqa: E402

COLONY = "chaos"
EXECUTOR_TYPE = "chaos"
SUBMITTER_TYPE = "chaos-submitter"
PRELOAD_COLONY = "history"
POLL_EVERY_S = 1.0
POLL_TIMEOUT_S = 1.5
EXECUTOR_STOP_S = 10.0
CONVERGE_TIMEOUT_S = 30.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="chaos", description="Fault injection on a real cluster, with a history checker.")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of faults (default 60)")
    p.add_argument("--seed", type=int, default=1, help="seeds the fault schedule and the load")
    p.add_argument("--nodes", type=int, default=3, help="colonyd processes (default 3)")
    p.add_argument("--executors", type=int, default=3, help="executor processes (default 3)")
    p.add_argument("--faults", default=DEFAULT_MIX,
                   help="fault mix, e.g. 'kill=2,kill-leader,pause,partition,slow,drop,"
                        "kill-executor' ('none' for a run without faults)")
    p.add_argument("--rate", type=float, default=4.0, help="submits per second (default 4)")
    p.add_argument("--overrun", type=float, default=0.1,
                   help="share of processes an executor runs past maxexectime (default 0.1)")
    p.add_argument("--quiet", type=float, default=5.0,
                   help="seconds of calm after healing, before the final reads (default 5)")
    p.add_argument("--drain-timeout", type=float, default=90.0,
                   help="bound on waiting for every acknowledged process to finish")
    p.add_argument("--report-dir", type=Path, default=None,
                   help="where the report goes (default ./chaos-reports/<time>-seed<seed>)")
    p.add_argument("--keep-data", action="store_true", help="keep the nodes' data dirs")
    p.add_argument("--compact-after", type=int, default=50,
                   help="the nodes snapshot after this many entries (default 50, so that "
                        "followers that were down get snapshots)")
    p.add_argument("--preload", type=int, default=0, metavar="N",
                   help="first fill n1's archive with N finished processes of another colony "
                        "(the others join by installing it): a run with a large archive")
    view = p.add_mutually_exclusive_group()
    view.add_argument("--plain", action="store_true", help="plain lines even on a terminal")
    view.add_argument("--live", action="store_true", help="the live view even when piped")
    args = p.parse_args(argv)
    checks = [
        (0 < args.duration <= 86_400, "--duration must be in (0, 86400] seconds"),
        (1 <= args.nodes <= 9, "--nodes must be in 1..9"),
        (0 <= args.executors <= 32, "--executors must be in 0..32"),
        (0 < args.rate <= 200, "--rate must be in (0, 200]"),
        (0 <= args.overrun <= 1, "--overrun must be in 0..1"),
        (0 <= args.quiet <= 3600, "--quiet must be in 0..3600"),
        (0 < args.drain_timeout <= 3600, "--drain-timeout must be in (0, 3600]"),
        (1 <= args.compact_after <= 1_000_000, "--compact-after must be in 1..1000000"),
        (0 <= args.preload <= 10_000_000, "--preload must be in 0..10000000"),
    ]
    for ok, message in checks:
        if not ok:
            p.error(message)
    try:
        args.mix = {} if args.faults.strip() == "none" else parse_mix(args.faults)
    except ValueError as e:
        p.error(f"--faults: {e}")
    if args.report_dir is None:
        args.report_dir = Path("chaos-reports") / f"{time.strftime('%Y%m%d-%H%M%S')}-seed{args.seed}"
    if args.report_dir.exists() and any(args.report_dir.iterdir()):
        p.error(f"--report-dir {args.report_dir} is not empty (a report is never overwritten)")
    return args


class ExecutorProcess:
    """One chaos_worker.py process; restartable (each start logs to its own file)."""

    def __init__(self, name: str, key: PrivateKey, argv: list[str], workdir: Path,
                 env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.workdir = workdir
        self.env = {**env, KEY_ENV: key.hex}
        self.child: ChildProcess | None = None
        self.starts = 0

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.proc.poll() is None

    def start(self) -> None:
        self.starts += 1
        suffix = "" if self.starts == 1 else f"-start{self.starts}"
        self.child = ChildProcess(f"{self.name}{suffix}", self.argv, self.workdir, self.env)

    def kill(self) -> None:
        if self.child is not None and self.running:
            self.child.proc.kill()
            self.child.proc.wait(5)

    def terminate(self) -> None:
        if self.child is not None and self.running:
            self.child.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()


class ChaosRun:
    def __init__(self, args: argparse.Namespace, view: ChaosView) -> None:
        self.args = args
        self.view = view
        self.report = Path(args.report_dir)
        self.report.mkdir(parents=True, exist_ok=True)
        self.nodes_dir = self.report / "nodes"
        self.exec_dir = self.report / "executors"
        self.server = PrivateKey.generate()
        self.cluster = ClusterProcess(
            self.server.hex, args.nodes, log_level="info", workdir=self.nodes_dir,
            member_args=lambda m: ["--fault-file", str(self.fault_path(m.name)),
                                   "--compact-after", str(args.compact_after)],
            prepare_first=self.preload if args.preload else None,
        )
        self.executors: list[ExecutorProcess] = []
        self.infos: dict[str, dict[str, Any] | None] = {}
        self.rng = random.Random(args.seed)
        self.history = HistoryLog(self.report / "history-run.jsonl")
        self.load = Load(self.history, random.Random(args.seed + 1), COLONY, EXECUTOR_TYPE,
                         args.rate)
        self.injector: Injector | None = None
        self.timings: dict[str, float] = {}
        self.notes: list[str] = []

    # --- what the faults module asks --------------------------------------------------------

    def fault_path(self, name: str) -> Path:
        return self.nodes_dir / f"{name}.faults.json"

    def member(self, name: str) -> ClusterMember:
        return next(m for m in self.cluster.members if m.name == name)

    def leader_name(self) -> str | None:
        best: tuple[int, str] | None = None
        for name, info in self.infos.items():
            if info and info["raft"]["state"] == "leader" and self.member(name).running:
                term = info["raft"]["term"]
                if best is None or term > best[0]:
                    best = (term, name)
        return best[1] if best else None

    # --- setup --------------------------------------------------------------------------------

    async def preload(self, first: ClusterMember) -> None:
        """--preload: history in a colony of its own, through n1's own apply path
        (simulations/scale_preload.py), before the others join."""
        self.view.set_phase(f"preloading {self.args.preload} finished processes into n1")
        t = time.monotonic()
        owner, executor = PrivateKey.generate(), PrivateKey.generate()
        await fill_member(first, self.server, owner, executor, PRELOAD_COLONY, "history",
                          self.args.preload, 0)
        self.timings["preload_s"] = round(time.monotonic() - t, 2)

    async def setup_colony(self, submitter: PrivateKey, keys: list[PrivateKey]) -> None:
        owner = PrivateKey.generate()
        async with Client.connect(self.cluster.addrs, self.server, timeout=10) as admin:
            await admin.add_colony(owner.id, COLONY)
            co = admin.with_key(owner)
            await co.add_executor(submitter.id, "submitter", SUBMITTER_TYPE, COLONY)
            await co.approve_executor(COLONY, "submitter")
            for i, key in enumerate(keys):
                await co.add_executor(key.id, f"ex{i + 1}", EXECUTOR_TYPE, COLONY)
                await co.approve_executor(COLONY, f"ex{i + 1}")

    def make_executors(self, keys: list[PrivateKey]) -> None:
        self.exec_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for i, key in enumerate(keys):
            name = f"ex{i + 1}"
            # Every other executor overruns sometimes; the rest never do.
            overrun = self.args.overrun if i % 2 == 0 else 0.0
            argv = [PYTHON, str(ROOT / "simulations" / "chaos_worker.py"),
                    "--addrs", ",".join(self.cluster.addrs), "--colony", COLONY,
                    "--executortype", EXECUTOR_TYPE, "--executorname", name,
                    "--history", str(self.exec_dir / f"{name}.jsonl"),
                    "--overrun", str(overrun), "--seed", str(self.args.seed * 100 + i)]
            self.executors.append(ExecutorProcess(name, key, argv, self.exec_dir, env))

    # --- watching -----------------------------------------------------------------------------

    async def poll_nodes(self, nursery: trio.Nursery) -> None:
        """Each node's own view (pinned clients), and the cluster's counts; bounded calls."""
        clients: dict[str, Client | None] = {m.name: None for m in self.cluster.members}
        stats_session = Session(nursery, self.cluster.addrs, self.server)
        last_done, last_t = 0, time.monotonic()

        async def one(m: ClusterMember) -> None:
            inj = self.injector
            faults = []
            if inj is not None:
                faults = [f for f, on in (("killed", m.name in inj.down),
                                          ("paused", m.name in inj.paused),
                                          ("cut", bool(inj.plans[m.name].block))) if on]
            info = None
            if m.running and (inj is None or m.name not in inj.paused):
                with trio.move_on_after(POLL_TIMEOUT_S):
                    try:
                        if clients[m.name] is None:
                            clients[m.name] = await Client.open(
                                nursery, m.addr, self.server, POLL_TIMEOUT_S, pinned=True)
                        info = await clients[m.name].server_info_fresh()
                    except (ColoniesError, OSError):
                        info = None
                if info is None and clients[m.name] is not None:
                    client, clients[m.name] = clients[m.name], None
                    with trio.move_on_after(0.5):
                        await client.aclose()
            self.infos[m.name] = info
            if info is None:
                state = "down" if not m.running else "paused" if "paused" in faults else "no reply"
                self.view.update_node(m.name, state=state, faults=",".join(faults))
            else:
                r = info["raft"]
                self.view.update_node(m.name, state=r["state"], term=r["term"],
                                      applied=r["last_applied"], faults=",".join(faults))

        while True:
            async with trio.open_nursery() as n:
                for m in self.cluster.members:
                    n.start_soon(one, m)
            try:
                stats = await stats_session.call(lambda c: c.statistics())
                done = stats.get("successfulprocesses", 0) + stats.get("failedprocesses", 0)
                now = time.monotonic()
                self.view.state.stats = stats
                self.view.state.done_rate = max(0.0, (done - last_done) / max(now - last_t, 1e-6))
                last_done, last_t = done, now
            except (ColoniesError, OSError):
                pass
            self.view.state.submitted = len(self.load.acked)
            self.view.state.executors = {
                e.name: "up" if e.running else "killed" for e in self.executors}
            await trio.sleep(POLL_EVERY_S)

    async def run_faults(self, nursery: trio.Nursery, t_start: float) -> None:
        assert self.injector is not None
        schedule = plan_schedule(self.rng, self.args.duration, self.args.mix, self.args.nodes,
                                 len(self.executors))
        (self.report / "schedule.json").write_text(
            json.dumps([ev.__dict__ for ev in schedule], indent=1))
        for ev in schedule:
            await trio.sleep_until(trio.current_time() + max(0.0, t_start + ev.at - time.monotonic()))
            try:
                await self.injector.fire(ev, nursery)
            except Exception as e:  # noqa: BLE001 - one failed injection must not end the run
                self.view.note("error", f"{ev.kind} could not be injected: {e}"[:300])

    # --- the phases ---------------------------------------------------------------------------

    async def main(self) -> int:
        t_begin = time.monotonic()
        self.report.mkdir(parents=True, exist_ok=True)
        self.view.set_phase(f"starting {self.args.nodes} nodes")
        stopped_by: list[str] = []

        async def on_signals(scope: trio.CancelScope) -> None:
            # SIGTERM and SIGHUP stop the run like Ctrl-C does (everything started is stopped).
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as sigs:
                async for signum in sigs:
                    stopped_by.append(signal.Signals(signum).name)
                    scope.cancel()
                    return

        with trio.CancelScope() as scope:
            async with self.cluster, trio.open_nursery() as nursery:
                nursery.start_soon(on_signals, scope)
                try:
                    return await self._phases(nursery, t_begin)
                finally:
                    self._stop_everything()
                    nursery.cancel_scope.cancel()
        print(f"chaos: stopped by {', '.join(stopped_by) or 'cancellation'}; every process it "
              "started was stopped", file=sys.stderr)
        return 130

    async def _phases(self, nursery: trio.Nursery, t_begin: float) -> int:
        args = self.args
        nursery.start_soon(self.view.run)
        self.timings["cluster_start_s"] = round(time.monotonic() - t_begin, 2)
        submitter = PrivateKey.generate()
        keys = [PrivateKey.generate() for _ in range(args.executors)]
        await self.setup_colony(submitter, keys)
        self.make_executors(keys)
        for ex in self.executors:
            ex.start()
        self.injector = Injector(self, self.view.note)
        for m in self.cluster.members:
            self.injector._write(m.name)
        nursery.start_soon(self.poll_nodes, nursery)

        self.view.set_phase(f"faults for {args.duration:g} s")
        t_faults = time.monotonic()
        until = t_faults + args.duration
        submit_session = Session(nursery, self.cluster.addrs, submitter)
        observe_session = Session(nursery, self.cluster.addrs, submitter, consistent=True)
        async with trio.open_nursery() as phase:
            phase.start_soon(self.load.submitter, submit_session, until)
            phase.start_soon(self.load.observer, observe_session, until)
            phase.start_soon(self.run_faults, nursery, t_faults)
        self.timings["fault_phase_s"] = round(time.monotonic() - t_faults, 2)

        self.view.set_phase("healing")
        await self.injector.heal_all()
        try:
            await self.cluster.leader(timeout=30)
        except BenchError as e:
            self.view.note("error", str(e))
        self.view.set_phase(f"quiet for {args.quiet:g} s")
        await trio.sleep(args.quiet)

        self.view.set_phase("draining")
        t_drain = time.monotonic()
        left = list(self.load.acked)
        while left and time.monotonic() - t_drain < args.drain_timeout:
            left = await unfinished(observe_session, left)
            if left:
                await trio.sleep(1.0)
        self.timings["drain_s"] = round(time.monotonic() - t_drain, 2)
        if left:
            self.view.note("error", f"{len(left)} acknowledged processes still unfinished")
        await self._stop_executors()

        self.view.set_phase("collecting")
        processes = await read_processes(observe_session, self.load.acked)
        digests, attempts = await self.collect_digests(nursery)
        final = {"processes": processes, "digests": digests, "digest_attempts": attempts}
        (self.report / "final.json").write_text(json.dumps(final, indent=1, sort_keys=True))
        for s in (submit_session, observe_session):
            await s.aclose()
        return self.finish(final, t_begin)

    async def collect_digests(self, nursery: trio.Nursery) -> tuple[dict[str, Any], int]:
        """Every node's (digest, applied) of its live state and of its archive, asked of each
        node itself, until they agree."""
        deadline = time.monotonic() + CONVERGE_TIMEOUT_S
        attempts = 0
        digests: dict[str, Any] = {}
        while True:
            attempts += 1
            digests = {}
            for m in self.cluster.members:
                try:
                    with trio.fail_after(5):
                        async with Client.connect(m.addr, self.server, timeout=3) as c:
                            if c.addr != m.addr:
                                raise ColoniesError(f"connected to {c.addr}, not {m.addr}")
                            digests[m.name] = await c.state_digest()
                except (ColoniesError, OSError, trio.TooSlowError) as e:
                    digests[m.name] = {"digest": None, "applied": None,
                                       "error": f"{type(e).__name__}: {e}"[:200]}
            if len({checker.digest_key(d) for d in digests.values()}) == 1:
                if next(iter(digests.values()))["digest"] is not None:
                    return digests, attempts
            if time.monotonic() >= deadline:
                return digests, attempts
            await trio.sleep(0.5)

    async def _stop_executors(self) -> None:
        for ex in self.executors:
            ex.terminate()
        with trio.move_on_after(EXECUTOR_STOP_S):
            while any(ex.running for ex in self.executors):
                await trio.sleep(0.1)
        for ex in self.executors:
            ex.stop()

    def _stop_everything(self) -> None:
        """Synchronous and bounded, for every way out (also Ctrl-C): no process left behind."""
        for m in self.cluster.members:
            if m.running and m.child is not None:
                try:
                    m.child.proc.send_signal(signal.SIGCONT)
                except ProcessLookupError:
                    pass
        for ex in self.executors:
            ex.terminate()
        for ex in self.executors:
            try:
                ex.stop()
            except (OSError, subprocess.SubprocessError):
                pass
        self.history.close()

    # --- the report ---------------------------------------------------------------------------

    def finish(self, final: dict[str, Any], t_begin: float) -> int:
        parts = [self.report / "history-run.jsonl", *sorted(self.exec_dir.glob("ex*.jsonl"))]
        ops = merge_histories(parts, self.report / "history.jsonl")
        history = [o for o in ops if o.get("op") in ("submit", "assign", "close", "observe")]
        restarts = [o for o in ops if o.get("op") == "worker-restart"]
        assert self.injector is not None
        with (self.report / "faults.jsonl").open("w") as f:
            for entry in self.injector.log:
                f.write(json.dumps(entry) + "\n")
        violation = checker.check(history, final)
        states: dict[str, int] = {}
        for p in final["processes"].values():
            name = checker.STATE_NAMES.get(p["state"], str(p["state"]))
            states[name] = states.get(name, 0) + 1
        op_counts: dict[str, int] = {}
        for o in history:
            key = f"{o['op']}-{'ok' if o.get('ok') else 'failed'}"
            op_counts[key] = op_counts.get(key, 0) + 1
        digests = final["digests"]
        summary = {
            "verdict": "ok" if violation is None else "violated",
            "violated_rule": None if violation is None else violation.rule,
            "violation": None if violation is None else violation.describe(),
            "seed": self.args.seed,
            "options": {k: (str(v) if isinstance(v, Path) else v)
                        for k, v in vars(self.args).items() if k != "mix"},
            "wall_s": round(time.monotonic() - t_begin, 2),
            "timings": self.timings,
            "faults": dict(sorted(self.injector.counts.items())),
            "faults_skipped": self.injector.skipped,
            "operations": dict(sorted(op_counts.items())),
            "acknowledged_processes": len(self.load.acked),
            "final_states": states,
            "executor_run_restarts": len(restarts),
            "node_starts": {m.name: m.starts for m in self.cluster.members},
            "digests_agree_after_attempts": final["digest_attempts"],
            "digests": digests,
        }
        (self.report / "summary.json").write_text(json.dumps(summary, indent=1))
        lines = [
            f"chaos run, seed {self.args.seed}: {summary['verdict'].upper()}",
            f"  {self.args.nodes} nodes, {self.args.executors} executors, "
            f"{self.args.duration:g} s of faults, {summary['wall_s']} s wall",
            f"  faults: {', '.join(f'{k} x{v}' for k, v in summary['faults'].items()) or 'none'}"
            f" ({self.injector.skipped} skipped)",
            f"  operations: {', '.join(f'{k} {v}' for k, v in summary['operations'].items())}",
            f"  processes acknowledged: {len(self.load.acked)}; final states: "
            f"{', '.join(f'{k} {v}' for k, v in sorted(states.items()))}",
            f"  executor run restarts: {len(restarts)}; node starts: {summary['node_starts']}",
            "  digests: " + ", ".join(f"{n} {str(d.get('digest'))[:12]}@{d.get('applied')}"
                                      for n, d in sorted(digests.items())),
            f"  report: {self.report}",
            "checker: " + ("every rule held: " + ", ".join(checker.RULES)
                           if violation is None else violation.describe()),
        ]
        (self.report / "summary.txt").write_text("\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)
        return 0 if violation is None else 1

    def cleanup_data(self) -> None:
        if not self.args.keep_data:
            for d in self.nodes_dir.glob("*-data"):
                shutil.rmtree(d, ignore_errors=True)


async def run(args: argparse.Namespace) -> int:
    view = ChaosView(live=True if args.live else False if args.plain else None)
    chaos = ChaosRun(args, view)
    try:
        return await chaos.main()
    except (BenchError, ColoniesError, OSError) as e:
        print(f"chaos: the run could not be carried out: {type(e).__name__}: {e}",
              file=sys.stderr)
        return 2
    finally:
        chaos.cleanup_data()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return trio.run(run, args)
    except KeyboardInterrupt:
        pass
    except BaseExceptionGroup as group:  # Ctrl-C, as trio's nurseries hand it up
        if group.split(KeyboardInterrupt)[1] is not None:
            raise
    print("chaos: interrupted; every process it started was stopped", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
