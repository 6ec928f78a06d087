"""The stall meter: how long this node's event loop went without running its tasks.

Everything a node does runs on one trio thread: RPCs, Raft ticks, applies, snapshots. Anything
that holds that thread (a slow apply, a big decode, a synchronous write) delays every other
task, heartbeats included, and a long enough stall makes the cluster elect another leader.
A heartbeat task sleeps ``PERIOD_S`` at a time and records how much later than asked it woke
up: that lateness is the loop's lag, the time some other task held the thread.

Exported as the Prometheus gauge ``colonies_event_loop_lag_max_seconds`` (the worst in the last
minute), the histogram ``colonies_event_loop_lag_seconds`` and the counter
``colonies_event_loop_stalls_total`` (lags over ``STALL_S``), and shown per node in
``colonies status``. Lags over ``STALL_S`` are also logged, at most once per ``LOG_EVERY_S``
unless longer than the last one logged, with where the loop was stuck: a watchdog thread looks at the loop's thread once a heartbeat
is ``STALL_S`` late and keeps its innermost frames (a stall that holds the GIL inside one C
call shows where that call was made, once it returns).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable

import trio

log = logging.getLogger("colonies.node")

PERIOD_S = 0.05
STALL_S = 0.1  # a lag this long is a stall worth a log line and a count
WINDOW_S = 60.0
BUCKET_S = 5.0  # the window's max is kept per bucket, so memory is fixed
LOG_EVERY_S = 10.0
BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
WHERE_FRAMES = 4  # innermost frames named in a stall's log line


class LoopMonitor:
    def __init__(self, period: float = PERIOD_S) -> None:
        self.period = period
        self.last = 0.0
        self.max_ever = 0.0
        self.stalls = 0
        self.samples = 0
        # (bucket start, worst lag in it), newest last; at most WINDOW_S / BUCKET_S + 1.
        self._buckets: deque[tuple[float, float]] = deque()
        self._observers: list[Callable[[float], None]] = []
        self._last_log = -LOG_EVERY_S
        self._last_logged = 0.0
        # The watchdog's view: when the heartbeat should wake next, and where the loop's
        # thread was when it was late (None: not seen late).
        self._due = 0.0
        self._where: str | None = None

    def on_lag(self, observe: Callable[[float], None]) -> None:
        """``observe(seconds)`` for every measured lag (the metrics histogram)."""
        self._observers.append(observe)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        stop = threading.Event()
        watchdog = threading.Thread(
            target=self._watch, args=(threading.get_ident(), stop), name="loop-watchdog",
            daemon=True,
        )
        watchdog.start()
        task_status.started()
        try:
            while True:
                asked = trio.current_time() + self.period
                self._due = time.monotonic() + self.period
                await trio.sleep_until(asked)
                self.record(max(0.0, trio.current_time() - asked))
        finally:
            stop.set()

    def _watch(self, loop_thread: int, stop: threading.Event) -> None:
        """The watchdog thread: notes where the loop's thread is once it is STALL_S late."""
        while not stop.wait(self.period / 2):
            due = self._due
            if self._where is None and due and time.monotonic() - due > STALL_S:
                frame = sys._current_frames().get(loop_thread)
                if frame is not None:
                    self._where = where(frame)

    def record(self, lag: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.samples += 1
        self.last = lag
        self.max_ever = max(self.max_ever, lag)
        start = now - now % BUCKET_S
        if self._buckets and self._buckets[-1][0] == start:
            if lag > self._buckets[-1][1]:
                self._buckets[-1] = (start, lag)
        else:
            self._buckets.append((start, lag))
        while self._buckets and self._buckets[0][0] <= now - WINDOW_S - BUCKET_S:
            self._buckets.popleft()
        for observe in self._observers:
            observe(lag)
        stuck_in, self._where = self._where, None
        if lag >= STALL_S:
            self.stalls += 1
            if now - self._last_log >= LOG_EVERY_S or lag > self._last_logged:
                self._last_log, self._last_logged = now, lag
                log.warning(
                    "event loop stalled for %.0f ms%s", lag * 1000,
                    f" in {stuck_in}" if stuck_in else "",
                )

    def max_recent(self, now: float | None = None) -> float:
        """The worst lag in about the last WINDOW_S seconds."""
        now = time.monotonic() if now is None else now
        return max((lag for start, lag in self._buckets if start > now - WINDOW_S - BUCKET_S),
                   default=0.0)

    def status(self) -> dict[str, float | int]:
        return {
            "loop_lag_ms": round(self.last * 1000, 1),
            "loop_lag_max_1m_ms": round(self.max_recent() * 1000, 1),
            "loop_lag_max_ms": round(self.max_ever * 1000, 1),
            "loop_stalls": self.stalls,
        }


def where(frame: object) -> str:
    """The innermost WHERE_FRAMES frames, innermost first: file:line function."""
    stack = traceback.extract_stack(frame)[-WHERE_FRAMES:]  # type: ignore[arg-type]
    return " < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in reversed(stack))
