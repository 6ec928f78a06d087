"""Idempotency keys on submit: the window, per-colony keys, pruning by command time, the
bound on the book, snapshots, and bad input refused with no change."""

from __future__ import annotations

import msgpack
import pytest
from machine_harness import Harness, S

from consensus import idempotency
from consensus.idempotency import IdempotencyBook
from consensus.machine import ColonyMachine
from protocol.errors import BadRequest, InvalidField


@pytest.fixture
def dev(h: Harness) -> dict[str, str]:
    ids = {"co": h.colony("dev"), "w1": h.executor("dev", "w1"), "w2": h.executor("dev", "w2")}
    ids["co2"] = h.colony("other")
    ids["o1"] = h.executor("other", "o1")
    return ids


def test_second_submit_within_the_window_returns_the_first(h: Harness, dev) -> None:
    first = h.submit(dev["w1"], "dev", idempotencykey="order-42", args=[1])
    h.advance(3600)
    again = h.submit(dev["w2"], "dev", idempotencykey="order-42", args=[2])
    assert again == h.process(dev["w1"], first["processid"])
    assert h.stats()["waitingprocesses"] == 1
    other = h.submit(dev["w1"], "dev", idempotencykey="order-43")
    assert other["processid"] != first["processid"]
    assert h.stats()["waitingprocesses"] == 2


def test_keys_are_per_colony(h: Harness, dev) -> None:
    a = h.submit(dev["w1"], "dev", idempotencykey="k")
    b = h.submit(dev["o1"], "other", idempotencykey="k")
    assert a["processid"] != b["processid"]


def test_the_first_process_is_returned_whatever_its_state(h: Harness, dev) -> None:
    first = h.submit(dev["w1"], "dev", idempotencykey="k")
    h.close(dev["w1"], h.assign(dev["w1"], "dev"), out=["done"])
    again = h.submit(dev["w1"], "dev", idempotencykey="k")
    assert again["processid"] == first["processid"] and again["out"] == ["done"]


def test_after_the_window_a_new_process_is_created(h: Harness, dev) -> None:
    first = h.submit(dev["w1"], "dev", idempotencykey="k")
    h.advance(idempotency.WINDOW_S)  # exactly the window: the key has expired
    second = h.submit(dev["w1"], "dev", idempotencykey="k")
    assert second["processid"] != first["processid"]
    h.advance(idempotency.WINDOW_S - 1)
    assert h.submit(dev["w1"], "dev", idempotencykey="k")["processid"] == second["processid"]


def test_a_removed_first_process_frees_the_key(h: Harness, dev) -> None:
    first = h.submit(dev["w1"], "dev", idempotencykey="k")
    h.write("removeprocessmsg", dev["w1"], {"processid": first["processid"]})
    second = h.submit(dev["w1"], "dev", idempotencykey="k")
    assert second["processid"] != first["processid"]
    assert h.submit(dev["w1"], "dev", idempotencykey="k")["processid"] == second["processid"]


def test_keyed_submits_prune_expired_keys_by_command_time(h: Harness, dev) -> None:
    for i in range(5):
        h.submit(dev["w1"], "dev", idempotencykey=f"old-{i}")
        h.advance(60)
    book = h.m._st.idempotency
    assert len(book) == 5
    h.advance(idempotency.WINDOW_S - 3 * 60)  # old-0 .. old-2 are now out of the window
    h.submit(dev["w1"], "dev")  # an unkeyed submit does not touch the book
    assert len(book) == 5
    h.submit(dev["w1"], "dev", idempotencykey="new")
    assert len(book) == 3  # old-3, old-4, new
    assert book.find("dev", "old-2") is None and book.find("dev", "old-3") is not None


def test_the_book_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idempotency, "MAX_KEYS", 3)
    book = IdempotencyBook()
    for i in range(5):
        book.remember("dev", f"k{i}", f"p{i}", i * S)
    assert len(book) == 3
    assert [book.find("dev", f"k{i}") for i in range(5)] == [None, None, "p2", "p3", "p4"]


def test_snapshot_round_trip_keeps_the_keys(h: Harness, dev) -> None:
    first = h.submit(dev["w1"], "dev", idempotencykey="k")
    h.submit(dev["o1"], "other", idempotencykey="k")
    data = msgpack.unpackb(msgpack.packb(h.m.snapshot()), raw=False)
    assert [e[1:3] for e in data["idempotencykeys"]] == [["dev", "k"], ["other", "k"]]
    h.m = ColonyMachine.restore(data)
    assert h.m.digest() == ColonyMachine.restore(data).digest()
    assert h.submit(dev["w1"], "dev", idempotencykey="k")["processid"] == first["processid"]
    del data["idempotencykeys"]  # an older format-3 snapshot without the section still loads
    assert len(ColonyMachine.restore(data)._st.idempotency) == 0


@pytest.mark.parametrize("bad", ["", "x" * 257, 7, ["k"]])
def test_bad_keys_are_refused_and_change_nothing(h: Harness, dev, bad: object) -> None:
    before = h.m.digest()
    with pytest.raises(InvalidField):
        h.submit(dev["w1"], "dev", idempotencykey=bad)
    assert h.m.digest() == before


def test_workflow_specs_refuse_keys(h: Harness, dev) -> None:
    spec = dict(h.spec("dev"), nodename="a", idempotencykey="k")
    before = h.stats()
    with pytest.raises(BadRequest, match="single submits"):
        h.write("submitworkflowspecmsg", dev["w1"], {"spec": {"colonyname": "dev",
                                                              "functionspecs": [spec]}})
    assert h.stats() == before
