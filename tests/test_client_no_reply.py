"""A client leaves a node that does not answer (found by the chaos runs' SIGSTOP)."""

from __future__ import annotations

import pytest

from node.client import Client
from node.connection import NoReply
from tests.conftest import Colony


async def test_a_call_with_no_reply_moves_the_client_off_that_connection(colony: Colony) -> None:
    # Regression (chaos runs): a SIGSTOPped node never breaks the connection, so its clients
    # and executors timed out on it again and again until it resumed. Now a call that gets no
    # reply within its bound abandons the connection; the next call opens a new one (to the
    # next member; here the only node, which answers again).
    async with Client.connect(colony.addr, colony.executor) as c:
        first = c.conn
        with pytest.raises(NoReply):
            await c.call("assignprocessmsg", {"colonyname": "dev", "timeout": 3}, timeout=0.3)
        assert first is not None and first.broken
        assert (await c.colony("dev"))["name"] == "dev"
        assert c.conn is not first and not c.conn.broken
