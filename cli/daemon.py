"""`colonyd`: run one node.

    colonyd --data-dir DIR --listen /ip4/127.0.0.1/tcp/4001
    colonyd --data-dir DIR2 --listen /ip4/127.0.0.1/tcp/4002 --join /ip4/127.0.0.1/tcp/4001/p2p/<id>

The server owner key comes from --server-key-file, else COLONIES_SERVER_PRVKEY, else it is
created in the data dir on the first start. The node prints its full multiaddr when ready.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
from pathlib import Path

import trio

from cli.errors import describe, first_error
from cli.logs import LOG_FORMATS, setup_logging
from node import gc_control
from node.daemon import ColonyNode, NodeConfig
from node.libp2p_patches import ConnectionLimits
from node.raft_journal import SyncPolicy
from node.raft_replica import DEFAULT_COMPACT_AFTER
from protocol.errors import ColoniesError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="colonyd", description="Run a Colonies node.")
    p.add_argument("--data-dir", required=True, type=Path, help="journal, snapshot and keys")
    p.add_argument(
        "--listen",
        action="append",
        default=None,
        help="multiaddr to listen on (repeatable); default /ip4/127.0.0.1/tcp/0",
    )
    p.add_argument(
        "--join",
        action="append",
        default=None,
        metavar="MULTIADDR",
        help="join the cluster of this member (repeatable; only on the first start)",
    )
    p.add_argument("--announce", help="the full multiaddr others dial (default: first listen)")
    p.add_argument("--server-key-file", type=Path, help="file holding the server owner key (hex)")
    p.add_argument("--ready-file", type=Path, help="write the node's addresses here when ready")
    p.add_argument(
        "--metrics-addr",
        default=os.environ.get("COLONIES_METRICS_ADDR") or None,
        help="serve Prometheus metrics on HOST:PORT (GET /metrics)",
    )
    p.add_argument(
        "--fault-file",
        type=Path,
        help="chaos testing only: a JSON fault plan for the Raft transport (node/faults.py)",
    )
    p.add_argument(
        "--max-client-connections",
        type=_positive_int,
        default=None,
        metavar="N",
        help="inbound connections from clients (not cluster members) held at once "
        f"(default {ConnectionLimits.max_clients}, within the open-file limit)",
    )
    p.add_argument(
        "--journal-sync",
        type=_sync_policy,
        default=os.environ.get("COLONIES_JOURNAL_SYNC", "always"),
        metavar="always|INTERVAL",
        help="when the Raft journal reaches the disk: 'always' (default: before this node "
        "acknowledges an entry), or an interval such as 50ms (faster on slow disks; a power "
        "loss of every member at once can lose writes acknowledged in the last interval)",
    )
    p.add_argument(
        "--compact-after",
        type=_positive_int,
        default=DEFAULT_COMPACT_AFTER,
        metavar="N",
        help="snapshot the live state and cut the journal after N entries, or 5 minutes "
        f"(default {DEFAULT_COMPACT_AFTER})",
    )
    p.add_argument("--log-level", default=os.environ.get("COLONIES_LOG_LEVEL", "info"))
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=os.environ.get("COLONIES_LOG_FORMAT", "text"),
        help="text lines, or JSON lines with node, peer and process fields",
    )
    return p.parse_args(argv)


def _sync_policy(text: str) -> SyncPolicy:
    try:
        return SyncPolicy.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


# Files a node keeps open besides client connections: members, the journal, the archive, the
# metrics listener, its own dials.
RESERVED_FDS = 256


def client_connection_limit(requested: int | None) -> int:
    """Raises the soft open-file limit to the hard one, and keeps the client connection limit
    within it (each connection is a socket), so a full node refuses connections cleanly
    instead of failing with EMFILE on its journal or a member's dial."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = 65536 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    fits = max(1, soft - RESERVED_FDS)
    wanted = ConnectionLimits.max_clients if requested is None else requested
    if wanted > fits:
        logging.getLogger("colonies.node").warning(
            "client connections limited to %d (open-file limit %d); raise `ulimit -n` for more",
            fits, soft,
        )
    return min(wanted, fits)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Whatever the node or a library writes (journal, snapshots, archive, temp files) is
    # private; node/datadir.py also creates its files 0600 and tightens an existing dir.
    os.umask(0o077)
    setup_logging(args.log_level, args.log_format)
    gc_control.tune()
    config = NodeConfig(
        data_dir=args.data_dir,
        listen=args.listen or ["/ip4/127.0.0.1/tcp/0"],
        server_prvkey=os.environ.get("COLONIES_SERVER_PRVKEY") or None,
        server_key_file=args.server_key_file,
        ready_file=args.ready_file,
        metrics_addr=args.metrics_addr,
        join=args.join or [],
        announce=args.announce,
        fault_file=args.fault_file,
        max_client_connections=client_connection_limit(args.max_client_connections),
        journal_sync=args.journal_sync,
        compact_after=args.compact_after,
    )

    async def run() -> None:
        node = ColonyNode(config)
        async with trio.open_nursery() as n:
            await n.start(node.run)
            gc_control.freeze()  # the state loaded at start is long-lived (node/gc_control.py)
            for addr in node.addrs:
                print(f"colonyd ready: {addr}", flush=True)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        return 130
    except (ColoniesError, OSError, BaseExceptionGroup) as e:
        if isinstance(first_error(e), KeyboardInterrupt):
            return 130
        if not isinstance(first_error(e), ColoniesError | OSError):
            raise
        print(f"colonyd: error: {describe(e)}", file=sys.stderr)
        return 2
    logging.getLogger("colonies.node").info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
