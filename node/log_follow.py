"""Following a process's log: a getlogsmsg with a `timeout` waits for its answer.

The read is answered as soon as the local replica holds a line after the caller's cursor, or
the process has finished (no line will come), or the timeout passes (an empty list). It waits
on the replicator's apply notifications, as a long-poll assign does, so a line reaches its
followers on every node when that node applies it, with no polling; between applies the
wait costs nothing.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import trio

from protocol.envelope import Request
from protocol.messages import FINISHED_STATES


class _Machine(Protocol):
    def read(self, msgtype: str, caller: str, body: dict, now: int) -> object: ...


class _Log(Protocol):
    @property
    def machine(self) -> _Machine: ...
    @property
    def applied_generation(self) -> int: ...
    async def wait_applied(self, seen: int, deadline: float) -> int: ...


async def follow_logs(log: _Log, req: Request) -> Any:
    """The lines `req` asks for, waiting up to its `timeout` seconds for the first one."""
    deadline = trio.current_time() + req.body["timeout"]
    ref = {"processid": req.body["processid"]}
    while True:
        # Read the generation before the state: an apply in between still wakes us.
        seen = log.applied_generation
        machine = log.machine  # a snapshot install replaces it: take it afresh each pass
        lines = machine.read("getlogsmsg", req.caller, req.body, time.time_ns())
        if lines or trio.current_time() >= deadline:
            return lines
        process: Any = machine.read("getprocessmsg", req.caller, ref, time.time_ns())
        if process["state"] in FINISHED_STATES:
            return lines
        await log.wait_applied(seen, deadline)
