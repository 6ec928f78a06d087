"""State records: colonies, executors, processes, process graphs and attributes.

Each record converts to its Colonies (HEAD) JSON shape with `to_wire()` and back from the
snapshot form with `from_snapshot()`. `to_wire()` always builds a fresh dict, so a reply
handed to the node never changes when the machine later mutates the record. Sub-structures
the machine never mutates in place (the spec, the in/out/errors lists, attribute values) are
shared with the reply rather than copied, to keep reads cheap: callers must treat replies as
read-only.

All times are int unix nanoseconds; 0 means unset.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from typing import Any

from protocol.messages import CANCELLED, FAILED, RUNNING, STATE_NAMES, SUCCESS, WAITING

# Times we store are clamped to int64 so every int stays msgpack-able, however large a
# client's maxwaittime/maxexectime or priority is.
MAX_TIME_NS = 2**63 - 1
MIN_TIME_NS = -(2**63)
NS_PER_S = 1_000_000_000
NS_PER_DAY = 86_400 * NS_PER_S


def deadline_after(now: int, seconds: int) -> int:
    """`now + seconds`, in ns, clamped to int64 (0 = no deadline when seconds <= 0)."""
    if seconds <= 0:
        return 0
    return min(now + seconds * NS_PER_S, MAX_TIME_NS)


def priority_time(submitted: int, priority: int) -> int:
    """Colonies HEAD: one priority unit is worth one day of queue age; lower is served first."""
    return max(MIN_TIME_NS, min(submitted - priority * NS_PER_DAY, MAX_TIME_NS))


@dataclass(frozen=True, slots=True)
class Colony:
    colonyid: str  # the ID of the colony owner's key
    name: str

    def to_wire(self) -> dict[str, Any]:
        return {"colonyid": self.colonyid, "name": self.name}

    @classmethod
    def from_snapshot(cls, d: dict[str, Any]) -> Colony:
        return cls(colonyid=d["colonyid"], name=d["name"])


@dataclass(slots=True)
class Executor:
    executorid: str
    executortype: str
    executorname: str
    colonyname: str
    state: int
    commissiontime: int
    lastheardfromtime: int = 0
    # Set when it was not heard from for its colony's stale-after (consensus/liveness.py),
    # cleared when it calls in again.
    stale: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {
            "executorid": self.executorid,
            "executortype": self.executortype,
            "executorname": self.executorname,
            "colonyname": self.colonyname,
            "state": self.state,
            "commissiontime": self.commissiontime,
            "lastheardfromtime": self.lastheardfromtime,
            "stale": self.stale,
        }

    @classmethod
    def from_snapshot(cls, d: dict[str, Any]) -> Executor:
        return cls(
            executorid=d["executorid"],
            executortype=d["executortype"],
            executorname=d["executorname"],
            colonyname=d["colonyname"],
            state=d["state"],
            commissiontime=d["commissiontime"],
            lastheardfromtime=d["lastheardfromtime"],
            stale=bool(d.get("stale", False)),  # absent before format 3's liveness
        )


def attribute_id(targetid: str, key: str, attributetype: int) -> str:
    """Deterministic, as in Colonies: the same key and type on one target collide."""
    return hashlib.sha3_256((targetid + key + str(attributetype)).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Attribute:
    attributeid: str
    targetid: str
    targetcolonyname: str
    attributetype: int
    key: str
    value: str

    def to_wire(self) -> dict[str, Any]:
        return {
            "attributeid": self.attributeid,
            "targetid": self.targetid,
            "targetcolonyname": self.targetcolonyname,
            "attributetype": self.attributetype,
            "key": self.key,
            "value": self.value,
        }

    @classmethod
    def from_snapshot(cls, d: dict[str, Any]) -> Attribute:
        return cls(
            attributeid=d["attributeid"],
            targetid=d["targetid"],
            targetcolonyname=d["targetcolonyname"],
            attributetype=d["attributetype"],
            key=d["key"],
            value=d["value"],
        )


# The (prioritytime, submission sequence, processid) order the assign queue serves.
QueueKey = tuple[int, int, str]


class _SharedEmptyList(list):  # type: ignore[type-arg]
    """The one empty list that every process shares for a list field that is empty: such
    fields are replaced, never changed in place (changing this one raises), and 100,000
    waiting processes otherwise hold 700,000 empty lists."""

    def _refuse(self, *_args: Any, **_kwargs: Any) -> Any:  # noqa: ANN401
        raise TypeError("the shared empty list is never changed: replace it")

    append = extend = insert = remove = pop = clear = sort = reverse = _refuse
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse  # type: ignore[assignment]


class _SharedEmptyDict(dict):  # type: ignore[type-arg]
    """The one empty dict that specs share for their empty `kwargs` and `env`."""

    def _refuse(self, *_args: Any, **_kwargs: Any) -> Any:  # noqa: ANN401
        raise TypeError("the shared empty dict is never changed: replace it")

    update = pop = popitem = clear = setdefault = _refuse
    __setitem__ = __delitem__ = __ior__ = _refuse  # type: ignore[assignment]


EMPTY_LIST: list[Any] = _SharedEmptyList()
EMPTY_DICT: dict[str, Any] = _SharedEmptyDict()


def shared(value: list[Any]) -> list[Any]:
    """``value``, or the shared empty list when it is empty."""
    return value if value else EMPTY_LIST


# Spec strings that many live processes repeat (the same function, colony and executor type).
_SHARED_SPEC_STRINGS = ("funcname", "label", "nodename")
_SHARED_CONDITION_STRINGS = ("colonyname", "executortype")


def compact_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` sharing what many specs repeat (in place): its common strings interned, its
    empty containers the shared ones. 100,000 waiting processes of one function otherwise
    hold 100,000 copies of its name, colony and executor type. Specs are never changed once
    stored, so sharing is safe."""
    for key in _SHARED_SPEC_STRINGS:
        value = spec.get(key)
        if type(value) is str:
            spec[key] = sys.intern(value)
    for key in ("kwargs", "env"):
        if spec.get(key) == {}:
            spec[key] = EMPTY_DICT
    conditions = spec.get("conditions")
    if type(conditions) is dict:
        for key in _SHARED_CONDITION_STRINGS:
            value = conditions.get(key)
            if type(value) is str:
                conditions[key] = sys.intern(value)
        for key in ("executornames", "dependencies"):
            if conditions.get(key) == []:
                conditions[key] = EMPTY_LIST
    return spec


@dataclass(slots=True)
class Process:
    processid: str
    seq: int  # submission sequence number: the tie-break after prioritytime, never reused
    spec: dict[str, Any]
    initiatorid: str
    initiatorname: str
    submissiontime: int
    prioritytime: int
    state: int = WAITING
    assignedexecutorid: str = ""
    isassigned: bool = False
    starttime: int = 0
    endtime: int = 0
    waitdeadline: int = 0
    execdeadline: int = 0
    retries: int = 0
    # The current (or last) attempt number; 0 before the first assign. A close must name it.
    attempt: int = 0
    attributes: list[Attribute] = field(default_factory=list)
    inputs: list[Any] = field(default_factory=lambda: EMPTY_LIST)
    out: list[Any] = field(default_factory=lambda: EMPTY_LIST)
    errors: list[str] = field(default_factory=lambda: EMPTY_LIST)
    # Workflow membership. `parents` are in the order of the spec's dependencies (the order
    # `in` concatenates their outputs); `waitforparents` is true until every parent has
    # succeeded, and such a process is not in the assign queue. The lists are replaced, never
    # changed in place, so replies that share them stay as they were.
    processgraphid: str = ""
    parents: list[str] = field(default_factory=lambda: EMPTY_LIST)
    children: list[str] = field(default_factory=lambda: EMPTY_LIST)
    waitforparents: bool = False
    # Retries with backoff, concurrency limits (consensus/backoff.py, concurrency.py).
    # `backoffuntil` (ns, 0 = none): a requeued process waits out its backoff before it is
    # assignable (shown on the wire). `parked`: its concurrency key was at its limit when
    # assign met it, so it waits in the key's parked list, not in the assign queue (an
    # internal index detail: in snapshots, not on the wire).
    backoffuntil: int = 0
    parked: bool = False
    # A read-only view of an archived process (ColonyState.process): never changed, and not
    # part of the live state. Not on the wire or in snapshots.
    archived: bool = False

    @property
    def colonyname(self) -> str:
        return self.spec["conditions"]["colonyname"]

    @property
    def executortype(self) -> str:
        return self.spec["conditions"]["executortype"]

    @property
    def target_names(self) -> tuple[str, ...]:
        """The executor names this process is reserved for (empty = any), deduplicated."""
        return tuple(dict.fromkeys(self.spec["conditions"]["executornames"]))

    @property
    def queue_key(self) -> QueueKey:
        return (self.prioritytime, self.seq, self.processid)

    def to_wire(self) -> dict[str, Any]:
        return {
            "processid": self.processid,
            "initiatorid": self.initiatorid,
            "initiatorname": self.initiatorname,
            "assignedexecutorid": self.assignedexecutorid,
            "isassigned": self.isassigned,
            "state": self.state,
            "prioritytime": self.prioritytime,
            "submissiontime": self.submissiontime,
            "starttime": self.starttime,
            "endtime": self.endtime,
            "waitdeadline": self.waitdeadline,
            "execdeadline": self.execdeadline,
            "retries": self.retries,
            "attempt": self.attempt,
            "attributes": [a.to_wire() for a in self.attributes],
            "spec": self.spec,
            "in": self.inputs,
            "out": self.out,
            "errors": self.errors,
            "waitforparents": self.waitforparents,
            "parents": self.parents,
            "children": self.children,
            "processgraphid": self.processgraphid,
            "backoffuntil": self.backoffuntil,  # retries with backoff
        }

    def to_snapshot(self) -> dict[str, Any]:
        d = self.to_wire()
        d["seq"] = self.seq
        d["parked"] = self.parked  # concurrency limits
        return d

    @classmethod
    def from_snapshot(cls, d: dict[str, Any], archived: bool = False) -> Process:
        return cls(
            processid=d["processid"],
            seq=d["seq"],
            spec=compact_spec(d["spec"]),
            initiatorid=sys.intern(d["initiatorid"]),
            initiatorname=sys.intern(d["initiatorname"]),
            submissiontime=d["submissiontime"],
            prioritytime=d["prioritytime"],
            state=d["state"],
            assignedexecutorid=d["assignedexecutorid"],
            isassigned=d["isassigned"],
            starttime=d["starttime"],
            endtime=d["endtime"],
            waitdeadline=d["waitdeadline"],
            execdeadline=d["execdeadline"],
            retries=d["retries"],
            attempt=d["attempt"],
            attributes=[Attribute.from_snapshot(a) for a in d["attributes"]],
            # Taken, not copied: these lists are replaced, never changed in place.
            inputs=shared(d["in"]),
            out=shared(d["out"]),
            errors=shared(d["errors"]),
            # Absent from snapshots written before workflows existed (format 1).
            processgraphid=d.get("processgraphid", ""),
            parents=shared(d.get("parents", [])),
            children=shared(d.get("children", [])),
            waitforparents=bool(d.get("waitforparents", False)),
            # Retries with backoff, concurrency limits: absent before format 3.
            backoffuntil=d.get("backoffuntil", 0),
            parked=bool(d.get("parked", False)),
            archived=archived,
        )


def graph_state(counts: list[int], total: int) -> int:
    """A graph's state from its members' states, as Colonies HEAD computes it: FAILED if any
    failed, else CANCELLED if any was cancelled, SUCCESS if all succeeded, RUNNING once any
    has started (running or succeeded), else WAITING."""
    if counts[FAILED]:
        return FAILED
    if counts[CANCELLED]:
        return CANCELLED
    if total and counts[SUCCESS] == total:
        return SUCCESS
    if counts[SUCCESS] or counts[RUNNING]:
        return RUNNING
    return WAITING



@dataclass(slots=True)
class ProcessGraph:
    """A workflow: a DAG of processes submitted together (and grown by addchildmsg).

    `state`, `starttime` and `endtime` follow the members (ColonyState keeps them right);
    `counts` (members per state) is derived, rebuilt from the members on restore, and not
    part of snapshots. `processids` is in creation order; it and `rootprocessids` change in
    place, so `to_wire` copies them.
    """

    processgraphid: str
    seq: int  # shares the process sequence: graphs list in submission order
    colonyname: str
    initiatorid: str
    initiatorname: str
    submissiontime: int
    rootprocessids: list[str] = field(default_factory=list)
    processids: list[str] = field(default_factory=list)
    state: int = WAITING
    starttime: int = 0
    endtime: int = 0
    counts: list[int] = field(default_factory=lambda: [0] * len(STATE_NAMES))
    archived: bool = False  # a read-only view of an archived graph (ColonyState.graph)

    def to_wire(self) -> dict[str, Any]:
        return {
            "processgraphid": self.processgraphid,
            "colonyname": self.colonyname,
            "initiatorid": self.initiatorid,
            "initiatorname": self.initiatorname,
            "rootprocessids": list(self.rootprocessids),
            "processids": list(self.processids),
            "state": self.state,
            "submissiontime": self.submissiontime,
            "starttime": self.starttime,
            "endtime": self.endtime,
        }

    def to_snapshot(self) -> dict[str, Any]:
        d = self.to_wire()
        d["seq"] = self.seq
        return d

    @classmethod
    def from_snapshot(cls, d: dict[str, Any], archived: bool = False) -> ProcessGraph:
        return cls(
            processgraphid=d["processgraphid"],
            seq=d["seq"],
            colonyname=d["colonyname"],
            initiatorid=d["initiatorid"],
            initiatorname=d["initiatorname"],
            submissiontime=d["submissiontime"],
            rootprocessids=list(d["rootprocessids"]),
            processids=list(d["processids"]),
            state=d["state"],
            starttime=d["starttime"],
            endtime=d["endtime"],
            archived=archived,
        )
