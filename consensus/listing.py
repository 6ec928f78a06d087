"""Processes per (colony, state) and per (colony, state, executortype), in submission order.

Process graphs are listed with the same structure (their executortype is "").

Listing a page is O(count) (a k-way merge over at most five states), counting is O(1), and
the statistics are these counts, so they can never drift from what a listing returns.
Ordered by submission sequence number, not by when a process entered its state, so a
requeued process keeps its place.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Iterator

from sortedcontainers import SortedDict

from protocol.messages import CANCELLED, FAILED, RUNNING, SUCCESS, WAITING

ALL_STATES = (WAITING, RUNNING, SUCCESS, FAILED, CANCELLED)


class ProcessListing:
    def __init__(self) -> None:
        self._by_state: dict[tuple[str, int], SortedDict] = {}
        self._by_state_type: dict[tuple[str, int, str], SortedDict] = {}
        self._totals: dict[int, int] = dict.fromkeys(ALL_STATES, 0)

    def add(self, colony: str, state: int, executortype: str, seq: int, pid: str) -> None:
        _at(self._by_state, (colony, state))[seq] = pid
        if executortype:  # "" for graphs: no per-type index
            _at(self._by_state_type, (colony, state, executortype))[seq] = pid
        self._totals[state] += 1

    def remove(self, colony: str, state: int, executortype: str, seq: int) -> None:
        _pop(self._by_state, (colony, state), seq)
        if executortype:
            _pop(self._by_state_type, (colony, state, executortype), seq)
        self._totals[state] -= 1

    def total(self, state: int) -> int:
        return self._totals[state]

    def count(self, colony: str, state: int) -> int:
        d = self._by_state.get((colony, state))
        return len(d) if d else 0

    def ids(self, colony: str, state: int) -> list[str]:
        d = self._by_state.get((colony, state))
        return list(d.values()) if d else []

    def page(self, colony: str, states: Iterable[int], executortype: str, count: int) -> list[str]:
        """Up to `count` process ids in submission order; executortype "" means any."""
        sources: list[Iterator[tuple[int, str]]] = []
        for s in states:
            d = (
                self._by_state_type.get((colony, s, executortype))
                if executortype
                else self._by_state.get((colony, s))
            )
            if d:
                sources.append(iter(d.items()))
        merged = heapq.merge(*sources)
        return [pid for _, pid in itertools.islice(merged, count)]

    def after(
        self, colony: str, states: Iterable[int], executortype: str, after: int
    ) -> Iterator[tuple[int, str]]:
        """(seq, id) of the entries with seq > `after`, in submission order, lazily: a cursor
        for paged reads (export, follow) that costs O(log n) to start and O(1) per item.
        Do not change the listing while iterating."""
        sources: list[Iterator[tuple[int, str]]] = []
        for s in states:
            d = (
                self._by_state_type.get((colony, s, executortype))
                if executortype
                else self._by_state.get((colony, s))
            )
            if d:
                sources.append(_items_after(d, after))
        return heapq.merge(*sources)


def _items_after(d: SortedDict, after: int) -> Iterator[tuple[int, str]]:
    for seq in d.irange(minimum=after, inclusive=(False, True)):
        yield seq, d[seq]


def _at(index: dict, where: tuple) -> SortedDict:
    # Not setdefault(where, SortedDict()): that would build a SortedDict on every call.
    d = index.get(where)
    if d is None:
        d = index[where] = SortedDict()
    return d


def _pop(index: dict, where: tuple, seq: int) -> None:
    d = index[where]
    del d[seq]
    if not d:
        del index[where]
