"""Shared fixtures: a real node on 127.0.0.1 in the test's trio loop, and the dev identities."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from node.client import Client
from node.daemon import ColonyNode, NodeConfig
from protocol.identity import PrivateKey
from tests.machine_harness import Harness

DATA = Path(__file__).parent / "data"


@pytest.fixture
def h() -> Harness:
    """A state machine driven directly, with a controlled clock (tests/machine_harness.py)."""
    return Harness()


def vector_key(role: str) -> PrivateKey:
    vectors = json.loads((DATA / "identity.json").read_text())
    for ident in vectors["identities"]:
        if ident.get("role_in_upstream_dev_setup") == role:
            return PrivateKey.from_hex(ident["prvkey"])
    raise KeyError(role)


@dataclass
class Colony:
    """A running node with one colony and one approved executor."""

    node: ColonyNode
    addr: str
    server: PrivateKey
    owner: PrivateKey
    executor: PrivateKey
    name: str = "dev"
    executortype: str = "test-executor"
    executorname: str = "worker-1"


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[ColonyNode]:
    server = vector_key("server")
    config = NodeConfig(data_dir=tmp_path / "node", server_prvkey=server.hex)
    node = ColonyNode(config)
    async with trio.open_nursery() as n:
        await n.start(node.run)
        yield node
        node.stop()


@pytest.fixture
async def colony(node: ColonyNode) -> AsyncIterator[Colony]:
    c = Colony(
        node=node,
        addr=node.addrs[0],
        server=vector_key("server"),
        owner=vector_key("colony"),
        executor=vector_key("executor"),
    )
    async with Client.connect(c.addr, c.server) as client:
        await client.add_colony(c.owner.id, c.name)
        owner = client.with_key(c.owner)
        await owner.add_executor(c.executor.id, c.executorname, c.executortype, c.name)
        await owner.approve_executor(c.name, c.executorname)
    yield c
