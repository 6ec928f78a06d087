"""Shared pieces of the benchmarks: output lines, percentiles, CPU accounting, and a colonyd
started in its own OS process (so the node and the clients each get a core, as in reality).

Output discipline: result lines are JSON objects on stdout, one per line; progress and
diagnostics go to stderr.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
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
            argv = [PYTHON, str(Path(__file__).resolve().parent / "node_probe.py"),
                    "--stats-file", str(self.stats_file)]
            if self.cprofile is not None:
                argv += ["--cprofile", str(self.cprofile)]
            argv += ["--"]
        else:
            argv = [PYTHON, "-m", "cli.daemon"]
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

    async def probe_stats(self) -> dict[str, Any]:
        """The node_probe counters now (probe=True only)."""
        assert self.stats_file is not None
        trigger = Path(str(self.stats_file) + ".dump")
        trigger.write_text("")
        with trio.move_on_after(5):
            while trigger.exists():
                await trio.sleep(0.01)
            return json.loads(self.stats_file.read_text())
        raise BenchError("the node probe did not write its counters")

    def _cleanup(self) -> None:
        if self.child is not None:
            code = self.child.stop()
            if code not in (0, None, -signal.SIGTERM):
                progress(f"colonyd exited with {code}:\n{self.child.tail()}")
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class PySpy:
    """`py-spy record` of a running process (collapsed stacks), for --py-spy DIR.

    py-spy is not a project dependency: `.venv/bin/pip install py-spy`. It writes its output
    when it gets SIGINT, so stop() sends that first.
    """

    def __init__(self, pid: int, out: Path, workdir: Path, rate: int = 250) -> None:
        exe = Path(PYTHON).parent / "py-spy"
        if not exe.exists():
            raise BenchError(f"--py-spy needs py-spy: {Path(PYTHON).parent}/pip install py-spy")
        self.out = out
        self.child = ChildProcess(
            f"py-spy-{pid}",
            [str(exe), "record", "--pid", str(pid), "--rate", str(rate),
             "--format", "raw", "--output", str(out)],
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
