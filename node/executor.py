"""The executor helper: register Python functions by name, then `run`.

    ex = Executor(addr, prvkey, colonyname="dev", executortype="python")

    @ex.function
    def echo(*args):
        return list(args)

    ex.run_forever()

It assigns a process, calls the function registered under the process's funcname with the
spec's args and kwargs, and closes the attempt with the return value as output (a list is used
as is, None is no output, anything else becomes a one-item list), or fails it with the error
text. Closing and assigning the next process is one call. Plain functions run in a worker
thread so a slow function does not stall the connection; async functions are awaited.

A function that declares a keyword-only parameter `ctx` gets a ProcessContext: the process
it runs (`ctx.process`, `ctx.inputs` = its parents' outputs in a workflow) and
`ctx.add_child(spec, insert=False)`, which extends the running workflow from this process:

    @ex.function
    def split(*args, ctx):
        for part in args:
            ctx.add_child({"funcname": "work", "args": [part]})

In a plain function `ctx.add_child` blocks and returns the new process; in an async
function it returns an awaitable (`await ctx.add_child(...)`). `ctx.log("text")` appends a
line to the process's log (`colonies log get --follow` shows it), the same way.

When it starts, the helper registers its functions in the colony's function registry
(`colonies function ls`), under its executor name (looked up by its key unless given). It
calls in with a heartbeat when it made no other write for a third of the colony's
stale-after (every HEARTBEAT_WHEN_OFF_S when staleness is off), so a live executor, idle or
busy with a long function, never goes stale (consensus/liveness.py).
"""

from __future__ import annotations

import functools
import inspect
import logging
import signal
import traceback
from collections.abc import Callable, Coroutine
from typing import Any

import trio

from node.client import Client
from protocol.errors import (
    BadRequest,
    ColoniesError,
    Forbidden,
    NotFound,
    RequestTimeout,
    Unavailable,
)
from protocol.identity import PrivateKey

log = logging.getLogger("colonies.executor")

RECONNECT_DELAY_S = 1.0
HEARTBEAT_WHEN_OFF_S = 60.0  # keeps lastheardfromtime fresh for `executor ls`
REGISTER_TRIES = 5  # function registration through failovers, then serve without it


def wants_context(fn: Callable[..., Any]) -> bool:
    """True if `fn` declares a keyword-only parameter named `ctx`."""
    try:
        param = inspect.signature(fn).parameters.get("ctx")
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return param is not None and param.kind is inspect.Parameter.KEYWORD_ONLY


class ProcessContext:
    """What a function may know and do about the process it runs."""

    def __init__(self, client: Client, process: dict) -> None:
        self._client = client
        self.process = process

    @property
    def processid(self) -> str:
        return self.process["processid"]

    @property
    def processgraphid(self) -> str:
        return self.process.get("processgraphid", "")

    @property
    def inputs(self) -> list:
        """In a workflow: the outputs of this process's parents, in dependency order."""
        return self.process.get("in", [])

    def add_child(
        self, spec: dict, *, insert: bool = False, child_process_id: str = ""
    ) -> dict | Coroutine[Any, Any, dict]:
        """Add a process to this process's workflow, as its child. `spec` is a function
        spec; its executor type defaults to this process's. insert=True puts the new process
        between this process and all its current children. Blocks in a plain function;
        returns an awaitable in an async one."""
        if not self.processgraphid:
            raise BadRequest(
                f"process {self.processid} is not part of a workflow: it cannot add children"
            )
        spec = dict(spec)
        conditions = dict(spec.get("conditions") or {})
        conditions.setdefault("executortype", self.process["spec"]["conditions"]["executortype"])
        spec["conditions"] = conditions
        call = functools.partial(
            self._client.add_child,
            self.processgraphid,
            self.processid,
            spec,
            insert=insert,
            child_process_id=child_process_id,
        )
        return _run_here(call)

    def log(self, message: str) -> dict | Coroutine[Any, Any, dict]:
        """Append a line to this process's log; returns the line (with its `seq`). Blocks in
        a plain function; returns an awaitable in an async one."""
        return _run_here(functools.partial(self._client.add_log, self.processid, message))


def _run_here(call: Callable[[], Coroutine[Any, Any, dict]]) -> dict | Coroutine[Any, Any, dict]:
    """Run a client call from a function: block on the trio loop from a worker thread (a
    plain function), or hand back the coroutine to await (an async function)."""
    try:
        trio.lowlevel.current_task()
    except RuntimeError:  # a worker thread (a plain function): block on the trio loop
        return trio.from_thread.run(call)
    return call()


def as_output(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


class Executor:
    def __init__(
        self,
        addr: str | list[str],
        prvkey: PrivateKey | str,
        *,
        colonyname: str,
        executortype: str,
        poll_timeout: int = 10,
        concurrency: int = 1,
        executorname: str = "",
    ) -> None:
        self.addr = addr
        self.key = prvkey if isinstance(prvkey, PrivateKey) else PrivateKey.from_hex(prvkey)
        self.colonyname = colonyname
        self.executortype = executortype
        self.poll_timeout = poll_timeout
        self.concurrency = concurrency
        self.executorname = executorname  # "" = look it up by key when starting
        self.functions: dict[str, Callable[..., Any]] = {}
        self._wants_ctx: dict[Callable[..., Any], bool] = {}  # signature checks, cached
        self.processed = 0
        self._stop = trio.Event()
        self._started = trio.Event()
        self._last_write = 0.0  # trio time of this executor's last write (liveness)

    def function(
        self, fn: Callable[..., Any] | None = None, *, name: str | None = None
    ) -> Any:
        """Register `fn` under its own name or `name`; usable as @ex.function or @ex.function(name=...)."""

        def register(f: Callable[..., Any]) -> Callable[..., Any]:
            self.functions[name or f.__name__] = f
            return f

        return register(fn) if fn is not None else register

    def stop(self) -> None:
        """Ask the loops to finish: the process in hand is closed first, then run returns."""
        self._stop.set()

    async def run(self, client: Client | None = None) -> None:
        """Serve until stop(); reconnects (bounded pace) when the node goes away."""
        if client is not None:
            await self._serve(client)
            return
        while not self._stop.is_set():
            try:
                async with Client.connect(self.addr, self.key) as c:
                    await self._serve(c)
            except (Unavailable, RequestTimeout) as e:
                log.warning("node unavailable (%s); retrying in %.0f s", e, RECONNECT_DELAY_S)
                with trio.move_on_after(RECONNECT_DELAY_S):
                    await self._stop.wait()

    def run_forever(self) -> None:
        """Blocking entry point for scripts; SIGTERM and Ctrl-C stop cleanly."""

        async def main() -> None:
            async with trio.open_nursery() as n:

                async def watch_signals() -> None:
                    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                        async for _ in sigs:
                            self.stop()
                            return

                n.start_soon(watch_signals)
                await self.run()
                n.cancel_scope.cancel()

        trio.run(main)

    async def _serve(self, client: Client) -> None:
        client = client.with_key(self.key)
        await self._register_functions(client)
        async with trio.open_nursery() as n:
            n.start_soon(self._heartbeats, client)
            for _ in range(self.concurrency):
                n.start_soon(self._loop, client)
            self._started.set()
            await self._stop.wait()
            # Let loops finish their current process; they check _stop between calls.

    async def _register_functions(self, client: Client) -> None:
        """Register every function in the colony's registry (re-registering updates)."""
        if not self.functions:
            return
        for tries_left in range(REGISTER_TRIES - 1, -1, -1):
            try:
                if not self.executorname:
                    mine = [e for e in await client.executors(self.colonyname)
                            if e["executorid"] == self.key.id]
                    if not mine:
                        raise NotFound(f"this key is not an executor of colony {self.colonyname}")
                    self.executorname = mine[0]["executorname"]
                for name in sorted(self.functions):
                    doc = inspect.getdoc(self.functions[name]) or ""
                    await client.add_function(
                        self.colonyname, self.executorname, name,
                        description=doc.splitlines()[0][:1024] if doc else "",
                    )
                self._last_write = trio.current_time()
                return
            except (NotFound, Forbidden, BadRequest) as e:
                # Serving works without the registry (e.g. not approved yet): say so, go on.
                log.warning("could not register functions: %s", e)
                return
            except (Unavailable, RequestTimeout) as e:
                # A leader failover: registering again is harmless (it updates), so retry a
                # few times; never let it end the executor.
                if not tries_left or self._stop.is_set():
                    log.warning("could not register functions (%s); serving without", e)
                    return
                log.warning("registering functions failed (%s); retrying", e)
                with trio.move_on_after(RECONNECT_DELAY_S):
                    await self._stop.wait()

    async def _heartbeats(self, client: Client) -> None:
        """Call in when nothing else was written for `interval` (a third of the colony's
        stale-after, learnt from each heartbeat's reply)."""
        interval = 0.0  # the first one at once: it tells us the colony's stale-after
        while not self._stop.is_set():
            with trio.move_on_at(self._last_write + interval):
                await self._stop.wait()
                return
            if trio.current_time() - self._last_write < interval:
                continue  # another write called in meanwhile
            try:
                reply = await client.heartbeat(self.colonyname)
                after = reply.get("staleafter", 0)
                interval = after / 3 if after else HEARTBEAT_WHEN_OFF_S
            except ColoniesError as e:
                log.warning("heartbeat failed: %s", e)
                interval = interval or RECONNECT_DELAY_S
            self._last_write = trio.current_time()

    async def _loop(self, client: Client) -> None:
        process: dict | None = None
        while not self._stop.is_set():
            if process is None:
                try:
                    process = await client.assign(self.colonyname, timeout=self.poll_timeout)
                except NotFound:
                    continue
                except (Unavailable, RequestTimeout) as e:
                    # A leader failover (503) or a lost node: the client moves to another
                    # member by itself, so pause a moment and ask again rather than end.
                    log.warning("assign failed (%s); retrying in %.0f s", e, RECONNECT_DELAY_S)
                    with trio.move_on_after(RECONNECT_DELAY_S):
                        await self._stop.wait()
                    continue
                self._last_write = trio.current_time()
            ok, out, errors = await self._execute(process, client)
            if self._stop.is_set():
                await self._close(client, process, ok, out, errors)
                return
            try:
                process = await client.close_and_assign(
                    process,
                    self.colonyname,
                    successful=ok,
                    out=out,
                    errors=errors,
                    timeout=self.poll_timeout,
                )
                self._last_write = trio.current_time()
            except ColoniesError as e:
                # The attempt may have expired (refused close): the process went back to the
                # queue and another attempt owns it now. Keep serving.
                log.warning(
                    "closing %s failed: %s", process["processid"], e,
                    extra={"processid": process["processid"]},
                )
                process = None
            self.processed += 1

    async def _close(
        self, client: Client, process: dict, ok: bool, out: list, errors: list[str]
    ) -> None:
        try:
            if ok:
                await client.close(process, out)
            else:
                await client.fail(process, errors)
        except ColoniesError as e:
            log.warning(
                "closing %s failed: %s", process["processid"], e,
                extra={"processid": process["processid"]},
            )
        self.processed += 1

    async def _execute(
        self, process: dict, client: Client | None = None
    ) -> tuple[bool, list, list[str]]:
        spec, pid = process["spec"], process["processid"]
        fn = self.functions.get(spec["funcname"])
        if fn is None:
            return False, [], [f"executor has no function named {spec['funcname']!r}"]
        args, kwargs = spec.get("args", []), spec.get("kwargs", {})
        wants = self._wants_ctx.get(fn)
        if wants is None:
            wants = self._wants_ctx[fn] = wants_context(fn)
        if client is not None and wants:
            kwargs = {**kwargs, "ctx": ProcessContext(client, process)}
        try:
            if inspect.iscoroutinefunction(fn):
                result = await fn(*args, **kwargs)
            else:
                result = await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))
            return True, as_output(result), []
        except Exception as e:
            log.info(
                "%s failed in process %s: %s", spec["funcname"], pid,
                traceback.format_exc(limit=3), extra={"processid": pid},
            )
            return False, [], [f"{type(e).__name__}: {e}"]
