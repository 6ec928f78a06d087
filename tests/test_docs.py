"""docs/protocol.md lists every message a node serves, with its role rule, and every Raft
message type the codec lets through: a message added without its documentation fails here."""

from __future__ import annotations

import re
from pathlib import Path

from consensus.roles import RULES
from node.raft_codec import _REQUIRED as RAFT_MESSAGES
from protocol.messages import MESSAGES

DOC = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()


def table_rows() -> dict[str, list[str]]:
    rows = {}
    for line in DOC.splitlines():
        m = re.match(r"\| `([a-z_]+)`(?:, `[a-z_]+`)* \|(.*)\|$", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in m.group(2).split("|")]
    return rows


def test_every_rpc_message_is_documented_with_its_kind_and_role() -> None:
    rows = table_rows()
    for name, mt in MESSAGES.items():
        assert name in rows, f"{name} is missing from docs/protocol.md"
        kind, role = rows[name][:2]
        assert kind == ("write" if mt.write else "read"), name
        rule = RULES.get(name)
        # "|" would split a markdown table's cell: the doc says "or".
        assert role == (rule.symbol.replace("|", " or ") if rule else "anyone"), name


def test_every_raft_message_type_is_documented() -> None:
    for name in RAFT_MESSAGES:
        assert f"`{name}`" in DOC, f"raft message {name} is missing from docs/protocol.md"
