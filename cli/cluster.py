"""The operator's view of a cluster: every member probed on its own connection, and what the
answers add up to (who leads, who lags). Used by `colonies cluster ls` and `colonies status`.

Nothing here decides anything about the cluster: a node's role, term and indexes are its own
report (getserverinfomsg, which any key may ask); this module only lines the reports up. A
member that does not answer within the probe timeout is shown as down; it never fails the
command.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from protocol.errors import ColoniesError
from protocol.identity import PrivateKey
from protocol.schema import multiaddr, peer_id

if TYPE_CHECKING:  # node.client imports libp2p: only when a command talks to a node
    from node.client import Client

PROBE_TIMEOUT_S = 2.0
CLOSE_TIMEOUT_S = 2.0


def peer_of(addr: str) -> str:
    """The peer id at the end of a full multiaddr ('' if it has none)."""
    return addr.rsplit("/p2p/", 1)[1] if "/p2p/" in addr else ""


def check_member_addr(addr: str) -> tuple[str, str]:
    """(peer id, addr) of a full member multiaddr; ValueError with a message if it is not one."""
    addr = addr.strip()
    pid = peer_of(addr)
    if multiaddr(addr) is not None or not pid or peer_id(pid) is not None:
        raise ValueError(
            f"{addr!r} is not a full multiaddr like /ip4/10.0.0.2/tcp/47001/p2p/<peer id>"
        )
    return pid, addr


def check_peer_id(text: str) -> str:
    """A peer id, or the peer id at the end of a full multiaddr; ValueError if neither."""
    pid = peer_of(text.strip()) or text.strip()
    if peer_id(pid) is not None:
        raise ValueError(f"{text!r} is not a peer id (nor a multiaddr ending in /p2p/<peer id>)")
    return pid


def describe(e: BaseException, addr: str) -> str:
    """One line for why a member did not answer (libp2p's dial errors come wrapped in
    exception groups and repeat the address the row already shows)."""
    leaves = [e]
    while any(isinstance(x, BaseExceptionGroup) for x in leaves):
        leaves = [
            y for x in leaves
            for y in (x.exceptions if isinstance(x, BaseExceptionGroup) else (x,))
        ]
    leaf = next((x for x in leaves if isinstance(x, ColoniesError)), None) or next(
        (x for x in leaves if not isinstance(x, trio.Cancelled)), leaves[0]
    )
    if isinstance(leaf, ColoniesError):
        if leaf.message.startswith(f"cannot connect to {addr}"):
            return "cannot connect"
        return leaf.message
    return f"{type(leaf).__name__}: {leaf}"


@dataclass
class Probe:
    """One member's answer (its server info), or why there was none."""

    peerid: str
    addr: str
    info: dict[str, Any] | None = None
    error: str | None = None
    rtt_s: float | None = None

    @property
    def reachable(self) -> bool:
        return self.info is not None

    @property
    def raft(self) -> dict[str, Any]:
        raft = (self.info or {}).get("raft")
        return raft if isinstance(raft, dict) else {}


class Prober:
    """One pinned connection per member (it never moves to another node, so each answer is
    that member's own view), kept open across rounds (`status --watch`) and opened afresh
    after it fails. Connections live in `nursery`; every probe is bounded by `timeout`."""

    def __init__(self, nursery: trio.Nursery, key: PrivateKey, timeout: float) -> None:
        self._nursery = nursery
        self._key = key
        self.timeout = timeout
        self._clients: dict[str, Client] = {}  # by address

    async def probe(self, peerid: str, addr: str) -> Probe:
        from node.client import Client

        probe = Probe(peerid, addr)
        client = self._clients.get(addr)
        started = time.monotonic()
        try:
            with trio.fail_after(self.timeout):
                if client is None or client.conn is None or client.conn.broken:
                    await self._drop(addr)
                    client = await Client.open(
                        self._nursery, addr, self._key, self.timeout, pinned=True
                    )
                    self._clients[addr] = client
                    info = client.server_info
                else:
                    info = await client.server_info_fresh()
        except trio.TooSlowError:
            probe.error = f"no answer within {self.timeout:g} s"
        except Exception as e:  # refused, a transport error, a bad address: down to us
            probe.error = describe(e, addr)
        else:
            if not isinstance(info, dict):
                probe.error = "the node sent no server info"
            elif peerid and info.get("peerid") != peerid:
                probe.error = f"the node at this address is {info.get('peerid')}, not {peerid}"
            else:
                probe.info = info
                probe.rtt_s = round(time.monotonic() - started, 4)
        if probe.error is not None:
            await self._drop(addr)
        return probe

    async def probe_all(self, members: dict[str, str]) -> list[Probe]:
        """Every member at once; the answers in the order of `members`."""
        out: dict[str, Probe] = {}

        async def one(pid: str, addr: str) -> None:
            out[pid] = await self.probe(pid, addr)

        async with trio.open_nursery() as n:
            for pid, addr in members.items():
                n.start_soon(one, pid, addr)
        return [out[pid] for pid in members]

    async def _drop(self, addr: str) -> None:
        client = self._clients.pop(addr, None)
        if client is not None:
            with trio.move_on_after(CLOSE_TIMEOUT_S) as scope:
                scope.shield = True
                await client.aclose()

    async def aclose(self) -> None:
        for addr in list(self._clients):
            await self._drop(addr)


# What the probes add up to.


def leader_of(probes: list[Probe]) -> tuple[str | None, int | None]:
    """(leader peer id, its term) as the reachable members report it: a member that says it
    leads (the highest term wins over a deposed leader that has not heard yet), else the
    leader most members name; (None, None) if no reachable member knows one."""
    reachable = [p for p in probes if p.reachable]
    claims = [
        (int(p.raft.get("term") or 0), p.peerid)
        for p in reachable
        if p.raft.get("state") == "leader"
    ]
    named = Counter(str(p.raft["leader"]) for p in reachable if p.raft.get("leader"))
    if claims:
        term, pid = max(claims)
        # A follower with a newer term that names someone else knows better.
        newer = [
            (int(p.raft.get("term") or 0), str(p.raft["leader"]))
            for p in reachable
            if p.raft.get("leader") and int(p.raft.get("term") or 0) > term
        ]
        if newer:
            term, pid = max(newer)
        return pid, term
    if named:
        pid = named.most_common(1)[0][0]
        terms = [int(p.raft.get("term") or 0) for p in reachable if p.raft.get("leader") == pid]
        return pid, max(terms) if terms else None
    return None, None


def leader_commit(probes: list[Probe], leader: str | None) -> int | None:
    """The leader's commit index: its own word if it answered, else the highest commit index
    a follower has heard from it."""
    for p in probes:
        if p.peerid == leader and p.reachable and isinstance(p.raft.get("commit_index"), int):
            return int(p.raft["commit_index"])
    known = [
        int(p.raft["leader_commit_index"])
        for p in probes
        if p.reachable and isinstance(p.raft.get("leader_commit_index"), int)
    ]
    return max(known) if known else None


def node_rows(probes: list[Probe], leader: str | None) -> list[dict[str, Any]]:
    """One row per member for `status`: what it reports, and its lag behind the leader."""
    commit = leader_commit(probes, leader)
    rows = []
    for p in probes:
        row: dict[str, Any] = {"peerid": p.peerid, "addr": p.addr, "reachable": p.reachable}
        if not p.reachable:
            row.update(role="down", error=p.error)
            rows.append(row)
            continue
        r = p.raft
        applied = r.get("last_applied")
        heard = r.get("last_heard") if isinstance(r.get("last_heard"), dict) else {}
        row.update(
            role=r.get("state", "unknown"),
            term=r.get("term"),
            leader=r.get("leader"),
            commit_index=r.get("commit_index"),
            applied_index=applied,
            lag=max(0, commit - applied) if isinstance(applied, int) and commit is not None
            else None,
            # Seconds since this member last heard from the leader (None on the leader).
            leader_contact_s=None if p.peerid == leader or leader is None else heard.get(leader),
            queued=r.get("queued"),
            in_flight=r.get("in_flight"),
            # The worst event-loop stall in the last minute (node/loop_monitor.py).
            loop_lag_max_ms=r.get("loop_lag_max_1m_ms"),
            has_quorum=r.get("has_quorum"),
            caught_up=r.get("caught_up"),
            version=(p.info or {}).get("version"),
            rtt_ms=round(p.rtt_s * 1000, 1) if p.rtt_s is not None else None,
        )
        rows.append(row)
    return rows


def raft_members(probes: list[Probe], leader: str | None) -> list[str] | None:
    """The Raft group as the leader (else the first member that answered) sees it."""
    ordered = sorted(probes, key=lambda p: p.peerid != leader)
    for p in ordered:
        if p.reachable and isinstance(p.raft.get("members"), list):
            return [str(m) for m in p.raft["members"]]
    return None


def member_rows(probes: list[Probe], leader: str | None) -> list[dict[str, Any]]:
    """One row per member for `cluster ls`. `raft` says where a member stands in the Raft
    group: "voter", "learner" (in the book, not yet in the group: it gets the log without a
    vote until it has caught up) or "leaving" (in the group, no longer in the book)."""
    group = raft_members(probes, leader)
    rows = []
    for p in probes:
        rows.append(
            {
                "peerid": p.peerid,
                "addr": p.addr,
                "reachable": p.reachable,
                "role": p.raft.get("state", "unknown") if p.reachable else "down",
                "term": p.raft.get("term") if p.reachable else None,
                "raft": None if group is None else "voter" if p.peerid in group else "learner",
                **({"error": p.error} if p.error else {}),
            }
        )
    listed = {p.peerid for p in probes}
    for pid in group or []:
        if pid not in listed:
            rows.append({"peerid": pid, "addr": None, "reachable": None, "role": "unknown",
                         "term": None, "raft": "leaving"})
    return rows


def member_book(probes: list[Probe], leader: str | None) -> dict[str, str] | None:
    """The member book as the leader (else any member that answered) holds it."""
    ordered = sorted(probes, key=lambda p: p.peerid != leader)
    for p in ordered:
        members = (p.info or {}).get("members")
        if p.reachable and isinstance(members, dict) and members:
            return {str(k): str(v) for k, v in members.items()}
    return None


class ClusterView:
    """Probes the members of the cluster that `seed` (a member's full address) belongs to.
    The first round learns the member book from the seed; later rounds follow the book as
    the leader reports it, so members added or removed meanwhile come and go."""

    def __init__(self, nursery: trio.Nursery, seed: str, key: PrivateKey, timeout: float) -> None:
        self.seed = seed
        self.prober = Prober(nursery, key, timeout)
        self.book: dict[str, str] = {}
        self.probes: list[Probe] = []
        self.leader: str | None = None
        self.term: int | None = None

    async def refresh(self) -> list[Probe]:
        if not self.book:
            first = await self.prober.probe(peer_of(self.seed), self.seed)
            if not first.reachable:
                self.probes, self.leader, self.term = [first], None, None
                return self.probes
            book = (first.info or {}).get("members")
            self.book = dict(book) if isinstance(book, dict) and book else {
                first.peerid: self.seed
            }
            others = {p: a for p, a in self.book.items() if p != first.peerid}
            probes = [first, *await self.prober.probe_all(others)]
            if first.peerid in self.book:
                first.addr = self.book[first.peerid]
            else:  # the seed is not (or no longer) in its cluster's book
                probes.remove(first)
        else:
            probes = await self.prober.probe_all(self.book)
        self.leader, self.term = leader_of(probes)
        book = member_book(probes, self.leader)
        if book is not None:
            self.book = book
        self.probes = sorted(probes, key=lambda p: p.addr)
        return self.probes

    def first_info(self) -> dict[str, Any] | None:
        """The server info of the seed if it answered, else of the leader, else of any member."""
        by_pid = {p.peerid: p for p in self.probes if p.reachable}
        for pid in (peer_of(self.seed), self.leader):
            if pid in by_pid:
                return by_pid[pid].info
        return next(iter(by_pid.values())).info if by_pid else None

    def reachable_addrs(self) -> list[str]:
        """Reachable members' addresses, the leader first (for calls that any member answers)."""
        ordered = sorted(self.probes, key=lambda p: p.peerid != self.leader)
        return [p.addr for p in ordered if p.reachable]

    async def aclose(self) -> None:
        await self.prober.aclose()

    @classmethod
    @asynccontextmanager
    async def open(cls, seed: str, key: PrivateKey, timeout: float) -> AsyncIterator[ClusterView]:
        """A view whose connections live (and end) with the `async with` block."""
        async with trio.open_nursery() as nursery:
            view = cls(nursery, seed, key, timeout)
            try:
                yield view
            finally:
                with trio.CancelScope(shield=True):
                    await view.aclose()
                nursery.cancel_scope.cancel()
