"""PySyncObj's own pickle paths, restricted.

PySyncObj 0.3.17 pickles two kinds of log commands itself: MEMBERSHIP (``addNodeToCluster`` /
``removeNodeFromCluster``) and VERSION. Every node unpickles them when it receives, applies or
replays them, so a member could make every other member run code. These parsers use an
unpickler that resolves only the globals it is given (``pysyncobj.node.Node`` for membership,
none for versions) and check the shape of what comes out; ``node/raft_replica.py`` routes
PySyncObj's name-mangled parse and apply methods through them. Application commands never
use pickle (they are msgpack, see ``node/raft_replica.py``).
"""

from __future__ import annotations

import io
import pickle
from typing import Any

from pysyncobj.node import Node

# The only global a MEMBERSHIP command needs: addNodeToCluster/removeNodeFromCluster pickle
# ['add'|'rem', node_id, Node(node_id, ...)] with protocol 2, where a str-only Node is
# GLOBAL + NEWOBJ + BUILD (no copyreg, no _codecs: those appear only for bytes attributes).
MEMBERSHIP_GLOBALS = frozenset({("pysyncobj.node", "Node")})
MAX_NODE_ID_CHARS = 256
MAX_NODE_ADDR_CHARS = 1024


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals it is given. Every way pickle has to run
    code (REDUCE, NEWOBJ, BUILD with __setstate__, INST/OBJ, extensions) needs a callable or a
    class from find_class first, so refusing globals refuses code execution."""

    def __init__(self, data: bytes, allowed: frozenset[tuple[str, str]]) -> None:
        super().__init__(io.BytesIO(data))
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed here")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed here")


def restricted_loads(data: bytes, allowed: frozenset[tuple[str, str]] = frozenset()) -> Any:
    """pickle.loads that refuses every global not in ``allowed`` (UnpicklingError)."""
    return _RestrictedUnpickler(bytes(data), allowed).load()


def parse_membership_command(payload: bytes) -> list[Any] | None:
    """A MEMBERSHIP command's pickle (without its type byte) as ``[kind, node_id, Node]``, or
    None if it is anything else than what addNodeToCluster/removeNodeFromCluster produce.

    The Node is rebuilt from the checked fields rather than returned as unpickled: only its id
    and an optional ``addr`` string (a libp2p multiaddr the transport may dial) survive.
    """
    try:
        request = restricted_loads(payload, MEMBERSHIP_GLOBALS)
    except Exception:
        return None
    if type(request) is not list or len(request) != 3:
        return None
    kind, node_id, node = request
    if kind not in ("add", "rem") or type(node_id) is not str:
        return None
    if not 0 < len(node_id) <= MAX_NODE_ID_CHARS or type(node) is not Node:
        return None
    attrs = dict(vars(node))
    if attrs.pop("_id", None) != node_id:
        return None
    addr = attrs.pop("addr", None)
    if attrs or (addr is not None and (type(addr) is not str or len(addr) > MAX_NODE_ADDR_CHARS)):
        return None
    return [kind, node_id, Node(node_id) if addr is None else Node(node_id, addr=addr)]


def parse_version_command(payload: bytes) -> int | None:
    """A VERSION command's pickled int (no globals allowed), or None."""
    try:
        version = restricted_loads(payload)
    except Exception:
        return None
    return version if type(version) is int else None
