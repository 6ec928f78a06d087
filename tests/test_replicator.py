"""node/replicator.py: the trio ticker, group commit and apply wake-ups over a one-node group."""

from __future__ import annotations

import logging
import statistics
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from pysyncobj import FAIL_REASON

from node.raft_replica import NullTransport, ReplicatedColony
from node.replicator import MAX_COMMAND_BYTES, Replicator, failure_error, pack_batch
from protocol.errors import BadRequest, InternalError, RequestTimeout, Unavailable
from tests.raft_harness import FakeMachine

SELF = "16Uiu2HAmSelfNodeForTests"
log = logging.getLogger(__name__)


def machine_of(replicator: Replicator) -> FakeMachine:
    machine = replicator.machine
    assert isinstance(machine, FakeMachine)
    return machine


@asynccontextmanager
async def running(path: Path, **kwargs: Any) -> AsyncIterator[Replicator]:
    """A started Replicator over a one-node colony in path, closed on exit."""
    replicator = Replicator(ReplicatedColony(SELF, [], path, FakeMachine()), **kwargs)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(replicator.run)
        try:
            yield replicator
        finally:
            await replicator.close()


@asynccontextmanager
async def leaderless(path: Path, **kwargs: Any) -> AsyncIterator[Replicator]:
    """A member of a two-node group whose partner never answers: it never gets a leader."""
    colony = ReplicatedColony(
        SELF, ["16Uiu2HAmAbsentPeer"], path, FakeMachine(), transport=NullTransport()
    )
    replicator = Replicator(colony, **kwargs)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(replicator.run)
        try:
            yield replicator
        finally:
            await replicator.close()


async def test_submit_returns_the_commands_result(tmp_path):
    async with running(tmp_path) as replicator:
        assert replicator.is_leader
        assert await replicator.submit({"op": "put", "n": 7}) == [200, {"n": 7, "seq": 1}]
        status = replicator.status()
        assert status["leader"] == SELF and status["in_flight"] == 0 and status["queued"] == 0
        msgpack.packb(status)


async def test_group_commit_batches_concurrent_submits_in_order(tmp_path):
    async with running(tmp_path) as replicator:
        machine = machine_of(replicator)
        before = len(machine.batch_sizes)
        enqueued: list[int] = []
        results: dict[int, list[Any]] = {}

        async def one(n: int) -> None:
            # submit queues synchronously before its first checkpoint, so this is queue order.
            enqueued.append(n)
            results[n] = await replicator.submit({"op": "put", "n": n})

        async with trio.open_nursery() as nursery:
            for n in range(200):
                nursery.start_soon(one, n)

        batches = machine.batch_sizes[before:]
        assert sum(batches) == 200
        assert len(batches) <= 10, batches  # far fewer entries than commands
        for n, (status, value) in results.items():
            assert status == 200 and value["n"] == n
        # Applied in queue order, and every waiter got the result at its own position.
        assert [cmd["n"] for _, cmd in machine.applied] == enqueued
        assert [results[n][1]["seq"] for n in enqueued] == list(range(1, 201))
        stamps = [now for now, _ in machine.applied]
        assert stamps == sorted(stamps) and stamps[0] > 1_600_000_000 * 10**9


async def test_sequential_latency_sanity(tmp_path):
    async with running(tmp_path) as replicator:
        latencies = []
        for n in range(50):
            start = trio.current_time()
            assert (await replicator.submit({"op": "put", "n": n}))[0] == 200
            latencies.append(trio.current_time() - start)
        # No assertion on time (shared CI boxes); printed for the curious (-s / log output).
        log.info(
            "sequential submit on a one-node group: p50 %.2f ms, max %.2f ms",
            statistics.median(latencies) * 1e3,
            max(latencies) * 1e3,
        )
        assert len(machine_of(replicator).applied) == 50


async def test_timeouts_map_to_request_timeout_and_free_the_slot(tmp_path):
    async with leaderless(tmp_path, max_in_flight=1) as replicator:
        errors: dict[int, RequestTimeout] = {}

        async def one(n: int, timeout: float) -> None:
            with pytest.raises(RequestTimeout) as caught:
                await replicator.submit({"op": "put", "n": n}, timeout=timeout)
            errors[n] = caught.value

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, 0, 0.5)
            await trio.sleep(0.05)  # the first is proposed (and never commits)
            nursery.start_soon(one, 1, 0.2)  # the second waits for the only slot, in vain

        assert errors[0].status == 408 and "may still be applied" in errors[0].message
        assert errors[1].status == 408 and "was not applied" in errors[1].message
        with trio.fail_after(2):
            while replicator.status()["in_flight"] or replicator.status()["queued"]:
                await trio.sleep(0.01)
        with pytest.raises(Unavailable, match="no raft leader"):
            await replicator.wait_ready(0.05)
        assert machine_of(replicator).applied == []


@pytest.mark.parametrize(
    "reason",
    [
        FAIL_REASON.QUEUE_FULL,
        FAIL_REASON.MISSING_LEADER,
        FAIL_REASON.DISCARDED,
        FAIL_REASON.NOT_LEADER,
        FAIL_REASON.LEADER_CHANGED,
        FAIL_REASON.REQUEST_DENIED,
        FAIL_REASON.UNKNOWN_OUTCOME,
    ],
)
async def test_raft_failures_map_to_unavailable(tmp_path, monkeypatch, reason):
    async with running(tmp_path) as replicator:

        def failing_propose(batch: bytes, callback: Any) -> None:
            callback(None, reason)

        monkeypatch.setattr(replicator.colony, "propose", failing_propose)
        with pytest.raises(Unavailable) as caught:
            await replicator.submit({"op": "put", "n": 1})
        assert caught.value.status == 503
        assert caught.value.message == failure_error(reason).message
        assert "retry" in caught.value.message
        monkeypatch.undo()
        assert (await replicator.submit({"op": "put", "n": 2}))[0] == 200


async def test_wait_applied_wakes_on_an_apply_and_times_out_otherwise(tmp_path):
    async with running(tmp_path) as replicator:
        seen = replicator.applied_generation
        start = trio.current_time()
        assert await replicator.wait_applied(seen, start + 0.1) == seen
        assert trio.current_time() - start >= 0.09

        woke: list[int] = []

        async def waiter() -> None:
            woke.append(await replicator.wait_applied(seen, trio.current_time() + 10))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.sleep(0.02)
            assert woke == []
            start = trio.current_time()
            await replicator.submit({"op": "put", "n": 1})
        assert woke == [seen + 1] and trio.current_time() - start < 5
        # Already past `seen`: returns at once.
        assert await replicator.wait_applied(seen, trio.current_time() + 10) == seen + 1


async def test_close_then_reopen_preserves_state(tmp_path):
    async with running(tmp_path) as replicator:
        async with trio.open_nursery() as nursery:
            for n in range(30):
                nursery.start_soon(replicator.submit, {"op": "put", "n": n})
        digest = replicator.machine.digest()
    with pytest.raises(Unavailable, match="stopped"):
        await replicator.submit({"op": "put"})
    await replicator.close()  # idempotent

    async with running(tmp_path) as reopened:
        assert reopened.machine.digest() == digest
        assert len(machine_of(reopened).applied) == 30
        assert (await reopened.submit({"op": "put", "n": 30}))[1]["seq"] == 31


async def test_close_fails_pending_writes_with_unavailable(tmp_path):
    async with leaderless(tmp_path) as replicator:
        failed: list[Exception] = []

        async def one() -> None:
            try:
                await replicator.submit({"op": "put"}, timeout=10)
            except Unavailable as e:
                failed.append(e)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)
            await trio.sleep(0.05)
            await replicator.close()
        assert len(failed) == 1 and "shutting down" in str(failed[0])


async def test_bad_commands_fail_alone(tmp_path):
    async with running(tmp_path) as replicator:
        with pytest.raises(InternalError):
            await replicator.submit({"op": "put", "x": object()})
        with pytest.raises(BadRequest):
            await replicator.submit({"op": "put", "blob": b"\x00" * MAX_COMMAND_BYTES})
        assert (await replicator.submit({"op": "put", "n": 1}))[0] == 200


def test_pack_batch_is_the_plain_msgpack_encoding():
    cmds = [{"op": "put", "n": 1, "b": b"\x01"}, {"op": "tick"}, {}]
    packed = pack_batch(1_700_000_000_123_456_789, [msgpack.packb(c, use_bin_type=True) for c in cmds])
    expected = {"now": 1_700_000_000_123_456_789, "cmds": cmds}
    assert packed == msgpack.packb(expected, use_bin_type=True)
    assert msgpack.unpackb(packed, raw=False) == expected
