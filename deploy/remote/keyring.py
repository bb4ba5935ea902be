"""The trusted keys of a remote: one keyring file, and signature checks against it.

The keyring is a file of binary OpenPGP public keys (what `gpg --export` writes,
like apt's signed-by keyrings and ostree's per-remote trustedkeys.gpg).  Every
key in it is trusted, no more: signatures are checked with `gpgv`, which needs
no trust database, no agent and no writable home directory.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable

from ..repo.signing import SignatureError, SignatureIntegrityError, Signer
from ..util.errors import UsageError
from ..util.fsutil import atomic_write_bytes
from ..util.run import run

ARMOR = b"-----BEGIN PGP "


class KeyringError(SignatureError, UsageError):
    pass


def _gpg(home: str, *args: str, input: bytes | None = None) -> bytes:
    return run(["gpg", "--homedir", home, "--batch", "--no-tty", *args], capture=True, input=input).stdout


def _fingerprints(home: str, path: str) -> list[str]:
    """The primary fingerprints of the public keys in a file; refuses secret keys."""
    out = run(["gpg", "--homedir", home, "--batch", "--no-tty", "--with-colons", "--show-keys", path],
              capture=True, check=False)
    records = [line.split(":") for line in out.stdout.decode(errors="replace").splitlines()]
    if any(r[0] in ("sec", "ssb") for r in records):
        raise KeyringError(f"{path}: holds a secret key", hint="give the public key: gpg --export")
    # A key's fingerprint is the fpr record right after its pub record (subkeys have their own).
    fprs = [r[9] for prev, r in zip([[""], *records], records, strict=False) if r[0] == "fpr" and prev[0] == "pub"]
    if out.returncode != 0 or not fprs:
        raise KeyringError(f"{path}: no OpenPGP public key found")
    return fprs


def import_keys(keyring: str, key_files: Iterable[str]) -> list[str]:
    """Add the public keys of key_files (armored or binary) to the keyring file,
    creating it; returns the fingerprints added.  The keyring is replaced atomically."""
    with tempfile.TemporaryDirectory(prefix="cfsgpg-") as home:
        try:
            with open(keyring, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        added = []
        for name in key_files:
            with open(name, "rb") as f:
                key = f.read()
            if key.lstrip().startswith(ARMOR):
                key = _gpg(home, "--dearmor", input=key)
            binary = os.path.join(home, "key.gpg")
            with open(binary, "wb") as f:
                f.write(key)
            added += _fingerprints(home, binary)
            data += key
        atomic_write_bytes(keyring, data)
    return added


def fingerprints(keyring: str) -> list[str]:
    """The fingerprints of the keys in a keyring file (none if there is no file)."""
    if not os.path.exists(keyring):
        return []
    with tempfile.TemporaryDirectory(prefix="cfsgpg-") as home:
        return _fingerprints(home, keyring)


def verify(keyring: str, data: bytes, signature: str) -> Signer:
    """Check a detached signature of data against the keys of keyring only."""
    if not fingerprints(keyring):
        raise KeyringError("no trusted keys to check the signature with")
    with tempfile.TemporaryDirectory(prefix="cfsgpg-") as home:
        sig = os.path.join(home, "sig.asc")
        with open(sig, "w") as f:
            f.write(signature)
        result = run(["gpgv", "--homedir", home, "--keyring", os.path.abspath(keyring),
                      "--status-fd", "1", sig, "-"], capture=True, check=False, input=data)
    status: dict[str, list[str]] = {}
    for line in result.stdout.decode(errors="replace").splitlines():
        if line.startswith("[GNUPG:] "):
            word, *args = line[9:].split(" ")
            status.setdefault(word, args)
    for word, what in (("EXPKEYSIG", "an expired key"), ("REVKEYSIG", "a revoked key"),
                       ("EXPSIG", "an expired signature")):
        if word in status:
            raise SignatureIntegrityError(f"signed with {what} ({status[word][0]})")
    if "BADSIG" in status:
        raise SignatureIntegrityError(f"bad signature (key {status['BADSIG'][0]})")
    if "NO_PUBKEY" in status or "ERRSIG" in status:
        key = (status.get("NO_PUBKEY") or status["ERRSIG"])[0]
        raise SignatureIntegrityError(f"signed by unknown key {key}")
    if result.returncode != 0 or "GOODSIG" not in status or "VALIDSIG" not in status:
        raise SignatureIntegrityError("no valid signature")
    good, valid = status["GOODSIG"], status["VALIDSIG"]
    # VALIDSIG's tenth field is the primary key's fingerprint (the signing key may be a subkey).
    return Signer(valid[9] if len(valid) > 9 else valid[0], good[0], " ".join(good[1:]))
