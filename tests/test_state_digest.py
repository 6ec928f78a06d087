"""getstatedigestmsg: a canonical digest of the whole state machine plus the applied index,
which chaos runs compare across nodes (the checker's "converged" rule)."""

from __future__ import annotations

import pytest
from machine_harness import SERVER, Harness, make_id

from consensus.machine import ColonyMachine
from node.client import Client
from protocol.errors import AccessDenied, Forbidden
from tests.conftest import Colony


def world(order: list[str]) -> Harness:
    h = Harness()
    for name in order:
        h.colony(name)
    return h


def test_digest_read_is_the_machine_digest_and_server_owner_only() -> None:
    h = world(["dev"])
    assert h.read("getstatedigestmsg", SERVER) == {"digest": h.m.digest()}
    with pytest.raises(AccessDenied):
        h.read("getstatedigestmsg", make_id("colony-owner-dev"))


def test_equal_states_give_equal_digests_whatever_the_history_of_their_dicts() -> None:
    a = world(["dev", "other"])
    restored = ColonyMachine.restore(a.m.snapshot())
    assert restored.digest() == a.m.digest()
    b = world(["dev", "other"])
    assert b.read("getstatedigestmsg", SERVER) == a.read("getstatedigestmsg", SERVER)


def test_a_change_changes_the_digest() -> None:
    h = world(["dev"])
    before = h.read("getstatedigestmsg", SERVER)["digest"]
    h.executor("dev", "w1")
    assert h.read("getstatedigestmsg", SERVER)["digest"] != before


async def test_a_real_node_answers_with_its_digest_and_applied_index(colony: Colony) -> None:
    async with Client.connect(colony.addr, colony.server) as admin:
        first = await admin.state_digest()
        assert set(first) == {"digest", "applied", "archive"}
        assert len(first["digest"]) == 64 and first["applied"] > 0
        archive = colony.node.replicator.machine.archive
        assert first["archive"] == {"digest": archive.digest(), "applied": archive.applied_index}
        assert first["digest"] == colony.node.replicator.machine.digest()
        again = await admin.state_digest()
        assert again == first  # nothing applied in between: the same answer
        await admin.with_key(colony.owner).add_executor(
            make_id("x"), "w2", colony.executortype, colony.name
        )
        after = await admin.state_digest()
        assert after["applied"] > first["applied"] and after["digest"] != first["digest"]
        assert after["archive"] == first["archive"]  # nothing finished: no history written
        p = await admin.with_key(colony.executor).submit(
            "echo", colonyname=colony.name, executortype=colony.executortype
        )
        run = await admin.with_key(colony.executor).assign(colony.name, timeout=-1)
        await admin.with_key(colony.executor).close(run, [1])
        done = await admin.state_digest()
        assert done["archive"]["digest"] != first["archive"]["digest"]
        assert done["archive"]["applied"] > first["archive"]["applied"] and p
    async with Client.connect(colony.addr, colony.executor) as member:
        with pytest.raises(Forbidden):
            await member.state_digest()

