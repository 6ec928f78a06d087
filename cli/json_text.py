"""Standard JSON in and out of the CLI: no NaN or Infinity either way.

Python's json module reads and writes ``NaN``, ``Infinity`` and ``-Infinity`` by default,
which no other JSON parser accepts. The node refuses them in every field (400), so the CLI
refuses them when it reads a spec or an argument, before anything is sent, and writes them,
should an old value hold one, as null.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any


class NotStandardJson(ValueError):
    """The text holds NaN, Infinity or -Infinity."""


def _refuse_constant(name: str) -> Any:  # noqa: ANN401 - json's parse_constant hook
    raise NotStandardJson(f"{name} is not standard JSON (use a number or null)")


def loads(text: str) -> Any:  # noqa: ANN401 - any JSON value
    """json.loads that refuses NaN and Infinity (NotStandardJson, a ValueError, as
    json.JSONDecodeError is)."""
    return json.loads(text, parse_constant=_refuse_constant)


def _finite(value: Any) -> Any:  # noqa: ANN401 - any JSON-able value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def dumps(value: Any, default: Callable[[Any], Any] | None = None, **kwargs: Any) -> str:
    """json.dumps that always writes standard JSON (a non-finite float becomes null)."""
    try:
        return json.dumps(value, default=default, allow_nan=False, **kwargs)
    except ValueError:
        return json.dumps(_finite(value), default=default, allow_nan=False, **kwargs)
