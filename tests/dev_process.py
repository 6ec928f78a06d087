"""`colonies dev` (one node or a cluster) in a subprocess, and the real CLI against it: the
pieces the CLI end-to-end tests share. Output is read by threads, so every wait is bounded."""

from __future__ import annotations

import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CALL_TIMEOUT_S = 30


def base_env(home: Path) -> dict[str, str]:
    """The test's environment without the caller's COLONIES_* settings or ~/.colonies."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLONIES_")}
    env["HOME"] = str(home)
    env["PYTHONPATH"] = str(ROOT)
    return env


class DevProcess:
    """`python -m cli.main dev --dir STATE_DIR *args`."""

    def __init__(
        self,
        state_dir: Path,
        env: dict[str, str],
        args: list[str],
        *,
        ready_timeout: float,
        stop_timeout: float,
    ) -> None:
        self.ready_timeout, self.stop_timeout = ready_timeout, stop_timeout
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "dev", "--dir", str(state_dir), *args],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.threads = [
            threading.Thread(target=self._pump, daemon=True),
            threading.Thread(target=self._collect, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout.append(line)
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _collect(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def err(self) -> str:
        return "".join(self.stderr)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"colonies dev not ready in {self.ready_timeout} s: {self.err()}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(f"colonies dev exited early: {self.err()}")
            if line == "ready":
                return

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=self.stop_timeout)

    def kill(self) -> None:
        """Stop it if still running, and close its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for t in self.threads:
            t.join(timeout=5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            k, _, v = line[len("export "):].partition("=")
            out[k] = shlex.split(v)[0]
    return out


def colonies(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *argv],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=CALL_TIMEOUT_S,
    )
