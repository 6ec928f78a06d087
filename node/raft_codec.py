"""The Raft wire codec: what may cross a Raft stream, checked before PySyncObj sees it.

A frame (``protocol.framing``: 4-byte length prefix) carries one msgpack map per Raft message
(``use_bin_type=True``), or a one-byte heartbeat body (msgpack nil). A frame is at most
``RAFT_MAX_FRAME_BYTES``; an append-entries message bigger than that is sent as several
consecutive append-entries (PySyncObj batches up to ``appendEntriesBatchSizeBytes`` of entries
plus one more, each entry below ``MAX_ENTRY_BYTES``).

This is the barrier that keeps pickle away: a received message is checked against the shape
PySyncObj 0.3.17 sends for its type and rebuilt from the known fields (entries back to
``(command, idx, term)`` tuples, snapshot chunks to ``(data, is_first, is_last)``); anything
else is refused. Messages carrying a ``transmission`` chunk are always refused: PySyncObj
would ``pickle.loads`` the reassembled chunks, and our entries never need them. The pickle left
in MEMBERSHIP/VERSION commands is parsed by ``node/pickle_guard.py``. Our own messages on the
same streams (relays, ``node/replicator.py``) are checked here too and never reach PySyncObj.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import msgpack

from protocol.errors import ColoniesError
from protocol.framing import encode_frame, unpack_untrusted

# A single log entry at or above PySyncObj's appendEntriesBatchSizeBytes is sent to followers
# as pickle.dumps(entry) in chunks, and unpickled there. Entries must stay below it; the wire
# frame limit must allow about twice this (a batch of entries plus one more).
MAX_ENTRY_BYTES = 2 * 1024 * 1024
RAFT_MAX_FRAME_BYTES = 4 * 1024 * 1024  # one entry (< MAX_ENTRY_BYTES) always fits
assert RAFT_MAX_FRAME_BYTES >= MAX_ENTRY_BYTES + 64 * 1024

HEARTBEAT = b"\xc0"  # msgpack nil: never a Raft message
HEARTBEAT_FRAME = encode_frame(HEARTBEAT)


class RaftMessageRefused(ValueError):
    """A received frame that is not a Raft message PySyncObj 0.3.17 could have sent."""


class RaftMessageTooLarge(ValueError):
    """A message that cannot be split into frames under the limit (a bug upstream)."""


def _uint(v: object) -> bool:
    return type(v) is int and v >= 0  # type(): bool is not an int here


def _opt_uint(v: object) -> bool:
    return v is None or _uint(v)


def _bool(v: object) -> bool:
    return type(v) is bool


def _command(v: object) -> bool:
    return type(v) is bytes and 0 < len(v) <= MAX_ENTRY_BYTES


# Per message type: required fields and optional fields, with their checks. These are all the
# messages PySyncObj 0.3.17 sends through a Transport (syncobj.py); utility messages only
# exist in TCPTransport's handshake and are not part of this protocol.
_REQUIRED: dict[str, dict[str, Callable[[object], bool]]] = {
    "request_vote": {"term": _uint, "last_log_index": _uint, "last_log_term": _uint},
    "response_vote": {"term": _uint},
    "timeout_now": {"term": _uint},
    "next_node_idx": {"next_node_idx": _uint, "reset": _bool, "success": _bool},
    "apply_command": {"command": _command},
    "apply_command_response": {"request_id": _uint},
    "append_entries": {"term": _uint, "commit_index": _uint},
}
_OPTIONAL: dict[str, dict[str, Callable[[object], bool]]] = {
    "apply_command": {"request_id": _uint},
    "apply_command_response": {"error": _uint, "log_idx": _uint, "log_term": _uint},
    "append_entries": {"prevLogIdx": _opt_uint, "prevLogTerm": _opt_uint},
}


# Our own messages on the same streams (node/replicator.py): a follower relays a batch of
# commands to the leader, which may refuse it. Never handed to PySyncObj.
RELAY_TYPES = frozenset({"relay", "relay_refused"})
MAX_RELAY_COMMANDS = 4096


def _tokens(v: object) -> bool:
    return type(v) is list and 0 < len(v) <= MAX_RELAY_COMMANDS and all(_uint(t) for t in v)


def _commands(v: object) -> bool:
    return type(v) is list and 0 < len(v) <= MAX_RELAY_COMMANDS and all(_command(c) for c in v)


_REQUIRED["relay"] = {"cmds": _commands, "tokens": _tokens, "ttl_ms": _uint}
_REQUIRED["relay_refused"] = {"tokens": _tokens, "reason": _uint}

# Snapshots travel on our own messages too (node/snapshot_transfer.py): the leader sends a
# file in chunks at offsets, the follower acknowledges the offset it wants next.
SNAPSHOT_TYPES = frozenset({"snap_chunk", "snap_ack"})
SNAPSHOT_PARTS = ("dump", "archive")
MAX_SNAPSHOT_CHUNK = 1024 * 1024


def _part(v: object) -> bool:
    return type(v) is str and v in SNAPSHOT_PARTS


def _chunk(v: object) -> bool:
    return type(v) is bytes and 0 < len(v) <= MAX_SNAPSHOT_CHUNK


_REQUIRED["snap_chunk"] = {"sid": _uint, "index": _uint, "part": _part, "offset": _uint,
                           "size": _uint, "data": _chunk}
_REQUIRED["snap_ack"] = {"sid": _uint, "part": _part, "offset": _uint}

# PreVote (node/raft_elections.py): before it stands for election, a member asks the others
# whether they would vote for a log like its own; they say no while they hear a leader.
PRE_VOTE_TYPES = frozenset({"pre_vote", "pre_vote_reply"})
_REQUIRED["pre_vote"] = {"round": _uint, "last_log_index": _uint, "last_log_term": _uint}
_REQUIRED["pre_vote_reply"] = {"round": _uint, "granted": _bool}

# Every message type that is ours, not PySyncObj's: handled by the node, never by PySyncObj.
OWN_TYPES = RELAY_TYPES | SNAPSHOT_TYPES | PRE_VOTE_TYPES

# What a learner (a member that does not vote yet) may send: acknowledgements of the entries
# it received, relayed writes, snapshot acknowledgements. Never a vote or a vote request.
LEARNER_TYPES = frozenset({"next_node_idx", "snap_ack"}) | RELAY_TYPES


def _entries(v: object) -> list[tuple[bytes, int, int]]:
    if type(v) is not list:
        raise RaftMessageRefused("append_entries entries must be an array")
    out: list[tuple[bytes, int, int]] = []
    for e in v:
        if type(e) is not list or len(e) != 3 or not _command(e[0]):
            raise RaftMessageRefused("an entry must be [command bytes, index, term]")
        if not (_uint(e[1]) and _uint(e[2])):
            raise RaftMessageRefused("an entry's index and term must be unsigned ints")
        out.append((e[0], e[1], e[2]))
    return out


def _snapshot_chunk(v: object) -> tuple[bytes, bool, bool] | None:
    if v is None:
        return None
    if type(v) is not list or len(v) != 3:
        raise RaftMessageRefused("a snapshot chunk must be [data, is_first, is_last]")
    data, first, last = v
    if type(data) is not bytes or not (_bool(first) and _bool(last)):
        raise RaftMessageRefused("a snapshot chunk must be [bytes, bool, bool]")
    return (data, first, last)


def decode_raft_message(body: bytes) -> dict[str, Any]:
    """A frame body as the dict PySyncObj expects, or RaftMessageRefused.

    Only known fields are copied; lists that PySyncObj sent as tuples become tuples again.
    """
    try:
        msg = unpack_untrusted(body, "raft message")
    except ColoniesError as e:
        raise RaftMessageRefused(e.message) from None
    if type(msg) is not dict:
        raise RaftMessageRefused("a raft message must be a map")
    if "transmission" in msg:
        # Chunks of one pickled entry, which PySyncObj would pickle.loads once reassembled.
        raise RaftMessageRefused("chunked ('transmission') entries are not accepted")
    kind = msg.get("type")
    required = _REQUIRED.get(kind) if type(kind) is str else None
    if required is None:
        raise RaftMessageRefused(f"unknown raft message type {str(kind)[:40]!r}")
    out: dict[str, Any] = {"type": kind}
    for name, check in required.items():
        if name not in msg or not check(msg[name]):
            raise RaftMessageRefused(f"{kind} needs a valid {name!r}")
        out[name] = msg[name]
    for name, check in _OPTIONAL.get(kind, {}).items():
        if name in msg:
            if not check(msg[name]):
                raise RaftMessageRefused(f"{kind} has an invalid {name!r}")
            out[name] = msg[name]
    if kind == "append_entries":
        if "prevLogIdx" in out:
            if "prevLogTerm" not in out:
                raise RaftMessageRefused("append_entries with prevLogIdx needs prevLogTerm")
            out["entries"] = _entries(msg.get("entries", []))
        elif "serialized" in msg:
            out["serialized"] = _snapshot_chunk(msg["serialized"])
    elif kind == "apply_command_response" and "error" not in out:
        if "log_idx" not in out or "log_term" not in out:
            raise RaftMessageRefused("apply_command_response needs an error or log_idx/log_term")
    elif kind == "relay" and len(out["cmds"]) != len(out["tokens"]):
        raise RaftMessageRefused("relay needs one token per command")
    return out


def encode_raft_message(message: Mapping[str, Any], max_body: int = RAFT_MAX_FRAME_BYTES) -> list[bytes]:
    """A Raft message as one or more frame bodies of at most ``max_body`` bytes.

    Only append-entries can be too big; it is split into consecutive append-entries (the
    second half's prevLogIdx/prevLogTerm are the first half's last entry), which a follower
    handles exactly like PySyncObj's own pipelined batches.
    """
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) <= max_body:
        return [body]
    entries = message.get("entries")
    if (
        message.get("type") != "append_entries"
        or "prevLogIdx" not in message
        or not isinstance(entries, list | tuple)
        or len(entries) < 2
    ):
        raise RaftMessageTooLarge(
            f"raft {message.get('type')!r} message of {len(body)} bytes exceeds {max_body}"
        )
    mid = len(entries) // 2
    head, tail = list(entries[:mid]), list(entries[mid:])
    last = head[-1]
    first_part = {**message, "entries": head}
    second_part = {**message, "entries": tail, "prevLogIdx": last[1], "prevLogTerm": last[2]}
    return encode_raft_message(first_part, max_body) + encode_raft_message(second_part, max_body)


def sheddable(message: Mapping[str, Any]) -> bool:
    """Append-entries with entries: PySyncObj re-sends them when the follower's ack shows the
    gap. Never snapshot chunks (a lost chunk corrupts the follower's dump) nor control
    messages (small, and losing them only slows Raft down)."""
    return message.get("type") == "append_entries" and bool(message.get("entries"))
