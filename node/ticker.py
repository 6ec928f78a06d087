"""The leader's ticker: turns the passing of time into log entries.

Exec and wait timeouts are decided by the state machine when it applies a `tick` command, at
the time the leader stamped on the entry, so every replica expires the same processes at the
same place in the log, and a timeout happens once even across a failover.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import trio

from protocol.errors import ColoniesError

log = logging.getLogger("colonies.ticker")

IDLE_CHECK_S = 1.0
# An apply may bring an earlier deadline, so applies wake the ticker; under load there are
# hundreds a second, so it looks again at most this often (a deadline it already knew of is
# never waited past).
APPLY_RECHECK_S = 0.05
RETRY_AFTER_ERROR_S = 0.2


class _Machine(Protocol):
    def next_deadline(self) -> int | None: ...


class _Replicator(Protocol):
    @property
    def machine(self) -> _Machine: ...
    @property
    def is_leader(self) -> bool: ...
    @property
    def applied_generation(self) -> int: ...
    async def submit(self, cmd: dict, timeout: float = ...) -> list: ...
    async def wait_applied(self, seen: int, deadline: float) -> int: ...


def seconds_until(deadline_ns: int | None, now_ns: int) -> float:
    if deadline_ns is None:
        return IDLE_CHECK_S
    return max(0.0, min(IDLE_CHECK_S, (deadline_ns - now_ns) / 1e9))


def log_expired(result: dict) -> None:
    for pid in result.get("requeued", []):
        log.info("process %s timed out; back to the queue", pid, extra={"processid": pid})
    for pid in result.get("failed", []):
        log.info("process %s failed by its timeout", pid, extra={"processid": pid})


async def run_timeouts(replicator: _Replicator) -> None:
    while True:
        seen = replicator.applied_generation
        if replicator.is_leader:
            due = replicator.machine.next_deadline()
            now = time.time_ns()
            if due is not None and due <= now:
                try:
                    status, value = await replicator.submit({"op": "tick"}, timeout=5)
                    if status != 200:
                        log.warning("tick refused: %s %s", status, value)
                        await trio.sleep(RETRY_AFTER_ERROR_S)
                    else:
                        log_expired(value)
                except ColoniesError as e:
                    log.warning("tick not committed: %s", e)
                    await trio.sleep(RETRY_AFTER_ERROR_S)
                continue
            wait = seconds_until(due, now)
        else:
            wait = IDLE_CHECK_S
        # An apply may bring an earlier deadline (a new assign), so wake on applies too.
        start = trio.current_time()
        await replicator.wait_applied(seen, start + wait)
        await trio.sleep_until(start + min(wait, APPLY_RECHECK_S))
