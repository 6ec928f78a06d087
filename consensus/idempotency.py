"""Idempotency keys on submit (spec field `idempotencykey`).

A submit whose spec carries a key already seen in the same colony within the window returns
the process that the first submit created instead of creating another, so a client that
lost the reply (a timeout, a dropped connection, a crashed producer) can submit again
safely. Keys are per colony; the window runs from the first submit.

The book is replicated state (it is in snapshots) and kept bounded deterministically: every
keyed submit first drops the keys older than the window at its command time, and the book
never holds more than MAX_KEYS keys (the oldest go first). A key whose process is gone
(removed, or swept by retention) no longer dedupes: the next submit with it creates a new
process, so keep retention longer than the window if that matters.
"""

from __future__ import annotations

from sortedcontainers import SortedList

from consensus.records import NS_PER_S

WINDOW_S = 24 * 3600
MAX_KEYS = 100_000

Entry = tuple[int, str, str, str]  # (first submit time ns, colony, key, processid)


class IdempotencyBook:
    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str], Entry] = {}
        self._by_time: SortedList = SortedList()

    def __len__(self) -> int:
        return len(self._by_key)

    def find(self, colony: str, key: str) -> str | None:
        entry = self._by_key.get((colony, key))
        return entry[3] if entry is not None else None

    def remember(self, colony: str, key: str, processid: str, now: int) -> None:
        self._drop((colony, key))
        entry = (now, colony, key, processid)
        self._by_key[(colony, key)] = entry
        self._by_time.add(entry)
        while len(self._by_key) > MAX_KEYS:
            self._drop(self._by_time[0][1:3])

    def prune(self, now: int, window_s: int = WINDOW_S) -> int:
        """Drop the keys first seen at or before now - window; returns how many."""
        cutoff = now - window_s * NS_PER_S
        # (cutoff + 1,) sorts before every entry of time cutoff + 1: this counts times <= cutoff.
        n = self._by_time.bisect_left((cutoff + 1,))
        for entry in list(self._by_time.islice(0, n)):
            self._drop(entry[1:3])
        return n

    def _drop(self, ck: tuple[str, str]) -> None:
        entry = self._by_key.pop(ck, None)
        if entry is not None:
            self._by_time.remove(entry)

    def to_snapshot(self) -> list[list]:
        return [list(e) for e in self._by_time]

    @classmethod
    def from_snapshot(cls, data: list[list]) -> IdempotencyBook:
        book = cls()
        for at, colony, key, pid in data:
            book._by_key[(colony, key)] = (at, colony, key, pid)
            book._by_time.add((at, colony, key, pid))
        return book
