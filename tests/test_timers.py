"""The timer extension point: due timers fire once, in time order, through the log's tick."""

from __future__ import annotations

from collections.abc import Iterator

import msgpack
import pytest
from machine_harness import T0, Harness, S

from consensus import timers
from consensus.machine import ColonyMachine
from consensus.state import ColonyState


@pytest.fixture
def fired() -> Iterator[list[tuple[str, int]]]:
    """A test kind 'probe' that records its firings and repeats keys starting with 'again'."""
    calls: list[tuple[str, int]] = []

    def probe(st: ColonyState, key: str, now: int) -> list[str]:
        calls.append((key, now))
        if key.startswith("again"):
            st.timers.set(key, now + 10 * S, "probe")
        return [key]

    timers.HANDLERS["probe"] = probe
    yield calls
    del timers.HANDLERS["probe"]


def test_due_timers_fire_once_in_order(fired: list[tuple[str, int]]) -> None:
    h = Harness()
    st = h.m._st
    st.timers.set("b", T0 + 2 * S, "probe")
    st.timers.set("a", T0 + 1 * S, "probe")
    st.timers.set("later", T0 + 60 * S, "probe")
    assert h.m.next_deadline() == T0 + 1 * S
    result = h.advance(5)
    assert result["timers"] == {"probe": ["a", "b"]}
    assert [k for k, _ in fired] == ["a", "b"]
    assert h.tick().get("timers") is None  # nothing is due any more
    assert h.m.next_deadline() == T0 + 60 * S


def test_a_handler_may_set_its_timer_again(fired: list[tuple[str, int]]) -> None:
    h = Harness()
    h.m._st.timers.set("again", T0 + 1 * S, "probe")
    h.advance(1)
    h.advance(10)
    assert [k for k, _ in fired] == ["again", "again"]
    assert h.m.next_deadline() == fired[-1][1] + 10 * S


def test_unknown_kinds_are_dropped_and_timers_survive_snapshots(
    fired: list[tuple[str, int]],
) -> None:
    h = Harness()
    st = h.m._st
    st.timers.set("x", T0 + 1 * S, "gone-kind")
    st.timers.set("y", T0 + 5 * S, "probe")
    data = msgpack.unpackb(msgpack.packb(h.m.snapshot()), raw=False)
    restored = ColonyMachine.restore(data)
    assert restored.digest() == h.m.digest()
    assert restored.next_deadline() == T0 + 1 * S
    h.advance(2)
    assert fired == [] and h.m.next_deadline() == T0 + 5 * S
