"""Retries with exponential backoff and jitter (spec field `backoff`).

A process whose spec has `backoff: {initial, multiplier, max, jitter}` (seconds, see
protocol/messages.py) and that goes back to the queue with a retry counted (an exec timeout,
or a failed close with retries left: process_ops.retry_after_failure) is not assignable at
once: it stays WAITING with `backoffuntil` set, out of the assign queue (state._index), until
its timer "backoff:<processid>" fires. The delay before retry r (r = retries before this one,
0 for the first) is

    d = min(max, initial * multiplier**r),   delay = d - d * jitter * u,   u in [0, 1)

so with the default jitter 0.5 the delay lies in (d/2, d]. `u` comes from sha3-256 of the
process id and the attempt that failed, so every replica computes the same delay, and two
processes that failed together do not come back together. All arithmetic is on integers
(nanoseconds, and the multiplier and jitter in thousandths), so it cannot differ between
platforms the way float pow may.
"""

from __future__ import annotations

import hashlib
from typing import Any

from consensus import timers
from consensus.records import MAX_TIME_NS, NS_PER_S, Process
from consensus.state import ColonyState
from protocol.messages import WAITING

KIND = "backoff"
MILLI = 1000


def timer_key(processid: str) -> str:
    return f"{KIND}:{processid}"


def _milli(v: float) -> int:
    # One float operation, exact in IEEE double on every platform, then integers only.
    return int(round(v * MILLI))


def _ns(seconds: float) -> int:
    return int(round(seconds * NS_PER_S))


def jitter_fraction(processid: str, attempt: int) -> int:
    """u as a 32-bit integer (u = value / 2**32), the same on every replica."""
    digest = hashlib.sha3_256(f"{processid}/{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def capped_delay_ns(backoff: dict[str, Any], retry: int) -> int:
    """min(max, initial * multiplier**retry) in ns, without jitter."""
    initial, cap = _ns(backoff["initial"]), _ns(backoff["max"])
    mult = _milli(backoff["multiplier"])
    d = min(initial, cap)
    if mult <= MILLI:
        return d
    # Each step grows d by at least 0.1 %, so from >= 1 ms to <= 7 days this loop ends in
    # fewer than 21 000 steps, and usually in a handful.
    for _ in range(retry):
        if d >= cap:
            break
        d = d * mult // MILLI
    return min(d, cap)


def delay_ns(backoff: dict[str, Any], processid: str, attempt: int, retry: int) -> int:
    d = capped_delay_ns(backoff, retry)
    jitter = _milli(backoff["jitter"])
    u = jitter_fraction(processid, attempt)
    return max(1, d - d * jitter * u // (MILLI << 32))


def backoff_until(p: Process, now: int) -> int:
    """When `p`, requeued now with a retry counted, becomes assignable (0: at once)."""
    backoff = p.spec.get("backoff")
    if backoff is None:
        return 0
    return min(now + delay_ns(backoff, p.processid, p.attempt, p.retries), MAX_TIME_NS)


def end_backoff(st: ColonyState, key: str, now: int) -> list[str]:
    """The timer handler: the process goes into the assign queue. A process that was
    cancelled, failed or removed meanwhile is left alone."""
    pid = key[len(KIND) + 1 :]
    p = st.processes.get(pid)
    if p is None or p.state != WAITING or p.backoffuntil == 0:
        return []
    st.update(p, {"backoffuntil": 0}, now)
    return [pid]


timers.HANDLERS[KIND] = end_backoff
