"""A canonical msgpack encoding (map keys sorted at every level), for state digests.

Two replicas holding equal state must produce equal bytes whatever order their dicts were
built in, so maps are re-emitted with sorted keys before packing.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack


def _key(k: Any) -> tuple[str, Any]:
    # Keys are strings in our data; the type name keeps a mixed-key map sortable anyway.
    return (type(k).__name__, k)


def _canon(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _canon(obj[k]) for k in sorted(obj, key=_key)}
    if isinstance(obj, list | tuple):
        return [_canon(v) for v in obj]
    return obj


def encode(obj: Any) -> bytes:
    return msgpack.packb(_canon(obj), use_bin_type=True)


def digest(obj: Any) -> str:
    return hashlib.sha3_256(encode(obj)).hexdigest()
