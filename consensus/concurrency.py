"""Concurrency limits per key (spec fields `concurrencykey`, `concurrencylimit`).

At most `concurrencylimit` processes with the same `concurrencykey` run at once in a colony
(a key without a limit is a mutex: limit 1). Processes with different limits under one key
each check their own limit against the key's running count; use one limit per key.

How assign stays O(log n) for everything else: a process whose key is at its limit is not
skipped over and over, it is *parked*. When assign (process_ops.assign_next) finds one at the
head of the queue, it sets the process's `parked` flag, which moves it from the assign queue
into this index's parked list of its (colony, key) (state._index decides membership from the
fields, as for every other index), and looks at the next head. When a process of the key
leaves RUNNING, ColonyState releases the earliest parked processes of the key, as many as
there are free slots, back into the queue. Costs we accept: each parked process costs one
O(log n) move out and one back, each assign parks at most the blocked processes it meets
(each is parked once per release), and a release moves at most `limit` processes. Parked
processes keep their wait deadline and their place (queue key) for when they come back.
"""

from __future__ import annotations

from sortedcontainers import SortedList

from consensus.records import QueueKey

CK = tuple[str, str]  # (colony, concurrency key)


class ConcurrencyIndex:
    def __init__(self) -> None:
        self._running: dict[CK, int] = {}
        self._parked: dict[CK, SortedList] = {}

    def running(self, colony: str, key: str) -> int:
        return self._running.get((colony, key), 0)

    def started(self, colony: str, key: str) -> None:
        ck = (colony, key)
        self._running[ck] = self._running.get(ck, 0) + 1

    def stopped(self, colony: str, key: str) -> None:
        ck = (colony, key)
        left = self._running[ck] - 1
        if left:
            self._running[ck] = left
        else:
            del self._running[ck]  # keys that come and go do not accumulate

    def park(self, colony: str, key: str, qk: QueueKey) -> None:
        sl = self._parked.get((colony, key))
        if sl is None:
            sl = self._parked[(colony, key)] = SortedList()
        sl.add(qk)

    def unpark(self, colony: str, key: str, qk: QueueKey) -> None:
        sl = self._parked[(colony, key)]
        sl.remove(qk)
        if not sl:
            del self._parked[(colony, key)]

    def first_parked(self, colony: str, key: str) -> QueueKey | None:
        sl = self._parked.get((colony, key))
        return sl[0] if sl else None

    def parked_count(self, colony: str, key: str) -> int:
        sl = self._parked.get((colony, key))
        return len(sl) if sl else 0


def limit_of(spec: dict) -> int:
    return spec.get("concurrencylimit", 1)
