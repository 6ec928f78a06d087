"""Fault injection for chaos runs: a JSON file, re-read about every 200 ms, that tells the Raft
transport which peers to cut off and how slow or lossy to be.

    {"block": ["16Uiu2...", ...], "delay_ms": 50, "drop": 0.05}

Only ``colonyd --fault-file PATH`` creates a FaultFile; without it the transport holds None
and no fault code path runs. A malformed file is ignored (the last good plan stays) with one
clear log line per distinct problem, so a half-written file never takes a node down. A missing
file means no faults.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

log = logging.getLogger("colonies.faults")

POLL_S = 0.2
MAX_DELAY_MS = 10_000
MAX_FILE_BYTES = 64 * 1024


class FaultFileError(ValueError):
    """The fault file does not describe a plan."""


@dataclass(frozen=True)
class FaultPlan:
    block: frozenset[str] = frozenset()  # peer ids whose Raft traffic is cut both ways
    delay_ms: int = 0  # added to every inbound Raft frame
    drop: float = 0.0  # probability that an outbound Raft message is lost


NO_FAULTS = FaultPlan()


def parse_plan(text: str) -> FaultPlan:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise FaultFileError(f"not JSON: {e}") from None
    if not isinstance(data, dict):
        raise FaultFileError("must be a JSON object")
    unknown = set(data) - {"block", "delay_ms", "drop"}
    if unknown:
        raise FaultFileError(f"unknown fields: {', '.join(sorted(unknown))}")
    block = data.get("block", [])
    if not isinstance(block, list) or not all(isinstance(p, str) and p for p in block):
        raise FaultFileError("'block' must be a list of peer ids")
    delay = data.get("delay_ms", 0)
    if type(delay) is not int or not 0 <= delay <= MAX_DELAY_MS:
        raise FaultFileError(f"'delay_ms' must be an int in 0..{MAX_DELAY_MS}")
    drop = data.get("drop", 0.0)
    if type(drop) not in (int, float) or not 0.0 <= drop <= 1.0:
        raise FaultFileError("'drop' must be a number in 0..1")
    return FaultPlan(frozenset(block), delay, float(drop))


class FaultFile:
    """The current plan from ``path``; ``run`` keeps it fresh and calls ``on_change``."""

    def __init__(self, path: Path, rng: random.Random | None = None) -> None:
        self.path = path
        self.plan = NO_FAULTS
        self._rng = rng or random.Random()
        self._last_error = ""
        self.listeners: list[Callable[[FaultPlan], None]] = []

    def blocks(self, peer: str) -> bool:
        return peer in self.plan.block

    def drops(self) -> bool:
        return self.plan.drop > 0 and self._rng.random() < self.plan.drop

    @property
    def delay_s(self) -> float:
        return self.plan.delay_ms / 1000

    def reload(self) -> FaultPlan:
        """Re-reads the file once; the plan in force afterwards."""
        try:
            raw = self.path.read_bytes()[:MAX_FILE_BYTES + 1]
            if len(raw) > MAX_FILE_BYTES:
                raise FaultFileError(f"larger than {MAX_FILE_BYTES} bytes")
            plan = parse_plan(raw.decode("utf-8", errors="replace"))
        except FileNotFoundError:
            plan = NO_FAULTS
        except (OSError, FaultFileError) as e:
            problem = f"{type(e).__name__}: {e}"
            if problem != self._last_error:
                log.error("fault file %s ignored (keeping the last plan): %s", self.path, problem)
                self._last_error = problem
            return self.plan
        self._last_error = ""
        if plan != self.plan:
            log.warning(
                "fault plan: block %s, delay %d ms, drop %.2f",
                sorted(plan.block) or "nobody", plan.delay_ms, plan.drop,
            )
            self.plan = plan
            for listener in list(self.listeners):
                try:
                    listener(plan)
                except Exception:
                    log.exception("fault plan listener raised (ignored)")
        return plan

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.reload()
        task_status.started()
        while True:
            await trio.sleep(POLL_S)
            self.reload()
