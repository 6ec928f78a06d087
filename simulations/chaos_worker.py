"""One chaos executor: a real OS process running the node/executor.py helper, recording every
assign and close it makes (with its reply or failure) for the history checker.

    CHAOS_EXECUTOR_PRVKEY=<hex> python simulations/chaos_worker.py \\
        --addrs A1,A2,A3 --colony chaos --executortype chaos --executorname ex1 \\
        --history ex1.jsonl --overrun 0.1 --seed 7

The function it serves, ``work(sleep_s, maxexectime, tag)``, sleeps ``sleep_s`` and returns
``[tag]``; with probability ``--overrun`` it sleeps past ``maxexectime`` instead, so its close
comes after the attempt expired (the node must refuse it). The chaos run kills these processes
with SIGKILL in the middle of a process, and stops them with SIGTERM at the end.

History lines are appended and flushed one by one (a SIGKILL loses at most the operation in
flight, which the checker then simply does not see). Times are time.monotonic(), which is one
clock for every process on the machine (CLOCK_MONOTONIC), so they compare with the run's own.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import trio

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from node.client import Client  # noqa: E402
from node.executor import Executor  # noqa: E402
from protocol.errors import ColoniesError, NotFound  # noqa: E402
from protocol.identity import PrivateKey  # noqa: E402

log = logging.getLogger("colonies.chaos.worker")
KEY_ENV = "CHAOS_EXECUTOR_PRVKEY"
OVERRUN_EXTRA_S = 1.5
RESTART_PAUSE_S = 1.0
CALL_TIMEOUT_S = 5.0


class HistoryFile:
    """Appends one JSON object per line, flushed at once."""

    def __init__(self, path: Path, who: str) -> None:
        self._f: TextIO = path.open("a", encoding="utf-8")
        self.who = who

    def write(self, op: dict[str, Any]) -> None:
        op["by"] = self.who
        self._f.write(json.dumps(op, separators=(",", ":")) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _assign_op(process: dict[str, Any], t0: float, t1: float) -> dict[str, Any]:
    return {"op": "assign", "pid": process["processid"], "attempt": process["attempt"],
            "starttime": process["starttime"], "t0": t0, "t1": t1, "ok": True}


class RecordingClient:
    """The Client the Executor helper uses, with its assigns and closes written down."""

    def __init__(self, client: Client, history: HistoryFile) -> None:
        self._client = client
        self._history = history

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - everything else as is
        return getattr(self._client, name)

    def with_key(self, key: PrivateKey | str) -> RecordingClient:
        return RecordingClient(self._client.with_key(key), self._history)

    async def assign(self, colonyname: str, timeout: int = 10) -> dict:
        t0 = time.monotonic()
        try:
            process = await self._client.assign(colonyname, timeout=timeout)
        except NotFound:
            raise  # nothing to run within the long-poll: the normal idle answer
        except ColoniesError as e:
            self._history.write({"op": "assign", "pid": None, "t0": t0, "t1": time.monotonic(),
                                 "ok": False, "error": f"{e.status} {e.message}"[:300]})
            raise
        self._history.write(_assign_op(process, t0, time.monotonic()))
        return process

    async def _closing(self, process: dict, successful: bool, call: Any) -> Any:  # noqa: ANN401
        op: dict[str, Any] = {"op": "close", "pid": process["processid"],
                              "attempt": process["attempt"], "successful": successful,
                              "t0": time.monotonic()}
        try:
            result = await call
        except ColoniesError as e:
            self._history.write({**op, "t1": time.monotonic(), "ok": False,
                                 "error": f"{e.status} {e.message}"[:300]})
            raise
        self._history.write({**op, "t1": time.monotonic(), "ok": True})
        return result

    async def close(self, process: dict, out: list | None = None) -> None:
        await self._closing(process, True, self._client.close(process, out))

    async def fail(self, process: dict, errors: list[str] | None = None) -> None:
        await self._closing(process, False, self._client.fail(process, errors))

    async def close_and_assign(self, process: dict, colonyname: str, *, successful: bool,
                               **kw: Any) -> dict | None:  # noqa: ANN401
        t0 = time.monotonic()
        nxt = await self._closing(
            process, successful,
            self._client.close_and_assign(process, colonyname, successful=successful, **kw),
        )
        if nxt is not None:
            self._history.write(_assign_op(nxt, t0, time.monotonic()))
        return nxt


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="a chaos executor (see simulations/chaos.py)")
    p.add_argument("--addrs", required=True, help="comma-separated node multiaddrs")
    p.add_argument("--colony", required=True)
    p.add_argument("--executortype", required=True)
    p.add_argument("--executorname", required=True)
    p.add_argument("--history", required=True, type=Path)
    p.add_argument("--overrun", type=float, default=0.0,
                   help="probability of sleeping past maxexectime (0..1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 0.0 <= args.overrun <= 1.0:
        p.error("--overrun must be in 0..1")
    return args


async def serve(args: argparse.Namespace, key: PrivateKey) -> int:
    rng = random.Random(args.seed)
    addrs = [a for a in args.addrs.split(",") if a]
    history = HistoryFile(args.history, args.executorname)
    ex = Executor(addrs, key, colonyname=args.colony, executortype=args.executortype,
                  poll_timeout=2, executorname=args.executorname)

    @ex.function
    async def work(sleep_s: float, maxexectime: int, tag: int) -> list:
        """Sleeps, then returns its tag (sometimes past the attempt's deadline)."""
        if maxexectime > 0 and rng.random() < args.overrun:
            sleep_s = maxexectime + OVERRUN_EXTRA_S
        await trio.sleep(sleep_s)
        return [tag]

    stopping = trio.Event()
    ended = 0
    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for _ in sigs:
                    stopping.set()
                    ex.stop()
                    return

        nursery.start_soon(watch_signals)
        # Bounded by the run: the chaos run stops this process with SIGTERM (then SIGKILL).
        while not stopping.is_set():
            try:
                async with Client.connect(addrs, key, timeout=CALL_TIMEOUT_S) as client:
                    client.timeout = CALL_TIMEOUT_S
                    await ex.run(RecordingClient(client, history))
            except (Exception, BaseExceptionGroup) as e:  # noqa: BLE001 - say it, go on
                ended += 1
                log.error("executor run ended (%d): %s: %s", ended, type(e).__name__, e,
                          exc_info=True)
                history.write({"op": "worker-restart", "t0": time.monotonic(),
                               "error": f"{type(e).__name__}: {e}"[:300]})
                with trio.move_on_after(RESTART_PAUSE_S):
                    await stopping.wait()
        nursery.cancel_scope.cancel()
    history.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {args.executorname} %(levelname)s %(name)s: %(message)s")
    logging.getLogger("libp2p").setLevel(logging.WARNING)
    raw = os.environ.get(KEY_ENV, "")
    if not raw:
        print(f"chaos_worker: set {KEY_ENV} to the executor's private key", file=sys.stderr)
        return 2
    return trio.run(serve, args, PrivateKey.from_hex(raw))


if __name__ == "__main__":
    sys.exit(main())
