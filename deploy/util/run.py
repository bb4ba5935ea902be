"""The one way cfsdeploy runs external commands.

Every subprocess goes through run() so that failures become one-line CommandErrors
naming the command, its exit status and what it last said on stderr.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence

from .errors import CommandError, CommandHostError

# Debian packages providing the commands cfsdeploy runs, for "command not found" hints.
_PACKAGES = {
    "getfacl": "acl",
    "setfacl": "acl",
    "mkfs.erofs": "erofs-utils",
    "fsck.erofs": "erofs-utils",
    "mkcomposefs": "composefs",
    "fsverity": "fsverity",
    "modprobe": "kmod",
    "gpg": "gnupg",
    "gpgv": "gpgv",
    "sfdisk": "fdisk",
    "wipefs": "util-linux",
    "losetup": "mount",
    "mount": "mount",
    "umount": "mount",
    "findmnt": "util-linux",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "mkfs.ext4": "e2fsprogs",
    "mkfs.xfs": "xfsprogs",
    "dd": "coreutils",
    "sync": "coreutils",
    "fallocate": "util-linux",
    "objcopy": "binutils",
    "sbsign": "sbsigntool",
    "sbverify": "sbsigntool",
}

Arg = str | bytes | os.PathLike[str] | os.PathLike[bytes]


def _last_line(data: bytes) -> str:
    for line in reversed(data.splitlines()):
        if line.strip():
            return line.strip().decode("utf-8", "replace")
    return ""


def _status(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def run(
    argv: Sequence[Arg],
    *,
    check: bool = True,
    capture: bool = False,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Arg | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run argv and return its CompletedProcess (stdout set only if capture).

    stderr is always captured so a failure can quote it; without capture it is
    forwarded to our stderr afterwards so warnings are not lost.  stdin is
    /dev/null unless input is given.  A nonzero exit raises CommandError when
    check is set; a missing command or a timeout always does.
    """
    args = [os.fspath(a) for a in argv]
    if not args:
        raise CommandError("run: empty command")
    name = os.fsdecode(os.path.basename(args[0]))
    try:
        proc = subprocess.run(
            args,
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            timeout=timeout,
        )
    except FileNotFoundError as e:
        if cwd is not None and e.filename == os.fspath(cwd):
            raise CommandError(f"{name}: working directory {os.fsdecode(e.filename)} not found") from None
        package = package_of(name)
        raise CommandHostError(f"{name}: command not found",
                               hint=f"install package {package}?" if package else None) from None
    except subprocess.TimeoutExpired as e:
        raise CommandError(f"{name}: timed out after {e.timeout:g} s") from None
    except OSError as e:
        raise CommandHostError(f"{name}: cannot run: {e.strerror}") from None

    if not capture and proc.stderr:
        sys.stderr.write(proc.stderr.decode("utf-8", "replace"))
        sys.stderr.flush()
    if check and proc.returncode != 0:
        message = f"{name}: {_status(proc.returncode)}"
        if last := _last_line(proc.stderr):
            message += f": {last}"
        raise CommandError(message)
    return proc


def package_of(command: str) -> str | None:
    """The Debian package providing command, when known."""
    return _PACKAGES.get(command)


def which(name: str) -> str | None:
    """The path of an executable on PATH, or None."""
    return shutil.which(name)
