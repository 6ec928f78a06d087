"""Time-driven work besides process deadlines: named timers, fired by the leader's tick.

A feature that must act at a time (a generator's batch timeout, a cron's next run, an
executor going stale, a retention sweep, a retry's backoff ending) sets a timer in
`st.timers` under a key of its own, with its kind. The `tick` command fires every due
timer, earliest first, through the kind's handler in `HANDLERS`, at the time the leader
stamped on the entry, so every replica fires the same timers at the same place in the log
and a timer fires once even across a failover.

A handler gets the state, the timer's key and the time; it may set the timer again (a
repeating job) and returns the ids it acted on, reported in the tick's result under its
kind. Handlers check before they mutate, like commands.
"""

from __future__ import annotations

from collections.abc import Callable

from consensus.state import ColonyState

TimerHandler = Callable[[ColonyState, str, int], list[str]]

# kind -> handler. Each feature adds its kind here.
HANDLERS: dict[str, TimerHandler] = {}

MAX_TIMERS_PER_TICK = 1000


def fire_due(st: ColonyState, now: int) -> dict[str, list[str]]:
    fired: dict[str, list[str]] = {}
    for entry in st.timers.due(now, MAX_TIMERS_PER_TICK):
        _at, key, kind = entry
        if st.timers.get(key) != entry:
            continue  # an earlier timer in this tick moved or cleared it
        st.timers.clear(key)
        handler = HANDLERS.get(kind)
        if handler is None:
            continue  # a kind this version does not know: drop it rather than fire forever
        done = handler(st, key, now)
        if done:
            fired.setdefault(kind, []).extend(done)
    return fired
