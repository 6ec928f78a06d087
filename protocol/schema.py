"""A small declarative schema: validates a decoded msgpack map and returns a normalized dict.

Messages stay plain dicts after validation so they can go into the Raft log as they are; the
schema guarantees every declared key is present with the declared type (defaults filled in)
and drops nothing silently: unknown keys are ignored, as Colonies ignores unknown JSON fields.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protocol.errors import InvalidField

HEX64 = re.compile(r"^[0-9a-f]{64}$")
PEER_ID = re.compile(r"[1-9A-HJ-NP-Za-km-z]{20,128}")  # base58btc, as libp2p prints peer ids
MULTIADDR = re.compile(r"(/[A-Za-z0-9_.:%\[\]-]+)+")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")

MAX_STR = 64 * 1024
MAX_LIST = 10_000
MAX_DEPTH = 16


def _fail(path: str, why: str) -> InvalidField:
    return InvalidField(f"invalid field '{path}': {why}")


def check_any(value: Any, path: str, depth: int = 0) -> Any:
    """Opaque user data (args, kwargs, output): any msgpack value, bounded in depth."""
    if depth > MAX_DEPTH:
        raise _fail(path, f"nested deeper than {MAX_DEPTH}")
    if isinstance(value, float) and not math.isfinite(value):
        # Colonies speaks JSON, which has no NaN or Infinity: such a value could be stored
        # but never shown or sent on in standard JSON.
        raise _fail(path, "NaN and Infinity are not allowed (JSON has no form for them)")
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return value
    if isinstance(value, list | tuple):
        return [check_any(v, path, depth + 1) for v in value]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise _fail(path, "map keys must be strings")
            out[k] = check_any(v, path, depth + 1)
        return out
    raise _fail(path, f"unsupported value of type {type(value).__name__}")


@dataclass(frozen=True)
class F:
    """One field: a type tag, whether it is required, its default, and an extra check."""

    kind: str  # str | int | bool | bytes | any | strlist | anylist | strmap | anymap | obj | objlist
    required: bool = False
    default: Any = None
    check: Callable[[Any], str | None] | None = None
    schema: Schema | None = None
    omit: bool = False  # when absent, leave the key out instead of filling the default

    def validate(self, value: Any, path: str) -> Any:
        k = self.kind
        if k == "str":
            if not isinstance(value, str):
                raise _fail(path, "expected a string")
            if len(value) > MAX_STR:
                raise _fail(path, f"longer than {MAX_STR} characters")
        elif k == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise _fail(path, "expected an integer")
            if not -(2**63) <= value < 2**63:
                raise _fail(path, "integer out of range")
        elif k == "bool":
            if not isinstance(value, bool):
                raise _fail(path, "expected a boolean")
        elif k == "bytes":
            if not isinstance(value, bytes):
                raise _fail(path, "expected bytes")
        elif k == "any":
            value = check_any(value, path)
        elif k in ("strlist", "anylist", "objlist"):
            if not isinstance(value, list | tuple):
                raise _fail(path, "expected a list")
            if len(value) > MAX_LIST:
                raise _fail(path, f"more than {MAX_LIST} items")
            if k == "strlist":
                for i, v in enumerate(value):
                    if not isinstance(v, str) or len(v) > MAX_STR:
                        raise _fail(f"{path}[{i}]", "expected a string")
                value = list(value)
            elif k == "anylist":
                value = [check_any(v, f"{path}[{i}]") for i, v in enumerate(value)]
            else:
                assert self.schema is not None
                value = [self.schema.validate(v, f"{path}[{i}]") for i, v in enumerate(value)]
        elif k in ("strmap", "anymap"):
            if not isinstance(value, dict):
                raise _fail(path, "expected a map")
            if len(value) > MAX_LIST:
                raise _fail(path, f"more than {MAX_LIST} entries")
            out = {}
            for key, v in value.items():
                if not isinstance(key, str):
                    raise _fail(path, "map keys must be strings")
                if k == "strmap" and not isinstance(v, str):
                    raise _fail(f"{path}.{key}", "expected a string")
                out[key] = v if k == "strmap" else check_any(v, f"{path}.{key}")
            value = out
        elif k == "obj":
            assert self.schema is not None
            value = self.schema.validate(value, path)
        else:  # pragma: no cover - a schema bug, not input
            raise AssertionError(f"unknown field kind {k}")
        if self.check is not None:
            why = self.check(value)
            if why:
                raise _fail(path, why)
        return value


@dataclass(frozen=True)
class Schema:
    fields: dict[str, F] = field(default_factory=dict)

    def validate(self, value: Any, path: str = "") -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _fail(path or "body", "expected a map")
        out: dict[str, Any] = {}
        for name, f in self.fields.items():
            sub = f"{path}.{name}" if path else name
            if name in value and value[name] is not None:
                out[name] = f.validate(value[name], sub)
            elif f.required:
                raise _fail(sub, "missing")
            elif f.omit:
                continue
            else:
                d = f.default
                out[name] = d() if callable(d) else d
        return out


# Reusable checks.
def hex64(v: str) -> str | None:
    return None if HEX64.fullmatch(v) else "expected 64 lowercase hex characters"


def hex64_or_empty(v: str) -> str | None:
    return None if v == "" or HEX64.fullmatch(v) else "expected 64 lowercase hex characters"


def name(v: str) -> str | None:
    return None if NAME.fullmatch(v) else "expected a name of 1-128 letters, digits or _.:@-"


def name_or_empty(v: str) -> str | None:
    return None if v == "" else name(v)


def peer_id(v: str) -> str | None:
    return None if PEER_ID.fullmatch(v) else "expected a libp2p peer id (base58)"


def multiaddr(v: str) -> str | None:
    if len(v) > 512 or not MULTIADDR.fullmatch(v):
        return "expected a multiaddr such as /ip4/127.0.0.1/tcp/4001/p2p/<peer id>"
    return None


def between(lo: int, hi: int) -> Callable[[int], str | None]:
    def check(v: int) -> str | None:
        return None if lo <= v <= hi else f"must be between {lo} and {hi}"

    return check


def at_least(lo: int) -> Callable[[int], str | None]:
    def check(v: int) -> str | None:
        return None if v >= lo else f"must be at least {lo}"

    return check
