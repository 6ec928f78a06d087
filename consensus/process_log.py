"""The log lines of one process: append-only, bounded, read by cursor.

Every line gets the next sequence number of its process (1, 2, ...), so a reader follows a
log with "lines after sequence n" and never misses or repeats one, even when several lines
share a timestamp (lines applied in one log entry do). A process keeps its last
MAX_LOG_LINES lines: appending to a full log drops the oldest line rather than refusing, so
an executor that logs a lot never fails its process over logging, and a reader sees the gap
in the sequence numbers (`first_seq` says where the kept lines start).
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from protocol.messages import MAX_LOG_LINES


@dataclass(frozen=True, slots=True)
class LogLine:
    seq: int
    timestamp: int  # unix ns: the time of the log entry that appended it
    executorname: str  # the executor that was running the process (retries may differ)
    message: str


@dataclass(slots=True)
class ProcessLog:
    processid: str
    colonyname: str
    lines: deque[LogLine] = field(default_factory=deque)
    next_seq: int = 1

    def append(self, message: str, executorname: str, now: int) -> LogLine:
        line = LogLine(self.next_seq, now, executorname, message)
        self.next_seq += 1
        self.lines.append(line)
        while len(self.lines) > MAX_LOG_LINES:
            self.lines.popleft()
        return line

    @property
    def first_seq(self) -> int:
        """The sequence number of the oldest kept line (next_seq when there is none)."""
        return self.lines[0].seq if self.lines else self.next_seq

    def read(self, afterseq: int, since: int, count: int, latest: bool) -> list[LogLine]:
        """Up to `count` lines with seq > afterseq and timestamp > since, oldest first; with
        `latest`, the newest `count` of them. O(log n + count)."""
        lines = self.lines
        # Sequence numbers are consecutive from first_seq: index arithmetic, no search.
        start = max(0, afterseq + 1 - self.first_seq)
        if since:
            # Timestamps never decrease along the log, so bisect on them.
            start = max(start, bisect.bisect_right(_Timestamps(lines), since))
        end = len(lines)
        if start >= end:
            return []
        if latest:
            start = max(start, end - count)
        else:
            end = min(end, start + count)
        return [lines[i] for i in range(start, end)]

    def wire(self, line: LogLine) -> dict[str, Any]:
        """A line as Colonies' Log, plus its sequence number (the follow cursor)."""
        return {
            "processid": self.processid,
            "colonyname": self.colonyname,
            "executorname": line.executorname,
            "message": line.message,
            "timestamp": line.timestamp,
            "seq": line.seq,
        }

    def to_snapshot(self) -> dict[str, Any]:
        return {
            "processid": self.processid,
            "colonyname": self.colonyname,
            "nextseq": self.next_seq,
            "lines": [[ln.seq, ln.timestamp, ln.executorname, ln.message] for ln in self.lines],
        }

    @classmethod
    def from_snapshot(cls, d: dict[str, Any]) -> ProcessLog:
        return cls(
            processid=d["processid"],
            colonyname=d["colonyname"],
            lines=deque(LogLine(s, t, e, m) for s, t, e, m in d["lines"]),
            next_seq=d["nextseq"],
        )


class _Timestamps:
    """A read-only sequence view of the lines' timestamps, for bisect."""

    def __init__(self, lines: deque[LogLine]) -> None:
        self._lines = lines

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, i: int) -> int:
        return self._lines[i].timestamp
