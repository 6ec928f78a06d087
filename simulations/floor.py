"""The transport floor: the lifecycle's request pattern over a plain trio TCP socket.

Same framing as the node (protocol.framing: encode_requests / decode_requests /
encode_replies), the same client code (node.connection.Connection's batching writer, reader
and call path, with the libp2p stream swapped for a TCP socket), and an echo-like server in a
separate OS process that decodes each request frame and answers every request with a
process-sized reply. No signatures are checked and nothing is replicated, so the gap between
this and the lifecycle run is what libp2p, signature recovery, dispatch and consensus cost.

    python simulations/floor.py --ready-file F      # the server; writes "127.0.0.1 PORT\\n"
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import trio

from node.connection import Connection
from node.rpc_server import READ_SIZE
from protocol.envelope import seal
from protocol.framing import FrameDecoder, decode_requests, encode_replies
from protocol.identity import PrivateKey

MAX_REPLIES_PER_WRITE = 64


def sample_process() -> dict[str, Any]:
    """What a submit or an assign answers: a process record of typical size."""
    h = "ab" * 32
    return {
        "processid": h,
        "initiatorid": h,
        "initiatorname": "submitter-0",
        "assignedexecutorid": h,
        "isassigned": True,
        "state": 1,
        "prioritytime": 1_700_000_000_000_000_000,
        "submissiontime": 1_700_000_000_000_000_000,
        "starttime": 1_700_000_000_000_000_000,
        "endtime": 0,
        "waitdeadline": 0,
        "execdeadline": 0,
        "retries": 0,
        "attempt": 1,
        "attributes": [],
        "spec": bench_spec(0),
        "in": [],
        "out": [],
        "errors": [],
    }


def bench_spec(i: int) -> dict[str, Any]:
    return {
        "funcname": "bench",
        "args": [i],
        "kwargs": {},
        "priority": 0,
        "maxwaittime": -1,
        "maxexectime": -1,
        "maxretries": -1,
        "label": "",
        "env": {},
        "conditions": {"colonyname": "bench", "executortype": "bench", "executornames": []},
    }


# --- the server (its own OS process) ---------------------------------------------------------


async def _serve_conn(stream: trio.SocketStream, reply_payload: Any) -> None:
    decoder = FrameDecoder()
    try:
        while True:
            data = await stream.receive_some(READ_SIZE)
            if not data:
                return
            replies: list[tuple[int, int, Any]] = []
            for frame in decoder.feed(data):
                for request_id, _envelope in decode_requests(frame):
                    replies.append((request_id, 200, reply_payload))
            # Like the node's writer: everything answered in this read goes out in one write.
            out = [
                encode_replies(replies[i : i + MAX_REPLIES_PER_WRITE])
                for i in range(0, len(replies), MAX_REPLIES_PER_WRITE)
            ]
            if out:
                await stream.send_all(b"".join(out))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return


async def _server_main(ready_file: Path) -> None:
    payload = sample_process()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    ready_file.write_text(f"127.0.0.1 {port}\n")
    async with trio.open_nursery() as n:

        async def on_sigterm() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for _ in sigs:
                    n.cancel_scope.cancel()
                    return

        n.start_soon(on_sigterm)
        n.start_soon(trio.serve_listeners, lambda s: _serve_conn(s, payload), listeners)


# --- the client --------------------------------------------------------------------------


class _TcpStream:
    """The two stream methods Connection uses, on a trio socket."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._s = stream

    async def read(self, n: int) -> bytes:
        return await self._s.receive_some(n)

    async def write(self, data: bytes) -> None:
        await self._s.send_all(data)


class TcpConnection(Connection):
    """node.connection.Connection (writer batching, reader, call) over plain TCP.

    Overrides only `_run`, which in Connection opens the libp2p host and stream; it relies on
    Connection's private split (_run / _writer / _reader / _fail_all, the _stream with
    read(n) and write(data)), so a change there needs a matching change here.
    """

    def __init__(self, host: str, port: int) -> None:
        super().__init__(f"tcp://{host}:{port}")
        self._tcp_host, self._tcp_port = host, port
        self.writes = 0

    async def _run(self, timeout: float, task_status: trio.TaskStatus[None]) -> None:
        with self._cancel:
            try:
                with trio.fail_after(timeout):
                    sock = await trio.open_tcp_stream(self._tcp_host, self._tcp_port)
                tcp = _TcpStream(sock)
                self._stream = tcp
                inner_write = tcp.write

                async def counted_write(data: bytes) -> None:
                    self.writes += 1
                    await inner_write(data)

                tcp.write = counted_write  # type: ignore[method-assign]
                task_status.started()
                try:
                    async with trio.open_nursery() as n:
                        n.start_soon(self._writer)
                        await self._reader()
                        n.cancel_scope.cancel()
                finally:
                    with trio.CancelScope(shield=True):
                        await sock.aclose()
            finally:
                self._fail_all()
                self.closed.set()


async def run_floor(
    host: str,
    port: int,
    *,
    submit_requests: int,
    executor_requests: int,
    submitters: int,
    executors: int,
    timeout: float,
) -> dict[str, Any]:
    """The lifecycle's concurrency shape: `submitters` sequential callers share
    `submit_requests` submit-sized calls, `executors` sequential callers share
    `executor_requests` close-and-assign-sized calls, all over one connection."""
    # Pre-sealed envelopes of the lifecycle's sizes: the floor measures transport, not signing.
    key = PrivateKey.generate()
    now = time.time_ns() // 1_000_000
    submit_env = seal(key, "submitfuncspecmsg", {"spec": bench_spec(0)}, "c" * 64, now)
    close_env = seal(
        key,
        "closeassignmsg",
        {
            "processid": "ab" * 32,
            "attempt": 1,
            "successful": True,
            "out": [0],
            "errors": [],
            "colonyname": "bench",
            "timeout": -1,
        },
        "c" * 64,
        now,
    )
    callers = [submit_env] * submitters + [close_env] * executors
    counts = split(submit_requests, submitters) + split(executor_requests, executors)
    latencies: list[float] = []
    async with trio.open_nursery() as nursery:
        conn = TcpConnection(host, port)
        await nursery.start(conn._run, 10.0)

        async def caller(envelope: bytes, count: int) -> None:
            for _ in range(count):
                t = time.perf_counter()
                await conn.call(envelope, timeout)
                latencies.append(time.perf_counter() - t)

        cpu0 = time.process_time()
        t0 = time.perf_counter()
        async with trio.open_nursery() as callers_nursery:
            for env, count in zip(callers, counts, strict=True):
                callers_nursery.start_soon(caller, env, count)
        seconds = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        await conn.aclose()
    return {
        "requests": len(latencies),
        "seconds": seconds,
        "latencies": latencies,
        "client_cpu_s": cpu,
        "frames": conn.writes,
        "callers": len(callers),
    }


def split(total: int, parts: int) -> list[int]:
    """`total` as `parts` near-equal counts."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="echo-like framing server for the floor benchmark")
    p.add_argument("--ready-file", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        trio.run(_server_main, args.ready_file)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
