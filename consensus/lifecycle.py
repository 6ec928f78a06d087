"""The process lifecycle as data: (state, event) -> next state.

Every state change of a process goes through `next_state`, so this table is the whole truth
about which transitions exist; tests and docs read it too. A pair that is not in the table is
an illegal transition and is refused with 400 before anything changes.
"""

from __future__ import annotations

from enum import StrEnum

from protocol.errors import BadRequest
from protocol.messages import CANCELLED, FAILED, RUNNING, STATE_NAMES, SUCCESS, WAITING


class Event(StrEnum):
    ASSIGN = "assign"  # an executor pulled the process
    CLOSE_SUCCESS = "close successful"  # the assigned executor closed the current attempt
    CLOSE_FAILED = "close failed"
    EXEC_TIMEOUT_REQUEUE = "exec timeout, retries left"  # back to the queue, retries + 1
    EXEC_TIMEOUT_FAIL = "exec timeout, no retries left"
    WAIT_TIMEOUT = "wait timeout"  # waited longer than maxwaittime
    EXECUTOR_REMOVED = "executor removed"  # back to the queue, retries unchanged
    CANCEL = "cancel"  # cancelprocessmsg, or its workflow was cancelled
    WORKFLOW_FAILED = "workflow failed"  # another member of its workflow failed
    # Retries with backoff (consensus/backoff.py): a failed close of a spec with a backoff
    # and retries left goes back to the queue, retries + 1.
    CLOSE_FAILED_RETRY = "close failed, retries left"
    # Executor liveness (consensus/liveness.py): its executor stopped calling in.
    EXECUTOR_STALE_REQUEUE = "executor stale, retries left"  # back to the queue, retries + 1
    EXECUTOR_STALE_FAIL = "executor stale, no retries left"


TRANSITIONS: dict[tuple[int, Event], int] = {
    (WAITING, Event.ASSIGN): RUNNING,
    (WAITING, Event.WAIT_TIMEOUT): FAILED,
    (RUNNING, Event.CLOSE_SUCCESS): SUCCESS,
    (RUNNING, Event.CLOSE_FAILED): FAILED,
    (RUNNING, Event.EXEC_TIMEOUT_REQUEUE): WAITING,
    (RUNNING, Event.EXEC_TIMEOUT_FAIL): FAILED,
    (RUNNING, Event.EXECUTOR_REMOVED): WAITING,
    (WAITING, Event.CANCEL): CANCELLED,
    (RUNNING, Event.CANCEL): CANCELLED,
    (WAITING, Event.WORKFLOW_FAILED): FAILED,
    (RUNNING, Event.WORKFLOW_FAILED): FAILED,
    # Retries with backoff.
    (RUNNING, Event.CLOSE_FAILED_RETRY): WAITING,
    # Executor liveness.
    (RUNNING, Event.EXECUTOR_STALE_REQUEUE): WAITING,
    (RUNNING, Event.EXECUTOR_STALE_FAIL): FAILED,
}


def next_state(state: int, event: Event) -> int:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        shown = STATE_NAMES.get(state, str(state))
        raise BadRequest(f"a {shown} process cannot take the event '{event.value}'") from None


def table_markdown() -> str:
    """The lifecycle table as markdown, for the docs."""
    rows = ["| from | event | to |", "|---|---|---|"]
    for (state, event), to in TRANSITIONS.items():
        rows.append(f"| {STATE_NAMES[state]} | {event.value} | {STATE_NAMES[to]} |")
    return "\n".join(rows)
