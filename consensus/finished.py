"""Finished standalone processes and finished graphs per colony, ordered by end time: the
index the retention sweep (consensus/retention.py) walks, oldest end first, in O(log n + k).

Derived from the records (ColonyState keeps it up to date in _index/_unindex and with the
graphs' states), so it is not in snapshots.
"""

from __future__ import annotations

from sortedcontainers import SortedList

Ended = tuple[int, int, str]  # (endtime ns, seq, id)


class FinishedIndex:
    def __init__(self) -> None:
        self._processes: dict[str, SortedList] = {}
        self._graphs: dict[str, SortedList] = {}

    def add(self, graph: bool, colony: str, entry: Ended) -> None:
        lists = self._graphs if graph else self._processes
        sl = lists.get(colony)
        if sl is None:
            sl = lists[colony] = SortedList()
        sl.add(entry)

    def remove(self, graph: bool, colony: str, entry: Ended) -> None:
        lists = self._graphs if graph else self._processes
        sl = lists[colony]
        sl.remove(entry)
        if not sl:
            del lists[colony]

    def ended_before(self, graph: bool, colony: str, cutoff: int, limit: int) -> list[Ended]:
        """Up to `limit` entries that ended at or before `cutoff`, oldest first (a copy)."""
        sl = (self._graphs if graph else self._processes).get(colony)
        if not sl:
            return []
        n = min(sl.bisect_left((cutoff + 1,)), limit)
        return list(sl.islice(0, n))
