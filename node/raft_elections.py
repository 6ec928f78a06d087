"""Who may stand for election, and when: learners and PreVote on top of PySyncObj, which has
neither. A mixin of ``node.raft_replica.ReplicatedColony``.

Learners. A node that joins (``colonyd --join``, ``colonies cluster add``) first gets the log as
a member that does not vote: the transport tells PySyncObj it is a *read-only node*
(``RaftTransport.set_learners``), so the leader sends it append-entries and reads its
acknowledgements, but it neither votes nor counts toward a commit, and what it may send is
limited (``node/raft_codec.py`` ``LEARNER_TYPES``). The leader makes it a voter with a
MEMBERSHIP entry once it has caught up (``node/membership.py``). Until then a dead or
unreachable newcomer costs the group nothing: with three voters and one learner, one failure
still leaves a majority. The learner knows it is one (``learner``) until it appends the entry
that adds it, as PySyncObj applies membership on append; the flag is kept in ``raft.meta`` and
a learner's snapshots do not list it among the members.

PreVote (the Raft thesis, section 9.6; etcd's ``PreVote``). PySyncObj raises its term and asks
for votes as soon as its election timer runs out, and a higher term deposes any leader that
hears it. A follower that was paused (SIGSTOP), cut off, or slow to read its socket thus forced
an election on its return although the leader was fine. Here a voter whose timer ran out first
asks the voters whether they would vote for a log like its own (``pre_vote``); it raises its
term and campaigns only with a majority's yes. A member says yes only when no leader has been
heard for at least the minimum election timeout and the asker's log is at least as recent as
its own; a leader says no. The gate is PySyncObj's ``__connectedToAnyone``, which it asks only
when it is about to campaign.

CheckQuorum's other half is PySyncObj's own: a leader that has heard from no majority for
``leaderFallbackTimeout`` steps down.
"""

from __future__ import annotations

import logging
from typing import Any

from pysyncobj import SyncObj
from pysyncobj.monotonic import monotonic
from pysyncobj.node import Node
from pysyncobj.syncobj import _RAFT_STATE

from node.raft_codec import PRE_VOTE_TYPES

log = logging.getLogger("colonies.raft")


class ElectionRules:
    """Learners and PreVote for ``ReplicatedColony`` (a ``SyncObj``): the ``_SyncObj__*``
    methods override PySyncObj's name-mangled private ones."""

    _self_id: str
    _journal: Any  # node.raft_journal.DurableJournal
    _timeouts: Any  # node.raft_replica.RaftTimeouts

    def _init_elections(self, transport: Any, *, learner: bool) -> None:  # noqa: ANN401
        """Before ``SyncObj.__init__``: ``learner`` for the first start of a joining node,
        else what ``raft.meta`` says."""
        self._learner = learner or self._journal.learner
        if learner:
            self._journal.set_learner(True)
        self._prevote_round = 0
        self._prevote_grants: set[str] = set()
        self._prevote_won = False
        self._leader_heard_at = 0.0
        self.prevotes = {"asked": 0, "won": 0, "granted": 0, "refused": 0}
        if hasattr(transport, "set_handler"):
            transport.set_handler(PRE_VOTE_TYPES, self._on_pre_vote_message)

    @property
    def learner(self) -> bool:
        """This node gets the log but does not vote (yet)."""
        return self._learner

    def _set_learner(self, learner: bool) -> None:
        if learner != self._learner:
            self._learner = learner
            self._journal.set_learner(learner)
            log.info("this node is %s", "a learner" if learner else "a voter")

    # --- learners ------------------------------------------------------------------------------

    def learner_match_index(self, peer: str) -> int | None:
        """A leader's view of how far a learner's log matches its own (None: no session)."""
        node = Node(peer)
        if node not in self._SyncObj__readonlyNodes:
            return None
        return int(self._SyncObj__raftMatchIndex.get(node, 0))

    def _SyncObj__doChangeCluster(self, request: Any, reverse: bool = False) -> bool:  # noqa: ANN401, N802
        """PySyncObj applies a membership change (on append, and again on apply). A learner
        that becomes a voter keeps its session and what the leader knows of its log."""
        peer = request[1] if isinstance(request, list | tuple) and len(request) > 1 else None
        node = Node(peer) if isinstance(peer, str) else None
        readonly = self._SyncObj__readonlyNodes
        known = None
        if node is not None and node in readonly:
            known = (self._SyncObj__raftNextIndex.get(node), self._SyncObj__raftMatchIndex.get(node))
        changed = SyncObj._SyncObj__doChangeCluster(self, request, reverse)
        if node is None:
            return bool(changed)
        if changed and known is not None and node in self._SyncObj__otherNodes:
            readonly.discard(node)  # still in __connectedNodes: the session goes on
            if known[0] is not None:
                self._SyncObj__raftNextIndex[node] = known[0]
                self._SyncObj__raftMatchIndex[node] = known[1] or 0
        if peer == self._self_id and request[0] in ("add", "rem"):
            added = (request[0] == "add") != reverse
            self._set_learner(not added)
        return bool(changed)

    def _snapshot_members(self, cluster: set[Node]) -> list[str]:
        """The members a snapshot lists: PySyncObj's view always includes this node."""
        return sorted(n.id for n in cluster if not (self._learner and n.id == self._self_id))

    def _loaded_members(self, members: list[str]) -> None:
        """A snapshot from the leader replaced the log: it says whether we vote."""
        self._set_learner(self._self_id not in members)

    # --- PreVote -------------------------------------------------------------------------------

    def _SyncObj__connectedToAnyone(self) -> bool:  # noqa: N802
        """PySyncObj asks this once its election timer ran out, right before it campaigns."""
        if not SyncObj._SyncObj__connectedToAnyone(self):
            return False
        if self._learner:
            self._restart_election_timer()
            return False
        if not self._SyncObj__otherNodes or self._SyncObj__transferInProgress:
            return True  # alone, or the leader handed over to us (TimeoutNow)
        if self._prevote_won:
            self._prevote_won = False
            return True
        self._ask_pre_votes()
        return False

    def _restart_election_timer(self) -> None:
        self._SyncObj__raftElectionDeadline = (
            monotonic() + self._SyncObj__generateRaftTimeout()
        )

    def _ask_pre_votes(self) -> None:
        self._restart_election_timer()  # ask again after another timeout if this round fails
        self._prevote_round += 1
        self._prevote_grants = {self._self_id}
        self.prevotes["asked"] += 1
        message = {
            "type": "pre_vote",
            "round": self._prevote_round,
            "last_log_index": self._SyncObj__getCurrentLogIndex(),
            "last_log_term": self._SyncObj__getCurrentLogTerm(),
        }
        for node in self._SyncObj__otherNodes:
            self._SyncObj__transport.send(node, message)

    def _heard_leader(self) -> None:
        """An append-entries from a leader of our term or later (our onMessageReceived)."""
        self._leader_heard_at = monotonic()
        self._prevote_won = False

    def _on_pre_vote_message(self, peer: str, message: dict[str, Any]) -> None:
        node = Node(peer)
        if node not in self._SyncObj__otherNodes:
            return  # only voters ask and answer
        if message["type"] == "pre_vote":
            granted = self._grants_pre_vote(message)
            self.prevotes["granted" if granted else "refused"] += 1
            reply = {"type": "pre_vote_reply", "round": message["round"], "granted": granted}
            self._SyncObj__transport.send(node, reply)
            return
        if message["round"] != self._prevote_round or not message["granted"]:
            return
        if self._SyncObj__raftState == _RAFT_STATE.LEADER:
            return
        self._prevote_grants.add(peer)
        voters = len(self._SyncObj__otherNodes) + 1
        if len(self._prevote_grants) > voters / 2 and not self._prevote_won:
            self._prevote_won = True
            self.prevotes["won"] += 1
            self._SyncObj__raftElectionDeadline = 0  # campaign in the next tick

    def _grants_pre_vote(self, message: dict[str, Any]) -> bool:
        if self._SyncObj__raftState == _RAFT_STATE.LEADER:
            return False
        if monotonic() - self._leader_heard_at < self._timeouts.min_timeout:
            return False
        mine = (self._SyncObj__getCurrentLogTerm(), self._SyncObj__getCurrentLogIndex())
        return (message["last_log_term"], message["last_log_index"]) >= mine
