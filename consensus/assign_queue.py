"""The assign index: which WAITING process an executor gets next, in O(log n).

Colonies serves the waiting process with the lowest (prioritytime) among those whose
executortype equals the executor's type and whose executornames list is empty ("pool") or
names the executor ("targeted"). We keep one sorted list per (colony, executortype) for pool
processes and one per (colony, executortype, executorname) for targeted ones; an executor's
next process is the smaller of the two heads. A process targeting several names sits in each
of their lists. Keys are (prioritytime, submission seq, processid): seq breaks ties in submit
order and is unique, so keys never collide.
"""

from __future__ import annotations

from sortedcontainers import SortedList

from consensus.records import QueueKey


class AssignQueue:
    def __init__(self) -> None:
        self._pool: dict[tuple[str, str], SortedList] = {}
        self._targeted: dict[tuple[str, str, str], SortedList] = {}
        self._size = 0

    def __len__(self) -> int:
        """The number of queued processes (each counted once, however many names it targets)."""
        return self._size

    def add(self, colony: str, executortype: str, names: tuple[str, ...], key: QueueKey) -> None:
        if names:
            for n in names:
                _at(self._targeted, (colony, executortype, n)).add(key)
        else:
            _at(self._pool, (colony, executortype)).add(key)
        self._size += 1

    def remove(self, colony: str, executortype: str, names: tuple[str, ...], key: QueueKey) -> None:
        """Remove a queued process; it must be queued with exactly these coordinates."""
        if names:
            for n in names:
                _remove_from(self._targeted, (colony, executortype, n), key)
        else:
            _remove_from(self._pool, (colony, executortype), key)
        self._size -= 1

    def count(self, colony: str, executortype: str, name: str) -> int:
        """How many processes this executor could be assigned (an upper bound shared with
        the other executors of its type)."""
        pool = self._pool.get((colony, executortype))
        targeted = self._targeted.get((colony, executortype, name))
        return (len(pool) if pool else 0) + (len(targeted) if targeted else 0)

    def peek(self, colony: str, executortype: str, name: str) -> QueueKey | None:
        """The key of the process this executor would get now, or None."""
        pool = self._pool.get((colony, executortype))
        targeted = self._targeted.get((colony, executortype, name))
        best: QueueKey | None = pool[0] if pool else None
        if targeted and (best is None or targeted[0] < best):
            best = targeted[0]
        return best


def _at(lists: dict, where: tuple) -> SortedList:
    # Not setdefault(where, SortedList()): that would build a list on every call.
    sl = lists.get(where)
    if sl is None:
        sl = lists[where] = SortedList()
    return sl


def _remove_from(lists: dict, where: tuple, key: QueueKey) -> None:
    sl = lists[where]
    sl.remove(key)
    if not sl:
        # Drop empty lists so names and types that come and go do not accumulate.
        del lists[where]
