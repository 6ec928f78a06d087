"""Pending exec and wait deadlines, ordered by time.

A process has at most one pending deadline: its wait deadline while WAITING, its exec
deadline while RUNNING. Entries are removed exactly (we remember each process's entry), so
`next()` is the true earliest deadline and a tick touches only the expired entries:
O(expired * log n).
"""

from __future__ import annotations

from sortedcontainers import SortedList

EXEC = "exec"
WAIT = "wait"

Entry = tuple[int, str, str]  # (deadline ns, processid, kind)


class DeadlineIndex:
    def __init__(self) -> None:
        self._entries = SortedList()
        self._by_process: dict[str, Entry] = {}

    def __len__(self) -> int:
        return len(self._by_process)

    def set(self, processid: str, deadline: int, kind: str) -> None:
        self.clear(processid)
        entry = (deadline, processid, kind)
        self._entries.add(entry)
        self._by_process[processid] = entry

    def clear(self, processid: str) -> None:
        entry = self._by_process.pop(processid, None)
        if entry is not None:
            self._entries.remove(entry)

    def get(self, processid: str) -> Entry | None:
        return self._by_process.get(processid)

    def entries(self) -> list[Entry]:
        """Every entry, earliest first."""
        return list(self._entries)

    def next(self) -> int | None:
        return self._entries[0][0] if self._entries else None

    def due(self, now: int, limit: int) -> list[Entry]:
        """Up to `limit` entries with deadline <= now, earliest first (a copy: callers mutate
        the index while they walk it)."""
        # (now + 1,) sorts before every (now + 1, pid, kind), so this counts deadlines <= now.
        n = min(self._entries.bisect_left((now + 1,)), limit)
        return list(self._entries.islice(0, n))
