"""colonyd with counters: how well the node batches under load. For `bench.py --probe`.

    COLONIES_SERVER_PRVKEY=... python simulations/node_probe.py --stats-file S \\
        [--cprofile FILE] -- <colonyd arguments>

Runs `cli.daemon.main` unchanged, with thin wrappers (no behaviour change) around:
- node.rpc_server.decode_requests: request frames read, envelopes in them;
- node.rpc_server.encode_replies: reply frames written (one stream write each), replies in them;
- node.replicator.pack_batch: Raft entries proposed, commands in them;
- ReplicatedColony.doTick: ticks;
- RaftTransport.send: Raft messages sent, by type;
- ColonyMachine.apply: applied commands by op, and the refused ones by op and error;
- the garbage collector: collections and their pauses per generation;
- SnapshotStore.serialize: snapshots started (log compaction), and how long the part in the
  node's trio thread took (the fork; a child process writes the dump);
- LoopMonitor.record: every event-loop lag of LAG_KEPT_S or more, with its wall-clock time
  (`lags`: [[unix seconds, ms], ...], the last MAX_LAGS), so a benchmark can take the worst
  one within a phase it timed.
The counters are written as JSON to --stats-file at exit, and whenever the file
`<stats-file>.dump` appears (then deleted), so a benchmark can take a snapshot around its
measured phase. --cprofile writes a cProfile of the whole run at exit (slows the node ~2x).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import sys
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

import node.replicator as replicator_mod
import node.rpc_server as rpc_mod
from node.loop_monitor import LoopMonitor
from node.raft_replica import ReplicatedColony
from node.raft_snapshots import SnapshotStore

COUNTERS: Counter[str] = Counter()
# The Raft transports of this node (their own counters include libp2p writes).
TRANSPORTS: list[Any] = []
LAG_KEPT_S = 0.005
MAX_LAGS = 20000
LAGS: deque[tuple[float, float]] = deque(maxlen=MAX_LAGS)
HIST: dict[str, Counter[int]] = {"req_per_frame": Counter(), "replies_per_frame": Counter(),
                                 "cmds_per_entry": Counter()}


def install() -> None:
    decode_requests = rpc_mod.decode_requests
    encode_replies = rpc_mod.encode_replies
    pack_batch = replicator_mod.pack_batch
    do_tick = ReplicatedColony.doTick
    serialize = SnapshotStore.serialize
    record = LoopMonitor.record

    def counted_decode(body: bytes) -> Any:
        items = decode_requests(body)
        COUNTERS["frames_in"] += 1
        COUNTERS["requests_in"] += len(items)
        HIST["req_per_frame"][len(items)] += 1
        return items

    def counted_encode(items: list) -> bytes:
        COUNTERS["frames_out"] += 1
        COUNTERS["replies_out"] += len(items)
        HIST["replies_per_frame"][len(items)] += 1
        return encode_replies(items)

    def counted_pack(now: int, packed_cmds: list[bytes], *rest: Any) -> bytes:
        COUNTERS["entries"] += 1
        COUNTERS["commands"] += len(packed_cmds)
        HIST["cmds_per_entry"][len(packed_cmds)] += 1
        return pack_batch(now, packed_cmds, *rest)

    def counted_tick(self: ReplicatedColony, *a: Any, **kw: Any) -> Any:
        COUNTERS["ticks"] += 1
        return do_tick(self, *a, **kw)

    def timed_serialize(self: SnapshotStore, *a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return serialize(self, *a, **kw)
        finally:
            ms = (time.perf_counter() - t) * 1000
            COUNTERS["dumps"] += 1
            COUNTERS["dump_ms_total"] += round(ms, 3)
            COUNTERS["dump_ms_max"] = max(COUNTERS["dump_ms_max"], round(ms, 3))

    def kept_record(self: LoopMonitor, lag: float, now: float | None = None) -> None:
        if lag >= LAG_KEPT_S:
            LAGS.append((round(time.time(), 3), round(lag * 1000, 1)))
        record(self, lag, now)

    from consensus.machine import ColonyMachine

    apply = ColonyMachine.apply

    def counted_apply(self: ColonyMachine, cmd: Any, now: int) -> Any:
        op = cmd.get("op") if isinstance(cmd, dict) else "?"
        COUNTERS[f"apply:{op}"] += 1
        try:
            return apply(self, cmd, now)
        except Exception as e:
            COUNTERS[f"refused:{op}:{type(e).__name__}"] += 1
            raise

    from node.raft_transport import RaftTransport

    send = RaftTransport.send

    def counted_send(self: RaftTransport, node: Any, message: Any) -> bool:
        kind = message.get("type") if isinstance(message, dict) else "?"
        COUNTERS["raft_sent"] += 1
        COUNTERS[f"raft_sent:{kind}"] += 1
        return send(self, node, message)

    send_to = RaftTransport.send_to

    def counted_send_to(self: RaftTransport, peer: str, message: Any) -> bool:
        if isinstance(message, dict) and message.get("type") in ("relay", "relay_refused"):
            COUNTERS[f"raft_sent:{message['type']}"] += 1
        return send_to(self, peer, message)

    init = RaftTransport.__init__

    def kept_init(self: RaftTransport, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        TRANSPORTS.append(self)

    from libp2p.stream_muxer.yamux.yamux import YamuxStream
    swu = YamuxStream.send_window_update

    async def counted_swu(self: Any, *a: Any, **k: Any) -> None:
        COUNTERS["yamux_window_updates"] += 1
        await swu(self, *a, **k)

    YamuxStream.send_window_update = counted_swu  # type: ignore[method-assign]
    RaftTransport.send = counted_send  # type: ignore[method-assign]
    RaftTransport.send_to = counted_send_to  # type: ignore[method-assign]
    RaftTransport.__init__ = kept_init  # type: ignore[method-assign]
    ColonyMachine.apply = counted_apply  # type: ignore[method-assign]
    rpc_mod.decode_requests = counted_decode
    rpc_mod.encode_replies = counted_encode
    replicator_mod.pack_batch = counted_pack
    ReplicatedColony.doTick = counted_tick  # type: ignore[method-assign]
    SnapshotStore.serialize = timed_serialize  # type: ignore[method-assign]
    LoopMonitor.record = kept_record  # type: ignore[method-assign]


def watch_gc() -> None:
    """Time the collector's pauses (generation 2 walks the whole heap)."""
    started = [0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        ms = (time.perf_counter() - started[0]) * 1000
        gen = info.get("generation")
        COUNTERS[f"gc{gen}"] += 1
        COUNTERS[f"gc{gen}_ms_total"] += round(ms, 3)
        COUNTERS[f"gc{gen}_ms_max"] = max(COUNTERS[f"gc{gen}_ms_max"], round(ms, 3))

    gc.callbacks.append(on_gc)


def snapshot() -> dict[str, Any]:
    out: dict[str, Any] = dict(COUNTERS)
    out["raft_writes"] = sum(t.counters["writes"] for t in TRANSPORTS)
    out["hist"] = {k: dict(sorted(v.items())) for k, v in HIST.items()}
    out["lags"] = list(LAGS)
    return out


def write_stats(path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(snapshot()))
    tmp.replace(path)


def watch_dump_requests(path: Path, stop: threading.Event) -> None:
    # A thread, not a trio task: the daemon's trio loop is cli.daemon's own.
    trigger = Path(str(path) + ".dump")
    while not stop.wait(0.02):
        if trigger.exists():
            write_stats(path)
            trigger.unlink(missing_ok=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stats-file", type=Path, required=True)
    p.add_argument("--cprofile", type=Path)
    p.add_argument("daemon_args", nargs=argparse.REMAINDER)
    args = p.parse_args()
    daemon_args = [a for a in args.daemon_args if a != "--"]
    install()
    watch_gc()
    from cli.daemon import main as daemon_main

    stop = threading.Event()
    watcher = threading.Thread(target=watch_dump_requests, args=(args.stats_file, stop),
                               daemon=True)
    watcher.start()
    prof = cProfile.Profile() if args.cprofile else None
    try:
        if prof is not None:
            prof.enable()
        code = daemon_main(daemon_args)
    finally:
        if prof is not None:
            prof.disable()
            prof.dump_stats(str(args.cprofile))
        stop.set()
        write_stats(args.stats_file)
    return code


if __name__ == "__main__":
    sys.exit(main())
