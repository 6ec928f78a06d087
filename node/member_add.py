"""Adding a cluster member (``addmembermsg``) the way an operator expects it to go.

1. The node serving the request dials the new member first (libp2p proves its peer id). An
   address that is mistyped, or a node that is not running, fails at once with a clear error,
   and nothing changes.
2. The member book entry goes through the log. From then on the new member is a learner
   (node/membership.py, node/raft_elections.py): it gets the log without a vote, so a member
   that dies while it catches up never costs the group its majority.
3. The reply waits up to ``wait`` seconds for the leader to make it a voter, and says whether
   it did (``voter``). A learner still catching up (a large snapshot, a slow link) becomes a
   voter later by itself; ``colonies cluster ls`` shows its role.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from protocol.envelope import Request
from protocol.errors import BadRequest, ColoniesError

REACH_TIMEOUT_S = 5.0
WAIT_POLL_S = 0.5

# reach(peer id, multiaddr): returns once a connection to that peer is up; raises if not.
Reach = Callable[[str, str], Awaitable[Any]]


class _Machine(Protocol):
    @property
    def members(self) -> dict[str, str]: ...


class _Replica(Protocol):
    @property
    def member_ids(self) -> list[str]: ...


class _Log(Protocol):
    @property
    def machine(self) -> _Machine: ...
    @property
    def colony(self) -> _Replica: ...
    @property
    def applied_generation(self) -> int: ...
    async def wait_applied(self, seen: int, deadline: float) -> int: ...


async def check_reachable(reach: Reach, peer: str, addr: str) -> None:
    try:
        with trio.fail_after(REACH_TIMEOUT_S):
            await reach(peer, addr)
    except trio.TooSlowError:
        why = f"no answer within {REACH_TIMEOUT_S:g} s"
    except (ColoniesError, OSError) as e:
        why = getattr(e, "message", None) or str(e)
    else:
        return
    raise BadRequest(
        f"cannot reach the new member at {addr} ({why}); nothing changed. Start its colonyd "
        "first (with --join) and check the address and peer id"
    )


async def add_member(
    log: _Log, req: Request, reach: Reach | None, write: Callable[[], Awaitable[Any]]
) -> dict[str, Any]:
    """``write()`` proposes the request's book change; the reply adds ``voter``."""
    peer, addr = req.body["peerid"], req.body["addr"]
    if reach is not None and log.machine.members.get(peer) != addr:
        await check_reachable(reach, peer, addr)
    value = await write()
    deadline = trio.current_time() + req.body["wait"]
    while peer not in log.colony.member_ids and trio.current_time() < deadline:
        seen = log.applied_generation
        await log.wait_applied(seen, min(deadline, trio.current_time() + WAIT_POLL_S))
    return {**value, "voter": peer in log.colony.member_ids}
