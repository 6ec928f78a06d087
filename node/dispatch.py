"""From an opened request to a reply: reads from the local replica, writes through the log.

The role rules live in the state machine (consensus), which checks them again when a write is
applied; the pre-check here only spares the log a command that would be refused anyway.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import trio

from node import subscriptions
from node.archive_sqlite import file_digest
from node.log_follow import follow_logs
from node.member_add import Reach, add_member
from protocol.envelope import Request
from protocol.errors import NotFound, RequestTimeout, Unavailable, error_from_wire

# Every call is bounded: long-polls by their own timeout, everything else by this.
DEFAULT_CALL_TIMEOUT_S = 10.0
# A request's signature lifetime is checked when it arrives (protocol/envelope.py); what the
# node proposes for it later (the assign at the end of a long-poll, a write that waited in the
# proposal queue) carries an expiry of at least this long from the proposal, so the state
# machine never refuses work the node accepted, and keeps the nonce that long against replays.
COMMAND_TTL_MS = 60_000


class Machine(Protocol):
    def read(self, msgtype: str, caller: str, body: dict, now: int) -> object: ...
    def authorize(self, msgtype: str, caller: str, body: dict) -> None: ...
    def assignable(self, colonyname: str, executor_id: str) -> int: ...


class Replica(Protocol):
    @property
    def last_applied(self) -> int: ...
    @property
    def installing(self) -> bool: ...
    @property
    def member_ids(self) -> list[str]: ...


class Log(Protocol):
    """What dispatch needs from the replicator."""

    @property
    def machine(self) -> Machine: ...
    @property
    def colony(self) -> Replica: ...
    @property
    def applied_generation(self) -> int: ...
    async def submit(self, cmd: dict, timeout: float = ...) -> list: ...
    async def wait_applied(self, seen: int, deadline: float) -> int: ...
    def add_apply_listener(self, listener: Callable[[], None]) -> None: ...


def derived_nonce(nonce: bytes, i: int) -> bytes:
    """Follow-up commands of one long-poll get their own nonces, bound to the client's."""
    return hashlib.blake2b(nonce + i.to_bytes(4, "big"), digest_size=16).digest()


class _AssignWaiter:
    __slots__ = ("caller", "event", "granted")

    def __init__(self, caller: str) -> None:
        self.caller = caller
        self.event = trio.Event()
        self.granted = False


class Dispatcher:
    def __init__(
        self, log: Log, server_info: Callable[[], dict[str, Any]], reach: Reach | None = None
    ) -> None:
        self.log = log
        self.server_info = server_info
        self.reach = reach  # dials a new member before it is added (node/member_add.py)
        # Assign proposals in flight per colony (granted slots). Without this gate every
        # long-poller would propose an assign for the same new process and all but one would
        # be refused, a log entry each.
        self._assigning: dict[str, int] = {}
        # Long-polling assigns per colony, oldest first. Applies do not wake them all: the
        # apply listener grants a slot to a waiter only when the replica shows a process it
        # could get beyond the slots already granted, and wakes just that one.
        self._waiters: dict[str, list[_AssignWaiter]] = {}
        log.add_apply_listener(self._grant_waiters)

    async def handle(self, req: Request) -> Any:
        if req.msgtype == "getserverinfomsg":
            return self.server_info()
        if self.log.colony.installing:
            raise Unavailable("this node is installing a snapshot from its leader; retry shortly")
        if not req.write:
            if req.body.get("consistent"):
                status, value = await self.log.submit({"op": "barrier"}, DEFAULT_CALL_TIMEOUT_S)
                if status != 200:
                    raise error_from_wire(status, value)
            if req.msgtype == "getlogsmsg" and req.body["timeout"] > 0:
                return await follow_logs(self.log, req)  # a log follower waits for a line
            if req.msgtype in subscriptions.LONG_POLLS:  # woken by applies on this replica
                return await subscriptions.serve(self.log, req)
            if req.msgtype == "getstatedigestmsg":
                return await self._state_digest(req)
            return self.log.machine.read(req.msgtype, req.caller, req.body, time.time_ns())
        self.log.machine.authorize(req.msgtype, req.caller, req.body)
        if req.msgtype == "assignprocessmsg":
            return await self._assign(req, req.msgtype, req.nonce)
        if req.msgtype == "closeassignmsg":
            return await self._close_assign(req)
        if req.msgtype == "addmembermsg":
            write = partial(self._write, req, req.msgtype, req.body, req.nonce)
            return await add_member(self.log, req, self.reach, write)
        return await self._write(req, req.msgtype, req.body, req.nonce)

    async def _state_digest(self, req: Request) -> Any:
        """This replica's own digest with the index it reflects (read together, with no await
        between, so they match), and its archive's with the index that one reflects (read in
        a worker thread in one transaction); never forwarded, so each node can be asked."""
        value = self.log.machine.read(req.msgtype, req.caller, req.body, 0)
        reply = {**value, "applied": self.log.colony.last_applied}
        path = getattr(getattr(self.log.machine, "archive", None), "path", None)
        if path is not None:
            digest, applied = await trio.to_thread.run_sync(file_digest, path)
            reply["archive"] = {"digest": digest, "applied": applied}
        return reply

    async def _write(self, req: Request, op: str, body: dict, nonce: bytes) -> Any:
        cmd = {
            "op": op,
            "caller": req.caller,
            "nonce": nonce,
            "expiry": max(req.expiry_ms, time.time_ns() // 1_000_000 + COMMAND_TTL_MS),
            "body": body,
            "gen": os.urandom(32).hex(),
        }
        status, value = await self.log.submit(cmd, timeout=DEFAULT_CALL_TIMEOUT_S)
        if status != 200:
            raise error_from_wire(status, value)
        return value

    async def _assign(self, req: Request, op: str, nonce: bytes) -> Any:
        """Long-poll: propose an assign only when the local replica shows a candidate."""
        timeout = req.body["timeout"]
        colony = req.body["colonyname"]
        if timeout < 0:
            return await self._write(req, op, req.body, nonce)
        deadline = trio.current_time() + timeout
        tries = 0
        granted = self._try_grant(colony, req.caller)
        # Bounded: every pass either waits for a grant (or the deadline) or proposes once.
        while True:
            if granted:
                try:
                    return await self._write(
                        req, op, req.body, derived_nonce(nonce, tries) if tries else nonce
                    )
                except NotFound:
                    pass  # another executor took it first
                finally:
                    self._release(colony)
                tries += 1
            if trio.current_time() >= deadline:
                raise NotFound("no process available for assignment")
            granted = await self._wait_for_grant(colony, req.caller, deadline)

    def _try_grant(self, colony: str, caller: str) -> bool:
        if self.log.machine.assignable(colony, caller) > self._assigning.get(colony, 0):
            self._assigning[colony] = self._assigning.get(colony, 0) + 1
            return True
        return False

    def _release(self, colony: str) -> None:
        left = self._assigning[colony] - 1
        if left:
            self._assigning[colony] = left
        else:
            del self._assigning[colony]
        self._grant_waiters()  # a refused assign may leave a candidate for another waiter

    def _grant_waiters(self) -> None:
        for colony, waiters in list(self._waiters.items()):
            for w in list(waiters):
                if self._try_grant(colony, w.caller):
                    waiters.remove(w)
                    w.granted = True
                    w.event.set()
            if not waiters:
                del self._waiters[colony]

    async def _wait_for_grant(self, colony: str, caller: str, deadline: float) -> bool:
        """Until the apply listener grants an assign slot (True) or the deadline (False)."""
        w = _AssignWaiter(caller)
        self._waiters.setdefault(colony, []).append(w)
        try:
            with trio.move_on_at(deadline):
                await w.event.wait()
        except BaseException:
            if w.granted:
                self._release(colony)
            raise
        finally:
            if not w.granted:
                waiters = self._waiters.get(colony)
                if waiters is not None and w in waiters:
                    waiters.remove(w)
                    if not waiters:
                        del self._waiters[colony]
        return w.granted

    async def _close_assign(self, req: Request) -> Any:
        result = await self._write(req, "closeassignmsg", req.body, req.nonce)
        if result.get("process") is not None or req.body["timeout"] < 0:
            return result
        follow = Request(
            msgtype="assignprocessmsg",
            body={"colonyname": req.body["colonyname"], "timeout": req.body["timeout"]},
            caller=req.caller,
            nonce=derived_nonce(req.nonce, 1_000_000),
            expiry_ms=req.expiry_ms,
            audience=req.audience,
            write=True,
        )
        try:
            process = await self._assign(follow, "assignprocessmsg", follow.nonce)
        except (NotFound, RequestTimeout):
            process = None
        return {"closed": result.get("closed", {}), "process": process}
