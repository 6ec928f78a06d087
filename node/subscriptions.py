"""Subscriptions, the node half: long-polls woken by applies on this node's replica.

`waitprocessmsg` and `followprocessesmsg` are reads: the state machine answers each from
the local replica (consensus/subscriptions.py). Here we ask again after every apply until
there is an answer or the timeout passes. Waking comes from the replicator's apply
notifications (`wait_applied`), not from polling, so a subscriber on a follower wakes as
soon as the entry reaches that follower, and a waiter costs nothing between applies.

The cost we accept: every apply wakes every waiter on the node, and each re-runs its check
(a dict lookup, or an O(log n) listing seek), the same way assign long-polls wake.

A wait that times out is a 408; a follow that times out answers with no processes and the
cursor to continue from, so a follower loop needs no error handling for quiet periods.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import trio

from protocol.envelope import Request
from protocol.errors import RequestTimeout

LONG_POLLS = frozenset({"waitprocessmsg", "followprocessesmsg"})


class _Machine(Protocol):
    def read(self, msgtype: str, caller: str, body: dict, now: int) -> object: ...


class _Log(Protocol):
    @property
    def machine(self) -> _Machine: ...
    @property
    def applied_generation(self) -> int: ...
    async def wait_applied(self, seen: int, deadline: float) -> int: ...


async def serve(log: _Log, req: Request) -> Any:  # noqa: ANN401
    """Answer a subscription read once its condition holds, or at its timeout (the
    dispatcher has done the barrier of a consistent read already)."""
    deadline = trio.current_time() + req.body["timeout"]
    body = dict(req.body)
    following = req.msgtype == "followprocessesmsg"
    while True:
        seen = log.applied_generation  # before the check: an apply in between is not missed
        # Read the machine every time: a loaded snapshot replaces it.
        answer: Any = log.machine.read(req.msgtype, req.caller, body, time.time_ns())
        if following:
            if answer["processes"]:
                return answer
            body["afterseq"] = answer["cursor"]  # "from now" becomes a fixed cursor
        elif answer is not None:
            return answer
        if trio.current_time() >= deadline:
            if following:
                return answer
            raise RequestTimeout(
                f"process {req.body['processid']} did not reach the state waited for "
                f"within {req.body['timeout']} s"
            )
        await log.wait_applied(seen, deadline)
