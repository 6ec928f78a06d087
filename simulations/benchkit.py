"""Shared pieces of the benchmarks: output lines, percentiles, CPU accounting, a colonyd
started in its own OS process (so the node and the clients each get a core, as in reality),
and a cluster of such processes on 127.0.0.1 (ClusterProcess) whose members can be killed
and restarted on the same address.

Output discipline: result lines are JSON objects on stdout, one per line; progress and
diagnostics go to stderr.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
NODE_START_TIMEOUT_S = 60.0
NODE_STOP_TIMEOUT_S = 15.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A run that could not complete: reported as an error line, and the exit code is 1."""


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, separators=(", ", ": ")), flush=True)


def progress(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def ms_stats(seconds: list[float], prefix: str) -> dict[str, float | None]:
    """{prefix_ms_p50, prefix_ms_p99, prefix_ms_max} in milliseconds (None: no samples)."""
    s = sorted(seconds)
    if not s:
        return {f"{prefix}ms_p50": None, f"{prefix}ms_p99": None, f"{prefix}ms_max": None}
    return {
        f"{prefix}ms_p50": round(percentile(s, 50) * 1000, 3),
        f"{prefix}ms_p99": round(percentile(s, 99) * 1000, 3),
        f"{prefix}ms_max": round(s[-1] * 1000, 3),
    }


def proc_cpu_seconds(pid: int) -> float:
    """user+system CPU of a live process, from /proc (10 ms resolution)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    # After the ")" of comm: field 3 (state) is index 0, so utime (14) and stime (15) are 11, 12.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent outside idle and iowait since boot (from /proc/stat)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    # guest time is already counted in user; the first 8 fields are the disjoint ones.
    return (sum(fields[:8]) - idle) / _CLK_TCK


class OtherLoad:
    """How much CPU the rest of the machine used while a run was measured.

    Other users' work on a 2-core VM skews every number here (measured: 310 instead of 530
    processes/s with a test suite running next to the bench), so each result line says how
    many cores went elsewhere: other_cpu_util = (machine busy - our processes) / seconds.
    """

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.t0 = time.monotonic()
        self.busy0 = machine_busy_seconds()
        self.ours0 = self._ours()

    def _ours(self) -> float:
        return sum(proc_cpu_seconds(p) for p in self.pids)

    def util(self) -> float:
        seconds = time.monotonic() - self.t0
        other = (machine_busy_seconds() - self.busy0) - (self._ours() - self.ours0)
        return round(max(0.0, other) / max(seconds, 1e-9), 2)


def machine_line() -> dict[str, Any]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    line: dict[str, Any] = {
        "bench": "machine",
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    commit = _git_commit()
    if commit:
        line["commit"] = commit
    return line


def _cpu_model() -> str:
    try:
        for row in Path("/proc/cpuinfo").read_text().splitlines():
            if row.startswith("model name"):
                return row.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT, capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT, capture_output=True, text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{head}{'+dirty' if dirty else ''}" if head else ""


class ChildProcess:
    """A child process that is always stopped: SIGTERM, a bounded wait, then SIGKILL.

    Its stderr goes to a file in `workdir`; `tail()` shows the end of it for error reports.
    """

    def __init__(self, name: str, argv: list[str], workdir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.stderr"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            start_new_session=True,  # a Ctrl-C on the bench reaches us, and we stop it
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.proc.pid)

    def tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self) -> int | None:
        """Blocking, bounded; safe to call twice. Returns the exit code (None if unknown)."""
        p = self.proc
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
                p.wait(NODE_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                progress(f"{self.name} (pid {p.pid}) ignored SIGTERM for "
                         f"{NODE_STOP_TIMEOUT_S:g} s; killing it")
                p.kill()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    progress(f"{self.name} (pid {p.pid}) survived SIGKILL")
            except ProcessLookupError:
                pass
        self._log.close()
        return p.returncode


async def wait_ready_file(child: ChildProcess, path: Path, timeout: float) -> list[str]:
    """Lines of the ready file once it is complete (ends with a newline), bounded."""
    with trio.move_on_after(timeout):
        while True:
            if child.proc.poll() is not None:
                raise BenchError(
                    f"{child.name} exited with {child.proc.returncode} before it was ready:\n"
                    f"{child.tail()}"
                )
            try:
                text = path.read_text()
            except FileNotFoundError:
                text = ""
            if text.endswith("\n"):
                return [line for line in text.splitlines() if line.strip()]
            await trio.sleep(0.05)
    raise BenchError(f"{child.name} not ready within {timeout:g} s:\n{child.tail()}")


def colonyd_argv(stats_file: Path | None = None, cprofile: Path | None = None) -> list[str]:
    """How to run colonyd: plain, or under simulations/node_probe.py (counters, cProfile)."""
    if stats_file is None and cprofile is None:
        return [PYTHON, "-m", "cli.daemon"]
    argv = [PYTHON, str(Path(__file__).resolve().parent / "node_probe.py")]
    if stats_file is not None:
        argv += ["--stats-file", str(stats_file)]
    if cprofile is not None:
        argv += ["--cprofile", str(cprofile)]
    return argv + ["--"]


async def read_probe_stats(stats_file: Path) -> dict[str, Any]:
    """A node_probe's counters now: it writes them when the trigger file appears."""
    trigger = Path(str(stats_file) + ".dump")
    trigger.write_text("")
    with trio.move_on_after(5):
        while trigger.exists():
            await trio.sleep(0.01)
        return json.loads(stats_file.read_text())
    raise BenchError("the node probe did not write its counters")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a cluster member keeps it across restarts)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NodeProcess:
    """`colonyd` in its own OS process, on 127.0.0.1, with a fresh data dir.

        async with NodeProcess(server_key_hex) as node:
            node.addr, node.pid, node.cpu_seconds()
    """

    def __init__(
        self,
        server_prvkey: str,
        log_level: str = "warning",
        probe: bool = False,
        cprofile: Path | None = None,
    ) -> None:
        self.server_prvkey = server_prvkey
        self.log_level = log_level
        # probe: run simulations/node_probe.py (colonyd plus batching counters) instead.
        self.probe = probe or cprofile is not None
        self.cprofile = cprofile
        self.stats_file: Path | None = None
        self.addr = ""
        self.child: ChildProcess | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    def cpu_seconds(self) -> float:
        assert self.child is not None
        return self.child.cpu_seconds()

    async def __aenter__(self) -> NodeProcess:
        self._tmp = tempfile.TemporaryDirectory(prefix="colonies-bench-")
        workdir = Path(self._tmp.name)
        ready = workdir / "ready"
        env = dict(os.environ)
        env["COLONIES_SERVER_PRVKEY"] = self.server_prvkey
        if self.probe:
            self.stats_file = workdir / "probe.json"
        argv = colonyd_argv(self.stats_file, self.cprofile)
        argv += [
            "--data-dir", str(workdir / "data"),
            "--ready-file", str(ready),
            "--listen", "/ip4/127.0.0.1/tcp/0",
            "--log-level", self.log_level,
        ]
        try:
            self.child = ChildProcess("colonyd", argv, workdir, env)
            addrs = await wait_ready_file(self.child, ready, NODE_START_TIMEOUT_S)
        except BaseException:
            self._cleanup()
            raise
        if not addrs:
            self._cleanup()
            raise BenchError("colonyd wrote an empty ready file")
        self.addr = addrs[0]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._cleanup()

    @property
    def addrs(self) -> list[str]:
        return [self.addr]

    @property
    def pids(self) -> list[int]:
        return [self.pid]

    async def probe_stats(self) -> dict[str, Any]:
        """The node_probe counters now (probe=True only)."""
        assert self.stats_file is not None
        return await read_probe_stats(self.stats_file)

    def _cleanup(self) -> None:
        if self.child is not None:
            code = self.child.stop()
            if code not in (0, None, -signal.SIGTERM):
                progress(f"colonyd exited with {code}:\n{self.child.tail()}")
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


CLUSTER_INFO_TIMEOUT_S = 2.0


class ClusterMember:
    """One colonyd of a ClusterProcess. Its port and data dir are fixed, so a restart keeps its
    address and peer id; each start gets its own ChildProcess (and stderr file)."""

    def __init__(
        self, name: str, workdir: Path, env: dict[str, str], log_level: str,
        probe: bool, cprofile: Path | None,
    ) -> None:
        self.name = name
        self.workdir = workdir
        self.env = env
        self.log_level = log_level
        self.listen = f"/ip4/127.0.0.1/tcp/{free_port()}"
        self.data_dir = workdir / f"{name}-data"
        self.ready = workdir / f"{name}.ready"
        self.stats_file = workdir / f"{name}-probe.json" if probe or cprofile else None
        self.cprofile = cprofile
        self.child: ChildProcess | None = None
        self.addr = ""
        self.starts = 0
        self.extra_args: list[str] = []  # more colonyd options (chaos: --fault-file)

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    @property
    def peer_id(self) -> str:
        return self.addr.rsplit("/p2p/", 1)[-1]

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.proc.poll() is None

    def cpu_seconds(self) -> float:
        return self.child.cpu_seconds() if self.running and self.child else 0.0

    def start(self, join: str | None = None) -> None:
        self.starts += 1
        self.ready.unlink(missing_ok=True)
        argv = colonyd_argv(self.stats_file, self.cprofile) + [
            "--data-dir", str(self.data_dir),
            "--ready-file", str(self.ready),
            "--listen", self.listen,
            "--log-level", self.log_level,
        ]
        argv += self.extra_args
        if join:
            argv += ["--join", join]
        suffix = "" if self.starts == 1 else f"-start{self.starts}"
        self.child = ChildProcess(f"colonyd-{self.name}{suffix}", argv, self.workdir, self.env)

    async def wait_ready(self, timeout: float = NODE_START_TIMEOUT_S) -> None:
        assert self.child is not None
        addrs = await wait_ready_file(self.child, self.ready, timeout)
        if not addrs:
            raise BenchError(f"{self.name} wrote an empty ready file")
        self.addr = addrs[0]

    def kill(self) -> None:
        """SIGKILL, reaped."""
        assert self.child is not None
        self.child.proc.kill()
        self.child.proc.wait(5)
        self.child.stop()  # closes its log

    def stop(self) -> int | None:
        return self.child.stop() if self.child is not None else None

    async def probe_stats(self) -> dict[str, Any]:
        assert self.stats_file is not None
        return await read_probe_stats(self.stats_file)


class ClusterProcess:
    """`n` colonyd processes on 127.0.0.1 forming one Raft group: the first bootstraps, the
    others start with --join (and the server key, so they ask to be added themselves).

        async with ClusterProcess(server_key_hex, 3) as cluster:
            cluster.addrs, cluster.pids, cluster.cpu_seconds()
            leader = await cluster.leader(); leader.kill(); leader.start()

    Same interface as NodeProcess where the benchmarks need it (addrs, pids, cpu_seconds,
    probe, probe_stats), plus kill/restart of members and the leader as the nodes see it.
    """

    def __init__(
        self,
        server_prvkey: str,
        n: int = 3,
        log_level: str = "warning",
        probe: bool = False,
        cprofile_dir: Path | None = None,
        cprofile_prefix: str = "",
        workdir: Path | None = None,
        member_args: Callable[[ClusterMember], list[str]] | None = None,
        prepare_first: Callable[[ClusterMember], Awaitable[None]] | None = None,
    ) -> None:
        # workdir: keep the members' data and logs there (default: a temporary directory);
        # member_args: more colonyd options per member (chaos runs add --fault-file);
        # prepare_first: runs once the first member is ready, before the others join (it may
        # stop the member, fill its data dir and start it again).
        self.workdir = workdir
        self.member_args = member_args
        self.prepare_first = prepare_first
        self.server_prvkey = server_prvkey
        self.n = n
        self.log_level = log_level
        self.probe = probe or cprofile_dir is not None
        self.cprofile_dir = cprofile_dir
        self.cprofile_prefix = cprofile_prefix
        self.members: list[ClusterMember] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def addrs(self) -> list[str]:
        return [m.addr for m in self.members]

    @property
    def pids(self) -> list[int]:
        return [m.pid for m in self.members if m.running]

    def cpu_seconds(self) -> float:
        """CPU of the running members (a killed member's CPU is gone with it)."""
        return sum(m.cpu_seconds() for m in self.members)

    def cpu_each(self) -> list[float]:
        return [m.cpu_seconds() for m in self.members]

    async def probe_stats(self) -> dict[str, Any]:
        return {m.name: await m.probe_stats() for m in self.members}

    async def __aenter__(self) -> ClusterProcess:
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="colonies-bench-cluster-")
            workdir = Path(self._tmp.name)
        else:
            workdir = self.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["COLONIES_SERVER_PRVKEY"] = self.server_prvkey
        for i in range(self.n):
            name = f"n{i + 1}"
            cprofile = (self.cprofile_dir / f"{self.cprofile_prefix}{name}.pstats"
                        if self.cprofile_dir else None)
            member = ClusterMember(name, workdir, env, self.log_level, self.probe, cprofile)
            if self.member_args is not None:
                member.extra_args = self.member_args(member)
            self.members.append(member)
        try:
            first, *others = self.members
            first.start()
            await first.wait_ready()
            if self.prepare_first is not None:
                await self.prepare_first(first)
                if not first.running:
                    first.start()
                await first.wait_ready()
            for m in others:
                m.start(join=first.addr)
            for m in others:
                await m.wait_ready()
            await self.leader()  # every member agrees on one
        except BaseException:
            self._cleanup()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        for m in self.members:  # SIGTERM all first: each drains for up to a few seconds
            if m.running and m.child is not None:
                m.child.proc.send_signal(signal.SIGTERM)
        for m in self.members:
            code = m.stop()
            if code not in (0, None, -signal.SIGTERM, -signal.SIGKILL) and m.child is not None:
                progress(f"{m.name} exited with {code}:\n{m.child.tail()}")
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    async def info(self, member: ClusterMember) -> dict[str, Any] | None:
        """The member's own server info, or None if it does not answer quickly."""
        from node.client import Client  # the bench's clients; benchkit stays import-light
        from protocol.errors import ColoniesError
        from protocol.identity import PrivateKey

        with trio.move_on_after(CLUSTER_INFO_TIMEOUT_S):
            try:
                async with Client.connect(member.addr, PrivateKey.from_hex(self.server_prvkey),
                                          timeout=CLUSTER_INFO_TIMEOUT_S) as c:
                    if c.addr == member.addr:
                        return await c.server_info_fresh()
            except (ColoniesError, OSError):
                pass
        return None

    async def leader(self, timeout: float = 30.0) -> ClusterMember:
        """The member every running member names as leader, and which says it leads."""
        with trio.move_on_after(timeout):
            while True:
                running = [m for m in self.members if m.running]
                infos = [await self.info(m) for m in running]
                named = {i["raft"]["leader"] for i in infos if i is not None}
                if None not in infos and len(named) == 1 and None not in named:
                    pid = named.pop()
                    leader = next((m for m in running if m.peer_id == pid), None)
                    info = infos[running.index(leader)] if leader else None
                    if info is not None and info["raft"]["state"] == "leader":
                        return leader
                await trio.sleep(0.05)
        raise BenchError(f"the cluster agreed on no leader within {timeout:g} s")

    async def wait_caught_up(self, member: ClusterMember, timeout: float = 30.0) -> None:
        """`member` has applied everything the leader had committed when asked."""
        leader = await self.leader(timeout)
        info = await self.info(leader)
        target = info["raft"]["commit_index"] if info else 0
        with trio.move_on_after(timeout):
            while True:
                mine = await self.info(member)
                if mine is not None and mine["raft"]["last_applied"] >= target:
                    return
                await trio.sleep(0.05)
        raise BenchError(f"{member.name} did not catch up to index {target} within {timeout:g} s")


class PySpy:
    """`py-spy record` of a running process (collapsed stacks), for --py-spy DIR.

    py-spy is not a project dependency: `.venv/bin/pip install py-spy`. It writes its output
    when it gets SIGINT, so stop() sends that first.

    Only samples that hold the GIL count (--gil). With the nodes and clients sharing two cores,
    a process is often preempted inside a syscall that released the GIL (a loopback send wakes
    its reader); without --gil those samples made socket sends look like 15% of a node's CPU,
    where /proc says system time is about 7% in all.
    """

    def __init__(self, pid: int, out: Path, workdir: Path, rate: int = 250) -> None:
        exe = Path(PYTHON).parent / "py-spy"
        if not exe.exists():
            raise BenchError(f"--py-spy needs py-spy: {Path(PYTHON).parent}/pip install py-spy")
        self.out = out
        self.child = ChildProcess(
            f"py-spy-{pid}",
            [str(exe), "record", "--pid", str(pid), "--rate", str(rate),
             "--format", "raw", "--gil", "--output", str(out)],
            workdir,
            dict(os.environ),
        )

    def stop(self) -> None:
        p = self.child.proc
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                pass
        self.child.stop()
        progress(f"py-spy profile: {self.out}")
