"""Process logs: the assigned executor appends lines to its running process; members read
them by cursor. Role rules in roles.py (addlogmsg: M✓ + A; getlogsmsg: M✓).

Bounds (protocol/messages.py): a line is at most MAX_LOG_LINE_BYTES (longer is refused with
400, so the caller learns it at once); a process keeps its last MAX_LOG_LINES lines, older ones
are dropped (process_log.py says why). The lines go when their process is removed
(ColonyState.remove_process), with a workflow, a colony, or a retention sweep alike.

Following a log is a read with `timeout`: the node answers it when a line after the cursor is
applied, or the process finishes, or the timeout passes (node/log_follow.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from consensus.process_log import ProcessLog
from consensus.request import Request
from consensus.state import ColonyState
from protocol.errors import BadRequest
from protocol.messages import RUNNING, STATE_NAMES

Handler = Callable[[ColonyState, Request, int], Any]
Query = Callable[[ColonyState, Request], Any]


def add_log(st: ColonyState, req: Request, now: int) -> Any:
    pid = req.body["processid"]
    p = st.process(pid)  # the role rule: it exists and is assigned to the caller
    if p.state != RUNNING:
        # A cancelled process stays assigned to its executor: say why it is refused.
        raise BadRequest(
            f"process {pid} is {STATE_NAMES.get(p.state, p.state)}: "
            "log lines can be added only while it runs"
        )
    log = st.logs.get(pid)
    if log is None:
        log = st.logs[pid] = ProcessLog(processid=pid, colonyname=p.colonyname)
    line = log.append(req.body["message"], st.executors[req.caller].executorname, now)
    return log.wire(line)


def get_logs(st: ColonyState, req: Request) -> Any:
    b = req.body
    p = st.process(b["processid"])
    if b["colonyname"] and b["colonyname"] != p.colonyname:
        raise BadRequest(
            f"process {p.processid} belongs to colony '{p.colonyname}', not '{b['colonyname']}'"
        )
    log = st.logs.get(p.processid) if not p.archived else _archived_log(st, p.processid)
    if log is None:
        return []
    return [log.wire(ln) for ln in log.read(b["afterseq"], b["since"], b["count"], b["latest"])]


def _archived_log(st: ColonyState, pid: str) -> ProcessLog | None:
    kept = st.archive.log(pid)
    if kept is None or not kept.lines:
        return None
    return ProcessLog(
        processid=pid,
        colonyname=kept.colonyname,
        lines=deque(kept.lines),
        next_seq=kept.lines[-1].seq + 1,
    )


WRITES: dict[str, Handler] = {"addlogmsg": add_log}
READS: dict[str, Query] = {"getlogsmsg": get_logs}
