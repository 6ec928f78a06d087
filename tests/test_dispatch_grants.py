"""The long-poll assign gate in node/dispatch.py, against a scripted log: applies wake only a
waiter that can be granted a slot, and a refused assign hands its slot on."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from node.dispatch import Dispatcher
from protocol.envelope import Request
from protocol.errors import NotFound


class FakeMachine:
    def __init__(self) -> None:
        self.queue: dict[str, int] = {}  # executor id -> processes it could be assigned

    def assignable(self, colonyname: str, executor_id: str) -> int:
        return self.queue.get(executor_id, 0)

    def authorize(self, msgtype: str, caller: str, body: dict) -> None:
        pass


class FakeLog:
    """Proposals are answered from `answers` (per caller, in order) after one scheduling pass;
    an accepted assign takes a process from everyone's count, as its apply would."""

    def __init__(self) -> None:
        self.machine = FakeMachine()
        self.colony = SimpleNamespace(installing=False, last_applied=0)
        self.applied_generation = 0
        self.listeners: list[Callable[[], None]] = []
        self.proposed: list[str] = []
        self.answers: dict[str, list[list[Any]]] = {}

    def add_apply_listener(self, listener: Callable[[], None]) -> None:
        self.listeners.append(listener)

    def apply(self) -> None:
        self.applied_generation += 1
        for listener in self.listeners:
            listener()

    async def submit(self, cmd: dict, timeout: float = 10.0) -> list:
        self.proposed.append(cmd["caller"])
        await trio.lowlevel.checkpoint()
        reply = self.answers[cmd["caller"]].pop(0)
        if reply[0] == 200:
            for caller, count in self.machine.queue.items():
                self.machine.queue[caller] = max(0, count - 1)
            self.apply()
        return reply

    async def wait_applied(self, seen: int, deadline: float) -> int:
        raise AssertionError("assign long-polls wait for grants, not for every apply")


def assign(caller: str, timeout: float) -> Request:
    return Request(
        msgtype="assignprocessmsg",
        body={"colonyname": "dev", "timeout": timeout},
        caller=caller,
        nonce=caller.encode().ljust(16, b"\0"),
        expiry_ms=0,
        audience="",
        write=True,
    )


async def test_an_apply_wakes_only_a_waiter_that_can_get_a_process() -> None:
    log = FakeLog()
    d = Dispatcher(log, dict)
    got: dict[str, Any] = {}

    async def poll(caller: str) -> None:
        try:
            got[caller] = await d.handle(assign(caller, 2))
        except NotFound:
            got[caller] = None

    async with trio.open_nursery() as n:
        for caller in ("a", "b"):
            n.start_soon(poll, caller)
        await trio.testing.wait_all_tasks_blocked()
        log.apply()  # nothing assignable: nobody proposes
        await trio.testing.wait_all_tasks_blocked()
        assert log.proposed == []

        log.machine.queue["b"] = 1  # a process only b can run
        log.answers["b"] = [[200, {"processid": "p1"}]]
        log.apply()
        await trio.testing.wait_all_tasks_blocked()
        assert log.proposed == ["b"]
        assert got == {"b": {"processid": "p1"}}
        n.cancel_scope.cancel()
    assert "a" not in got


async def test_a_refused_assign_hands_its_slot_to_the_next_waiter() -> None:
    log = FakeLog()
    d = Dispatcher(log, dict)
    got: dict[str, Any] = {}

    async def poll(caller: str) -> None:
        got[caller] = await d.handle(assign(caller, 2))

    async with trio.open_nursery() as n:
        n.start_soon(poll, "a")
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(poll, "b")
        await trio.testing.wait_all_tasks_blocked()
        # One process both could run: one slot, granted to the oldest waiter.
        log.machine.queue.update(a=1, b=1)
        log.answers["a"] = [[404, "no process available for assignment"]]
        log.answers["b"] = [[200, {"processid": "p2"}]]
        log.apply()
        await trio.testing.wait_all_tasks_blocked()
        # a's assign was refused (another node's executor took that process, say) while a
        # second process arrived: the released slot goes to b, a waits again.
        assert log.proposed == ["a", "b"]
        assert got == {"b": {"processid": "p2"}}
        n.cancel_scope.cancel()


async def test_a_waiter_times_out_with_not_found_and_leaves_no_slot_behind() -> None:
    log = FakeLog()
    d = Dispatcher(log, dict)
    with pytest.raises(NotFound):
        await d.handle(assign("a", 0.05))
    log.machine.queue["b"] = 1
    log.answers["b"] = [[200, {"processid": "p3"}]]
    assert await d.handle(assign("b", 1)) == {"processid": "p3"}
    assert log.proposed == ["b"]
