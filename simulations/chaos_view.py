"""What a chaos run shows while it runs: a rich live view on a terminal (nodes and their roles,
faults as they happen, processes by state, throughput), plain lines otherwise."""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import trio
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

STYLE = {"fault": "bold red", "heal": "green", "skip": "dim", "error": "bold magenta",
         "phase": "bold cyan", "info": ""}
PLAIN_STATUS_EVERY_S = 5.0


@dataclass
class NodeRow:
    name: str
    state: str = "starting"  # leader | follower | candidate | down | paused | no reply
    term: int = 0
    applied: int = 0
    faults: str = ""


@dataclass
class ViewState:
    started: float = field(default_factory=time.monotonic)
    phase: str = "starting"
    nodes: dict[str, NodeRow] = field(default_factory=dict)
    events: deque[tuple[float, str, str]] = field(default_factory=lambda: deque(maxlen=12))
    stats: dict[str, int] = field(default_factory=dict)
    executors: dict[str, str] = field(default_factory=dict)
    done_rate: float = 0.0  # finished processes per second, over the last poll
    submitted: int = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.started


class ChaosView:
    """`note` events and `update` state from the run; `run` draws until cancelled."""

    def __init__(self, live: bool | None = None) -> None:
        self.state = ViewState()
        self.live = sys.stdout.isatty() if live is None else live
        self.console = Console()
        self._last_plain = 0.0

    def note(self, kind: str, text: str) -> None:
        self.state.events.append((self.state.elapsed(), kind, text))
        if not self.live:
            print(f"[chaos {self.state.elapsed():6.1f}s] {kind:5} {text}", flush=True)

    def set_phase(self, phase: str) -> None:
        self.state.phase = phase
        self.note("phase", phase)

    def status_line(self) -> str:
        s = self.state
        roles = " ".join(f"{r.name}={r.state}" for r in s.nodes.values())
        st = s.stats
        return (f"{s.phase}: {roles} | submitted {s.submitted} waiting {st.get('waitingprocesses', 0)} "
                f"running {st.get('runningprocesses', 0)} ok {st.get('successfulprocesses', 0)} "
                f"failed {st.get('failedprocesses', 0)} | {s.done_rate:.1f} done/s")

    def render(self) -> Group:
        s = self.state
        nodes = Table(title=f"chaos · {s.phase} · {s.elapsed():.0f} s", expand=False)
        for col in ("node", "role", "term", "applied", "faults"):
            nodes.add_column(col)
        for r in s.nodes.values():
            style = {"leader": "bold green", "down": "red", "paused": "yellow"}.get(r.state, "")
            nodes.add_row(r.name, Text(r.state, style=style), str(r.term), str(r.applied),
                          r.faults)
        procs = Table(title="processes", expand=False)
        for col in ("submitted", "waiting", "running", "successful", "failed", "done/s"):
            procs.add_column(col, justify="right")
        st = s.stats
        procs.add_row(str(s.submitted), str(st.get("waitingprocesses", 0)),
                      str(st.get("runningprocesses", 0)), str(st.get("successfulprocesses", 0)),
                      str(st.get("failedprocesses", 0)), f"{s.done_rate:.1f}")
        execs = Text("executors: " + "  ".join(f"{k}={v}" for k, v in s.executors.items()))
        events = Table(title="faults and heals", expand=False, show_header=False)
        events.add_column("t", justify="right")
        events.add_column("what")
        for t, kind, text in s.events:
            events.add_row(f"{t:6.1f}s", Text(f"{kind:5} {text}", style=STYLE.get(kind, "")))
        return Group(nodes, procs, execs, events)

    async def run(self) -> None:
        if not self.live:
            while True:
                await trio.sleep(PLAIN_STATUS_EVERY_S)
                print(f"[chaos {self.state.elapsed():6.1f}s] stat  {self.status_line()}",
                      flush=True)
        with Live(self.render(), console=self.console, refresh_per_second=4,
                  transient=False) as live:
            while True:
                await trio.sleep(0.25)
                live.update(self.render())

    def update_node(self, name: str, **fields: Any) -> None:  # noqa: ANN401
        row = self.state.nodes.setdefault(name, NodeRow(name))
        for k, v in fields.items():
            setattr(row, k, v)
