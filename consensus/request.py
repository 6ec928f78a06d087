"""What a command handler or a query receives: the caller, the validated body, a node id."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Request:
    caller: str  # the ID recovered from the signature
    body: dict[str, Any]  # validated and normalized
    gen: str = ""  # a random 64-hex id the proposing node drew (a submit's process id)
