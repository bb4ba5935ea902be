"""What protects the running boot: the boot hook's record of what it checked.

hooks/cfsdeploy-prepare-root writes /run/cfsdeploy-booted once the root is
prepared, one line:

    deployment=/cfsdeploy/deploy/OS/NAME digest=HEX verity=require|try|off fs-verity=yes|no sealed=yes|no

fs-verity=yes: the kernel measured the image, and overlayfs checks every file
against the digest the image names when it is read.  fs-verity=no: the image's
digest was computed once, at boot, and files are served as the disk holds them.
sealed=yes: the command line (a signed UKI's) named only the image, and the
hook found the deployment by it; hooks older than sealed boots leave it out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum

from ..boot import kargs

RECORD = "/run/cfsdeploy-booted"
RECORD_ENV = "CFSDEPLOY_BOOTED"  # another record, for tests
_KEYS = ("deployment", "digest", "verity", "fs-verity")
_SEALED = "sealed"


class Reason(Enum):
    """Why the files of the running deployment are checked when read, or not."""
    MEASURED = "measured"              # the kernel measured the image; overlayfs checks every file read
    UNMEASURED = "unmeasured"          # the image's digest was checked at boot; files are served as they are
    NO_RECORD = "no_record"            # verity=try, and the boot hook left no record that fs-verity was used
    RECORD_DAMAGED = "record_damaged"  # the boot hook's record is damaged: what this boot checked is unknown


@dataclass(frozen=True)
class BootVerity:
    verified: bool
    reason: Reason
    mode: str                     # the boot's cfsdeploy.verity= (require, try, off)
    record: str                   # the boot hook's record
    message: str | None = None    # what is wrong with the record, for RECORD_DAMAGED

    def to_json(self) -> dict[str, object]:
        return {"verified": self.verified, "reason": self.reason.value, "mode": self.mode, "record": self.record,
                "message": self.message}


def _read_record(path: str) -> dict[str, str] | None:
    """The record's fields; None if there is none; ValueError if it is damaged."""
    try:
        with open(path, "rb") as f:
            data = f.read(4096)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ValueError(e.strerror) from None
    try:
        fields = dict(word.split("=", 1) for word in data.decode().split())
    except (UnicodeDecodeError, ValueError):
        raise ValueError("not KEY=VALUE words") from None
    if (not set(_KEYS) <= set(fields) <= {*_KEYS, _SEALED} or fields["fs-verity"] not in ("yes", "no")
            or fields.setdefault(_SEALED, "no") not in ("yes", "no")):
        raise ValueError(f"expected {', '.join(k + '=' for k in _KEYS)} and {_SEALED}=yes|no")
    return fields


def _of_this_boot(record: dict[str, str], cmdline: list[str], own: kargs.Own | None) -> bool:
    """Whether the record is of the boot the command line made: its deployment and image,
    or, in a sealed boot (no cfsdeploy=), its image."""
    if own is not None:
        return (record["deployment"], record["digest"]) == (own.deployment, own.digest)
    return record[_SEALED] == "yes" and record["digest"] == kargs.value(cmdline, kargs.DIGEST)


def boot_verity(cmdline: list[str]) -> BootVerity:
    """Whether the files of the running deployment are checked when read, and why (not)."""
    path = os.environ.get(RECORD_ENV, RECORD)
    own = kargs.own(cmdline)
    mode = own.verity if own else "require"
    try:
        record = _read_record(path)
    except ValueError as e:
        return BootVerity(False, Reason.RECORD_DAMAGED, mode, path, str(e))
    if record is not None and _of_this_boot(record, cmdline, own):
        measured = record["fs-verity"] == "yes"
    elif mode in ("require", "off"):
        # Without a record (an older hook): require boots only a measured image.
        measured = mode == "require"
    else:
        return BootVerity(False, Reason.NO_RECORD, mode, path)
    return BootVerity(measured, Reason.MEASURED if measured else Reason.UNMEASURED, mode, path)
