"""OpenPGP signatures on commits, through python-gnupg and the real gpg.

A signed commit carries the standard git `gpgsig` header: an armored detached
signature over the commit object without that header, which is what
`git verify-commit` checks.  Who made a signature can also be read from the
signature itself (its issuer subpackets, RFC 9580 5.2.3), without gpg and
without trusting it, e.g. to list history.
"""

from __future__ import annotations

import base64
import binascii
import tempfile
from dataclasses import dataclass

import gnupg

from ..util.errors import CfsError, HostError, IntegrityError, UsageError


class SignatureError(CfsError):
    pass


class SignatureUsageError(SignatureError, UsageError):
    pass


class SignatureIntegrityError(SignatureError, IntegrityError):
    pass


class SignatureHostError(SignatureError, HostError):
    pass


@dataclass(frozen=True)
class Signer:
    fingerprint: str
    key_id: str
    username: str


def _gpg(homedir: str | None) -> gnupg.GPG:
    try:
        return gnupg.GPG(gnupghome=homedir) if homedir else gnupg.GPG()
    except (OSError, ValueError) as e:
        raise SignatureHostError(f"cannot run gpg: {e}") from None


def sign(data: bytes, key: str, *, homedir: str | None = None) -> str:
    """An armored detached signature of data by key (a key id, fingerprint or user id)."""
    gpg = _gpg(homedir)
    # gpg falls back to another secret key when the asked one is absent: refuse instead.
    secret = gpg.list_keys(secret=True, keys=[key])
    if len(secret) != 1:
        found = "no" if not secret else "more than one"
        raise SignatureUsageError(f"signing with key {key!r} failed: {found} matching secret key")
    result = gpg.sign(data, keyid=secret[0]["fingerprint"], detach=True, clearsign=False)
    if not result or not str(result).startswith("-----BEGIN PGP SIGNATURE-----"):
        status = getattr(result, "status", None) or "no signature produced"
        raise SignatureUsageError(f"signing with key {key!r} failed: {status}")
    return str(result)


def verify(data: bytes, signature: str, *, homedir: str | None = None) -> Signer:
    """Check a detached signature; return who signed, or raise SignatureError."""
    with tempfile.NamedTemporaryFile("w", suffix=".asc") as sig:
        sig.write(signature)
        sig.flush()
        result = _gpg(homedir).verify_data(sig.name, data)
    if not result.valid:
        if result.status == "no public key":
            raise SignatureIntegrityError(f"signed by unknown key {result.key_id}")
        raise SignatureIntegrityError(f"bad signature ({result.status or 'invalid'})")
    return Signer(result.fingerprint, result.key_id, result.username or "")



@dataclass(frozen=True)
class Issuer:
    """The key a signature says made it (unverified)."""

    key_id: str  # 16 hex digits, upper case
    fingerprint: str | None  # 40 (v4) or 64 (v6) hex digits, when the signature names it


_SIG_TAG = 2
_SUB_ISSUER_KEY_ID = 16
_SUB_ISSUER_FINGERPRINT = 33


def issuer(armored: str) -> Issuer:
    """The issuer of an armored detached OpenPGP signature, from its own packets."""
    try:
        body = _signature_packet(_dearmor(armored))
        return _issuer_of(body)
    except (IndexError, ValueError, binascii.Error):
        raise SignatureIntegrityError("unreadable OpenPGP signature") from None


def _dearmor(armored: str) -> bytes:
    lines = [line.strip() for line in armored.strip().splitlines()]
    if not lines or lines[0] != "-----BEGIN PGP SIGNATURE-----":
        raise ValueError("not an armored signature")
    end = lines.index("-----END PGP SIGNATURE-----")
    start = lines.index("") + 1  # armor headers end at the first blank line
    data = [line for line in lines[start:end] if not line.startswith("=")]  # "=" starts the CRC
    return base64.b64decode("".join(data), validate=True)


def _signature_packet(data: bytes) -> bytes:
    """The body of the first packet, which must be a signature."""
    first = data[0]
    if not first & 0x80:
        raise ValueError("not an OpenPGP packet")
    if first & 0x40:  # new format: tag in 6 bits, then a 1, 2 or 5 byte length
        tag, o = first & 0x3F, data[1]
        if o < 192:
            length, pos = o, 2
        elif o < 224:
            length, pos = ((o - 192) << 8) + data[2] + 192, 3
        elif o == 255:
            length, pos = int.from_bytes(data[2:6], "big"), 6
        else:
            raise ValueError("partial body length in a signature")
    else:  # old format: tag in 4 bits, length size in 2
        tag, size = (first >> 2) & 0x0F, (1, 2, 4)[first & 3]
        length, pos = int.from_bytes(data[1:1 + size], "big"), 1 + size
    if tag != _SIG_TAG or pos + length > len(data):
        raise ValueError("not a signature packet")
    return data[pos:pos + length]


def _issuer_of(body: bytes) -> Issuer:
    version = body[0]
    if version == 3:  # version, 5, type, time(4), key id(8)
        return Issuer(body[7:15].hex().upper(), None)
    if version not in (4, 5, 6):
        raise ValueError(f"signature version {version}")
    width = 4 if version == 6 else 2  # of the subpacket area lengths
    pos = 4
    key_id = fingerprint = None
    for _ in range(2):  # hashed, then unhashed subpackets
        size = int.from_bytes(body[pos:pos + width], "big")
        area, pos = body[pos + width:pos + width + size], pos + width + size
        for kind, value in _subpackets(area):
            if kind == _SUB_ISSUER_KEY_ID and len(value) == 8:
                key_id = key_id or value.hex().upper()
            elif kind == _SUB_ISSUER_FINGERPRINT and len(value) in (21, 33):
                fingerprint = fingerprint or value[1:].hex().upper()
    if fingerprint is not None:
        # A v4 key id is the fingerprint's tail, a v6 one its head.
        key_id = key_id or (fingerprint[-16:] if len(fingerprint) == 40 else fingerprint[:16])
    if key_id is None:
        raise ValueError("the signature names no issuer")
    return Issuer(key_id, fingerprint)


def _subpackets(area: bytes) -> list[tuple[int, bytes]]:
    out = []
    pos = 0
    while pos < len(area):
        o = area[pos]
        if o < 192:
            length, pos = o, pos + 1
        elif o < 255:
            length, pos = ((o - 192) << 8) + area[pos + 1] + 192, pos + 2
        else:
            length, pos = int.from_bytes(area[pos + 1:pos + 5], "big"), pos + 5
        if length == 0 or pos + length > len(area):
            raise ValueError("bad subpacket length")
        out.append((area[pos] & 0x7F, area[pos + 1:pos + length]))  # bit 7: "critical"
        pos += length
    return out
