"""Identity: keys, IDs and signatures must match the Colonies vectors byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import coincurve
import pytest

from protocol.errors import BadSignature, InvalidField
from protocol.identity import (
    HALF_N,
    N,
    PrivateKey,
    id_from_public_key,
    recover_id,
    recover_id_hex,
    recover_public_key,
    sha3_256,
    sha3_256_hex,
)

VECTORS = json.loads((Path(__file__).parent / "data" / "identity.json").read_text())
SIG = VECTORS["signatures"][0]


def test_sha3_is_fips202_not_keccak():
    v = VECTORS["sha3_256"]
    assert sha3_256_hex(v["input"].encode()) == v["digest"]


@pytest.mark.parametrize("ident", VECTORS["identities"], ids=lambda v: v["id"][:8])
def test_identity_vectors(ident):
    key = PrivateKey.from_hex(ident["prvkey"])
    assert key.hex == ident["prvkey"]
    assert key.secret == bytes.fromhex(ident["prvkey"])
    assert key.public_key.hex() == ident["pubkey"]
    assert len(key.public_key) == 65 and key.public_key[0] == 4
    assert key.id == ident["id"]
    assert id_from_public_key(bytes.fromhex(ident["pubkey"])) == ident["id"]


@pytest.mark.parametrize("vec", VECTORS["signatures"], ids=lambda v: v["id"][:8])
def test_signature_vectors(vec):
    key = PrivateKey.from_hex(vec["prvkey"])
    msg = vec["message"].encode()
    assert key.id == vec["id"]
    assert key.sign_hex(msg) == vec["signature_deterministic"]
    assert key.sign(msg) == bytes.fromhex(vec["signature_deterministic"])
    for sig_hex in (vec["signature_deterministic"], vec["signature_other_valid"]):
        assert recover_id_hex(msg, sig_hex) == vec["id"]
        assert recover_id(msg, bytes.fromhex(sig_hex)) == vec["id"]
        assert recover_public_key(msg, bytes.fromhex(sig_hex)) == key.public_key


def test_signatures_are_low_s_with_v_0_or_1():
    for _ in range(50):
        key = PrivateKey.generate()
        sig = key.sign(b"some payload")
        assert len(sig) == 65
        assert sig[64] in (0, 1)
        assert 0 < int.from_bytes(sig[32:64], "big") <= HALF_N
        assert recover_id(b"some payload", sig) == key.id


def test_other_message_recovers_other_id():
    key = PrivateKey.from_hex(SIG["prvkey"])
    sig = key.sign(b"hello")
    assert recover_id(b"hellp", sig) != key.id


def _high_s(sig: bytes) -> bytes:
    s = int.from_bytes(sig[32:64], "big")
    return sig[:32] + (N - s).to_bytes(32, "big") + bytes([sig[64] ^ 1])


def test_high_s_is_refused():
    sig = bytes.fromhex(SIG["signature_deterministic"])
    high = _high_s(sig)
    # The malleated signature is mathematically valid for the same key ...
    pub = coincurve.PublicKey.from_signature_and_message(high, sha3_256(b"hello"), hasher=None)
    assert pub.format(compressed=False).hex() == PrivateKey.from_hex(SIG["prvkey"]).public_key.hex()
    # ... and Colonies refuses it, so we do too.
    with pytest.raises(BadSignature, match="high-S"):
        recover_id(b"hello", high)
    with pytest.raises(BadSignature):
        recover_id_hex(b"hello", high.hex())


@pytest.mark.parametrize(
    "sig",
    [
        b"",
        b"\x00" * 64,
        b"\x00" * 66,
        bytes.fromhex(SIG["signature_deterministic"])[:-1],
        bytes.fromhex(SIG["signature_deterministic"]) + b"\x00",
    ],
    ids=["empty", "64", "66", "truncated", "extended"],
)
def test_wrong_length_signatures(sig):
    with pytest.raises(BadSignature, match="65 bytes"):
        recover_id(b"hello", sig)


def _with(sig: bytes, r: int | None = None, s: int | None = None, v: int | None = None) -> bytes:
    rb = sig[:32] if r is None else r.to_bytes(32, "big")
    sb = sig[32:64] if s is None else s.to_bytes(32, "big")
    vb = sig[64:] if v is None else bytes([v])
    return rb + sb + vb


GOOD = bytes.fromhex(SIG["signature_deterministic"])


@pytest.mark.parametrize(
    "sig, why",
    [
        (_with(GOOD, v=2), "recovery id"),
        (_with(GOOD, v=27), "recovery id"),
        (_with(GOOD, r=0), "r out of range"),
        (_with(GOOD, r=N), "r out of range"),
        (_with(GOOD, r=2**256 - 1), "r out of range"),
        (_with(GOOD, s=0), "s out of range"),
        (_with(GOOD, s=HALF_N + 1), "s out of range"),
        (_with(GOOD, s=N), "s out of range"),
    ],
)
def test_out_of_range_signatures(sig, why):
    with pytest.raises(BadSignature, match=why):
        recover_id(b"hello", sig)


def test_signature_that_does_not_recover():
    # r = 5 is not the x coordinate of any curve point, so nothing recovers.
    sig = _with(GOOD, r=5)
    with pytest.raises(BadSignature, match="does not recover"):
        recover_id(b"hello", sig)


@pytest.mark.parametrize(
    "sig_hex",
    [
        "",
        "zz" * 65,
        SIG["signature_deterministic"][:-2],
        " " + SIG["signature_deterministic"][1:],
        SIG["signature_deterministic"] + "00",
        None,
        12,
    ],
)
def test_bad_hex_signatures(sig_hex):
    with pytest.raises(BadSignature):
        recover_id_hex(b"hello", sig_hex)


def test_hex_signature_is_case_insensitive():
    assert recover_id_hex(b"hello", SIG["signature_deterministic"].upper()) == SIG["id"]


@pytest.mark.parametrize(
    "prv",
    [
        "",
        "00" * 32,  # zero
        f"{N:064x}",  # n
        f"{N + 1:064x}",
        "ff" * 32,
        "0" * 63,
        "0" * 65,
        "g" * 64,
        " " * 2 + "1" * 62,
        "11 " * 21 + "1",
        None,
        b"\x01" * 32,
    ],
)
def test_bad_private_keys(prv):
    with pytest.raises(InvalidField, match="private key"):
        PrivateKey.from_hex(prv)


def test_private_key_bounds_accepted():
    assert PrivateKey.from_hex(f"{1:064x}").id
    assert PrivateKey.from_hex(f"{N - 1:064x}").id
    # Upper case is the same key.
    k = PrivateKey.from_hex(SIG["prvkey"].upper())
    assert k.id == SIG["id"] and k.hex == SIG["prvkey"]


def test_bad_private_key_bytes():
    with pytest.raises(InvalidField):
        PrivateKey(b"\x01" * 31)
    with pytest.raises(InvalidField):
        PrivateKey(N.to_bytes(32, "big"))


def test_repr_never_shows_the_secret():
    key = PrivateKey.from_hex(SIG["prvkey"])
    for text in (repr(key), str(key), f"{key}", f"{key!r}"):
        assert SIG["prvkey"] not in text
        assert SIG["id"] in text


def test_generate_gives_distinct_valid_keys():
    a, b = PrivateKey.generate(), PrivateKey.generate()
    assert a.id != b.id
    assert PrivateKey.from_hex(a.hex).id == a.id


def test_id_from_public_key_rejects_non_uncompressed_keys():
    pub = bytes.fromhex(VECTORS["identities"][0]["pubkey"])
    with pytest.raises(InvalidField):
        id_from_public_key(pub[:33])
    with pytest.raises(InvalidField):
        id_from_public_key(b"\x02" + pub[1:])
