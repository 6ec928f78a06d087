"""Cron schedules: when a cron runs next, computed from a given time only.

Expressions have 6 fields with seconds first, as Colonies writes them (`sec min hour dom
month dow`, e.g. `0/5 * * * * *` every 5 seconds, `0 0 15 24 12 *` Dec 24 at 15:00), or are
one of the descriptors @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly.
They are parsed and matched by croniter (pinned), in UTC, from an explicit start time, so
every replica computes the same next run from the time stamped on the log entry.

croniter's `R` (a random value) is refused: each replica would draw its own. Its `H` (hashed)
needs a hash id we do not give, so croniter refuses it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from croniter import CroniterBadDateError, CroniterError, croniter

from consensus.records import MAX_TIME_NS, NS_PER_S

FIELDS = 6
MAX_EXPRESSION_CHARS = 256
DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
EXAMPLE = "'0/5 * * * * *' (every 5 s) or '0 30 9 * * MON-FRI' (9:30 UTC on weekdays)"
# An R (random) that stands alone in a field or list item, not part of a name like FRI.
_RANDOM = re.compile(r"(?<![A-Za-z])R(?![A-Za-z])")
# croniter looks this many years ahead for a match; it bounds the cost of an expression
# that matches rarely (the default is 50), and one with no match within it is refused.
MAX_YEARS_AHEAD = 10


def check_expression(expr: str) -> str | None:
    """Why `expr` is not a valid cron expression, or None when it is."""
    if len(expr) > MAX_EXPRESSION_CHARS:
        return f"longer than {MAX_EXPRESSION_CHARS} characters"
    text = expr.strip()
    if text.startswith("@"):
        if text.lower() not in DESCRIPTORS:
            return (
                f"unknown descriptor '{text}' (known: {', '.join(DESCRIPTORS)}; "
                "for '@every N' use an interval of N seconds)"
            )
    elif len(text.split()) != FIELDS:
        return (
            f"expected {FIELDS} fields (second minute hour day-of-month month day-of-week), "
            f"got {len(text.split())}; e.g. {EXAMPLE}"
        )
    elif _RANDOM.search(text):
        return "'R' (a random value) is not supported: replicas must agree on the schedule"
    try:
        if next_after(text, 0) is None:
            return f"it matches no time within {MAX_YEARS_AHEAD} years"
    except (CroniterError, ValueError, KeyError, IndexError, TypeError) as e:
        return f"{e} (expected e.g. {EXAMPLE})"
    return None


def next_after(expr: str, now: int) -> int | None:
    """The first time (unix ns, whole seconds) strictly after `now` that `expr` matches, or
    None when there is none within MAX_YEARS_AHEAD years (or past int64).

    Raises croniter's errors for a bad expression; check_expression first."""
    # Whole seconds: croniter's next match after the second `now` falls in is > now.
    start = datetime.fromtimestamp(now // NS_PER_S, tz=UTC)
    try:
        it = croniter(
            expr.strip(),
            start,
            second_at_beginning=True,
            max_years_between_matches=MAX_YEARS_AHEAD,
        )
        nxt = it.get_next(datetime)
    except (CroniterBadDateError, OverflowError):
        return None  # no match within MAX_YEARS_AHEAD, or past what datetime holds
    at = int(nxt.timestamp()) * NS_PER_S
    return at if at <= MAX_TIME_NS else None
