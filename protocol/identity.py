"""Colonies-compatible identities: secp256k1 keys, IDs, and recoverable signatures.

- ID = hex(SHA3-256(ascii(lowercase hex of the 65-byte uncompressed public key))); the hash is
  taken of the 130-character hex string, not of the raw key bytes (as Colonies does).
- A signature is 65 bytes r||s||v (v in {0, 1}), RFC6979 deterministic and low-S, over
  SHA3-256(data). SHA3 is FIPS-202 (hashlib.sha3_256), not Keccak.
- Verifying means recovering the public key and deriving the ID; authorization then decides
  whether that ID may do the call. High-S signatures are refused, as Colonies refuses them
  (libsecp256k1's recovery would accept them, which makes signatures malleable).
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache

import coincurve

from protocol.errors import BadSignature, InvalidField

# Order of the secp256k1 group.
N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
HALF_N = N // 2
SIGNATURE_BYTES = 65

_PRV_HEX = re.compile(r"[0-9a-fA-F]{64}")
_SIG_HEX = re.compile(r"[0-9a-fA-F]{130}")


def sha3_256(data: bytes) -> bytes:
    return hashlib.sha3_256(data).digest()


def sha3_256_hex(data: bytes) -> str:
    return hashlib.sha3_256(data).hexdigest()


# Recovery is the hot path and most requests come from a few callers, so the second hash
# (over the 130-character hex of the key) is worth remembering. Bounded: keys are attacker
# chosen.
@lru_cache(maxsize=4096)
def id_from_public_key(pub65: bytes) -> str:
    """The Colonies ID of a 65-byte uncompressed public key."""
    if len(pub65) != 65 or pub65[0] != 4:
        raise InvalidField("public key must be 65 bytes, uncompressed (0x04||X||Y)")
    return hashlib.sha3_256(pub65.hex().encode("ascii")).hexdigest()


class PrivateKey:
    """A secp256k1 private key. Its repr shows only the ID, so logs never carry the secret."""

    __slots__ = ("_key", "_public_key", "_id")

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes) or len(secret) != 32:
            raise InvalidField("private key must be exactly 32 bytes")
        d = int.from_bytes(secret, "big")
        if not 0 < d < N:
            raise InvalidField("private key out of range: it must be between 1 and n-1")
        self._key = coincurve.PrivateKey(secret)
        self._public_key = self._key.public_key.format(compressed=False)
        self._id = id_from_public_key(self._public_key)

    @classmethod
    def generate(cls) -> PrivateKey:
        return cls(coincurve.PrivateKey().secret)

    @classmethod
    def from_hex(cls, s: str) -> PrivateKey:
        # A regex, not just bytes.fromhex, which would accept spaces and other lengths.
        if not isinstance(s, str) or not _PRV_HEX.fullmatch(s):
            raise InvalidField("private key must be exactly 64 hex characters")
        return cls(bytes.fromhex(s))

    @property
    def secret(self) -> bytes:
        return self._key.secret

    @property
    def hex(self) -> str:
        return self._key.secret.hex()

    @property
    def public_key(self) -> bytes:
        return self._public_key

    @property
    def id(self) -> str:
        return self._id

    def sign(self, data: bytes) -> bytes:
        """65-byte r||s||v over SHA3-256(data); libsecp256k1 gives RFC6979 and low-S.

        v is 2 or 3 only when R.x >= n, with probability about 2**-127; it is not handled.
        """
        return self._key.sign_recoverable(sha3_256(data), hasher=None)

    def sign_hex(self, data: bytes) -> str:
        return self.sign(data).hex()

    def __repr__(self) -> str:
        return f"PrivateKey(id={self._id})"


def recover_public_key(data: bytes, signature: bytes) -> bytes:
    """The 65-byte public key that made `signature` over `data`, or BadSignature."""
    if not isinstance(signature, bytes | bytearray) or len(signature) != SIGNATURE_BYTES:
        raise BadSignature("signature must be exactly 65 bytes (r||s||v)")
    v = signature[64]
    if v > 1:
        raise BadSignature("signature recovery id v must be 0 or 1")
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:64], "big")
    if not 0 < r < N:
        raise BadSignature("signature r out of range")
    if not 0 < s <= HALF_N:
        raise BadSignature("signature s out of range (high-S signatures are refused)")
    try:
        pub = coincurve.PublicKey.from_signature_and_message(
            bytes(signature), sha3_256(data), hasher=None
        )
    except ValueError as e:
        raise BadSignature("signature does not recover a public key") from e
    return pub.format(compressed=False)


def recover_id(data: bytes, signature: bytes) -> str:
    """The Colonies ID of whoever signed `data`, or BadSignature."""
    return id_from_public_key(recover_public_key(data, signature))


def recover_id_hex(data: bytes, sig_hex: str) -> str:
    """As recover_id, with the signature as 130 hex characters (the Colonies wire form)."""
    if not isinstance(sig_hex, str) or not _SIG_HEX.fullmatch(sig_hex):
        raise BadSignature("signature must be exactly 130 hex characters")
    return recover_id(data, bytes.fromhex(sig_hex))
