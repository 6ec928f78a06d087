"""Cluster membership: the replicated member book drives the Raft group.

The state machine holds the member book (peer id -> multiaddr), changed only by the server
owner's ``addmembermsg``/``removemembermsg``. This module turns the book into Raft membership
and back into what a node does:

* a member in the book that is not in the Raft group is a *learner* (node/raft_elections.py):
  every node lets it in as one, so it gets the log without a vote; the leader makes it a voter
  once it has caught up (its log within ``PROMOTE_MAX_LAG`` entries of the commit index), and
  removes every Raft member that left the book, one change at a time (PySyncObj allows no
  more), and only when its whole log is applied, so that a book one entry behind the log
  never undoes a change. A member added while unreachable stays a learner and costs the group
  nothing;
* every node keeps its transport's addresses in line with the book, remembers the members in
  ``cluster.json`` (a restarted node must know its partners before it applies a single entry,
  or it would elect itself alone), and switches to group timings once it has partners;
* a node the book no longer lists stops serving (``on_removed``) once the group has let it go,
  and marks its data dir so that a restart refuses to serve a cluster it left;
* a follower can be dropped from the group before it learns that its removal committed (the
  leader applies the book entry, removes the node from Raft and closes its session before the
  next heartbeat would carry the commit index), so it never applies that entry and would stand
  for election forever. A node in the book that has not heard a leader for a while asks
  the other members (``ask_member``): a member that has a leader and a book without us is
  proof that we were removed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from pysyncobj import FAIL_REASON
from pysyncobj.node import Node

from node.datadir import write_private
from node.raft_replica import GROUP_TIMEOUTS, SOLO_TIMEOUTS, ReplicatedColony
from node.raft_transport import RaftTransport
from node.replicator import Replicator
from protocol.errors import BadRequest
from protocol.schema import multiaddr, peer_id

log = logging.getLogger("colonies.membership")

MEMBERS_FILE = "cluster.json"
REMOVED_FILE = "removed"
CHECK_EVERY_S = 0.5
# Applies wake the check (a membership entry should take effect at once), but under load there
# are hundreds a second; member changes are rare, so check at most this often.
MIN_CHECK_GAP_S = 0.05
CHANGE_RETRY_S = 1.0
# A removed node may never hear the entry that drops it (the leader stops talking to it
# first); it leaves once it has heard from no leader for this long.
REMOVED_GRACE_S = 3.0
# A node in the book that heard no leader for REMOVED_GRACE_S asks the others this often.
ASK_MEMBERS_EVERY_S = 2.0
# A learner becomes a voter once the leader knows its log reaches this close to the commit
# index (a learner's acknowledgements trail the leader by a round trip under load).
PROMOTE_MAX_LAG = 64


class NodeRemoved(BadRequest):
    """This data dir belongs to a node that was removed from its cluster."""


def load_members(data_dir: Path) -> dict[str, str | None]:
    """The members this node last knew (peer id -> address or None); {} on a first start."""
    path = data_dir / MEMBERS_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        members = data["members"]
        if not isinstance(members, dict):
            raise TypeError("members is not a map")
        for pid, addr in members.items():
            if not isinstance(pid, str) or peer_id(pid) is not None or not (
                addr is None
                or (isinstance(addr, str) and multiaddr(addr) is None and addr.endswith("/p2p/" + pid))
            ):
                raise ValueError(f"bad member entry {pid!r}: {addr!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadRequest(f"cannot read {path}: {e}") from None
    return dict(members)


def save_members(data_dir: Path, members: dict[str, str | None]) -> None:
    text = json.dumps({"members": members}, sort_keys=True, indent=1) + "\n"
    write_private(data_dir / MEMBERS_FILE, text, sync=True)


def check_not_removed(data_dir: Path) -> None:
    marker = data_dir / REMOVED_FILE
    if marker.exists():
        raise NodeRemoved(
            f"this node was removed from its cluster ({marker.read_text().strip()}); "
            f"delete {data_dir} to start it afresh"
        )


class Membership:
    def __init__(
        self,
        data_dir: Path,
        colony: ReplicatedColony,
        transport: RaftTransport,
        replicator: Replicator,
        on_removed: Callable[[], None],
        ask_member: Callable[[str], Awaitable[dict[str, Any] | None]] | None = None,
    ) -> None:
        self._dir = data_dir
        self._colony = colony
        self._transport = transport
        self._replicator = replicator
        self._on_removed = on_removed
        self._self = colony.self_id
        self._saved: dict[str, str | None] | None = None
        self._changing: str | None = None  # "add <pid>" or "rem <pid>" while in flight
        self._next_change_at = 0.0
        self._left_book_at: float | None = None
        # ask_member(addr): that member's server info, or None if it does not answer (bounded).
        self._ask_member = ask_member
        self._leaderless_since: float | None = None
        self._next_ask_at = 0.0
        self.removed = False

    def on_transport_members(self, members: dict[str, str | None]) -> None:
        """The transport's hook: its allow-list changed (PySyncObj added or dropped a node)."""
        self._colony.set_timeouts(GROUP_TIMEOUTS if members else SOLO_TIMEOUTS)
        if members != self._saved:
            try:
                save_members(self._dir, members)
                self._saved = dict(members)
            except OSError as e:
                log.error("cannot save %s: %s", MEMBERS_FILE, e)

    async def run(self) -> None:
        while not self.removed:
            seen = self._replicator.applied_generation
            try:
                self.check()
            except Exception:
                log.exception("membership check failed (retrying)")
            if not self.removed:
                try:
                    await self.ask_if_cut_off()
                except Exception:
                    log.exception("asking the members about this node failed (retrying)")
            await trio.sleep(MIN_CHECK_GAP_S)
            await self._replicator.wait_applied(seen, trio.current_time() + CHECK_EVERY_S)

    def check(self) -> None:
        book = self._replicator.machine.members
        if not book:
            return  # a cluster bootstrapped before the member book: nothing to enforce
        for pid, addr in book.items():
            if pid in self._transport.members and self._transport.members[pid] != addr:
                self._transport.add_member(pid, addr)
        raft = set(self._colony.member_ids)
        self._transport.set_learners({p: a for p, a in book.items() if p not in raft})
        if self._self not in book:
            self._leave_if_let_go()
            return
        self._left_book_at = None
        if self._colony.is_leader:
            self._reconcile(book)

    def _reconcile(self, book: dict[str, str]) -> None:
        colony = self._colony
        if self._changing is not None or time.monotonic() < self._next_change_at:
            return
        if colony.last_applied < colony.log_end_index:
            return  # the book may be behind a membership entry still in the log
        raft = set(colony.member_ids)
        to_add = [p for p in sorted(set(book) - raft) if self._caught_up(p)]
        to_remove = sorted(raft - set(book) - {self._self})
        if to_add:
            pid = to_add[0]
            self._start_change(f"add {pid}")
            colony.addNodeToCluster(Node(pid, addr=book[pid]), callback=self._done(f"add {pid}"))
        elif to_remove:
            pid = to_remove[0]
            self._start_change(f"rem {pid}")
            colony.removeNodeFromCluster(Node(pid), callback=self._done(f"rem {pid}"))
        else:
            return
        self._replicator.kick()

    def _caught_up(self, learner: str) -> bool:
        match = self._colony.learner_match_index(learner)
        return match is not None and match > 0 and (
            self._colony.commit_index - match <= PROMOTE_MAX_LAG
        )

    def _start_change(self, what: str) -> None:
        self._changing = what
        log.info("raft membership change: %s", what, extra={"peer": what.split()[1]})

    def _done(self, what: str) -> Callable[[Any, int], None]:
        def callback(_result: Any, reason: int) -> None:
            self._changing = None
            if reason == FAIL_REASON.SUCCESS:
                log.info("raft membership change done: %s", what, extra={"peer": what.split()[1]})
            else:
                log.warning(
                    "raft membership change %s failed (reason %s); will retry",
                    what,
                    reason,
                    extra={"peer": what.split()[1]},
                )
                self._next_change_at = time.monotonic() + CHANGE_RETRY_S

        return callback

    def _leave_if_let_go(self) -> None:
        """Out of the book: serve until the group no longer needs us (a follower's vote may
        still count toward the entry that removes it), then stop for good."""
        colony = self._colony
        now = time.monotonic()
        if self._left_book_at is None:
            self._left_book_at = now
            log.warning("this node was removed from the member book; leaving the cluster")
        # The leader may drop us from its group before it sends us the entry that does it;
        # then no leader talks to us any more (PySyncObj still names the last one).
        let_go = self._self not in colony.member_ids or (
            not self._hears_leader() and now - self._left_book_at > REMOVED_GRACE_S
        )
        if colony.is_leader and not let_go:
            # A leader cannot remove itself: it steps aside and the next leader removes it.
            let_go = now - self._left_book_at > REMOVED_GRACE_S or len(colony.member_ids) > 2
        if not let_go:
            return
        self._leave()

    async def ask_if_cut_off(self) -> None:
        """In our own book but no leader heard for REMOVED_GRACE_S: ask the other members
        whether the cluster removed us (see the module doc)."""
        if self._ask_member is None:
            return
        colony = self._colony
        now = time.monotonic()
        machine = self._replicator.machine
        if colony.is_leader or self._self not in machine.members or self._hears_leader():
            self._leaderless_since = None
            return
        if self._leaderless_since is None:
            self._leaderless_since = now
        # A known leader unheard for REMOVED_GRACE_S already waited; an election in progress
        # (no leader) gets as long to finish before we bother the others.
        waited = colony.leader_id is not None or now - self._leaderless_since >= REMOVED_GRACE_S
        if not waited or now < self._next_ask_at:
            return
        self._next_ask_at = now + ASK_MEMBERS_EVERY_S
        for pid, addr in sorted(self._transport.members.items()):
            if addr is None:
                continue
            info = await self._ask_member(addr)
            if not info or info.get("clusterid") != machine.cluster_id:
                continue
            book, raft = info.get("members") or {}, info.get("raft") or {}
            # Its replica must be at least as recent as ours (which has us in the book), so
            # a member still catching up from before we joined proves nothing.
            recent = raft.get("last_applied", -1) >= colony.last_applied
            if raft.get("leader") and recent and book and self._self not in book:
                log.warning("member %s, which has a leader, no longer lists this node", pid)
                self._leave()
                return

    def _hears_leader(self) -> bool:
        """A leader is known and has sent us something lately. (PySyncObj keeps the last
        leader's id, and stands for no election, while it is connected to no one, which is
        the state a dropped follower is left in.)"""
        leader = self._colony.leader_id
        if leader is None:
            return False
        heard = self._transport.last_heard().get(leader)
        return heard is not None and heard < REMOVED_GRACE_S

    def _leave(self) -> None:
        self.removed = True
        try:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            write_private(self._dir / REMOVED_FILE, when + "\n", sync=True)
        except OSError as e:
            log.error("cannot write the removed marker: %s", e)
        log.warning("removed from the cluster: this node stops serving")
        self._on_removed()
