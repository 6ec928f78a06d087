"""Cluster membership: the replicated member book drives the Raft group.

The state machine holds the member book (peer id -> multiaddr), changed only by the server
owner's ``addmembermsg``/``removemembermsg``. This module turns the book into Raft membership
and back into what a node does:

* the leader adds to the Raft group every member in the book that is not in it, and removes
  every Raft member that left the book, one change at a time (PySyncObj allows no more), and
  only when its whole log is applied, so that a book one entry behind the log never undoes a
  change;
* every node keeps its transport's addresses in line with the book, remembers the members in
  ``cluster.json`` (a restarted node must know its partners before it applies a single entry,
  or it would elect itself alone), and switches to group timings once it has partners;
* a node the book no longer lists stops serving (``on_removed``) once the group has let it go,
  and marks its data dir so that a restart refuses to serve a cluster it left.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from pysyncobj import FAIL_REASON
from pysyncobj.node import Node

from consensus.raft import GROUP_TIMEOUTS, SOLO_TIMEOUTS, ReplicatedColony
from node.raft_transport import StreamRaftTransport
from node.replicator import Replicator
from protocol.errors import BadRequest
from protocol.schema import multiaddr, peer_id

log = logging.getLogger("colonies.membership")

MEMBERS_FILE = "cluster.json"
REMOVED_FILE = "removed"
CHECK_EVERY_S = 0.5
CHANGE_RETRY_S = 1.0
# A removed node may never hear the entry that drops it (the leader stops talking to it
# first); it leaves once it has heard from no leader for this long.
REMOVED_GRACE_S = 3.0


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
    tmp = data_dir / (MEMBERS_FILE + ".tmp")
    tmp.write_text(json.dumps({"members": members}, sort_keys=True, indent=1) + "\n")
    tmp.replace(data_dir / MEMBERS_FILE)


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
        transport: StreamRaftTransport,
        replicator: Replicator,
        on_removed: Callable[[], None],
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
            await self._replicator.wait_applied(seen, trio.current_time() + CHECK_EVERY_S)

    def check(self) -> None:
        book = self._replicator.machine.members
        if not book:
            return  # a cluster bootstrapped before the member book: nothing to enforce
        for pid, addr in book.items():
            if pid in self._transport.members and self._transport.members[pid] != addr:
                self._transport.add_member(pid, addr)
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
        to_add = sorted(set(book) - raft)
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
        let_go = self._self not in colony.member_ids or (
            colony.leader_id is None and now - self._left_book_at > REMOVED_GRACE_S
        )
        if colony.is_leader and not let_go:
            # A leader cannot remove itself: it steps aside and the next leader removes it.
            let_go = now - self._left_book_at > REMOVED_GRACE_S or len(colony.member_ids) > 2
        if not let_go:
            return
        self.removed = True
        try:
            (self._dir / REMOVED_FILE).write_text(
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + "\n"
            )
        except OSError as e:
            log.error("cannot write the removed marker: %s", e)
        log.warning("removed from the cluster: this node stops serving")
        self._on_removed()
