"""The Python SDK: an async client for every RPC, and a thin synchronous wrapper.

    async with Client.connect(addr, prvkey) as client:
        process = await client.submit("echo", args=["hello"], colonyname="dev",
                                      executortype="echo")

One connection can serve many identities: `client.with_key(other_key)` signs with another key
over the same stream, which is how several executors in one process share a connection.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from node.connection import Connection, ConnectionLost, NoReply, leaves
from node.dispatch import DEFAULT_CALL_TIMEOUT_S
from protocol.envelope import DEFAULT_TTL_MS, seal
from protocol.errors import BadRequest, ColoniesError, RequestTimeout, Unavailable
from protocol.identity import PrivateKey
from protocol.messages import (
    BEYOND_SPEC_FIELDS,
    CANCELLED,
    FAILED,
    FINISHED_STATES,
    MAX_LOG_COUNT,
    MAX_SUBSCRIBE_TIMEOUT_S,
    MESSAGES,
    RUNNING,
    SUCCESS,
    WAITING,
)

ANY_AUDIENCE = "*"


def _key(key: PrivateKey | str) -> PrivateKey:
    return key if isinstance(key, PrivateKey) else PrivateKey.from_hex(key)


class _Link:
    """The connection a Client and its with_key views share, and where to go when it breaks:
    the addresses the user gave, then every member the cluster reports."""

    def __init__(self, nursery: trio.Nursery, addrs: list[str], timeout: float) -> None:
        self.nursery = nursery
        self.addrs = list(dict.fromkeys(addrs))
        self.timeout = timeout
        self.conn: Connection | None = None
        self._lock = trio.Lock()

    def learn(self, info: dict) -> None:
        for addr in info.get("members", {}).values():
            if addr not in self.addrs:
                self.addrs.append(addr)

    async def connection(self, key: PrivateKey, failed: Connection | None = None) -> Connection:
        """The live connection; if `failed` is the current one, move to the next address that
        answers (each tried once, in order, starting after the one that failed)."""
        async with self._lock:
            if self.conn is not None and self.conn is not failed and not self.conn.broken:
                return self.conn
            start = self.addrs.index(self.conn.addr) + 1 if self.conn is not None else 0
            if self.conn is not None:
                await self.conn.aclose()
                self.conn = None
            last: ColoniesError = Unavailable("no node address to connect to")
            for i in range(len(self.addrs)):
                addr = self.addrs[(start + i) % len(self.addrs)]
                try:
                    conn = await Connection.open(self.nursery, addr, self.timeout)
                    info = await conn.call(
                        seal(key, "getserverinfomsg", {}, ANY_AUDIENCE, _now_ms()), self.timeout
                    )
                except (Unavailable, RequestTimeout) as e:
                    last = e
                    continue
                self.learn(info)
                self.conn, self.info = conn, info
                return conn
            raise last


class _PinnedLink(_Link):
    """A link that stays with the node it was opened to: it learns no other members, so a
    reconnect goes back to the same address (what it reads is that node's own view)."""

    def learn(self, info: dict) -> None:
        pass


class Client:
    def __init__(self, link: _Link, key: PrivateKey, cluster_id: str, info: dict) -> None:
        self._link = link
        self.key = key
        self.cluster_id = cluster_id
        self.server_info = info
        self.timeout = DEFAULT_CALL_TIMEOUT_S
        # Reads are answered by the node's local replica; set this to read through the
        # leader's log instead (every write acknowledged before the read is then visible).
        self.consistent_reads = False
        # How long a signed request stays valid (the node checks it when the request
        # arrives; a long-poll may then wait longer than this, up to its own timeout).
        self.ttl_ms = DEFAULT_TTL_MS

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, addr: str | list[str], key: PrivateKey | str, timeout: float = 10.0
    ) -> AsyncIterator[Client]:
        """Connect to the first node that answers among `addr` (one or several); when that node
        goes away later, calls move to another member of its cluster by themselves."""
        try:
            async with trio.open_nursery() as nursery:
                link = _Link(nursery, [addr] if isinstance(addr, str) else addr, timeout)
                key = _key(key)
                await link.connection(key)
                try:
                    yield cls(link, key, link.info["clusterid"], link.info)
                finally:
                    if link.conn is not None:
                        await link.conn.aclose()
        except BaseExceptionGroup as group:
            # The nursery wraps what the caller's block raised; give them the error itself,
            # so `except NotFound:` around the block works.
            found = leaves(group)
            if len(found) == 1:
                raise found[0] from None
            raise

    @classmethod
    async def open(
        cls,
        nursery: trio.Nursery,
        addr: str | list[str],
        key: PrivateKey | str,
        timeout: float = 10.0,
        *,
        pinned: bool = False,
    ) -> Client:
        """Like `connect`, for callers that keep clients open across tasks: the connection
        lives in `nursery` (which must outlive the client) until `aclose()`. With `pinned`
        the client stays with the one node at `addr` and never moves to another member, so
        a status reader sees each member's own view (the CLI's `status` probes)."""
        addrs = [addr] if isinstance(addr, str) else addr
        link = _PinnedLink(nursery, addrs, timeout) if pinned else _Link(nursery, addrs, timeout)
        key = _key(key)
        await link.connection(key)
        return cls(link, key, link.info["clusterid"], link.info)

    async def aclose(self) -> None:
        """Close the connection of a client made with `open` (and of its with_key views)."""
        conn, self._link.conn = self._link.conn, None
        if conn is not None:
            await conn.aclose()

    def with_key(self, key: PrivateKey | str) -> Client:
        return Client(self._link, _key(key), self.cluster_id, self.server_info)

    @property
    def conn(self) -> Connection | None:
        return self._link.conn

    @property
    def addr(self) -> str | None:
        return self._link.conn.addr if self._link.conn is not None else None

    @property
    def id(self) -> str:
        return self.key.id

    async def call(self, msgtype: str, body: dict, timeout: float | None = None) -> Any:
        if self.consistent_reads and not MESSAGES[msgtype].write:
            body = {**body, "consistent": True}
        envelope = seal(self.key, msgtype, body, self.cluster_id, _now_ms(), self.ttl_ms)
        conn = await self._link.connection(self.key)
        try:
            return await conn.call(envelope, timeout or self.timeout)
        except NoReply:
            # The node did not answer within the bound (hung or paused): the next call moves
            # to another member rather than wait on this one again. This call's outcome stays
            # unknown, as with any timeout.
            conn.abandon()
            raise
        except ConnectionLost as lost:
            # The node went away. A request that never left can go to another member as it
            # is; one that was in flight may have been applied, so only reads are resent
            # (a resent write would come back as a replay, which says nothing useful).
            conn = await self._link.connection(self.key, failed=conn)
            if lost.sent and MESSAGES[msgtype].write:
                raise Unavailable(
                    f"lost the connection to {lost.addr} while {msgtype} was in flight; "
                    f"it may or may not have been applied (now connected to {conn.addr})"
                ) from None
            return await conn.call(envelope, timeout or self.timeout)

    # Server.
    async def server_info_fresh(self) -> dict:
        return await self.call("getserverinfomsg", {})

    async def statistics(self) -> dict:
        return await self.call("getstatisticsmsg", {})

    async def state_digest(self) -> dict:
        """{"digest", "applied"}: the connected node's own state digest and the Raft index it
        reflects (server owner). Nodes that applied the same index must show the same digest."""
        return await self.call("getstatedigestmsg", {})

    # Cluster membership (server owner). The leader then changes the Raft group to match;
    # a removed node stops serving.
    async def add_member(self, peerid: str, addr: str, wait: int = 0) -> dict:
        """Add (or re-address) a member: `addr` is its full multiaddr ending in /p2p/peerid.
        The node dials it first (an unreachable one is refused, nothing changes); it joins as
        a learner and becomes a voter once caught up. Waits up to `wait` seconds for that.
        Returns {"members": {peer id: multiaddr}, "voter": bool}."""
        body = {"peerid": peerid, "addr": addr, "wait": wait}
        return await self.call("addmembermsg", body, timeout=wait + self.timeout)

    async def remove_member(self, peerid: str) -> dict:
        """Remove a member; returns {"members": ...}, the member book after the change."""
        return await self.call("removemembermsg", {"peerid": peerid})

    # Colonies.
    async def add_colony(self, colony_id: str, name: str) -> dict:
        return await self.call("addcolonymsg", {"colony": {"colonyid": colony_id, "name": name}})

    async def remove_colony(self, name: str) -> None:
        await self.call("removecolonymsg", {"colonyname": name})

    async def colonies(self) -> list[dict]:
        return await self.call("getcoloniesmsg", {})

    async def colony(self, name: str) -> dict:
        return await self.call("getcolonymsg", {"colonyname": name})

    async def colony_stats(self, name: str) -> dict:
        return await self.call("getcolonystatsmsg", {"colonyname": name})

    # Executors.
    async def add_executor(
        self, executor_id: str, name: str, executortype: str, colonyname: str
    ) -> dict:
        executor = {
            "executorid": executor_id,
            "executorname": name,
            "executortype": executortype,
            "colonyname": colonyname,
        }
        return await self.call("addexecutormsg", {"executor": executor})

    async def approve_executor(self, colonyname: str, name: str) -> None:
        await self.call("approveexecutormsg", {"colonyname": colonyname, "executorname": name})

    async def reject_executor(self, colonyname: str, name: str) -> None:
        await self.call("rejectexecutormsg", {"colonyname": colonyname, "executorname": name})

    async def remove_executor(self, colonyname: str, name: str) -> None:
        await self.call("removeexecutormsg", {"colonyname": colonyname, "executorname": name})

    async def executors(self, colonyname: str) -> list[dict]:
        return await self.call("getexecutorsmsg", {"colonyname": colonyname})

    async def executor(self, colonyname: str, name: str) -> dict:
        return await self.call("getexecutormsg", {"colonyname": colonyname, "executorname": name})

    # Processes.
    async def submit_spec(self, spec: dict) -> dict:
        return await self.call("submitfuncspecmsg", {"spec": spec})

    async def submit(
        self,
        funcname: str,
        *,
        colonyname: str,
        executortype: str,
        args: list | None = None,
        kwargs: dict | None = None,
        executornames: list[str] | None = None,
        priority: int = 0,
        maxwaittime: int = -1,
        maxexectime: int = -1,
        maxretries: int = -1,
        env: dict[str, str] | None = None,
        label: str = "",
        **beyond: Any,  # noqa: ANN401 - optional spec fields, below
    ) -> dict:
        """Submit a function call. Optional spec fields beyond Colonies, sent only when
        given: backoff={"initial": s, "multiplier": m, "max": s, "jitter": 0..1} (retries
        wait, and a failed close retries while maxretries allows), idempotencykey="..." (a
        second submit with it within 24 h returns the first process), concurrencykey="..."
        with concurrencylimit=n (at most n running at once in the colony)."""
        unknown = set(beyond) - BEYOND_SPEC_FIELDS.keys()
        if unknown:
            raise TypeError(f"submit() got unexpected keyword arguments {sorted(unknown)}")
        return await self.submit_spec(
            {
                **{k: v for k, v in beyond.items() if v is not None},
                "funcname": funcname,
                "args": list(args or []),
                "kwargs": dict(kwargs or {}),
                "priority": priority,
                "maxwaittime": maxwaittime,
                "maxexectime": maxexectime,
                "maxretries": maxretries,
                "label": label,
                "env": dict(env or {}),
                "conditions": {
                    "colonyname": colonyname,
                    "executortype": executortype,
                    "executornames": list(executornames or []),
                },
            }
        )

    async def assign(self, colonyname: str, timeout: int = 10) -> dict:
        """Wait up to `timeout` seconds (< 0: try once) for a process; NotFound if none."""
        return await self.call(
            "assignprocessmsg",
            {"colonyname": colonyname, "timeout": timeout},
            timeout=max(timeout, 0) + self.timeout,
        )

    async def close(self, process: dict, out: list | None = None) -> None:
        await self.call(
            "closesuccessfulmsg",
            {"processid": process["processid"], "attempt": process["attempt"], "out": out or []},
        )

    async def fail(self, process: dict, errors: list[str] | None = None) -> None:
        await self.call(
            "closefailedmsg",
            {"processid": process["processid"], "attempt": process["attempt"], "errors": errors or []},
        )

    async def close_and_assign(
        self,
        process: dict,
        colonyname: str,
        *,
        successful: bool,
        out: list | None = None,
        errors: list[str] | None = None,
        timeout: int = 10,
    ) -> dict | None:
        """Close this attempt and assign the next process in one call; None if nothing came."""
        result = await self.call(
            "closeassignmsg",
            {
                "processid": process["processid"],
                "attempt": process["attempt"],
                "successful": successful,
                "out": out or [],
                "errors": errors or [],
                "colonyname": colonyname,
                "timeout": timeout,
            },
            timeout=max(timeout, 0) + self.timeout,
        )
        return result["process"]

    async def process(self, process_id: str) -> dict:
        return await self.call("getprocessmsg", {"processid": process_id})

    async def processes(
        self,
        colonyname: str,
        state: int = -1,
        count: int = 100,
        executortype: str = "",
        *,
        before: tuple[int, str] | None = None,
    ) -> list[dict]:
        """Unfinished processes in submission order, then finished ones newest first. The
        next page of finished ones: `before=(endtime, processid)` of the last one shown."""
        body: dict[str, Any] = {"colonyname": colonyname, "state": state, "count": count}
        body["executortype"] = executortype
        if before is not None:
            body["beforetime"], body["beforeid"] = before
        return await self.call("getprocessesmsg", body)

    async def waiting(self, colonyname: str, count: int = 100) -> list[dict]:
        return await self.processes(colonyname, WAITING, count)

    async def running(self, colonyname: str, count: int = 100) -> list[dict]:
        return await self.processes(colonyname, RUNNING, count)

    async def successful(self, colonyname: str, count: int = 100) -> list[dict]:
        return await self.processes(colonyname, SUCCESS, count)

    async def failed(self, colonyname: str, count: int = 100) -> list[dict]:
        return await self.processes(colonyname, FAILED, count)

    async def remove_process(self, process_id: str) -> None:
        await self.call("removeprocessmsg", {"processid": process_id})

    async def remove_all_processes(self, colonyname: str, state: int = -1) -> None:
        await self.call("removeallprocessesmsg", {"colonyname": colonyname, "state": state})

    async def cancel_process(self, process_id: str) -> None:
        """Cancel a waiting or running process (not a workflow member: cancel its graph)."""
        await self.call("cancelprocessmsg", {"processid": process_id})

    async def cancelled(self, colonyname: str, count: int = 100) -> list[dict]:
        return await self.processes(colonyname, CANCELLED, count)

    async def wait(self, process_id: str, timeout: float, poll: float = 0.05) -> dict:
        """Wait until the process is finished (SUCCESS, FAILED or CANCELLED); bounded by
        `timeout` (trio.TooSlowError)."""
        with trio.fail_after(timeout):
            while True:
                p = await self.process(process_id)
                if p["state"] in FINISHED_STATES:
                    return p
                await trio.sleep(poll)
                poll = min(poll * 1.5, 0.5)

    # Workflows (process graphs).
    async def submit_workflow(self, colonyname: str, functionspecs: list[dict]) -> dict:
        """Submit a DAG of function specs (each with a unique `nodename`, its dependencies in
        `conditions.dependencies`); returns the process graph."""
        return await self.submit_workflow_spec(
            {"colonyname": colonyname, "functionspecs": list(functionspecs)}
        )

    async def submit_workflow_spec(self, spec: dict) -> dict:
        """Submit a workflow spec as Colonies writes it: {colonyname, functionspecs}."""
        return await self.call("submitworkflowspecmsg", {"spec": spec})

    async def process_graph(self, graph_id: str) -> dict:
        """The graph with its `nodes` and `edges`."""
        return await self.call("getprocessgraphmsg", {"processgraphid": graph_id})

    async def process_graphs(
        self, colonyname: str, state: int = -1, count: int = 100
    ) -> list[dict]:
        body = {"colonyname": colonyname, "state": state, "count": count}
        return await self.call("getprocessgraphsmsg", body)

    async def remove_process_graph(self, graph_id: str) -> None:
        await self.call("removeprocessgraphmsg", {"processgraphid": graph_id})

    async def remove_all_process_graphs(self, colonyname: str, state: int = -1) -> None:
        await self.call("removeallprocessgraphsmsg", {"colonyname": colonyname, "state": state})

    async def cancel_process_graph(self, graph_id: str) -> None:
        await self.call("cancelprocessgraphmsg", {"processgraphid": graph_id})

    async def add_child(
        self,
        graph_id: str,
        parent_process_id: str,
        spec: dict,
        *,
        insert: bool = False,
        child_process_id: str = "",
    ) -> dict:
        """Add a process to a running graph as a child of `parent_process_id`, which must be
        running and assigned to this client's key. insert=True splices it between the parent
        and all the parent's children; `child_process_id` (an existing, not yet started
        process of the graph) makes that process wait for the new one. Returns the new
        process."""
        body = {
            "processgraphid": graph_id,
            "parentprocessid": parent_process_id,
            "childprocessid": child_process_id,
            "spec": spec,
            "insert": insert,
        }
        return await self.call("addchildmsg", body)

    async def wait_process_graph(self, graph_id: str, timeout: float, poll: float = 0.05) -> dict:
        """Wait until the graph is finished (SUCCESS, FAILED or CANCELLED); bounded by
        `timeout` (trio.TooSlowError)."""
        with trio.fail_after(timeout):
            while True:
                g = await self.process_graph(graph_id)
                if g["state"] in FINISHED_STATES:
                    return g
                await trio.sleep(poll)
                poll = min(poll * 1.5, 0.5)

    # Generators and crons.
    async def add_generator(
        self,
        colonyname: str,
        name: str,
        functionspecs: list[dict],
        trigger: int,
        timeout: int = -1,
    ) -> dict:
        """A generator: every `trigger` packed arguments start one run of the workflow
        (`functionspecs`, as for submit_workflow) whose roots get them as args; with
        `timeout` > 0 seconds, a partial batch runs that long after its first argument."""
        generator = {
            "colonyname": colonyname,
            "name": name,
            "workflowspec": {"colonyname": colonyname, "functionspecs": list(functionspecs)},
            "trigger": trigger,
            "timeout": timeout,
        }
        return await self.call("addgeneratormsg", {"generator": generator})

    async def pack_generator(self, generator_id: str, arg: Any) -> dict:  # noqa: ANN401
        """Queue one argument (any msgpack value); returns {queuesize, processgraphid}, the
        latter the run it completed ("" if the batch is not complete yet)."""
        return await self.call("packgeneratormsg", {"generatorid": generator_id, "arg": arg})

    async def generator(self, generator_id: str) -> dict:
        return await self.call("getgeneratormsg", {"generatorid": generator_id})

    async def generators(self, colonyname: str, count: int = 100) -> list[dict]:
        return await self.call("getgeneratorsmsg", {"colonyname": colonyname, "count": count})

    async def remove_generator(self, generator_id: str) -> None:
        await self.call("removegeneratormsg", {"generatorid": generator_id})

    async def add_cron(
        self,
        colonyname: str,
        name: str,
        functionspecs: list[dict],
        *,
        cron_expression: str = "",
        interval: int = -1,
        wait_for_prev: bool = False,
    ) -> dict:
        """A cron: the workflow runs on a 6-field expression with seconds (UTC, e.g.
        '0/5 * * * * *') or every `interval` seconds; `wait_for_prev` skips a run while the
        previous one is unfinished. The previous run's leaf outputs are the roots' input."""
        cron = {
            "colonyname": colonyname,
            "name": name,
            "workflowspec": {"colonyname": colonyname, "functionspecs": list(functionspecs)},
            "cronexpression": cron_expression,
            "interval": interval,
            "waitforprevprocessgraph": wait_for_prev,
        }
        return await self.call("addcronmsg", {"cron": cron})

    async def cron(self, cron_id: str) -> dict:
        return await self.call("getcronmsg", {"cronid": cron_id})

    async def crons(self, colonyname: str, count: int = 100) -> list[dict]:
        return await self.call("getcronsmsg", {"colonyname": colonyname, "count": count})

    async def run_cron(self, cron_id: str) -> dict:
        """Start a run now; returns the cron (its prevprocessgraphid is the new run)."""
        return await self.call("runcronmsg", {"cronid": cron_id})

    async def remove_cron(self, cron_id: str) -> None:
        await self.call("removecronmsg", {"cronid": cron_id})

    # Attributes.
    async def add_attribute(self, process_id: str, key: str, value: str, attributetype: int = 1) -> dict:
        attribute = {"targetid": process_id, "attributetype": attributetype, "key": key, "value": value}
        return await self.call("addattributemsg", {"attribute": attribute})

    async def attribute(self, attribute_id: str) -> dict:
        return await self.call("getattributemsg", {"attributeid": attribute_id})

    # Logs, functions, pause, executor liveness.
    async def add_log(self, process_id: str, message: str) -> dict:
        """Append a line to a running process's log (its assigned executor only); returns
        the line with its sequence number."""
        return await self.call("addlogmsg", {"processid": process_id, "message": message})

    async def logs(
        self,
        process_id: str,
        *,
        count: int = MAX_LOG_COUNT,
        afterseq: int = 0,
        since: int = 0,
        latest: bool = False,
        timeout: int = 0,
    ) -> list[dict]:
        """Up to `count` lines after sequence `afterseq` (and newer than `since`, unix ns),
        oldest first; `latest`: the newest `count`. With `timeout` > 0 the node waits up to
        that many seconds for a line when there is none yet."""
        body = {
            "processid": process_id,
            "count": count,
            "afterseq": afterseq,
            "since": since,
            "latest": latest,
            "timeout": timeout,
        }
        return await self.call("getlogsmsg", body, timeout=timeout + self.timeout)

    async def follow_logs(
        self, process_id: str, *, afterseq: int = 0, wait: int = 10
    ) -> AsyncIterator[dict]:
        """Every line after `afterseq` as it is written, until the process has finished
        and its last line was read. Each wait for a line is a long-poll of `wait` seconds,
        answered by the node when it applies one (no polling)."""
        cursor = afterseq
        while True:
            lines = await self.logs(process_id, afterseq=cursor, timeout=wait)
            for line in lines:
                cursor = line["seq"]
                yield line
            if lines:
                continue
            if (await self.process(process_id))["state"] not in FINISHED_STATES:
                continue
            # Finished: lines applied between the empty answer and that read are the last.
            while lines := await self.logs(process_id, afterseq=cursor):
                for line in lines:
                    cursor = line["seq"]
                    yield line
            return

    async def add_function(
        self,
        colonyname: str,
        executorname: str,
        funcname: str,
        *,
        description: str = "",
        args: list | None = None,
    ) -> dict:
        """Register a function this client's key (the executor `executorname`) serves;
        registering it again updates it."""
        fun = {
            "colonyname": colonyname,
            "executorname": executorname,
            "funcname": funcname,
            "description": description,
            "args": list(args or []),
        }
        return await self.call("addfunctionmsg", {"fun": fun})

    async def remove_function(self, function_id: str) -> None:
        await self.call("removefunctionmsg", {"functionid": function_id})

    async def functions(self, colonyname: str, executorname: str = "") -> list[dict]:
        """The colony's functions, or one executor's."""
        body = {"colonyname": colonyname, "executorname": executorname}
        return await self.call("getfunctionsmsg", body)

    async def pause_assignments(self, colonyname: str) -> None:
        """Stop handing out processes in the colony (colony owner); submits still queue."""
        await self.call("pauseassignmentsmsg", {"colonyname": colonyname})

    async def resume_assignments(self, colonyname: str) -> None:
        await self.call("resumeassignmentsmsg", {"colonyname": colonyname})

    async def pause_status(self, colonyname: str) -> dict:
        """{colonyname, ispaused, staleafter}."""
        return await self.call("getpausestatusmsg", {"colonyname": colonyname})

    async def heartbeat(self, colonyname: str) -> dict:
        """Tell the colony this executor is alive; returns {staleafter} (0: staleness off)."""
        return await self.call("executorheartbeatmsg", {"colonyname": colonyname})

    async def set_stale_after(self, colonyname: str, seconds: int) -> dict:
        """Colony owner: executors not heard from for `seconds` go stale and their running
        processes return to the queue (0 turns it off)."""
        body = {"colonyname": colonyname, "staleafter": seconds}
        return await self.call("setexecutorstaleaftermsg", body)

    # Beyond Colonies: subscriptions, retention and export. (Retries with backoff,
    # idempotency keys and concurrency limits are spec fields: see `submit`.)
    async def wait_for_process(
        self, process_id: str, state: int = SUCCESS, timeout: float = 60
    ) -> dict:
        """The process once it is in `state` (-1: any finished state), pushed by the node
        when it applies the change (no polling). RequestTimeout (408) after `timeout` s;
        BadRequest (400) at once when it finished in another state, so it never will be."""
        deadline = trio.current_time() + timeout
        while True:
            # One call waits at most MAX_SUBSCRIBE_TIMEOUT_S; longer waits take several.
            left = max(0.0, deadline - trio.current_time())
            chunk = MAX_SUBSCRIBE_TIMEOUT_S if left > MAX_SUBSCRIBE_TIMEOUT_S else math.ceil(left)
            body = {"processid": process_id, "state": state, "timeout": chunk}
            try:
                return await self.call("waitprocessmsg", body, timeout=chunk + self.timeout)
            except RequestTimeout:
                if trio.current_time() >= deadline:
                    raise

    async def follow_processes(
        self,
        colonyname: str,
        executortype: str = "",
        *,
        afterseq: int = -1,
        wait: int = 30,
        count: int = 100,
    ) -> AsyncIterator[dict]:
        """Every process submitted to the colony (of `executortype`, "" = any) after the
        cursor `afterseq` (a submission sequence number; -1: from now on), in submission
        order, as the node applies them. Runs until the caller stops iterating; each wait
        is a long-poll of up to `wait` seconds."""
        cursor = afterseq
        while True:
            body = {
                "colonyname": colonyname,
                "executortype": executortype,
                "afterseq": cursor,
                "count": count,
                "timeout": wait,
            }
            page = await self.call("followprocessesmsg", body, timeout=wait + self.timeout)
            cursor = page["cursor"]
            for p in page["processes"]:
                yield p

    async def set_retention(
        self, colonyname: str, seconds: int = 0, count: int = 0, *, default: bool = False
    ) -> dict:
        """Colony owner: remove finished processes and workflows `seconds` after they ended,
        and beyond the newest `count` of each (0 and 0: keep everything); `default` goes
        back to the cluster's default (30 days). Export what you want to keep before then.
        Returns the policy now in force, as `retention` does."""
        body = {"colonyname": colonyname, "seconds": seconds, "count": count, "default": default}
        return await self.call("setretentionmsg", body)

    async def retention(self, colonyname: str) -> dict:
        """The colony's retention: {colonyname, seconds, count, default}."""
        return await self.call("getretentionmsg", {"colonyname": colonyname})

    async def export_processes(
        self, colonyname: str, *, since: int = 0, afterseq: int = 0, count: int = 100
    ) -> AsyncIterator[dict]:
        """Every finished process of the colony (workflow members too) in submission order,
        read a page at a time; `since` (unix ns) keeps those that ended at or after it."""
        cursor = afterseq
        while True:
            body = {"colonyname": colonyname, "since": since, "afterseq": cursor, "count": count}
            page = await self.call("exportprocessesmsg", body)
            for p in page["processes"]:
                yield p
            cursor = page["cursor"]
            if not page["more"]:
                return


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class SyncClient:
    """The same calls, blocking, for scripts: runs a private trio loop in one thread.

        with SyncClient(addr, prvkey) as c:
            c.submit("echo", colonyname="dev", executortype="echo", args=["hi"])
    """

    def __init__(self, addr: str, key: PrivateKey | str, timeout: float = 10.0) -> None:
        self._addr, self._key, self._timeout = addr, _key(key), timeout
        self._token: trio.lowlevel.TrioToken | None = None
        self._client: Client | None = None
        self._stop: trio.Event | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="colonies-client", daemon=True)
        self._thread.start()
        self._ready.wait(timeout + 5)
        if self._error is not None:
            raise self._error
        if self._client is None:
            raise BadRequest(f"could not connect to {addr}")

    def _main(self) -> None:
        async def run() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            try:
                async with Client.connect(self._addr, self._key, self._timeout) as client:
                    self._client = client
                    self._ready.set()
                    await self._stop.wait()
            except BaseException as e:  # surfaced to the constructor's caller
                self._error = e
                self._ready.set()

        trio.run(run)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(Client, name, None)
        if method is None or name.startswith("_"):
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            assert self._client is not None and self._token is not None
            fn = getattr(self._client, name)
            return trio.from_thread.run(lambda: fn(*args, **kwargs), trio_token=self._token)

        def iterate(*args: Any, **kwargs: Any) -> Iterator[Any]:
            # The streaming calls (export_processes, follow_processes, follow_logs): one
            # item per trip to the loop; closing the iterator closes the stream.
            assert self._client is not None and self._token is not None
            stream = getattr(self._client, name)(*args, **kwargs)

            async def next_item() -> tuple[bool, Any]:
                try:
                    return True, await stream.__anext__()
                except StopAsyncIteration:
                    return False, None

            try:
                while True:
                    more, item = trio.from_thread.run(next_item, trio_token=self._token)
                    if not more:
                        return
                    yield item
            finally:
                with contextlib.suppress(trio.RunFinishedError):  # disconnected meanwhile
                    trio.from_thread.run(stream.aclose, trio_token=self._token)

        return iterate if inspect.isasyncgenfunction(method) else call

    def disconnect(self) -> None:
        if self._stop is not None and self._token is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(10)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.disconnect()
