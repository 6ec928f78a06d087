"""Frames and the request/reply batches they carry."""

from __future__ import annotations

import struct
import time

import msgpack
import pytest

from protocol.errors import FrameTooLarge, MalformedFrame
from protocol.framing import (
    MAX_ENVELOPES_PER_FRAME,
    MAX_FRAME_BYTES,
    FrameDecoder,
    decode_replies,
    decode_requests,
    encode_frame,
    encode_replies,
    encode_requests,
)


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# Frames.


def test_encode_frame_layout():
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    with pytest.raises(ValueError):
        encode_frame(b"")


def test_whole_frame_in_one_read():
    d = FrameDecoder()
    assert d.feed(encode_frame(b"hello")) == [b"hello"]
    assert d.pending == 0


def test_frame_split_across_reads():
    d = FrameDecoder()
    frame = encode_frame(b"x" * 1000)
    assert d.feed(frame[:500]) == []
    assert d.pending == 500
    assert d.feed(frame[500:]) == [b"x" * 1000]
    assert d.pending == 0


def test_split_inside_the_length_prefix():
    d = FrameDecoder()
    frame = encode_frame(b"abc")
    assert d.feed(frame[:2]) == []
    assert d.feed(frame[2:3]) == []
    assert d.feed(frame[3:]) == [b"abc"]


def test_byte_at_a_time():
    d = FrameDecoder()
    stream = encode_frame(b"one") + encode_frame(b"two")
    out = []
    for i in range(len(stream)):
        out += d.feed(stream[i : i + 1])
    assert out == [b"one", b"two"]
    assert d.pending == 0


def test_many_frames_per_read_and_a_partial_tail():
    d = FrameDecoder()
    bodies = [bytes([i]) * (i + 1) for i in range(50)]
    stream = b"".join(encode_frame(b) for b in bodies)
    tail = encode_frame(b"tail")
    assert d.feed(stream + tail[:5]) == bodies
    assert d.pending == 5
    assert d.feed(tail[5:]) == [b"tail"]


def test_frames_are_bytes_copies():
    d = FrameDecoder()
    (frame,) = d.feed(bytearray(encode_frame(b"abc")))
    assert type(frame) is bytes
    d.feed(encode_frame(b"zzz"))
    assert frame == b"abc"


def test_oversized_declared_length_fails_on_the_header():
    d = FrameDecoder(max_frame_bytes=100)
    assert d.feed(encode_frame(b"x" * 100)) == [b"x" * 100]
    # Refused as soon as the prefix arrives, without buffering the body.
    with pytest.raises(FrameTooLarge, match="101 bytes exceeds the maximum of 100"):
        d.feed(struct.pack(">I", 101))
    # The stream is now out of step: every further feed is refused.
    with pytest.raises(FrameTooLarge, match="already failed"):
        d.feed(encode_frame(b"ok"))
    assert d.pending == 0


def test_default_maximum():
    d = FrameDecoder()
    assert d.max_frame_bytes == MAX_FRAME_BYTES == (1024 + 64) * 1024  # a command + envelope
    with pytest.raises(FrameTooLarge):
        d.feed(struct.pack(">I", MAX_FRAME_BYTES + 1))
    with pytest.raises(FrameTooLarge):
        FrameDecoder().feed(b"\xff\xff\xff\xff")


def test_zero_length_frame():
    d = FrameDecoder()
    with pytest.raises(MalformedFrame, match="zero-length"):
        d.feed(encode_frame(b"a") + b"\x00\x00\x00\x00")
    with pytest.raises(MalformedFrame):
        d.feed(encode_frame(b"a"))


def test_bad_max_frame_bytes():
    with pytest.raises(ValueError):
        FrameDecoder(max_frame_bytes=0)
    with pytest.raises(ValueError):
        FrameDecoder(max_frame_bytes=2**32)


def test_large_frame_in_small_reads_is_linear():
    # Quadratic buffering would take seconds here (4 MiB in 1 KiB reads).
    body = b"y" * MAX_FRAME_BYTES
    stream = encode_frame(body)
    d = FrameDecoder()
    start = time.perf_counter()
    out = []
    for i in range(0, len(stream), 1024):
        out += d.feed(stream[i : i + 1024])
    assert out == [body]
    assert time.perf_counter() - start < 1.0


# Request frames.


def test_requests_round_trip():
    items = [(0, b"env0"), (7, b"env7"), (2**32 - 1, b"last")]
    frame = encode_requests(items)
    (body,) = FrameDecoder().feed(frame)
    assert decode_requests(body) == items


def test_requests_empty_batch():
    assert decode_requests(FrameDecoder().feed(encode_requests([]))[0]) == []


def test_requests_max_items():
    items = [(i, b"e") for i in range(MAX_ENVELOPES_PER_FRAME)]
    assert decode_requests(encode_requests(items)[4:]) == items
    with pytest.raises(ValueError):
        encode_requests(items + [(64, b"e")])
    with pytest.raises(MalformedFrame, match="more than 64"):
        decode_requests(pack([[i, b"e"] for i in range(MAX_ENVELOPES_PER_FRAME + 1)]))


def test_request_envelope_element_is_returned_as_is():
    # A bad envelope is left for open_envelope, so it gets its own error reply.
    assert decode_requests(pack([[1, "text"], [2, None], [3, b"ok"]])) == [
        (1, "text"),
        (2, None),
        (3, b"ok"),
    ]


@pytest.mark.parametrize(
    "body",
    [b"", b"\xc1", b"\x91", pack([[1, b"x"]]) + b"\x00", b"\x91\xd4\x05\x00"],
    ids=["empty", "reserved", "truncated", "trailing", "ext"],
)
def test_requests_not_msgpack(body):
    with pytest.raises(MalformedFrame, match="not valid msgpack"):
        decode_requests(body)


@pytest.mark.parametrize(
    "obj",
    [
        {"1": b"x"},
        b"x",
        7,
        None,
        [[1]],
        [[1, b"x", 2]],
        [b"x"],
        [[b"1", b"x"]],
        [["1", b"x"]],
        [[-1, b"x"]],
        [[2**32, b"x"]],
        [[True, b"x"]],
        [[1.0, b"x"]],
        [[1, b"x"], "bad"],
        [{"id": 1, "env": b"x"}],
    ],
)
def test_requests_wrong_shape(obj):
    with pytest.raises(MalformedFrame):
        decode_requests(pack(obj))


def test_encode_requests_refuses_bad_items():
    for items in ([(-1, b"x")], [(2**32, b"x")], [(True, b"x")], [(1, "x")]):
        with pytest.raises(ValueError):
            encode_requests(items)


# Reply frames.


def test_replies_round_trip():
    items = [
        (1, 200, {"processid": "a" * 64, "args": [1, "two", None]}),
        (2, 200, None),
        (3, 404, "process not found"),
        (4, 403, "access denied"),
    ]
    (body,) = FrameDecoder().feed(encode_replies(items))
    assert decode_replies(body) == items


def test_replies_results_come_back_as_lists():
    (rid, status, payload) = decode_replies(encode_replies([(1, 200, ((1, 2), 3))])[4:])[0]
    assert payload == [[1, 2], 3]


@pytest.mark.parametrize(
    "obj",
    [
        {"1": 1},
        [[1, 200]],
        [[1, 200, None, 4]],
        [["1", 200, None]],
        [[1, "200", None]],
        [[1, True, None]],
        [[-1, 200, None]],
        [[1, 500, None]],
        [[1, 500, b"bytes, not str"]],
        [[1, 200, None], 5],
        5,
    ],
)
def test_replies_wrong_shape(obj):
    with pytest.raises(MalformedFrame):
        decode_replies(pack(obj))


@pytest.mark.parametrize("body", [b"", b"\xc1", b"\x91\x93\x01", pack([]) + b"\x00"])
def test_replies_not_msgpack(body):
    with pytest.raises(MalformedFrame, match="not valid msgpack"):
        decode_replies(body)


def test_encode_replies_refuses_bad_items():
    for items in ([(1, 500, None)], [(-1, 200, None)], [(1, "200", None)]):
        with pytest.raises(ValueError):
            encode_replies(items)
