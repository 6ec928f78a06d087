"""node/loop_monitor.py: the stall meter's arithmetic, and that it measures a blocked loop."""

from __future__ import annotations

import time

import trio

from node.loop_monitor import BUCKET_S, STALL_S, WINDOW_S, LoopMonitor


def test_the_recent_maximum_forgets_old_stalls_and_memory_stays_fixed() -> None:
    m = LoopMonitor()
    m.record(0.4, now=1000.0)
    m.record(0.01, now=1001.0)
    assert m.max_recent(now=1002.0) == 0.4 and m.stalls == 1
    for i in range(10_000):  # a day of samples, one every ~9 s
        m.record(0.002, now=1010.0 + i * 9)
    assert m.max_recent() == 0.002 and m.max_ever == 0.4
    assert len(m._buckets) <= WINDOW_S / BUCKET_S + 2
    assert m.status()["loop_lag_max_ms"] == 400.0


async def test_a_blocked_loop_shows_as_lag() -> None:
    m = LoopMonitor(period=0.01)
    seen: list[float] = []
    m.on_lag(seen.append)
    async with trio.open_nursery() as n:
        await n.start(m.run)
        await trio.sleep(0.05)
        time.sleep(STALL_S * 2)  # what a slow apply does to every other task
        await trio.sleep(0.05)
        n.cancel_scope.cancel()
    assert max(seen) >= STALL_S * 1.8 and m.stalls == 1
    assert m.max_recent() == max(seen)


async def test_a_stall_is_logged_with_where_the_loop_was_stuck(caplog) -> None:
    m = LoopMonitor(period=0.01)

    def slow_apply() -> None:
        time.sleep(STALL_S * 3)  # releases the GIL, as a blocking syscall does

    async with trio.open_nursery() as n:
        await n.start(m.run)
        await trio.sleep(0.05)
        with caplog.at_level("WARNING", logger="colonies.node"):
            slow_apply()
            await trio.sleep(0.05)
        n.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records if "stalled" in r.getMessage()]
    assert len(lines) == 1 and "slow_apply" in lines[0], lines
