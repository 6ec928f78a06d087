"""A small driver for ColonyMachine in tests: ids, signed-looking commands, a clock.

Commands are built exactly as the node builds them (op, caller, nonce, expiry, body, gen);
`write` applies one through `apply` (raising typed errors), `batch` through `apply_batch`.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

import msgpack

from consensus.archive import Archive
from consensus.machine import ColonyMachine
from protocol.messages import APPROVED, PENDING, REJECTED, RUNNING, WAITING

T0 = 1_700_000_000 * 10**9  # a fixed start time (unix ns)
S = 10**9


def make_id(label: str) -> str:
    """A stand-in for a key-derived ID: 64 lowercase hex characters."""
    return hashlib.sha3_256(label.encode()).hexdigest()


SERVER = make_id("server-owner")
CLUSTER = make_id("cluster")


class Harness:
    def __init__(
        self, now: int = T0, bootstrap: bool = True, archive: Archive | None = None
    ) -> None:
        self.m = ColonyMachine(archive)
        self.now = now
        self._n = itertools.count(1)
        if bootstrap:
            self.m.apply({"op": "bootstrap", "serverid": SERVER, "clusterid": CLUSTER}, now)

    def next_deadline(self) -> int | None:
        """The machine's next deadline or timer, retention sweeps left out: what a test of
        another feature means by "nothing is due" (every colony with archived work has a
        retention sweep due days later, consensus/retention.py)."""
        st = self.m._st
        due = [at for at, _key, kind in st.timers.entries() if kind != "retention"]
        if st.deadlines.next() is not None:
            due.append(st.deadlines.next())
        return min(due) if due else None

    # Building and applying commands.

    def nonce(self) -> bytes:
        return hashlib.blake2b(str(next(self._n)).encode(), digest_size=16).digest()

    def cmd(
        self,
        op: str,
        caller: str,
        body: dict[str, Any],
        nonce: bytes | None = None,
        expiry: int | None = None,
        gen: str | None = None,
    ) -> dict[str, Any]:
        return {
            "op": op,
            "caller": caller,
            "nonce": nonce if nonce is not None else self.nonce(),
            "expiry": expiry if expiry is not None else self.now // 10**6 + 60_000,
            "body": body,
            "gen": gen if gen is not None else make_id(f"gen-{next(self._n)}"),
        }

    def write(self, op: str, caller: str, body: dict[str, Any], **kw: Any) -> Any:
        return self.m.apply(self.cmd(op, caller, body, **kw), self.now)

    def batch(self, cmds: list[dict[str, Any]]) -> list[list]:
        return self.m.apply_batch(msgpack.packb({"now": self.now, "cmds": cmds}))

    def read(self, msgtype: str, caller: str, body: dict[str, Any] | None = None) -> Any:
        return self.m.read(msgtype, caller, body or {}, self.now)

    def tick(self) -> Any:
        return self.m.apply({"op": "tick"}, self.now)

    def advance(self, seconds: float) -> Any:
        self.now += int(seconds * S)
        return self.tick()

    # Setting up a world.

    def colony(self, name: str) -> str:
        """Add colony `name`; returns its owner's id."""
        owner = make_id(f"colony-owner-{name}")
        self.write("addcolonymsg", SERVER, {"colony": {"colonyid": owner, "name": name}})
        return owner

    def executor(
        self, colony: str, name: str, executortype: str = "cli", state: int = APPROVED
    ) -> str:
        """Add an executor (approved unless told otherwise); returns its id."""
        eid = make_id(f"executor-{colony}-{name}")
        owner = make_id(f"colony-owner-{colony}")
        self.write(
            "addexecutormsg",
            owner,
            {
                "executor": {
                    "executorid": eid,
                    "executortype": executortype,
                    "executorname": name,
                    "colonyname": colony,
                }
            },
        )
        ref = {"colonyname": colony, "executorname": name}
        if state == APPROVED:
            self.write("approveexecutormsg", owner, ref)
        elif state == REJECTED:
            self.write("rejectexecutormsg", owner, ref)
        else:
            assert state == PENDING
        return eid

    def spec(
        self,
        colony: str,
        executortype: str = "cli",
        names: list[str] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "funcname": "echo",
            "conditions": {
                "colonyname": colony,
                "executortype": executortype,
                "executornames": names or [],
            },
        }
        spec.update(fields)
        return spec

    def submit(
        self,
        caller: str,
        colony: str,
        executortype: str = "cli",
        names: list[str] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        return self.write(
            "submitfuncspecmsg", caller, {"spec": self.spec(colony, executortype, names, **fields)}
        )

    def assign(self, caller: str, colony: str) -> dict[str, Any]:
        return self.write("assignprocessmsg", caller, {"colonyname": colony, "timeout": -1})

    def close(self, caller: str, process: dict[str, Any], ok: bool = True, **kw: Any) -> Any:
        body: dict[str, Any] = {"processid": process["processid"], "attempt": process["attempt"]}
        body.update(kw)
        return self.write("closesuccessfulmsg" if ok else "closefailedmsg", caller, body)

    def process(self, caller: str, pid: str) -> dict[str, Any]:
        return self.read("getprocessmsg", caller, {"processid": pid})

    def stats(self) -> dict[str, int]:
        return self.read("getstatisticsmsg", SERVER)


def assert_listing(listed: list[dict], want: list[str], idkey: str) -> None:
    """A listing of one state: waiting and running work in submission order (`want`'s
    order); finished work newest end first, so the same items ordered by (endtime, id)
    descending."""
    got = [x[idkey] for x in listed]
    assert len(got) == min(len(want), 100)
    if listed and listed[0]["state"] in (WAITING, RUNNING):
        assert got == want[:100]
        return
    assert set(got) <= set(want)
    keys = [(x["endtime"], x[idkey]) for x in listed]
    assert keys == sorted(keys, reverse=True)
