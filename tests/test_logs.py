"""JSON log lines carry the node, peer and process ids (node, peer, processid) as fields."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from cli.logs import setup_logging
from node.log_context import set_log_node


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    set_log_node("")


def test_json_lines_carry_node_peer_and_process(capsys, restore_logging) -> None:
    setup_logging("info", "json")
    set_log_node("16Uiu2HAmNode")
    log = logging.getLogger("colonies.test")
    log.info("process %s timed out", "p1", extra={"processid": "p1"})
    log.warning("session with %s down", "peerX", extra={"peer": "peerX"})
    log.debug("not shown")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(r["level"], r["msg"]) for r in lines] == [
        ("info", "process p1 timed out"),
        ("warning", "session with peerX down"),
    ]
    assert all(r["node"] == "16Uiu2HAmNode" and r["logger"] == "colonies.test" for r in lines)
    assert lines[0]["processid"] == "p1" and "peer" not in lines[0]
    assert lines[1]["peer"] == "peerX" and lines[1]["ts"].endswith("Z")


def test_an_unknown_format_is_refused(restore_logging) -> None:
    with pytest.raises(SystemExit, match="log format"):
        setup_logging("info", "xml")
