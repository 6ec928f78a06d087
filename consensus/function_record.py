"""A function an executor serves (Colonies HEAD `Function`), registered with addfunctionmsg.

One record per (executor, funcname): the executor type and colony come from the executor's
own record, never from the client. Its statistics count the processes the executor closed
successfully under that funcname (as Colonies), with their wait (submit to start) and exec
(start to close) times; kept as int ns, shown in seconds as Colonies does. The average is the
true mean (Colonies averages only the last two values).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

NS_PER_S = 1_000_000_000


def function_id(executorid: str, funcname: str) -> str:
    """Deterministic: re-registering the same function keeps its id (an executor registers
    its functions every time it starts)."""
    return hashlib.sha3_256(f"function/{executorid}/{funcname}".encode()).hexdigest()


@dataclass(slots=True)
class Function:
    functionid: str
    executorid: str
    executorname: str
    executortype: str
    colonyname: str
    funcname: str
    description: str = ""
    args: list[Any] = field(default_factory=list)  # replaced, never changed in place
    counter: int = 0
    wait_ns: tuple[int, int, int] = (0, 0, 0)  # min, max, total
    exec_ns: tuple[int, int, int] = (0, 0, 0)

    def record(self, wait: int, exec_: int) -> None:
        """One more successful run that waited `wait` ns and ran `exec_` ns."""
        first = self.counter == 0
        self.counter += 1
        self.wait_ns = _fold(self.wait_ns, wait, first)
        self.exec_ns = _fold(self.exec_ns, exec_, first)

    def to_wire(self) -> dict[str, Any]:
        n = self.counter or 1
        return {
            **self._fields(),
            "counter": self.counter,
            "minwaittime": self.wait_ns[0] / NS_PER_S,
            "maxwaittime": self.wait_ns[1] / NS_PER_S,
            "avgwaittime": self.wait_ns[2] / n / NS_PER_S,
            "minexectime": self.exec_ns[0] / NS_PER_S,
            "maxexectime": self.exec_ns[1] / NS_PER_S,
            "avgexectime": self.exec_ns[2] / n / NS_PER_S,
        }

    def to_snapshot(self) -> dict[str, Any]:
        return {
            **self._fields(),
            "counter": self.counter,
            "waitns": list(self.wait_ns),
            "execns": list(self.exec_ns),
        }

    def _fields(self) -> dict[str, Any]:
        return {
            "functionid": self.functionid,
            "executorid": self.executorid,
            "executorname": self.executorname,
            "executortype": self.executortype,
            "colonyname": self.colonyname,
            "funcname": self.funcname,
            "description": self.description,
            "args": self.args,
        }

    @classmethod
    def from_snapshot(cls, d: dict[str, Any]) -> Function:
        return cls(
            functionid=d["functionid"],
            executorid=d["executorid"],
            executorname=d["executorname"],
            executortype=d["executortype"],
            colonyname=d["colonyname"],
            funcname=d["funcname"],
            description=d["description"],
            args=list(d["args"]),
            counter=d.get("counter", 0),
            wait_ns=_triple(d.get("waitns")),
            exec_ns=_triple(d.get("execns")),
        )


def _triple(v: list[int] | None) -> tuple[int, int, int]:
    """Statistics from a snapshot; absent (no runs recorded) is all zeros."""
    lo, hi, total = v or (0, 0, 0)
    return (lo, hi, total)


def _fold(stats: tuple[int, int, int], value: int, first: bool) -> tuple[int, int, int]:
    lo, hi, total = stats
    if first:
        return (value, value, value)
    return (min(lo, value), max(hi, value), total + value)
