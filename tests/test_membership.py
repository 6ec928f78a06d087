"""Cluster membership in the replicated state: bootstrap records the first member, the server
owner adds and removes the others, and the list survives snapshots."""

from __future__ import annotations

import os

import pytest

from consensus.machine import ColonyMachine
from protocol.errors import AccessDenied, BadRequest, NotFound

SO = "a" * 64
A = "16Uiu2HAmMmu7o74vsbemwzENv8XTtQxKzKCkJTTAiS3ddBgfwwqJ"
B = "16Uiu2HAmQLaCeatmZZNk9UZjf7MNrXDUjnXxNqjte3q3rX6vaimY"
NOW = 1_700_000_000 * 10**9


def addr(pid: str) -> str:
    return f"/ip4/127.0.0.1/tcp/4001/p2p/{pid}"


def write(m: ColonyMachine, op: str, body: dict, caller: str = SO) -> object:
    cmd = {"op": op, "caller": caller, "nonce": os.urandom(16), "expiry": NOW // 10**6 + 60_000,
           "body": body, "gen": os.urandom(32).hex()}
    return m.apply(cmd, NOW)


@pytest.fixture
def m() -> ColonyMachine:
    m = ColonyMachine()
    m.apply({"op": "bootstrap", "serverid": SO, "clusterid": "c" * 64, "member": [A, addr(A)]}, NOW)
    return m


def test_bootstrap_records_the_first_member(m: ColonyMachine) -> None:
    assert m.members == {A: addr(A)}


def test_add_and_remove_members(m: ColonyMachine) -> None:
    assert write(m, "addmembermsg", {"peerid": B, "addr": addr(B)}) == {"members": {A: addr(A), B: addr(B)}}
    restored = ColonyMachine.restore(m.snapshot())
    assert restored.members == m.members and restored.digest() == m.digest()
    write(m, "removemembermsg", {"peerid": A})
    assert m.members == {B: addr(B)}
    with pytest.raises(BadRequest, match="last member"):
        write(m, "removemembermsg", {"peerid": B})
    with pytest.raises(NotFound):
        write(m, "removemembermsg", {"peerid": A})


def test_only_the_server_owner_changes_membership(m: ColonyMachine) -> None:
    with pytest.raises(AccessDenied):
        write(m, "addmembermsg", {"peerid": B, "addr": addr(B)}, caller="b" * 64)
    with pytest.raises(BadRequest, match="must end in"):
        write(m, "addmembermsg", {"peerid": B, "addr": addr(A)})
    assert m.members == {A: addr(A)}


def test_barrier_is_a_no_op(m: ColonyMachine) -> None:
    before = m.digest()
    assert m.apply({"op": "barrier"}, NOW) == {}
    assert m.digest() == before


def test_a_member_announces_its_new_address_but_an_outsider_cannot_join(m: ColonyMachine) -> None:
    moved = "/ip4/127.0.0.1/tcp/5001/p2p/" + A
    assert m.apply({"op": "announce", "member": [A, moved]}, NOW) == {"members": {A: moved}}
    with pytest.raises(NotFound):
        m.apply({"op": "announce", "member": [B, addr(B)]}, NOW)
    with pytest.raises(BadRequest, match="announce"):
        m.apply({"op": "announce", "member": [B, addr(A)]}, NOW)
    assert m.members == {A: moved}


def test_a_cluster_from_before_the_member_book_lists_its_first_announcer() -> None:
    m = ColonyMachine()
    m.apply({"op": "bootstrap", "serverid": SO, "clusterid": "c" * 64}, NOW)
    assert m.members == {}
    m.apply({"op": "announce", "member": [A, addr(A)]}, NOW)
    assert m.members == {A: addr(A)}
