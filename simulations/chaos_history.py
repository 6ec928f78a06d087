"""The chaos run's client side: the load it submits, the observations it makes, the history it
records (in simulations/checker.py's format), and the final state it collects at the end.

Every operation is written with t0/t1 = time.monotonic() at invocation and completion, and
``ok`` = a success reply came. A failed or timed-out write is recorded with ok=false and its
error: it may or may not have been applied, so the checker promises nothing about it.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, TextIO

import trio

from node.client import Client
from protocol.errors import ColoniesError, RequestTimeout, Unavailable
from protocol.identity import PrivateKey
from protocol.messages import FINISHED_STATES

CALL_TIMEOUT_S = 5.0
OPEN_TIMEOUT_S = 3.0
# What final.json keeps of each process (what the checker reads, and enough to debug).
FINAL_FIELDS = ("processid", "state", "attempt", "retries", "parents", "errors",
                "submissiontime", "starttime", "endtime", "processgraphid", "assignedexecutorid")
SPEC_FIELDS = ("funcname", "maxexectime", "maxretries", "maxwaittime", "args")


class HistoryLog:
    """The run's own operations (executors write theirs to their own files)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: TextIO = path.open("a", encoding="utf-8")
        self.counts: dict[str, int] = {}

    def write(self, op: dict[str, Any]) -> None:
        key = f"{op['op']}-{'ok' if op.get('ok') else 'failed'}"
        self.counts[key] = self.counts.get(key, 0) + 1
        self._f.write(json.dumps(op, separators=(",", ":")) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def merge_histories(parts: list[Path], out: Path) -> list[dict[str, Any]]:
    """All parts in one file, ordered by invocation time; only checker operations kept
    (executors also note their own restarts, counted apart)."""
    ops: list[dict[str, Any]] = []
    for part in parts:
        if not part.exists():
            continue
        for line in part.read_text(encoding="utf-8").splitlines():
            try:
                ops.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a SIGKILL
    ops.sort(key=lambda o: o.get("t0", 0.0))
    kept = [o for o in ops if o.get("op") in ("submit", "assign", "close", "observe")]
    with out.open("w", encoding="utf-8") as f:
        for op in kept:
            f.write(json.dumps(op, separators=(",", ":")) + "\n")
    return ops


class Session:
    """A client of the cluster that moves to the next node when a call fails or times out
    (the SDK moves only when a connection breaks, and a paused node never breaks it)."""

    def __init__(self, nursery: trio.Nursery, addrs: list[str], key: PrivateKey,
                 consistent: bool = False) -> None:
        self.nursery = nursery
        self.addrs = addrs
        self.key = key
        self.consistent = consistent
        self.client: Client | None = None
        self._start = 0

    async def get(self) -> Client:
        if self.client is None:
            order = self.addrs[self._start:] + self.addrs[:self._start]
            with trio.fail_after(OPEN_TIMEOUT_S * len(order) + 1):
                self.client = await Client.open(self.nursery, order, self.key, OPEN_TIMEOUT_S)
            self.client.timeout = CALL_TIMEOUT_S
            self.client.consistent_reads = self.consistent
        return self.client

    async def failed(self) -> None:
        """Drop the connection; the next call opens one to the next node."""
        self._start = (self._start + 1) % len(self.addrs)
        client, self.client = self.client, None
        if client is not None:
            with trio.move_on_after(1):
                await client.aclose()

    async def call(self, fn: Any) -> Any:  # noqa: ANN401 - fn(client) -> awaitable
        """One call, bounded; on a timeout or unavailability the session moves on and the
        error goes to the caller."""
        try:
            with trio.fail_after(CALL_TIMEOUT_S + OPEN_TIMEOUT_S * len(self.addrs) + 2):
                return await fn(await self.get())
        except trio.TooSlowError:
            await self.failed()
            raise RequestTimeout("no reply in time") from None
        except (Unavailable, RequestTimeout):
            await self.failed()
            raise

    async def aclose(self) -> None:
        if self.client is not None:
            with trio.move_on_after(1):
                await self.client.aclose()
            self.client = None


def _error(e: BaseException) -> str:
    if isinstance(e, ColoniesError):
        return f"{e.status} {e.message}"[:300]
    return f"{type(e).__name__}: {e}"[:300]


class Load:
    """Submits processes and workflows at a steady pace and observes acknowledged ones."""

    def __init__(self, history: HistoryLog, rng: random.Random, colony: str, executortype: str,
                 rate: float, workflow_share: float = 0.2) -> None:
        self.history = history
        self.rng = rng
        self.colony = colony
        self.executortype = executortype
        self.rate = rate
        self.workflow_share = workflow_share
        self.acked: list[str] = []  # acknowledged process ids, in order
        self.tag = 0

    def _spec(self, nodename: str = "", deps: list[str] | None = None) -> dict[str, Any]:
        self.tag += 1
        rng = self.rng
        spec: dict[str, Any] = {
            "funcname": "work",
            "args": [round(rng.uniform(0.02, 0.4), 3), 3, self.tag],
            "maxexectime": 3,
            "maxretries": rng.choice([2, 5, 5, 10]),
            "maxwaittime": rng.choice([-1, -1, -1, 30]),
            "conditions": {"colonyname": self.colony, "executortype": self.executortype,
                           "dependencies": deps or []},
        }
        if nodename:
            spec["nodename"] = nodename
        return spec

    async def submit_one(self, session: Session) -> None:
        workflow = self.rng.random() < self.workflow_share
        t0 = time.monotonic()
        try:
            if workflow:
                specs = [self._spec("a"), self._spec("b", ["a"]), self._spec("c", ["a"]),
                         self._spec("d", ["b", "c"])]
                graph = await session.call(lambda c: c.submit_workflow(self.colony, specs))
                pids = list(graph["processids"])
            else:
                spec = self._spec()
                p = await session.call(lambda c: c.submit_spec(spec))
                pids = [p["processid"]]
        except (ColoniesError, OSError) as e:
            self.history.write({"op": "submit", "pid": None, "t0": t0, "t1": time.monotonic(),
                                "ok": False, "workflow": workflow, "error": _error(e)})
            return
        t1 = time.monotonic()
        for pid in pids:
            self.history.write({"op": "submit", "pid": pid, "t0": t0, "t1": t1, "ok": True,
                                "workflow": workflow})
        self.acked.extend(pids)

    async def submitter(self, session: Session, until: float) -> None:
        interval = 1.0 / self.rate
        nxt = time.monotonic()
        while time.monotonic() < until:
            await self.submit_one(session)
            nxt = max(nxt + interval, time.monotonic() - 1.0)
            await trio.sleep(max(0.0, nxt - time.monotonic()))

    async def observer(self, session: Session, until: float, every: float = 0.25) -> None:
        """Consistent reads of random acknowledged processes: linearizable observations."""
        while time.monotonic() < until:
            await trio.sleep(every)
            if not self.acked:
                continue
            pid = self.rng.choice(self.acked[-200:])
            t0 = time.monotonic()
            try:
                p = await session.call(lambda c, pid=pid: c.process(pid))
            except (ColoniesError, OSError) as e:
                self.history.write({"op": "observe", "pid": pid, "t0": t0,
                                    "t1": time.monotonic(), "ok": False, "error": _error(e)})
                continue
            self.history.write({"op": "observe", "pid": pid, "t0": t0, "t1": time.monotonic(),
                                "ok": True, "state": p["state"], "attempt": p["attempt"]})


def final_record(p: dict[str, Any]) -> dict[str, Any]:
    rec = {k: p.get(k) for k in FINAL_FIELDS}
    rec["spec"] = {k: p["spec"].get(k) for k in SPEC_FIELDS}
    return rec


async def read_processes(session: Session, pids: list[str], limit: int = 8
                         ) -> dict[str, dict[str, Any]]:
    """Each process by a consistent read (several at a time, each retried a few times)."""
    out: dict[str, dict[str, Any]] = {}
    sem = trio.Semaphore(limit)

    async def one(pid: str) -> None:
        async with sem:
            for _ in range(10):  # bounded: a node that stays unreachable is the finding
                try:
                    out[pid] = final_record(await session.call(lambda c: c.process(pid)))
                    return
                except (Unavailable, RequestTimeout):
                    await trio.sleep(0.5)
                except ColoniesError:
                    return  # e.g. 404: the process is gone, which the checker reports

    async with trio.open_nursery() as n:
        for pid in dict.fromkeys(pids):
            n.start_soon(one, pid)
    return out


async def unfinished(session: Session, pids: list[str]) -> list[str]:
    """Which of these processes are not in a final state yet (by consistent reads)."""
    seen = await read_processes(session, pids)
    return [pid for pid in pids if seen.get(pid, {}).get("state") not in FINISHED_STATES]
