"""The chaos run's faults: a seeded schedule, and the injector that applies and heals them.

Kinds (the --faults mix names them, optionally weighted: "kill=2,pause,partition"):

  kill           SIGKILL a random node, restart it on the same address after the fault
  kill-leader    the same, on the node the cluster names as leader at that moment
  pause          SIGSTOP a random node, SIGCONT after the fault
  partition      split the nodes into a minority set (the largest one: one node of 3, two of
                 5) and the majority (each side's fault file blocks the other side's peer
                 ids: colonyd --fault-file, node/faults.py)
  slow           every node delays inbound Raft frames by 20-150 ms
  drop           every node drops 5-20 % of its outbound Raft messages
  kill-executor  SIGKILL a random executor process (often mid-process), restart it
  kill-install   SIGKILL a follower, keep it down while the others compact their journals
                 past it (chaos nodes run with a small --compact-after), restart it, and
                 SIGKILL it again, or the leader that sends, while it receives the snapshot
  restart-all    SIGKILL every node at once, restart them all after the fault

The schedule is drawn up front from the seed: what happens when, to which node index, for how
long. Node faults (kill, kill-leader, pause, partition) never overlap one another, so a
majority stays up and the run makes progress; network and executor faults overlap freely.
Only "which node is the leader" is decided when the fault fires.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

NODE_FAULTS = ("kill", "kill-leader", "pause", "partition", "kill-install", "restart-all")
# Node faults that take longer than their drawn length (a snapshot transfer, a whole cluster's
# start): the next node fault waits this much longer.
SETTLE_S = {"kill-install": 15.0, "restart-all": 10.0}
INSTALL_WAIT_S = 15.0
NET_FAULTS = ("slow", "drop")
EXECUTOR_FAULTS = ("kill-executor",)
FAULT_KINDS = NODE_FAULTS + NET_FAULTS + EXECUTOR_FAULTS
DEFAULT_MIX = ("kill=2,kill-leader=2,pause,partition=2,slow,drop,kill-executor=2,kill-install,"
               "restart-all=0.5")
RESTART_READY_S = 60.0


def parse_mix(text: str) -> dict[str, float]:
    """'kill=2,pause' -> {"kill": 2.0, "pause": 1.0}; ValueError with a clear message."""
    mix: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in FAULT_KINDS:
            raise ValueError(f"unknown fault {name!r}; known: {', '.join(FAULT_KINDS)}")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"fault weight for {name!r} must be a number, not {weight!r}") from None
        if not 0 <= w <= 1000:
            raise ValueError(f"fault weight for {name!r} must be in 0..1000")
        mix[name] = w
    if mix and sum(mix.values()) <= 0:
        raise ValueError("at least one fault needs a weight above 0")
    return mix


@dataclass(frozen=True)
class FaultEvent:
    at: float  # seconds after the fault phase started
    kind: str
    duration: float
    node: int = -1  # node index (resolved to the leader at fire time for kill-leader)
    executor: int = -1
    level: float = 0.0  # slow: delay in ms; drop: probability


def plan_schedule(
    rng: random.Random, duration: float, mix: dict[str, float], nodes: int, executors: int,
    gap: tuple[float, float] = (1.5, 4.0),
) -> list[FaultEvent]:
    """Fault events over `duration` seconds, every gap[0]..gap[1] seconds; each ends by
    `duration` (so the heal at the end finds nothing half applied)."""
    kinds = [k for k, w in mix.items() if w > 0 and (k not in EXECUTOR_FAULTS or executors)]
    if not kinds or duration <= 0:
        return []
    weights = [mix[k] for k in kinds]
    events: list[FaultEvent] = []
    node_free_at = 0.0
    t = rng.uniform(*gap)
    while t < duration - 2.0:
        kind = rng.choices(kinds, weights)[0]
        length = min(rng.uniform(2.0, 6.0), duration - t - 0.5)
        if kind in NODE_FAULTS:
            if t < node_free_at:  # one node fault at a time: take another kind or wait
                others = [k for k in kinds if k not in NODE_FAULTS]
                if not others:
                    t = node_free_at + 0.5
                    continue
                kind = rng.choices(others, [mix[k] for k in others])[0]
            else:  # and time to settle after the heal
                node_free_at = t + length + SETTLE_S.get(kind, 2.0)
        if kind == "kill-install":
            # level: 0 kills the installing follower, 1 the leader that sends it the snapshot
            events.append(FaultEvent(t, kind, length, node=rng.randrange(nodes),
                                     level=float(rng.randrange(2))))
        elif kind in NODE_FAULTS:
            events.append(FaultEvent(t, kind, length, node=rng.randrange(nodes)))
        elif kind == "slow":
            events.append(FaultEvent(t, kind, length, level=float(rng.randint(20, 150))))
        elif kind == "drop":
            events.append(FaultEvent(t, kind, length, level=round(rng.uniform(0.05, 0.2), 3)))
        else:
            events.append(FaultEvent(t, kind, min(length, 3.0), executor=rng.randrange(executors)))
        t += rng.uniform(*gap)
    return events


@dataclass
class NodePlan:
    """What one node's fault file says now."""

    block: set[str] = field(default_factory=set)
    delay_ms: int = 0
    drop: float = 0.0

    def to_json(self) -> str:
        return json.dumps({"block": sorted(self.block), "delay_ms": self.delay_ms,
                           "drop": self.drop})


def write_plan(path: Path, plan: NodePlan) -> None:
    """Atomically (a half-written file would be ignored by the node, but say it right)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(plan.to_json())
    os.replace(tmp, path)


class Injector:
    """Applies fault events to the run's nodes and executors, heals each after its duration,
    and heals everything at the end. `note(kind, text)` reports each step (the live view)."""

    def __init__(self, run: Any, note: Callable[[str, str], None]) -> None:  # noqa: ANN401
        self.run = run  # simulations.chaos.ChaosRun: cluster, executors, member, leader_name
        self.note = note
        self.plans = {m.name: NodePlan() for m in run.cluster.members}
        self.paused: set[str] = set()
        self.down: set[str] = set()
        self.counts: dict[str, int] = {}
        self.skipped = 0
        self.log: list[dict[str, Any]] = []

    def _record(self, kind: str, target: str, **extra: Any) -> None:  # noqa: ANN401
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.log.append({"t": time.monotonic(), "kind": kind, "target": target, **extra})

    def _write(self, name: str) -> None:
        write_plan(self.run.fault_path(name), self.plans[name])

    async def fire(self, ev: FaultEvent, nursery: trio.Nursery) -> None:
        members = self.run.cluster.members
        if ev.kind in NODE_FAULTS:
            node = members[ev.node]
            if ev.kind == "kill-leader":
                leader = self.run.leader_name()
                if leader is None:
                    self.skipped += 1
                    self.note("skip", "kill-leader: no leader known right now")
                    return
                node = self.run.member(leader)
            if ev.kind == "kill-install" and node.name == self.run.leader_name():
                node = next(m for m in members if m is not node)  # a follower
            if ev.kind == "restart-all" and (self.down or self.paused):
                self.skipped += 1
                self.note("skip", "restart-all: a node is already down")
                return
            if node.name in self.down or node.name in self.paused:
                self.skipped += 1
                self.note("skip", f"{ev.kind} {node.name}: it is already down")
                return
            await getattr(self, "_" + ev.kind.replace("-leader", "").replace("-", "_"))(
                node.name, ev, nursery
            )
        elif ev.kind in NET_FAULTS:
            for m in members:
                if ev.kind == "slow":
                    self.plans[m.name].delay_ms = int(ev.level)
                else:
                    self.plans[m.name].drop = ev.level
                self._write(m.name)
            what = f"{int(ev.level)} ms" if ev.kind == "slow" else f"{ev.level:.0%}"
            self._record(ev.kind, "all", level=ev.level, duration=ev.duration)
            self.note("fault", f"{ev.kind} messages on every node ({what}) for {ev.duration:.1f} s")
            nursery.start_soon(self._heal_net_later, ev)
        else:
            ex = self.run.executors[ev.executor % len(self.run.executors)]
            if not ex.running:
                self.skipped += 1
                return
            ex.kill()
            self._record(ev.kind, ex.name)
            self.note("fault", f"kill -9 executor {ex.name}")
            nursery.start_soon(self._restart_executor_later, ex, ev.duration)

    async def _kill(self, name: str, ev: FaultEvent, nursery: trio.Nursery) -> None:
        member = self.run.member(name)
        was_leader = self.run.leader_name() == name
        member.kill()
        self.down.add(name)
        kind = "kill-leader" if was_leader else "kill"
        self._record(kind, name, duration=ev.duration)
        self.note("fault", f"kill -9 {name}{' (the leader)' if was_leader else ''}; "
                           f"restart in {ev.duration:.1f} s")
        nursery.start_soon(self._restart_later, name, ev.duration)

    async def _pause(self, name: str, ev: FaultEvent, nursery: trio.Nursery) -> None:
        member = self.run.member(name)
        if member.child is None or not member.running:
            return
        member.child.proc.send_signal(signal.SIGSTOP)
        self.paused.add(name)
        self._record("pause", name, duration=ev.duration)
        self.note("fault", f"SIGSTOP {name} for {ev.duration:.1f} s")
        nursery.start_soon(self._resume_later, name, ev.duration)

    async def _partition(self, name: str, ev: FaultEvent, nursery: trio.Nursery) -> None:
        members = self.run.cluster.members
        first = next(i for i, m in enumerate(members) if m.name == name)
        size = max(1, (len(members) - 1) // 2)
        minority = [members[(first + i) % len(members)] for i in range(size)]
        majority = [m for m in members if m not in minority]
        for side, other in ((minority, majority), (majority, minority)):
            for m in side:
                self.plans[m.name].block |= {o.peer_id for o in other}
                self._write(m.name)
        names = ",".join(m.name for m in minority)
        self._record("partition", names, duration=ev.duration)
        self.note("fault", f"partition {names} | {','.join(m.name for m in majority)} "
                           f"for {ev.duration:.1f} s")
        nursery.start_soon(self._heal_partition_later, minority, ev.duration)

    async def _kill_install(self, name: str, ev: FaultEvent, nursery: trio.Nursery) -> None:
        member = self.run.member(name)
        member.kill()
        self.down.add(name)
        victim = "the leader that sends it" if ev.level else "it"
        self._record("kill-install", name, duration=ev.duration, victim=victim)
        self.note("fault", f"kill -9 {name}; restart in {ev.duration:.1f} s and kill {victim} "
                           "while it receives a snapshot")
        nursery.start_soon(self._interrupt_install, name, ev, nursery)

    async def _interrupt_install(self, name: str, ev: FaultEvent, nursery: trio.Nursery) -> None:
        await trio.sleep(ev.duration)
        member = self.run.member(name)
        install = member.data_dir / "install"
        member.start()
        deadline = time.monotonic() + INSTALL_WAIT_S
        while time.monotonic() < deadline and member.running:
            if install.is_dir() and any(install.iterdir()):
                break
            await trio.sleep(0.01)
        else:
            self.note("heal", f"{name} needed no snapshot (or got it at once): nothing to cut")
            await self._wait_back(name)
            return
        if ev.level:
            sender = self.run.leader_name()
            if sender is not None and sender != name and sender not in self.down:
                self.run.member(sender).kill()
                self.down.add(sender)
                self.note("fault", f"kill -9 {sender}, the leader, while {name} receives its "
                                   "snapshot; restart in 3 s")
                nursery.start_soon(self._restart_later, sender, 3.0)
            await self._wait_back(name)
            return
        member.kill()
        self.note("fault", f"kill -9 {name} while it receives a snapshot; restart in 1 s")
        await trio.sleep(1.0)
        await self.restart(name)

    async def _wait_back(self, name: str) -> None:
        try:
            await self.run.member(name).wait_ready(RESTART_READY_S)
            self.note("heal", f"{name} is ready again")
        except Exception as e:  # noqa: BLE001 - reported; the run's checks judge the outcome
            self.note("error", f"{name} did not come back ready: {e}"[:300])
        self.down.discard(name)

    async def _restart_all(self, name: str, ev: FaultEvent, nursery: trio.Nursery) -> None:
        names = [m.name for m in self.run.cluster.members]
        for m in self.run.cluster.members:
            m.kill()
            self.down.add(m.name)
        self._record("restart-all", ",".join(names), duration=ev.duration)
        self.note("fault", f"kill -9 every node; restart them all in {ev.duration:.1f} s")

        async def later() -> None:
            await trio.sleep(ev.duration)
            async with trio.open_nursery() as n:
                for each in names:
                    n.start_soon(self.restart, each)

        nursery.start_soon(later)

    # --- heals --------------------------------------------------------------------------------

    async def _restart_later(self, name: str, after: float) -> None:
        await trio.sleep(after)
        await self.restart(name)

    async def restart(self, name: str) -> None:
        if name not in self.down:
            return
        member = self.run.member(name)
        if not member.running:  # a kill-install may have started it already
            member.start()
            self.note("heal", f"restart {name}")
        self.down.discard(name)
        try:
            await member.wait_ready(RESTART_READY_S)
        except Exception as e:  # noqa: BLE001 - reported; the run's checks judge the outcome
            self.note("error", f"{name} did not come back ready: {e}"[:300])
            return
        self.note("heal", f"{name} is ready again")

    async def _resume_later(self, name: str, after: float) -> None:
        await trio.sleep(after)
        self.resume(name)

    def resume(self, name: str) -> None:
        if name not in self.paused:
            return
        member = self.run.member(name)
        if member.child is not None and member.running:
            member.child.proc.send_signal(signal.SIGCONT)
        self.paused.discard(name)
        self.note("heal", f"SIGCONT {name}")

    async def _heal_partition_later(self, minority: list[Any], after: float) -> None:
        await trio.sleep(after)
        for m in self.run.cluster.members:
            self.plans[m.name].block.clear()
            self._write(m.name)
        self.note("heal", f"partition of {','.join(m.name for m in minority)} healed")

    async def _heal_net_later(self, ev: FaultEvent) -> None:
        await trio.sleep(ev.duration)
        for m in self.run.cluster.members:
            if ev.kind == "slow" and self.plans[m.name].delay_ms == int(ev.level):
                self.plans[m.name].delay_ms = 0
            elif ev.kind == "drop" and self.plans[m.name].drop == ev.level:
                self.plans[m.name].drop = 0.0
            self._write(m.name)
        self.note("heal", f"{ev.kind} messages healed")

    async def _restart_executor_later(self, ex: Any, after: float) -> None:  # noqa: ANN401
        await trio.sleep(after)
        if not ex.running:
            ex.start()
            self.note("heal", f"restart executor {ex.name}")

    async def heal_all(self) -> None:
        """Every fault undone: processes continued, fault files cleared, the dead restarted."""
        for name in list(self.paused):
            self.resume(name)
        for name, plan in self.plans.items():
            plan.block.clear()
            plan.delay_ms, plan.drop = 0, 0.0
            self._write(name)
        for ex in self.run.executors:
            if not ex.running:
                ex.start()
        async with trio.open_nursery() as n:
            for name in list(self.down):
                n.start_soon(self.restart, name)
        self.note("heal", "everything healed")
