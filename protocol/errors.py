"""Typed errors. Every error carries a Colonies status code and a message a person can act on.

Status codes follow Colonies: 400 bad input or illegal state change, 403 signature or role,
404 not found (and "nothing to assign"), 408 timed out, 500 internal, 503 unavailable.
"""

from __future__ import annotations


class ColoniesError(Exception):
    """Base of every error that crosses the wire. `status` is the Colonies status code."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_wire(self) -> tuple[int, str]:
        return (self.status, self.message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.message!r})"


class BadRequest(ColoniesError):
    status = 400


class Forbidden(ColoniesError):
    status = 403


class NotFound(ColoniesError):
    status = 404


class RequestTimeout(ColoniesError):
    status = 408


class InternalError(ColoniesError):
    status = 500


class Unavailable(ColoniesError):
    status = 503


# Decoding and framing (400).
class MalformedFrame(BadRequest):
    """A frame that is truncated, not msgpack or not shaped as the protocol says."""


class FrameTooLarge(BadRequest):
    """A frame whose declared length exceeds the hard maximum."""


class UnknownMessageType(BadRequest):
    """A message type that this node does not serve."""


class InvalidField(BadRequest):
    """A missing, ill-typed or out-of-range field."""


# Envelope checks (403).
class BadSignature(Forbidden):
    """A signature that is not 65 bytes, does not recover, or is high-S."""


class ExpiredEnvelope(Forbidden):
    """An envelope whose expiry has passed, or lies further ahead than the window allows."""


class WrongAudience(Forbidden):
    """An envelope addressed to another cluster."""


class ReplayedEnvelope(Forbidden):
    """A write whose nonce was already used within its expiry window."""


class AccessDenied(Forbidden):
    """The caller's identity does not hold the role the call needs."""


_BY_STATUS: dict[int, type[ColoniesError]] = {
    400: BadRequest,
    403: Forbidden,
    404: NotFound,
    408: RequestTimeout,
    500: InternalError,
    503: Unavailable,
}


def error_from_wire(status: int, message: str) -> ColoniesError:
    """Rebuild a typed error from a reply's (status, message); unknown codes become 500."""
    cls = _BY_STATUS.get(status, InternalError)
    return cls(message)
