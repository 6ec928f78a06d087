"""Write nonces remembered within their expiry window (replay protection).

A nonce is remembered per caller, so one caller cannot burn another's nonce by racing it into
the log. Nonces are pruned once expired: a replay after that is refused as expired anyway.
An index ordered by expiry makes pruning O(expired).
"""

from __future__ import annotations

from sortedcontainers import SortedList

from protocol.errors import ExpiredEnvelope, ReplayedEnvelope


class NonceBook:
    def __init__(self) -> None:
        self._expiry: dict[tuple[str, bytes], int] = {}
        self._by_expiry = SortedList()  # (expiry ms, caller, nonce)

    def __len__(self) -> int:
        return len(self._expiry)

    def prune(self, now_ms: int) -> None:
        while self._by_expiry and self._by_expiry[0][0] < now_ms:
            _, caller, nonce = self._by_expiry.pop(0)
            del self._expiry[(caller, nonce)]

    def check(self, caller: str, nonce: bytes, expiry_ms: int, now_ms: int) -> None:
        """Refuse a replayed or expired write; does not remember it."""
        # Expiry first: an expired nonce may or may not have been pruned yet, and the answer
        # must not depend on that.
        if expiry_ms < now_ms:
            raise ExpiredEnvelope("expired request: its expiry has passed")
        if (caller, nonce) in self._expiry:
            raise ReplayedEnvelope("replayed request: this nonce was already used")

    def remember(self, caller: str, nonce: bytes, expiry_ms: int) -> None:
        self._expiry[(caller, nonce)] = expiry_ms
        self._by_expiry.add((expiry_ms, caller, nonce))

    def to_snapshot(self) -> list[list]:
        return [[e, c, n] for e, c, n in self._by_expiry]

    @classmethod
    def from_snapshot(cls, rows: list[list]) -> NonceBook:
        book = cls()
        for e, c, n in rows:
            book.remember(c, n, e)
        return book
