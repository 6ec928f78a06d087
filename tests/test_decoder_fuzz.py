"""Property tests: whatever bytes or msgpack a peer sends, decoders raise only ColoniesError."""

from __future__ import annotations

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.envelope import CLOCK_SKEW_MS, MAX_TTL_MS, open_envelope, seal
from protocol.errors import ColoniesError
from protocol.framing import FrameDecoder, decode_replies, decode_requests, encode_frame
from protocol.identity import N, PrivateKey

CLUSTER = "c" * 64
NOW = 1_700_000_000_000
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=40)
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)
keys = st.integers(min_value=1, max_value=N - 1).map(lambda d: PrivateKey(d.to_bytes(32, "big")))


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def only_colonies_errors(fn, *args) -> object:
    try:
        return fn(*args)
    except ColoniesError:
        return None


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=8), st.integers(min_value=1, max_value=64))
def test_frame_decoder_random_bytes(chunks, max_frame):
    d = FrameDecoder(max_frame_bytes=max_frame)
    for chunk in chunks:
        try:
            frames = d.feed(chunk)
        except ColoniesError:
            return
        assert all(0 < len(f) <= max_frame for f in frames)


@FUZZ
@given(st.lists(st.binary(min_size=1, max_size=40), max_size=6), st.data())
def test_frame_decoder_any_split(bodies, data):
    stream = b"".join(encode_frame(b) for b in bodies)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    d, out, prev = FrameDecoder(), [], 0
    for cut in [*cuts, len(stream)]:
        out += d.feed(stream[prev:cut])
        prev = cut
    assert out == bodies and d.pending == 0


@FUZZ
@given(st.binary(max_size=200))
def test_decoders_on_random_bytes(data):
    only_colonies_errors(decode_requests, data)
    only_colonies_errors(decode_replies, data)
    only_colonies_errors(open_envelope, data, CLUSTER, NOW)


@FUZZ
@given(values)
def test_decoders_on_random_msgpack(value):
    data = pack(value)
    only_colonies_errors(decode_requests, data)
    only_colonies_errors(decode_replies, data)
    only_colonies_errors(open_envelope, data, CLUSTER, NOW)
    only_colonies_errors(open_envelope, value, CLUSTER, NOW)  # not even bytes


@FUZZ
@given(st.lists(st.tuples(st.integers(-1, 2**33), values), max_size=4))
def test_decoders_on_request_and_reply_shapes(items):
    only_colonies_errors(decode_requests, pack([list(i) for i in items]))
    only_colonies_errors(decode_replies, pack([[i, s, p] for i, (s, p) in enumerate(items)]))


# Envelopes that get further in: the right outer shape and good payload fields, then at most
# one field dropped, replaced by a random value, or added, so every check after decoding is hit.
payload_fields = st.fixed_dictionaries(
    {
        "t": st.sampled_from(["getserverinfomsg", "getcolonymsg", "submitfuncspecmsg"]),
        "n": st.binary(min_size=16, max_size=16),
        "x": st.integers(NOW - 10, NOW + MAX_TTL_MS + CLOCK_SKEW_MS + 10),
        "a": st.sampled_from([CLUSTER, "*", "d" * 64]),
        "b": st.dictionaries(st.sampled_from(["colonyname", "spec", "q"]), values),
    },
)
payload_changes = st.tuples(
    st.sampled_from(["keep", "drop", "replace", "replace", "add"]),
    st.sampled_from(["t", "n", "x", "a", "b", "z"]),
    values,
)


def change_payload(fields: dict, change: tuple[str, str, object]) -> dict:
    what, key, value = change
    if what == "drop":
        fields.pop(key, None)
    elif what == "replace" or (what == "add" and key not in fields):
        fields[key] = value
    return fields


@FUZZ
@given(keys, payload_fields, payload_changes, st.booleans())
def test_open_envelope_on_structured_payloads(key, fields, change, good_sig):
    payload = pack(change_payload(fields, change))
    sig = key.sign(payload) if good_sig else bytes(65)
    req = only_colonies_errors(open_envelope, pack({"p": payload, "s": sig}), CLUSTER, NOW)
    if req is not None:
        assert req.caller == key.id


@FUZZ
@given(
    keys, st.dictionaries(st.text(max_size=8), values, max_size=4), st.sampled_from(["*", CLUSTER])
)
def test_sealed_envelopes_open_with_the_right_caller(key, body, audience):
    # getserverinfomsg has no required fields, so any body map is valid for it.
    env = seal(key, "getserverinfomsg", body, audience, NOW)
    req = open_envelope(env, CLUSTER, NOW)
    assert req.caller == key.id and req.msgtype == "getserverinfomsg" and req.body == {}


@FUZZ
@given(
    keys,
    st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    st.integers(1, MAX_TTL_MS),
    st.integers(0, MAX_TTL_MS),
)
def test_sealed_reads_open_until_they_expire(key, pid, ttl, age):
    env = seal(key, "getprocessmsg", {"processid": pid}, CLUSTER, NOW, ttl_ms=ttl)
    req = only_colonies_errors(open_envelope, env, CLUSTER, NOW + age)
    if age <= ttl:
        assert req is not None and req.caller == key.id and req.body == {"processid": pid}
    else:
        assert req is None


@FUZZ
@given(keys, st.data())
def test_mutated_envelopes_raise_only_colonies_errors(key, data):
    env = bytearray(seal(key, "getcolonymsg", {"colonyname": "dev"}, CLUSTER, NOW))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(env) - 1))
        env[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(env)))
    only_colonies_errors(open_envelope, bytes(env[:cut]), CLUSTER, NOW)
    only_colonies_errors(open_envelope, bytes(env), CLUSTER, NOW)
