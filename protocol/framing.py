"""Length-prefixed frames and the request/reply batches they carry. No I/O.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of body.

    request frame body = msgpack [[request_id, envelope bytes], ...]   (at most 64 items)
    reply frame body   = msgpack [[request_id, status, payload], ...]

A reply's payload is the result (any msgpack value) when status is 200, otherwise the error
message. Batching matters: a frame costs about 0.6 ms of libp2p CPU per side and each extra
envelope in it only a few us, so writers drain whatever is queued into one frame, aiming at
TARGET_ENVELOPES_PER_FRAME envelopes or TARGET_FRAME_BYTES bytes, and never wait to fill one.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from protocol.errors import ColoniesError, FrameTooLarge, MalformedFrame

# A node accepts request frames of one command's size plus the envelope around it (a frame
# holding a 1 MiB command and its signature fits; several large envelopes go in several frames,
# as the client's writer batches at most TARGET_FRAME_BYTES).
MAX_COMMAND_BYTES = 1024 * 1024
MAX_FRAME_BYTES = MAX_COMMAND_BYTES + 64 * 1024
# What a client accepts from its node: a page of processes with their arguments and output.
MAX_REPLY_FRAME_BYTES = 64 * 1024 * 1024
MAX_ENVELOPES_PER_FRAME = 64
TARGET_ENVELOPES_PER_FRAME = 16
TARGET_FRAME_BYTES = 8 * 1024
MAX_REQUEST_ID = 2**32 - 1
STATUS_OK = 200

_LENGTH = struct.Struct(">I")
_PREFIX = _LENGTH.size


class FrameDecoder:
    """Turns a byte stream into frame bodies, whatever the read boundaries.

    Any error (a declared length over the maximum, or a zero length) leaves the stream out of
    step or the peer misbehaving: the decoder then refuses all further input (frames completed
    earlier in the same feed are dropped too), and the caller must reply with the error if it
    wants to and close the stream.
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        if not 0 < max_frame_bytes <= 2**32 - 1:
            raise ValueError("max_frame_bytes must be between 1 and 2**32-1")
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._failed: ColoniesError | None = None

    @property
    def pending(self) -> int:
        """Bytes buffered towards the next frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Buffer `data` and return the body of every frame it completes, in order."""
        if self._failed is not None:
            raise type(self._failed)(f"stream already failed: {self._failed.message}")
        buf = self._buf
        buf += data
        frames: list[bytes] = []
        end = len(buf)
        off = 0
        try:
            with memoryview(buf) as view:
                while end - off >= _PREFIX:
                    (n,) = _LENGTH.unpack_from(view, off)
                    # Checked on the header alone, before the body is buffered.
                    if n > self.max_frame_bytes:
                        raise FrameTooLarge(
                            f"frame of {n} bytes exceeds the maximum of {self.max_frame_bytes}"
                        )
                    if n == 0:
                        raise MalformedFrame("zero-length frame")
                    start = off + _PREFIX
                    if end - start < n:
                        break
                    frames.append(bytes(view[start : start + n]))
                    off = start + n
        except ColoniesError as e:
            self._failed = e
            self._buf = bytearray()
            raise
        # Deleting a prefix of a bytearray is amortized O(1) in CPython (it moves the start).
        del buf[:off]
        return frames


def encode_frame(body: bytes) -> bytes:
    """Prefix `body` with its length. Empty bodies are refused: the decoder rejects them."""
    if not 0 < len(body) <= 2**32 - 1:
        raise ValueError("frame body must be between 1 and 2**32-1 bytes")
    return _LENGTH.pack(len(body)) + body


def _refuse_ext(code: int, data: bytes) -> object:
    raise ValueError(f"msgpack extension type {code} is not part of the protocol")


def unpack_untrusted(data: bytes, what: str, use_list: bool = True) -> Any:
    """msgpack-decode bytes from a peer, or raise MalformedFrame naming `what`.

    unpackb bounds every string, bin, array and map length by len(data), so the input's size
    bounds the work. Extension types are refused: nothing in the protocol uses them, and
    msgpack's ExtType is a tuple that would pass for an array further on.
    """
    try:
        return msgpack.unpackb(
            data, raw=False, use_list=use_list, strict_map_key=True, ext_hook=_refuse_ext
        )
    except Exception as e:  # any failure to decode untrusted bytes means malformed input
        raise MalformedFrame(
            f"{what} is not valid msgpack: {type(e).__name__}: {str(e)[:200]}"
        ) from None


def _is_request_id(v: object) -> bool:
    return type(v) is int and 0 <= v <= MAX_REQUEST_ID  # type() excludes bool


def encode_requests(items: list[tuple[int, bytes]]) -> bytes:
    """A whole request frame (prefix included) carrying `(request_id, envelope)` items."""
    if len(items) > MAX_ENVELOPES_PER_FRAME:
        raise ValueError(f"at most {MAX_ENVELOPES_PER_FRAME} envelopes per frame")
    for rid, env in items:
        if not _is_request_id(rid) or not isinstance(env, bytes):
            raise ValueError("each item must be (request id in 0..2**32-1, envelope bytes)")
    return encode_frame(msgpack.packb([[rid, env] for rid, env in items], use_bin_type=True))


def decode_requests(body: bytes) -> list[tuple[int, object]]:
    """The `(request_id, envelope)` items of a request frame body.

    The envelope is returned as it came (open_envelope checks it), so one bad envelope gets
    its own error reply; a frame of the wrong shape is refused whole with MalformedFrame.
    """
    # Tuples, not lists: a frame of empty arrays then costs ~10x less to decode.
    items = unpack_untrusted(body, "request frame", use_list=False)
    if type(items) is not tuple:
        raise MalformedFrame("request frame must be an array of [request_id, envelope]")
    if len(items) > MAX_ENVELOPES_PER_FRAME:
        raise MalformedFrame(
            f"request frame holds {len(items)} envelopes, more than {MAX_ENVELOPES_PER_FRAME}"
        )
    out: list[tuple[int, object]] = []
    for item in items:
        if type(item) is not tuple or len(item) != 2 or not _is_request_id(item[0]):
            raise MalformedFrame("each request must be [request_id (0..2**32-1), envelope]")
        out.append((item[0], item[1]))
    return out


def encode_replies(items: list[tuple[int, int, object]]) -> bytes:
    """A whole reply frame (prefix included) carrying `(request_id, status, payload)` items."""
    for rid, status, payload in items:
        if not _is_request_id(rid) or type(status) is not int:
            raise ValueError("each reply must be (request id in 0..2**32-1, int status, payload)")
        if status != STATUS_OK and not isinstance(payload, str):
            raise ValueError("an error reply's payload must be its message (str)")
    return encode_frame(msgpack.packb([[rid, st, p] for rid, st, p in items], use_bin_type=True))


def decode_replies(body: bytes) -> list[tuple[int, int, object]]:
    """The `(request_id, status, payload)` items of a reply frame body."""
    # Lists: results go back to users, who expect msgpack arrays as lists.
    items = unpack_untrusted(body, "reply frame")
    if type(items) is not list:
        raise MalformedFrame("reply frame must be an array of [request_id, status, payload]")
    out: list[tuple[int, int, object]] = []
    for item in items:
        if (
            type(item) is not list
            or len(item) != 3
            or not _is_request_id(item[0])
            or type(item[1]) is not int
        ):
            raise MalformedFrame("each reply must be [request_id (0..2**32-1), status, payload]")
        rid, status, payload = item
        if status != STATUS_OK and type(payload) is not str:
            raise MalformedFrame("an error reply's payload must be its message string")
        out.append((rid, status, payload))
    return out
