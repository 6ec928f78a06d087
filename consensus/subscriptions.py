"""Subscriptions, the state-machine half: one check each, answered from the local replica.

The node (node/subscriptions.py) long-polls them: it asks again after every apply on its
replica until the answer is there or the timeout passes, so a subscriber on a follower wakes
when the apply reaches that follower. These reads never change the state.

- `waitprocessmsg` {processid, state, timeout}: the process once it is in `state` (-1: any
  finished state). A process that finished in another state can never get there, which is
  answered at once with a 400 naming its state, rather than by waiting out the timeout
  (unlike Colonies, whose subscriber just hears nothing).
- `followprocessesmsg` {colonyname, executortype, afterseq, count, timeout}: processes
  submitted after the cursor `afterseq` (a submission sequence number; -1 = from now), in
  submission order and in whatever state they are now; `cursor` is where to continue.
"""

from __future__ import annotations

import heapq
from typing import Any

from consensus.listing import ALL_STATES
from consensus.records import Process
from consensus.request import Request
from consensus.state import ColonyState
from protocol.errors import BadRequest
from protocol.messages import FINISHED_STATES, STATE_NAMES

ANY_FINISHED = -1


def wait_process(st: ColonyState, req: Request) -> Any:
    """The process if it is in the state waited for, else None (ask again later)."""
    p = st.process(req.body["processid"])
    want = req.body["state"]
    if p.state == want or (want == ANY_FINISHED and p.state in FINISHED_STATES):
        return p.to_wire()
    if p.state in FINISHED_STATES:  # finished is final: it will never be in `want`
        raise BadRequest(
            f"process {p.processid} is {STATE_NAMES[p.state]} and will never be "
            f"{STATE_NAMES.get(want, 'finished')}"
        )
    return None


def follow_processes(st: ColonyState, req: Request) -> Any:
    b = req.body
    after = b["afterseq"]
    if after < 0:
        return {"processes": [], "cursor": st.next_seq - 1}
    colony, etype, count = b["colonyname"], b["executortype"], b["count"]
    live = (
        (seq, st.processes[pid])
        for seq, pid in st.listing.after(colony, ALL_STATES, etype, after)
    )
    rows = st.archive.after_seq(colony, st.colony_gen[colony], etype, after, count)
    archived = ((r.seq, Process.from_snapshot(r.record, archived=True)) for r in rows)
    out: list[dict[str, Any]] = []
    cursor = after
    for seq, p in heapq.merge(live, archived, key=lambda item: item[0]):
        if len(out) == count:
            break
        out.append(p.to_wire())
        cursor = seq
    return {"processes": out, "cursor": cursor}


READS = {
    "waitprocessmsg": wait_process,
    "followprocessesmsg": follow_processes,
}
