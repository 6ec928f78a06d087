"""The Raft transport's streams on the node's libp2p host (protocol ``/colonies/raft/1.0.0``).

One long-lived stream per pair of cluster members on the node's own host: no second port,
Noise-authenticated peer ids, and the Raft node id *is* the libp2p peer id, so the Raft member
list and the transport's allow-list are one list. Each dial clears libp2p's negative dial
cache first (``node.p2p.connect``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID as PeerID

from node.faults import FaultFile
from node.p2p import connect, parse_peer_addr
from node.raft_faults import FaultyStreamLayer
from node.raft_transport import DIAL_TIMEOUT_S, AcceptStream, RaftStream, RaftTransport, StreamLayer
from protocol.errors import ColoniesError

log = logging.getLogger("colonies.raft.transport")

RAFT_PROTOCOL_ID = "/colonies/raft/1.0.0"


class Libp2pStreamLayer:
    """Streams to and from members on a libp2p host."""

    def __init__(self, host: IHost, dial_timeout: float = DIAL_TIMEOUT_S) -> None:
        self._host = host
        self._dial_timeout = dial_timeout
        self._accept: AcceptStream | None = None

    def check_addr(self, peer: str, addr: str) -> str | None:
        try:
            pid, _ = parse_peer_addr(addr)
        except ColoniesError as e:
            log.warning("ignoring raft member address %r: %s", addr, e.message)
            return None
        if pid.to_string() != peer:
            log.warning("ignoring raft member address %r: it is not %s's", addr, peer)
            return None
        return addr

    def listen(self, accept: AcceptStream) -> None:
        self._accept = accept
        self._host.set_stream_handler(TProtocol(RAFT_PROTOCOL_ID), self._handle_stream)

    def stop_listening(self) -> None:
        self._host.remove_stream_handler(TProtocol(RAFT_PROTOCOL_ID))
        self._accept = None

    async def _handle_stream(self, stream: Any) -> None:
        accept = self._accept
        try:
            # Noise proved that the remote holds this id's key (the host allows nothing else).
            peer = stream.muxed_conn.peer_id.to_string()
        except Exception:
            peer = None
        if accept is None or peer is None:
            try:
                await stream.reset()
            except Exception:
                pass
            return
        await accept(peer, stream)

    async def open_stream(self, peer: str, addr: str) -> RaftStream:
        await connect(self._host, addr, timeout=self._dial_timeout)
        stream: RaftStream = await self._host.new_stream(
            PeerID.from_base58(peer), [TProtocol(RAFT_PROTOCOL_ID)]
        )
        return stream

    async def forget_connection(self, peer: str) -> None:
        await self._host.get_network().close_peer(PeerID.from_base58(peer))

    def stats(self) -> dict[str, int]:
        return {}


def libp2p_raft_transport(
    host: IHost,
    self_id: str,
    members: Mapping[str, str | None],
    *,
    faults: FaultFile | None = None,
    **kwargs: Any,
) -> RaftTransport:
    """The Raft transport on ``host``. ``members``: the OTHER members, peer id -> full
    multiaddr ``/ip4/../tcp/../p2p/<id>`` (None when unknown: that peer must dial us).
    ``faults`` (chaos runs only, ``colonyd --fault-file``) wraps the streams in fault
    injection; without it no fault code path runs."""
    layer: StreamLayer = Libp2pStreamLayer(host, kwargs.get("dial_timeout", DIAL_TIMEOUT_S))
    if faults is not None:
        layer = FaultyStreamLayer(layer, faults)
    return RaftTransport(self_id, members, layer, **kwargs)
