"""OpenPGP signatures on commits, through python-gnupg and the real gpg.

A signed commit carries the standard git `gpgsig` header: an armored detached
signature over the commit object without that header, which is what
`git verify-commit` checks.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import gnupg

from .errors import CfsError


class SignatureError(CfsError):
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
        raise SignatureError(f"cannot run gpg: {e}") from None


def sign(data: bytes, key: str, *, homedir: str | None = None) -> str:
    """An armored detached signature of data by key (a key id, fingerprint or user id)."""
    gpg = _gpg(homedir)
    # gpg falls back to another secret key when the asked one is absent: refuse instead.
    secret = gpg.list_keys(secret=True, keys=[key])
    if len(secret) != 1:
        found = "no" if not secret else "more than one"
        raise SignatureError(f"signing with key {key!r} failed: {found} matching secret key")
    result = gpg.sign(data, keyid=secret[0]["fingerprint"], detach=True, clearsign=False)
    if not result or not str(result).startswith("-----BEGIN PGP SIGNATURE-----"):
        status = getattr(result, "status", None) or "no signature produced"
        raise SignatureError(f"signing with key {key!r} failed: {status}")
    return str(result)


def verify(data: bytes, signature: str, *, homedir: str | None = None) -> Signer:
    """Check a detached signature; return who signed, or raise SignatureError."""
    with tempfile.NamedTemporaryFile("w", suffix=".asc") as sig:
        sig.write(signature)
        sig.flush()
        result = _gpg(homedir).verify_data(sig.name, data)
    if not result.valid:
        if result.status == "no public key":
            raise SignatureError(f"signed by unknown key {result.key_id}")
        raise SignatureError(f"bad signature ({result.status or 'invalid'})")
    return Signer(result.fingerprint, result.key_id, result.username or "")

