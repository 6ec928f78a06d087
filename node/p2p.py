"""The libp2p host, configured rather than defaulted (see DESIGN.md and notes/stack-probe.md).

- Noise only: the default host also accepts plaintext, which lets a peer claim another's ID.
- `max_connections_per_peer=1`: the default adds a 250 ms happy-eyeballs wait to every dial.
- No auto-dialing and no pruning: libp2p's connection manager dials peers from its peerstore to
  keep 50 connections and prunes above 300; a node dials only its cluster members, and what it
  accepts is bounded by `libp2p_patches.ConnectionLimits` (set with `set_limits`), so libp2p's
  own caps are set above those.
- secp256k1 keys, so a node's peer ID and its Colonies ID come from one key.
- libp2p logs every normal disconnect as a bare warning; we route it to our logger and quiet it.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.secp256k1 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID as PeerID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from multiaddr import Multiaddr

from node import libp2p_patches
from node.libp2p_patches import ConnectionLimits
from protocol.errors import BadRequest, Unavailable
from protocol.identity import PrivateKey

log = logging.getLogger("colonies.p2p")

# Speed and limit fixes to libp2p (see the module).
libp2p_patches.install()


def quiet_libp2p_logs(level: int = logging.ERROR) -> None:
    """libp2p's logger has propagate=False and no handler, so its warnings land on stderr bare."""
    lp = logging.getLogger("libp2p")
    lp.setLevel(level)
    if not lp.handlers:
        lp.addHandler(logging.NullHandler())


def key_pair_of(key: PrivateKey) -> KeyPair:
    return create_new_key_pair(key.secret)


def peer_id_of(key: PrivateKey) -> PeerID:
    return PeerID.from_pubkey(key_pair_of(key).public_key)


# libp2p's own cap on connections (it refuses beyond it, members included): above what our
# limits admit (clients, handshakes in flight) plus any cluster's members.
LIBP2P_MAX_CONNECTIONS = 65536
HANDSHAKE_TIMEOUT_S = 5.0  # Noise + yamux negotiation of an inbound connection


def make_host(key: PrivateKey) -> IHost:
    kp = key_pair_of(key)
    noise = NoiseTransport(kp, noise_privkey=create_x25519_key_pair().private_key)
    return new_host(
        key_pair=kp,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_preference="YAMUX",
        connection_config=ConnectionConfig(
            max_connections_per_peer=1,
            max_connections=LIBP2P_MAX_CONNECTIONS,
            high_watermark=LIBP2P_MAX_CONNECTIONS,
            low_watermark=0,
            min_connections=0,
            inbound_upgrade_timeout=HANDSHAKE_TIMEOUT_S,
        ),
    )


def parse_multiaddr(text: str) -> Multiaddr:
    try:
        return Multiaddr(text)
    except Exception as e:  # multiaddr raises several unrelated types
        raise BadRequest(f"invalid multiaddr {text!r}: {e}") from None


def parse_peer_addr(text: str) -> tuple[PeerID, Multiaddr]:
    """A full node address: /ip4/HOST/tcp/PORT/p2p/PEERID."""
    ma = parse_multiaddr(text)
    try:
        info = info_from_p2p_addr(ma)
    except Exception as e:
        raise BadRequest(f"address {text!r} must end in /p2p/<peer id>: {e}") from None
    return info.peer_id, ma


def full_addrs(host: IHost) -> list[str]:
    pid = host.get_id().to_string()
    out = []
    for a in host.get_addrs():
        s = str(a)
        out.append(s if "/p2p/" in s else f"{s}/p2p/{pid}")
    return out


def check_port_free(listen: str) -> None:
    """Refuse a fixed TCP port that another process listens on.

    libp2p's listener sets SO_REUSEPORT, so a second node on the same port would start without
    an error and the kernel would split connections between the two. A plain bind (SO_REUSEADDR
    only, so TIME_WAIT leftovers of an earlier run do not count) fails while any socket listens
    there.
    """
    parts = listen.strip("/").split("/")
    if len(parts) < 4 or parts[0] not in ("ip4", "ip6") or parts[2] != "tcp":
        return
    try:
        port = int(parts[3])
    except ValueError:
        return
    if port == 0:
        return
    family = socket.AF_INET if parts[0] == "ip4" else socket.AF_INET6
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((parts[1], port))
        except OSError as e:
            raise BadRequest(
                f"cannot listen on {listen}: {e.strerror} (is another colonyd running there?)"
            ) from None


@asynccontextmanager
async def running_host(
    key: PrivateKey, listen: list[str], limits: ConnectionLimits | None = None
) -> AsyncIterator[IHost]:
    """A started host; always closed on exit (leaving host.run() alone leaks the listener).
    ``limits`` bound what its peers can make it hold (default: ``ConnectionLimits()``)."""
    quiet_libp2p_logs()
    host = make_host(key)
    libp2p_patches.set_limits(host.get_network(), limits or libp2p_patches.ConnectionLimits())
    addrs = [parse_multiaddr(a) for a in listen]
    for a in listen:
        check_port_free(a)
    try:
        async with host.run(listen_addrs=addrs):
            yield host
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await host.close()


async def connect(host: IHost, addr: str, timeout: float = 5.0) -> PeerID:
    """Dial a peer by full multiaddr, clearing libp2p's 60 s negative dial cache first."""
    peer_id, ma = parse_peer_addr(addr)
    info = info_from_p2p_addr(ma)
    unblock = getattr(host.get_network(), "unblock_peer", None)
    if unblock is not None:
        unblock(peer_id)
    try:
        with trio.fail_after(timeout):
            await host.connect(info)
    except trio.TooSlowError:
        raise Unavailable(f"timed out connecting to {addr}") from None
    except Exception as e:
        raise Unavailable(f"cannot connect to {addr}: {e}") from None
    return peer_id
