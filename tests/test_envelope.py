"""The signed envelope: sealing, opening, and every way opening refuses."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import msgpack
import pytest

from protocol.envelope import (
    CLOCK_SKEW_MS,
    MAX_TTL_MS,
    Request,
    open_envelope,
    seal,
)
from protocol.errors import (
    BadSignature,
    ExpiredEnvelope,
    InvalidField,
    MalformedFrame,
    UnknownMessageType,
    WrongAudience,
)
from protocol.identity import N, PrivateKey, recover_id

VECTORS = json.loads((Path(__file__).parent / "data" / "identity.json").read_text())
KEY = PrivateKey.from_hex(VECTORS["identities"][3]["prvkey"])
OTHER = PrivateKey.from_hex(VECTORS["identities"][2]["prvkey"])
CLUSTER = "c" * 64
NOW = 1_700_000_000_000
NONCE = bytes(range(16))
SPEC = {"spec": {"funcname": "echo", "conditions": {"colonyname": "dev", "executortype": "cli"}}}


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def payload_map(**over: Any) -> dict[str, Any]:
    p = {
        "t": "getcolonymsg",
        "n": NONCE,
        "x": NOW + 60_000,
        "a": CLUSTER,
        "b": {"colonyname": "dev"},
    }
    p.update(over)
    return p


def raw_envelope(
    payload: dict[str, Any] | bytes, key: PrivateKey = KEY, sig: bytes | None = None
) -> bytes:
    """An envelope over an arbitrary payload, signed unless `sig` is given."""
    p = payload if isinstance(payload, bytes) else pack(payload)
    return pack({"p": p, "s": key.sign(p) if sig is None else sig})


def open_(env: object, now: int = NOW) -> Request:
    return open_envelope(env, CLUSTER, now)


# Round trips.


def test_seal_open_round_trip_write():
    env = seal(KEY, "submitfuncspecmsg", SPEC, CLUSTER, NOW, nonce=NONCE)
    req = open_(env)
    assert req.caller == KEY.id == VECTORS["identities"][3]["id"]
    assert req.msgtype == "submitfuncspecmsg"
    assert req.write is True
    assert req.nonce == NONCE
    assert req.expiry_ms == NOW + 60_000
    assert req.audience == CLUSTER
    # The body comes back validated and normalized: defaults filled in.
    spec = req.body["spec"]
    assert spec["funcname"] == "echo"
    assert spec["priority"] == 0 and spec["maxretries"] == -1 and spec["args"] == []
    assert spec["conditions"]["executornames"] == []


def test_seal_open_round_trip_read():
    req = open_(seal(OTHER, "getcolonymsg", {"colonyname": "dev"}, CLUSTER, NOW))
    assert req.caller == OTHER.id
    assert req.write is False
    assert req.body == {"colonyname": "dev"}
    assert len(req.nonce) == 16


def test_seal_is_deterministic_given_nonce_and_random_without():
    a = seal(KEY, "getcolonymsg", {"colonyname": "dev"}, CLUSTER, NOW, nonce=NONCE)
    b = seal(KEY, "getcolonymsg", {"colonyname": "dev"}, CLUSTER, NOW, nonce=NONCE)
    assert a == b
    c = seal(KEY, "getcolonymsg", {"colonyname": "dev"}, CLUSTER, NOW)
    d = seal(KEY, "getcolonymsg", {"colonyname": "dev"}, CLUSTER, NOW)
    assert open_(c).nonce != open_(d).nonce


def test_request_is_frozen():
    req = open_(seal(KEY, "getcolonymsg", {"colonyname": "dev"}, CLUSTER, NOW))
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.caller = OTHER.id  # type: ignore[misc]


def test_wire_layout():
    env = seal(KEY, "getcolonymsg", {"colonyname": "dev"}, CLUSTER, NOW, ttl_ms=1000, nonce=NONCE)
    outer = msgpack.unpackb(env, raw=False)
    assert set(outer) == {"p", "s"} and len(outer["s"]) == 65
    assert msgpack.unpackb(outer["p"], raw=False) == payload_map(x=NOW + 1000)
    assert recover_id(outer["p"], outer["s"]) == KEY.id


def test_seal_argument_errors():
    with pytest.raises(UnknownMessageType):
        seal(KEY, "nosuchmsg", {}, CLUSTER, NOW)
    for kwargs in ({"nonce": b"short"}, {"ttl_ms": 0}, {"ttl_ms": MAX_TTL_MS + 1}):
        with pytest.raises(ValueError):
            seal(KEY, "getcolonymsg", {}, CLUSTER, NOW, **kwargs)
    with pytest.raises(ValueError):
        seal(KEY, "getcolonymsg", [], CLUSTER, NOW)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        seal(KEY, "getcolonymsg", {}, None, NOW)  # type: ignore[arg-type]


# The outer envelope.


@pytest.mark.parametrize("env", ["text", None, 42, [b"x"], bytearray(b"\x80"), memoryview(b"\x80")])
def test_envelope_must_be_bytes(env):
    with pytest.raises(MalformedFrame, match="must be bytes"):
        open_(env)


@pytest.mark.parametrize(
    "env",
    [
        b"",
        b"\xc1",
        b"\x82\xa1p",
        pack({"p": b"", "s": b""}) + b"\x00",
        b"\xdd\xff\xff\xff\xff",
        b"\xa1\xff",
    ],
    ids=["empty", "reserved-byte", "truncated", "trailing", "huge-array-header", "bad-utf8"],
)
def test_envelope_not_msgpack(env):
    with pytest.raises(MalformedFrame, match="not valid msgpack"):
        open_(env)


SIGNED = pack(payload_map())


@pytest.mark.parametrize(
    "outer",
    [
        [SIGNED, KEY.sign(SIGNED)],
        {"p": SIGNED},
        {"s": KEY.sign(SIGNED)},
        {"p": SIGNED, "s": KEY.sign(SIGNED), "extra": 1},
        {"p": SIGNED.decode("latin-1"), "s": KEY.sign(SIGNED)},
        {"p": SIGNED, "s": KEY.sign_hex(SIGNED)},
        {b"p": SIGNED, b"s": KEY.sign(SIGNED)},
        {"p": SIGNED, "x": KEY.sign(SIGNED)},
    ],
    ids=["array", "no-s", "no-p", "extra-key", "p-str", "s-hex", "bytes-keys", "wrong-key"],
)
def test_envelope_shape(outer):
    with pytest.raises(MalformedFrame):
        open_(pack(outer))


# The payload.


@pytest.mark.parametrize("payload", [b"", b"\xc1", b"\x85\xa1t", pack(payload_map()) + b"\x00"])
def test_payload_not_msgpack(payload):
    with pytest.raises(MalformedFrame, match="payload is not valid msgpack"):
        open_(raw_envelope(payload))


@pytest.mark.parametrize("payload", [[1, 2], "getcolonymsg", 7, None])
def test_payload_not_a_map(payload):
    with pytest.raises(MalformedFrame, match="payload must be a map"):
        open_(raw_envelope(pack(payload)))


@pytest.mark.parametrize("t", ["nosuchmsg", "", 5, None, b"getcolonymsg", "GETCOLONYMSG"])
def test_unknown_message_type(t):
    with pytest.raises(UnknownMessageType, match="unknown message type"):
        open_(raw_envelope(payload_map(t=t)))


def test_missing_message_type():
    p = payload_map()
    del p["t"]
    with pytest.raises(UnknownMessageType):
        open_(raw_envelope(p))


@pytest.mark.parametrize("drop", ["n", "x", "a", "b"])
def test_missing_payload_field(drop):
    p = payload_map()
    del p[drop]
    with pytest.raises(InvalidField, match=f"missing \\['{drop}'\\]"):
        open_(raw_envelope(p))


def test_unknown_payload_field():
    with pytest.raises(InvalidField, match="extra \\['z'\\]"):
        open_(raw_envelope(payload_map(z=1)))


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", b"\x00" * 15),
        ("n", b"\x00" * 17),
        ("n", "0" * 16),
        ("n", None),
        ("x", float(NOW + 1000)),
        ("x", str(NOW + 1000)),
        ("x", True),
        ("x", None),
        ("a", 1),
        ("a", CLUSTER.encode()),
        ("b", [["colonyname", "dev"]]),
        ("b", None),
        ("b", "dev"),
    ],
)
def test_ill_typed_payload_fields(field, value):
    with pytest.raises(InvalidField, match=f"'{field}'"):
        open_(raw_envelope(payload_map(**{field: value})))


# Audience.


@pytest.mark.parametrize("aud", ["d" * 64, "", CLUSTER.upper(), CLUSTER + " "])
def test_wrong_audience(aud):
    with pytest.raises(WrongAudience, match="addressed to"):
        open_(seal(KEY, "getcolonymsg", {"colonyname": "dev"}, aud, NOW))


def test_star_audience_only_for_getserverinfo():
    req = open_(seal(KEY, "getserverinfomsg", {}, "*", NOW))
    assert req.audience == "*" and req.caller == KEY.id and req.body == {}
    # The cluster id works for it too.
    assert open_(seal(KEY, "getserverinfomsg", {}, CLUSTER, NOW)).audience == CLUSTER
    for msgtype, body in [("getcolonymsg", {"colonyname": "dev"}), ("submitfuncspecmsg", SPEC)]:
        with pytest.raises(WrongAudience, match="only for"):
            open_(seal(KEY, msgtype, body, "*", NOW))


# Expiry.


def test_expiry_window_edges():
    env = seal(KEY, "getcolonymsg", {"colonyname": "dev"}, CLUSTER, NOW, ttl_ms=1000)
    assert open_(env, now=NOW + 1000).caller == KEY.id  # expires at NOW + 1000 exactly
    with pytest.raises(ExpiredEnvelope, match="expired 1 ms ago"):
        open_(env, now=NOW + 1001)


def test_expired_envelope():
    env = seal(KEY, "getcolonymsg", {"colonyname": "dev"}, CLUSTER, NOW)
    with pytest.raises(ExpiredEnvelope, match="expired"):
        open_(env, now=NOW + 3_600_000)


def test_expiry_too_far_in_the_future():
    limit = NOW + MAX_TTL_MS + CLOCK_SKEW_MS
    assert open_(raw_envelope(payload_map(x=limit))).caller == KEY.id
    with pytest.raises(ExpiredEnvelope, match="ahead"):
        open_(raw_envelope(payload_map(x=limit + 1)))
    # A sender whose clock runs ahead within the skew is still accepted.
    env = seal(
        KEY, "getcolonymsg", {"colonyname": "dev"}, CLUSTER, NOW + CLOCK_SKEW_MS, ttl_ms=MAX_TTL_MS
    )
    assert open_(env).caller == KEY.id


# Signatures.


def _high_s(sig: bytes) -> bytes:
    s = int.from_bytes(sig[32:64], "big")
    return sig[:32] + (N - s).to_bytes(32, "big") + bytes([sig[64] ^ 1])


def test_high_s_signature_refused():
    p = pack(payload_map())
    with pytest.raises(BadSignature, match="high-S"):
        open_(raw_envelope(p, sig=_high_s(KEY.sign(p))))


@pytest.mark.parametrize(
    "sig",
    [b"", b"\x00" * 64, b"\x00" * 65, b"\x01" * 66, b"\xff" * 65],
    ids=["0", "64", "zeros", "66", "ff"],
)
def test_bad_signatures(sig):
    with pytest.raises(BadSignature):
        open_(raw_envelope(pack(payload_map()), sig=sig))


def test_signature_from_another_payload_gives_another_caller():
    p1, p2 = pack(payload_map()), pack(payload_map(n=b"\x01" * 16))
    req = open_(raw_envelope(p2, sig=KEY.sign(p1)))
    assert req.caller != KEY.id


def test_tampered_payload_byte_changes_the_caller():
    env = seal(KEY, "getcolonymsg", {"colonyname": "dev"}, CLUSTER, NOW, nonce=NONCE)
    outer = msgpack.unpackb(env, raw=False)
    p = outer["p"]
    i = p.index(b"dev")
    tampered = p[:i] + b"dew" + p[i + 3 :]
    try:
        req = open_(pack({"p": tampered, "s": outer["s"]}))
    except BadSignature:
        return  # also acceptable: some tamperings make the signature unrecoverable
    assert req.body == {"colonyname": "dew"}
    assert req.caller != KEY.id


def test_exact_payload_bytes_are_verified_not_a_reencoding():
    # A non-canonical but valid msgpack encoding: a map16 header where packb writes a fixmap.
    fields = payload_map()
    p = b"\xde\x00\x05" + b"".join(pack(k) + pack(v) for k, v in fields.items())
    reencoded = pack(msgpack.unpackb(p, raw=False))
    assert reencoded != p and msgpack.unpackb(reencoded, raw=False) == fields
    sig = KEY.sign(p)
    # The envelope opens with the right caller: the bytes as received were verified ...
    assert open_(raw_envelope(p, sig=sig)).caller == KEY.id
    # ... whereas verifying a re-encoding would have named someone else.
    assert recover_id(reencoded, sig) != KEY.id


# Body validation (after the signature).


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "spec"),
        ({"spec": "echo"}, "spec"),
        ({"spec": {"conditions": {"colonyname": "dev", "executortype": "cli"}}}, "spec.funcname"),
        (
            {"spec": {"funcname": 7, "conditions": {"colonyname": "dev", "executortype": "cli"}}},
            "spec.funcname",
        ),
        ({"spec": {"funcname": "echo"}}, "spec.conditions"),
        (
            {"spec": {"funcname": "echo", "conditions": {"colonyname": "dev"}}},
            "spec.conditions.executortype",
        ),
        ({"spec": {**SPEC["spec"], "priority": 10**6}}, "spec.priority"),
        ({"spec": {**SPEC["spec"], "priority": "high"}}, "spec.priority"),
        ({"spec": {**SPEC["spec"], "args": "notalist"}}, "spec.args"),
        ({"spec": {**SPEC["spec"], "env": {"K": 1}}}, "spec.env.K"),
    ],
)
def test_invalid_body_fields(body, field):
    env = seal(KEY, "submitfuncspecmsg", body, CLUSTER, NOW)
    with pytest.raises(InvalidField, match=f"'{field}'"):
        open_(env)


def test_body_ext_types_refused():
    # ExtType is a namedtuple: it must not pass for an array.
    body = {"spec": {**SPEC["spec"], "args": [msgpack.ExtType(5, b"x")]}}
    with pytest.raises(MalformedFrame, match="extension type 5"):
        open_(seal(KEY, "submitfuncspecmsg", body, CLUSTER, NOW))
    # Timestamps (ext -1) are decoded by msgpack itself; the schema refuses them.
    body = {"spec": {**SPEC["spec"], "args": [msgpack.Timestamp(1, 0)]}}
    with pytest.raises(InvalidField, match="unsupported value"):
        open_(seal(KEY, "submitfuncspecmsg", body, CLUSTER, NOW))


# Check order: cheap checks come before the ~50 us signature recovery; the body is checked
# only for an authenticated caller.


def test_cheap_checks_run_before_signature_recovery():
    bad_sig = b"\x00" * 65
    with pytest.raises(WrongAudience):
        open_(raw_envelope(payload_map(a="d" * 64), sig=bad_sig))
    with pytest.raises(ExpiredEnvelope):
        open_(raw_envelope(payload_map(x=NOW - 1), sig=bad_sig))
    with pytest.raises(InvalidField):
        open_(raw_envelope(payload_map(n=b""), sig=bad_sig))
    with pytest.raises(UnknownMessageType):
        open_(raw_envelope(payload_map(t="nosuchmsg"), sig=bad_sig))
    with pytest.raises(BadSignature):
        open_(raw_envelope(payload_map(b={"colonyname": 5}), sig=bad_sig))
