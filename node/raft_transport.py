"""PySyncObj's Raft transport: one session per pair of members over a stream layer, driven
from the trio loop (no threads).

The streams come from a ``StreamLayer``: libp2p in production (``node/raft_libp2p.py``: one
stream per pair on the node's own host, Noise-authenticated peer ids, so the Raft node id *is*
the libp2p peer id and the member list is the allow-list), an in-memory network in the tests
(``node/memory_transport.py``), and either wrapped by fault injection in chaos runs
(``node/raft_faults.py``). What crosses a stream is checked by ``node/raft_codec.py``.

How PySyncObj is driven (see ``notes/raft-over-libp2p.md``):

* ``send(node, msg)`` runs inside ``doTick`` or inside ``_onMessageReceived``, in the trio
  thread. It packs the message and ``send_nowait``s the frame on that peer's session queue.
  It never awaits and never raises; it returns False when there is no live session or when the
  queue is beyond its hard bound (the session is then dropped, as a broken TCP connection
  would be, and PySyncObj hears ``_onNodeDisconnected`` at once). Past a soft byte budget,
  append-entries that carry entries are shed instead: PySyncObj re-sends from the follower's
  acknowledged index (a lagging follower then catches up at the link's pace, not at the rate
  the leader can pack).
* Per session a writer drains every queued frame into one ``stream.write`` (a libp2p write
  costs far more than its bytes) and a reader decodes frames and calls
  ``_onMessageReceived`` directly, catching every exception per message, then kicks the
  ticker (``attach(kick)``).
* ``_onNodeConnected``/``_onNodeDisconnected`` follow the session exactly: PySyncObj only
  sends append-entries to connected nodes and only stands for election when connected to
  someone.

Sessions: the member whose id string is smaller dials; the other accepts. A member also dials
when it knows the address but has had no session for ``ANSWER_DELAY_S`` (the smaller one may
not know our address: a node added with ``addNodeToCluster`` and no ``addr``). When both
sessions exist, both ends keep the one the smaller id initiated (the same rule on both ends,
so they agree without talking); a newer session from the same initiator replaces the old one
(the initiator only dials when it has none, so it thinks the old one dead). Inbound streams
from peer ids on neither list are reset before a byte is read. The accepting end
writes a heartbeat frame first and the dialing end counts its session as up only once that
arrived, so a dialer that is refused (not yet a member over there) never reports the peer
connected, even for a moment. Each dial attempt is bounded by ``DIAL_TIMEOUT_S``; failed
attempts retry every 0.3-0.5 s until cancelled.

Learners (``set_learners``): members that get the log but do not vote yet
(node/raft_elections.py). Their sessions are PySyncObj's read-only nodes
(``_onReadonlyNodeConnected``), and a learner may only send ``LEARNER_TYPES``; a learner that
PySyncObj makes a voter (``addNode``) keeps its session.

Hung peers: a stream notices a dead peer (EOF) but never a hung one. Each writer sends a
heartbeat frame after ``HEARTBEAT_S`` without a write, and a reader that hears nothing for
``PEER_SILENT_S`` ends the session and drops the underlying connection (so the next dial opens
a fresh one instead of reusing the hung one). Raft's own timeouts still decide leadership;
this only frees the session and its queue, and lets PySyncObj see the peer as disconnected.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio
from pysyncobj.node import Node
from pysyncobj.transport import Transport

from node.raft_codec import (
    HEARTBEAT,
    HEARTBEAT_FRAME,
    LEARNER_TYPES,
    OWN_TYPES,
    RAFT_MAX_FRAME_BYTES,
    RELAY_TYPES,
    RaftMessageRefused,
    decode_raft_message,
    encode_raft_message,
    sheddable,
)
from protocol.framing import FrameDecoder, encode_frame

log = logging.getLogger("colonies.raft.transport")

READ_SIZE = 65536
WRITE_CHUNK_BYTES = 1024 * 1024  # a writer drains up to this much into one write
DIAL_TIMEOUT_S = 3.0
REDIAL_DELAY_S = (0.3, 0.5)
ANSWER_DELAY_S = 1.5  # how long the larger id waits for the smaller one to dial first
HEARTBEAT_S = 0.5
PEER_SILENT_S = 3.0
MAX_QUEUED_BYTES = 16 * 1024 * 1024  # soft: beyond it, entry-carrying append-entries are shed
MAX_QUEUED_BYTES_HARD = 256 * 1024 * 1024  # beyond it (or MAX_QUEUED_FRAMES) the session drops
MAX_QUEUED_FRAMES = 65536


class RaftStream(Protocol):
    """An ordered, reliable byte stream to one member (a libp2p stream, an in-memory pipe)."""

    async def read(self, n: int = ...) -> bytes: ...
    async def write(self, data: bytes) -> None: ...
    async def reset(self) -> None: ...


# The transport's handler for an inbound stream from an authenticated peer id.
AcceptStream = Callable[[str, RaftStream], Awaitable[None]]


class StreamLayer(Protocol):
    """Where a RaftTransport's streams come from."""

    def check_addr(self, peer: str, addr: str) -> str | None:
        """The address to dial for ``peer``, or None if ``addr`` cannot be it."""

    def listen(self, accept: AcceptStream) -> None:
        """Start handing inbound streams (with the peer id the layer proved) to ``accept``."""

    def stop_listening(self) -> None: ...

    async def open_stream(self, peer: str, addr: str) -> RaftStream:
        """A new stream to ``peer`` at ``addr`` (raise on failure; bounded by the caller)."""

    async def forget_connection(self, peer: str) -> None:
        """Drop the underlying connection to a peer that went silent."""

    def stats(self) -> dict[str, int]: ...


@dataclass(eq=False)
class _Session:
    peer: str
    stream: Any
    initiator: str
    send: trio.MemorySendChannel[bytes]
    recv: trio.MemoryReceiveChannel[bytes]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    queued_bytes: int = 0
    current: bool = False
    silent: bool = False  # ended because the peer stopped sending (hung, or a silent network)
    learner: bool = False  # the peer does not vote (yet): PySyncObj knows it as read-only


class RateLimitedLog:
    """At most one warning per kind of event per ``period``; the next one says how many were
    left out. Kinds are fixed strings (never an id a peer chooses), so the table stays small."""

    def __init__(self, period: float = 5.0) -> None:
        self.period = period
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def warning(self, kind: str, msg: str, *args: Any, **kwargs: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -math.inf) < self.period:
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return
        self._last[kind] = now
        skipped = self._skipped.pop(kind, 0)
        if skipped:
            msg += f" (and {skipped} more like it in the last {self.period:g} s)"
        log.warning(msg, *args, **kwargs)


class RaftTransport(Transport):
    """The PySyncObj transport over the streams of a ``StreamLayer``.

    The layer says how to open a stream to a member and how inbound streams arrive (libp2p,
    or an in-memory network in the tests); sessions, framing, the allow-list, heartbeats and
    PySyncObj's callbacks live here, so the tests' in-memory twin runs the same code as
    production.

    Everything is called from the trio thread. ``ready`` is True from the start (with
    ``autoTick=False`` the SyncObj constructor busy-loops until it is).
    """

    def __init__(
        self,
        self_id: str,
        members: Mapping[str, str | None],
        layer: StreamLayer,
        *,
        heartbeat: float = HEARTBEAT_S,
        silent_after: float = PEER_SILENT_S,
        dial_timeout: float = DIAL_TIMEOUT_S,
        answer_delay: float = ANSWER_DELAY_S,
        max_frame_bytes: int = RAFT_MAX_FRAME_BYTES,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
        on_members_changed: Callable[[dict[str, str | None]], None] | None = None,
    ) -> None:
        super().__init__(None, None, [])
        self._layer = layer
        self._handlers: dict[str, Callable[[str, dict[str, Any]], None]] = {}
        self._ack_gate: Callable[[], None] | None = None
        self._ack_gate_async: Callable[[], Awaitable[None]] | None = None
        self._holding_acks = False
        self._held_acks: list[tuple[str, Any]] = []
        self._session_handler: Callable[[str], None] | None = None
        if not 0 < heartbeat < silent_after:
            raise ValueError("need 0 < heartbeat < silent_after")
        self.self_id = self_id
        self._heartbeat = heartbeat
        self._silent_after = silent_after
        self._dial_timeout = dial_timeout
        self._answer_delay = answer_delay
        self._max_frame = max_frame_bytes
        self._max_queued = max_queued_bytes
        self._on_members_changed = on_members_changed
        self._kick: Callable[[], None] = lambda: None

        self._members: dict[str, str | None] = {}
        self._learners: dict[str, str | None] = {}  # members that do not vote yet
        self._nodes: dict[str, Node] = {}
        self._sessions: dict[str, _Session] = {}  # the current session per peer
        self._live: set[_Session] = set()
        self._last_heard: dict[str, float] = {}  # peer -> monotonic time of its last bytes
        self._dialers: dict[str, trio.CancelScope] = {}
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._running = False
        self._destroyed = False
        self._warn = RateLimitedLog()
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "sessions_opened",
                "sessions_replaced",
                "duplicate_sessions",
                "inbound_refused",
                "dial_failures",
                "peers_silent",
                "frames_sent",
                "writes",
                "messages_received",
                "messages_refused",
                "transmission_refused",
                "callback_errors",
                "shed",
                "queue_overflows",
                "send_failures",
            ),
            0,
        )
        for peer, addr in members.items():
            self._add(peer, addr, override=True)

    # --- wiring ----------------------------------------------------------------------------------

    def attach(self, kick: Callable[[], None]) -> None:
        """``kick()`` wakes the Raft ticker (``Replicator.kick``): called after received
        frames are delivered and after sessions come and go."""
        self._kick = kick

    @property
    def members(self) -> dict[str, str | None]:
        """The voting members: peer id -> address (None: not known, it must dial us)."""
        return dict(self._members)

    @property
    def learners(self) -> dict[str, str | None]:
        """Members that do not vote yet (``set_learners``)."""
        return dict(self._learners)

    def is_peer(self, peer: str) -> bool:
        """On the allow-list: a voting member or a learner."""
        return peer in self._members or peer in self._learners

    def _addr(self, peer: str) -> str | None:
        return self._members[peer] if peer in self._members else self._learners.get(peer)

    @property
    def connected(self) -> list[str]:
        """Peers with a live session."""
        return sorted(self._sessions)

    def last_heard(self) -> dict[str, float]:
        """Seconds since each member last sent us anything (a heartbeat counts)."""
        now = time.monotonic()
        return {p: round(now - t, 3) for p, t in self._last_heard.items() if self.is_peer(p)}

    def stats(self) -> dict[str, Any]:
        return {
            **self.counters,
            **self._layer.stats(),
            "members": sorted(self._members),
            "learners": sorted(self._learners),
            "connected": self.connected,
            "queued_bytes": {p: s.queued_bytes for p, s in sorted(self._sessions.items())},
        }

    # --- membership ------------------------------------------------------------------------------

    def set_members(self, members: Mapping[str, str | None]) -> None:
        """Replace the member list (other members: peer id -> address or None). Sessions with
        peers no longer listed end; new peers get a dial loop."""
        wanted = {p: a for p, a in members.items() if p != self.self_id}
        for peer in [p for p in self._members if p not in wanted]:
            self._remove(peer)
        for peer, addr in wanted.items():
            self._add(peer, addr, override=True)
        self._members_changed()

    def add_member(self, peer_id: str, addr: str | None = None) -> None:
        """Allow ``peer_id`` and, if given, record (or replace) its address."""
        self._add(peer_id, addr, override=addr is not None)
        self._members_changed()

    def remove_member(self, peer_id: str) -> None:
        self._remove(peer_id)
        self._members_changed()

    def set_learners(self, learners: Mapping[str, str | None]) -> None:
        """Replace the learners: members that get the log but do not vote (node/membership.py).
        PySyncObj knows them as read-only nodes (append-entries, no vote, not counted toward
        a commit), and what they send is limited to ``LEARNER_TYPES``. A learner that
        PySyncObj makes a voter (``addNode``) leaves this list and keeps its session."""
        wanted: dict[str, str | None] = {}
        for peer, addr in learners.items():
            if isinstance(peer, str) and peer and peer != self.self_id and peer not in self._members:
                wanted[peer] = None if addr is None else self._layer.check_addr(peer, addr)
        gone = [p for p in self._learners if p not in wanted]
        if not gone and wanted == self._learners:
            return
        for peer in gone:
            self._drop_peer(peer)
        self._learners = wanted
        for peer in wanted:
            self._ensure_dialer(peer)
        self._notify_change()

    def _add(self, peer: str, addr: str | None, *, override: bool) -> None:
        if not isinstance(peer, str) or not peer or peer == self.self_id:
            return
        if addr is not None:
            addr = self._layer.check_addr(peer, addr)
        if peer in self._learners:
            # Promoted: PySyncObj has made it a voter (node/raft_elections.py moved it out of
            # its read-only nodes); the session goes on.
            known = self._learners.pop(peer)
            addr = addr if addr is not None else known
            session = self._sessions.get(peer)
            if session is not None:
                session.learner = False
        if peer not in self._members or (override and addr is not None) or (
            self._members[peer] is None and addr is not None
        ):
            self._members[peer] = addr
        self._ensure_dialer(peer)
        self._notify_change()

    def _remove(self, peer: str) -> None:
        self._members.pop(peer, None)
        self._learners.pop(peer, None)
        self._drop_peer(peer)
        self._notify_change()

    def _drop_peer(self, peer: str) -> None:
        session = self._sessions.get(peer)
        if session is not None:
            self._end_session(session)
        scope = self._dialers.pop(peer, None)
        if scope is not None:
            scope.cancel()

    def _members_changed(self) -> None:
        hook = self._on_members_changed
        if hook is None:
            return
        try:
            hook(dict(self._members))
        except Exception:
            log.exception("on_members_changed hook raised (ignored)")

    # --- PySyncObj's Transport interface ---------------------------------------------------------

    def tryGetReady(self) -> None:
        pass

    @property
    def ready(self) -> bool:
        return True

    def waitReady(self) -> None:
        pass

    def addNode(self, node: Node) -> None:
        """PySyncObj added a member (a MEMBERSHIP entry, a snapshot's member list). Its
        address comes from the Node's ``addr`` attribute if it has one (``addNodeToCluster(
        Node(peer_id, addr=multiaddr))`` replicates it to every member), else from what
        ``set_members``/``add_member`` recorded, else the peer must dial us."""
        try:
            addr = getattr(node, "addr", None)
            self._add(str(node.id), addr if isinstance(addr, str) else None, override=False)
            self._members_changed()
        except Exception:
            log.exception("raft transport addNode failed (ignored)")

    def dropNode(self, node: Node) -> None:
        try:
            self._remove(str(node.id))
            self._members_changed()
        except Exception:
            log.exception("raft transport dropNode failed (ignored)")

    def send(self, node: Node, message: Any) -> bool:
        return self.send_to(str(node.id), message)

    def send_to(self, peer: str, message: Any) -> bool:
        """A message to a member: PySyncObj's (through ``send``) or a relay
        (node/replicator.py). False when it cannot go; never raises."""
        if message.get("type") == "next_node_idx" and self._ack_gate is not None:
            # An acknowledgement of entries: sent once they are on disk. Those PySyncObj
            # sends while it handles a batch of received frames wait for its end, so one
            # sync covers the batch (group commit on the follower's side).
            if self._holding_acks:
                self._held_acks.append((peer, message))
                return True
            self._ack_gate()
        return self._send_safely(peer, message)

    def _send_safely(self, peer: str, message: Any) -> bool:
        try:
            return self._send(peer, message)
        except Exception:
            self.counters["send_failures"] += 1
            self._warn.warning("send", "raft send to %s failed", peer, exc_info=True)
            return False

    def set_ack_gate(
        self,
        gate: Callable[[], None] | None,
        gate_async: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Before acknowledgements (next_node_idx) are sent, the replica makes its journal
        durable (node/raft_journal.py): ``gate_async()`` for those held while a batch of
        received frames was handled, ``gate()`` (blocking) for any other."""
        self._ack_gate = gate
        self._ack_gate_async = gate_async

    async def _send_acks(self, acks: list[tuple[str, Any]]) -> None:
        if self._ack_gate_async is not None:
            await self._ack_gate_async()  # other sessions' frames are handled meanwhile
        elif self._ack_gate is not None:
            self._ack_gate()
        for peer, message in acks:
            self._send_safely(peer, message)

    def set_handler(
        self, types: Iterable[str], handler: Callable[[str, dict[str, Any]], None] | None
    ) -> None:
        """``handler(peer, message)`` for our own message types (node/raft_codec.py OWN_TYPES),
        which never reach PySyncObj; None removes it. Called in the reader: must not raise."""
        for kind in types:
            if handler is None:
                self._handlers.pop(kind, None)
            else:
                self._handlers[kind] = handler

    def set_relay_handler(self, handler: Callable[[str, dict[str, Any]], None] | None) -> None:
        self.set_handler(RELAY_TYPES, handler)

    def set_session_handler(self, handler: Callable[[str], None] | None) -> None:
        """``handler(peer)`` after every new session with a member: frames queued on the
        one before it, if any, may be lost (a relay waiting for its answer, say)."""
        self._session_handler = handler

    def destroy(self) -> None:
        """Called by SyncObj.destroy (ReplicatedColony.close): no callback into PySyncObj after
        this, every session ends, and ``run`` returns."""
        self._destroyed = True
        self.setOnMessageReceivedCallback(None)
        self.setOnNodeConnectedCallback(None)
        self.setOnNodeDisconnectedCallback(None)
        self.setOnReadonlyNodeConnectedCallback(None)
        self.setOnReadonlyNodeDisconnectedCallback(None)
        self._stop_all()

    # --- sending ---------------------------------------------------------------------------------

    def _send(self, peer: str, message: Any) -> bool:
        session = self._sessions.get(peer)
        if session is None or self._destroyed:
            return False
        if "transmission" in message:
            # Never produced for our entries (< appendEntriesBatchSizeBytes); the receiver
            # would drop it anyway.
            self.counters["transmission_refused"] += 1
            self._warn.warning("tx", "not sending a chunked raft entry to %s", peer)
            return False
        bodies = encode_raft_message(message, self._max_frame)
        frames = [encode_frame(b) for b in bodies]
        size = sum(len(f) for f in frames)
        if session.queued_bytes + size > self._max_queued and sheddable(message):
            self.counters["shed"] += 1
            return False
        if session.queued_bytes + size > MAX_QUEUED_BYTES_HARD:
            return self._overflow(session)
        for frame in frames:
            try:
                session.send.send_nowait(frame)
            except trio.WouldBlock:
                return self._overflow(session)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._end_session(session)
                return False
            session.queued_bytes += len(frame)
        self.counters["frames_sent"] += len(frames)
        return True

    def _overflow(self, session: _Session) -> bool:
        self.counters["queue_overflows"] += 1
        self._warn.warning(
            "overflow",
            "raft queue to %s is full (%d bytes): dropping the session",
            session.peer,
            session.queued_bytes,
        )
        self._end_session(session)
        return False

    # --- running ---------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept inbound sessions and dial members until cancelled (or ``destroy``)."""
        if self._running or self._destroyed:
            raise RuntimeError("a raft transport runs once")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._running = True
                self._layer.listen(self._accept)
                for peer in [*self._members, *self._learners]:
                    self._ensure_dialer(peer)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._stop_all()

    def _stop_all(self) -> None:
        was_running = self._running
        self._running = False
        if was_running:
            try:
                self._layer.stop_listening()
            except Exception:
                log.exception("raft transport: removing the stream handler failed")
        for session in list(self._live):
            self._end_session(session)
        for scope in self._dialers.values():
            scope.cancel()
        self._dialers.clear()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        self._notify_change()

    # --- dialing ---------------------------------------------------------------------------------

    def _notify_change(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _ensure_dialer(self, peer: str) -> None:
        if not self._running or self._nursery is None or peer in self._dialers:
            return
        scope = trio.CancelScope()
        self._dialers[peer] = scope
        self._nursery.start_soon(self._dial_loop, peer, scope)

    async def _dial_loop(self, peer: str, scope: trio.CancelScope) -> None:
        with scope:
            try:
                while True:
                    if not self.is_peer(peer):
                        return
                    addr = self._addr(peer)
                    if peer in self._sessions or addr is None:
                        await self._changed.wait()
                        continue
                    if self.self_id > peer and not await self._smaller_did_not_dial(peer):
                        continue
                    addr = self._addr(peer)
                    if addr is None or peer in self._sessions:
                        continue
                    opened = await self._attempt(peer, addr)
                    if opened is not None:
                        stream, decoder, early = opened
                        await self._run_session(
                            peer, stream, initiator=self.self_id, decoder=decoder, early=early
                        )
                    await trio.sleep(random.uniform(*REDIAL_DELAY_S))
            finally:
                if self._dialers.get(peer) is scope:
                    del self._dialers[peer]

    async def _smaller_did_not_dial(self, peer: str) -> bool:
        """Waits up to ``answer_delay`` for a session to ``peer``; True if none came."""
        with trio.move_on_after(self._answer_delay):
            while peer not in self._sessions:
                await self._changed.wait()
        return peer not in self._sessions

    async def _attempt(self, peer: str, addr: str) -> tuple[Any, FrameDecoder, list[bytes]] | None:
        """A stream to ``peer`` whose accepting end said hello: (stream, its decoder, the
        frame bodies that came with the hello), or None."""
        stream = None
        try:
            with trio.fail_after(self._dial_timeout):
                stream = await self._layer.open_stream(peer, addr)
                decoder = FrameDecoder(self._max_frame)
                while True:
                    data = await stream.read(READ_SIZE)
                    if not data:
                        raise EOFError("refused")
                    bodies = decoder.feed(data)
                    if bodies:
                        if bodies[0] != HEARTBEAT:
                            raise ValueError("the accepting end did not start with a hello")
                        return stream, decoder, bodies[1:]
        except trio.TooSlowError:
            # A hung connection makes new streams hang: start over with a fresh one.
            self.counters["dial_failures"] += 1
            log.debug("raft dial to %s timed out", peer)
            await self._forget(peer)
        except Exception as e:
            self.counters["dial_failures"] += 1
            log.debug("raft dial to %s failed: %r", peer, e)
        if stream is not None:
            await _reset(stream)
        return None

    async def _forget(self, peer: str) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            try:
                await self._layer.forget_connection(peer)
            except Exception as e:
                log.debug("closing the connection to %s failed: %r", peer, e)

    # --- sessions --------------------------------------------------------------------------------

    async def _accept(self, peer: str, stream: Any) -> None:
        """An inbound stream from ``peer`` (already authenticated by the caller)."""
        if not self._running or peer == self.self_id or not self.is_peer(peer):
            self.counters["inbound_refused"] += 1
            self._warn.warning("refused", "refused a raft stream from non-member %s", peer)
            await _reset(stream)
            return
        await self._run_session(peer, stream, initiator=peer)

    def _prefer(self, new: _Session, old: _Session) -> bool:
        if new.initiator != old.initiator:
            return new.initiator == min(self.self_id, new.peer)
        return True

    def _node(self, peer: str) -> Node:
        node = self._nodes.get(peer)
        if node is None:
            node = self._nodes[peer] = Node(peer)
        return node

    async def _run_session(
        self,
        peer: str,
        stream: Any,
        initiator: str,
        decoder: FrameDecoder | None = None,
        early: list[bytes] | None = None,
    ) -> None:
        send, recv = trio.open_memory_channel[bytes](MAX_QUEUED_FRAMES)
        session = _Session(peer, stream, initiator, send, recv, learner=peer in self._learners)
        old = self._sessions.get(peer)
        if (
            not self._running
            or self._destroyed
            or not self.is_peer(peer)
            or (old is not None and not self._prefer(session, old))
        ):
            self.counters["duplicate_sessions"] += old is not None
            await _reset(stream)
            return
        self._live.add(session)
        try:
            with session.scope:
                if old is not None:
                    # Still connected as far as PySyncObj is concerned: just a new pipe.
                    self.counters["sessions_replaced"] += 1
                    self._end_session(old, replaced=True)
                self._sessions[peer] = session
                session.current = True
                self.counters["sessions_opened"] += 1
                log.info(
                    "raft session with %s up (initiator %s)", peer, initiator, extra={"peer": peer}
                )
                if old is None:
                    connected = (
                        self._onReadonlyNodeConnected if session.learner else self._onNodeConnected
                    )
                    self._callback(connected, self._node(peer))
                if self._session_handler is not None:
                    self._callback(self._session_handler, peer)
                self._notify_change()
                self._kick()
                # Neither task lets an exception out: mixed with the Cancelled of an outer
                # scope (dropNode cancels the dial loop too) it would form a
                # BaseExceptionGroup that no `except Exception` catches, and end the transport.
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_until_broken, session, nursery.cancel_scope)
                    try:
                        await self._reader(
                            session, decoder or FrameDecoder(self._max_frame), early
                        )
                    except Exception as e:  # a broken stream ends its session, never the node
                        log.debug("raft session with %s: read ended: %r", peer, e)
                    nursery.cancel_scope.cancel()
        except Exception as e:
            log.warning("raft session with %s failed: %r", peer, e, extra={"peer": peer})
        finally:
            self._live.discard(session)
            if session.current:
                self._end_session(session)
            if session.silent:
                await self._forget(peer)
            await _reset(stream)

    def _end_session(self, session: _Session, *, replaced: bool = False) -> None:
        """Synchronous, so that send() can drop a session and PySyncObj sees it at once."""
        session.scope.cancel()
        session.send.close()
        if not session.current:
            return
        session.current = False
        if self._sessions.get(session.peer) is session:
            del self._sessions[session.peer]
        if not replaced:
            log.info("raft session with %s down", session.peer, extra={"peer": session.peer})
            disconnected = (
                self._onReadonlyNodeDisconnected if session.learner else self._onNodeDisconnected
            )
            self._callback(disconnected, self._node(session.peer))
            self._notify_change()
            self._kick()

    def _callback(self, fn: Callable[[Any], None], arg: Any) -> None:
        if self._destroyed:
            return
        try:
            fn(arg)
        except Exception:
            self.counters["callback_errors"] += 1
            log.exception("raft connection callback raised (ignored)")

    async def _write_until_broken(self, session: _Session, scope: trio.CancelScope) -> None:
        try:
            await self._writer(session)
        except Exception as e:
            log.debug("raft session with %s: write ended: %r", session.peer, e)
        finally:
            scope.cancel()

    async def _writer(self, session: _Session) -> None:
        recv, stream = session.recv, session.stream
        if session.initiator != self.self_id:
            await stream.write(HEARTBEAT_FRAME)  # the hello the dialing end waits for
        while True:
            frames: list[bytes] = []
            with trio.move_on_after(self._heartbeat):
                try:
                    frames.append(await recv.receive())
                except trio.EndOfChannel:
                    return
            if not frames:
                await stream.write(HEARTBEAT_FRAME)
                continue
            size = len(frames[0])
            while size < WRITE_CHUNK_BYTES:
                try:
                    frame = recv.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                frames.append(frame)
                size += len(frame)
            session.queued_bytes -= size
            self.counters["writes"] += 1
            await stream.write(frames[0] if len(frames) == 1 else b"".join(frames))

    async def _reader(
        self, session: _Session, decoder: FrameDecoder, early: list[bytes] | None
    ) -> None:
        node = self._node(session.peer)
        stream = session.stream
        if early and not await self._deliver_all(session, node, early):
            return
        while True:
            with trio.move_on_after(self._silent_after) as waited:
                data = await stream.read(READ_SIZE)
            if waited.cancelled_caught:
                session.silent = True
                self.counters["peers_silent"] += 1
                log.warning(
                    "raft peer %s silent for %.1fs: dropping its session",
                    session.peer,
                    self._silent_after,
                )
                return
            if not data:
                return
            self._last_heard[session.peer] = time.monotonic()
            bodies = decoder.feed(data)  # framing errors raise
            if not await self._deliver_all(session, node, bodies):
                return

    async def _deliver_all(self, session: _Session, node: Node, bodies: list[bytes]) -> bool:
        """Hand a batch of frames to PySyncObj (no await in between, so the acknowledgements
        it sends are this batch's alone), then send those once the journal is durable."""
        delivered = False
        ok = True
        self._holding_acks, self._held_acks = True, []
        try:
            for body in bodies:
                if body == HEARTBEAT:
                    continue
                if not session.current or self._destroyed:
                    ok = False
                    break
                delivered |= self._deliver(node, body, session.learner)
        finally:
            self._holding_acks = False
            acks, self._held_acks = self._held_acks, []
        if acks:
            await self._send_acks(acks)
        if delivered:
            self._kick()
        return ok

    def _deliver(self, node: Node, body: bytes, learner: bool) -> bool:
        """True when PySyncObj got a message (it acts on it in its next tick); relays go to
        the replicator, which wakes its own proposer."""
        try:
            message = decode_raft_message(body)
            if learner and message["type"] not in LEARNER_TYPES:
                raise RaftMessageRefused(f"a learner may not send {message['type']}")
        except RaftMessageRefused as e:
            self.counters["messages_refused"] += 1
            if "transmission" in str(e):
                self.counters["transmission_refused"] += 1
            self._warn.warning("bad", "dropped a raft message from %s: %s", node.id, e)
            return False
        self.counters["messages_received"] += 1
        if message["type"] in OWN_TYPES:
            handler = self._handlers.get(message["type"])
            if handler is not None:
                try:
                    handler(str(node.id), message)
                except Exception:
                    self.counters["callback_errors"] += 1
                    self._warn.warning("cb", "%s handler raised", message["type"], exc_info=True)
            return False
        try:
            self._onMessageReceived(node, message)
        except Exception:
            self.counters["callback_errors"] += 1
            self._warn.warning(
                "cb", "PySyncObj raised on a %s message from %s", message["type"], node.id,
                exc_info=True,
            )
        return True


async def _reset(stream: Any) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
        try:
            await stream.reset()
        except Exception:
            pass
