"""Generator and cron records, and the registry that holds each kind in the colony state.

A generator collects packed arguments and turns every `trigger` of them into one workflow
run; a cron starts a workflow run on a schedule. Both are replicated state: a generator's
queued arguments are part of its record (and of snapshots), so they survive restarts and
failover. The rules are in generators.py and crons.py; the time-driven steps are timers
(consensus/timers.py) keyed by `timer_key`.

All times are int unix nanoseconds; 0 means unset. Workflow specs are stored normalized
(one dict per function spec, its colony filled in), as the workflow submit stores them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import msgpack

GENERATOR_TIMER = "generator"
CRON_TIMER = "cron"


def arg_size(arg: Any) -> int:  # noqa: ANN401 - any msgpack value
    """A packed argument's encoded size, what the queue bound counts."""
    return len(msgpack.packb(arg))


@dataclass(slots=True)
class Generator:
    generatorid: str
    colonyname: str
    name: str
    initiatorid: str
    initiatorname: str
    functionspecs: list[dict[str, Any]]
    trigger: int  # arguments per workflow run
    timeout: int  # seconds a partial batch may wait for more arguments; <= 0: no timeout
    created: int
    lastrun: int = 0
    runs: int = 0  # workflow runs so far: the next run's id derives from it
    # The queued arguments and when each was packed (parallel lists, oldest first).
    args: list[Any] = field(default_factory=list)
    packtimes: list[int] = field(default_factory=list)
    # The queue's encoded size (derived: rebuilt on restore, not in snapshots).
    queuebytes: int = 0

    @property
    def key(self) -> str:
        return self.generatorid

    @property
    def timer_key(self) -> str:
        return f"{GENERATOR_TIMER}:{self.generatorid}"

    def to_wire(self) -> dict[str, Any]:
        return {
            "generatorid": self.generatorid,
            "initiatorid": self.initiatorid,
            "initiatorname": self.initiatorname,
            "colonyname": self.colonyname,
            "name": self.name,
            "workflowspec": {"colonyname": self.colonyname, "functionspecs": self.functionspecs},
            "trigger": self.trigger,
            "timeout": self.timeout,
            "created": self.created,
            # As Colonies: when the oldest waiting argument was packed (0: none waits).
            "firstpack": self.packtimes[0] if self.packtimes else 0,
            "lastrun": self.lastrun,
            "queuesize": len(self.args),
            "runs": self.runs,
        }

    def to_snapshot(self) -> dict[str, Any]:
        d = self.to_wire()
        d["args"] = list(self.args)
        d["packtimes"] = list(self.packtimes)
        return d

    @classmethod
    def from_snapshot(cls, d: dict[str, Any]) -> Generator:
        return cls(
            generatorid=d["generatorid"],
            colonyname=d["colonyname"],
            name=d["name"],
            initiatorid=d["initiatorid"],
            initiatorname=d["initiatorname"],
            functionspecs=list(d["workflowspec"]["functionspecs"]),
            trigger=d["trigger"],
            timeout=d["timeout"],
            created=d["created"],
            lastrun=d["lastrun"],
            runs=d["runs"],
            args=list(d["args"]),
            packtimes=list(d["packtimes"]),
            queuebytes=sum(arg_size(a) for a in d["args"]),
        )


@dataclass(slots=True)
class Cron:
    cronid: str
    colonyname: str
    name: str
    initiatorid: str
    initiatorname: str
    functionspecs: list[dict[str, Any]]
    cronexpression: str  # "" when the cron runs on an interval
    interval: int  # seconds between runs; -1 when the cron runs on its expression
    waitforprevprocessgraph: bool
    created: int
    nextrun: int = 0  # 0: no next run (an expression with no future match)
    lastrun: int = 0
    runs: int = 0  # runs started so far: the next run's id derives from it
    skipped: int = 0  # scheduled runs skipped because the previous run had not finished
    prevprocessgraphid: str = ""

    @property
    def key(self) -> str:
        return self.cronid

    @property
    def timer_key(self) -> str:
        return f"{CRON_TIMER}:{self.cronid}"

    def to_wire(self) -> dict[str, Any]:
        return {
            "cronid": self.cronid,
            "initiatorid": self.initiatorid,
            "initiatorname": self.initiatorname,
            "colonyname": self.colonyname,
            "name": self.name,
            "cronexpression": self.cronexpression,
            "interval": self.interval,
            "random": False,
            "waitforprevprocessgraph": self.waitforprevprocessgraph,
            "workflowspec": {"colonyname": self.colonyname, "functionspecs": self.functionspecs},
            "created": self.created,
            "nextrun": self.nextrun,
            "lastrun": self.lastrun,
            "runs": self.runs,
            "skipped": self.skipped,
            "prevprocessgraphid": self.prevprocessgraphid,
        }

    def to_snapshot(self) -> dict[str, Any]:
        return self.to_wire()

    @classmethod
    def from_snapshot(cls, d: dict[str, Any]) -> Cron:
        return cls(
            cronid=d["cronid"],
            colonyname=d["colonyname"],
            name=d["name"],
            initiatorid=d["initiatorid"],
            initiatorname=d["initiatorname"],
            functionspecs=list(d["workflowspec"]["functionspecs"]),
            cronexpression=d["cronexpression"],
            interval=d["interval"],
            waitforprevprocessgraph=d["waitforprevprocessgraph"],
            created=d["created"],
            nextrun=d["nextrun"],
            lastrun=d["lastrun"],
            runs=d["runs"],
            skipped=d["skipped"],
            prevprocessgraphid=d["prevprocessgraphid"],
        )


class _Named(Protocol):
    @property
    def key(self) -> str: ...
    @property
    def timer_key(self) -> str: ...
    colonyname: str
    name: str

    def to_snapshot(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=_Named)


class Registry(Generic[R]):
    """Records of one kind by id, with their names unique per colony. Listings go by name,
    so every replica lists (and snapshots) them in the same order."""

    def __init__(self) -> None:
        self.by_id: dict[str, R] = {}
        self._names: dict[str, dict[str, str]] = {}  # colony -> name -> id

    def __len__(self) -> int:
        return len(self.by_id)

    def get(self, key: str) -> R | None:
        return self.by_id.get(key)

    def named(self, colonyname: str, name: str) -> R | None:
        key = self._names.get(colonyname, {}).get(name)
        return None if key is None else self.by_id[key]

    def count(self, colonyname: str) -> int:
        return len(self._names.get(colonyname, {}))

    def of_colony(self, colonyname: str) -> Iterator[R]:
        names = self._names.get(colonyname, {})
        for n in sorted(names):
            yield self.by_id[names[n]]

    def add(self, record: R) -> None:
        self.by_id[record.key] = record
        self._names.setdefault(record.colonyname, {})[record.name] = record.key

    def remove(self, record: R) -> None:
        del self.by_id[record.key]
        names = self._names[record.colonyname]
        del names[record.name]
        if not names:
            del self._names[record.colonyname]

    def remove_colony(self, colonyname: str, clear_timer: Callable[[str], None]) -> None:
        for record in list(self.of_colony(colonyname)):
            clear_timer(record.timer_key)
            self.remove(record)

    def to_snapshot(self) -> list[dict[str, Any]]:
        return [
            r.to_snapshot()
            for c in sorted(self._names)
            for r in self.of_colony(c)
        ]
