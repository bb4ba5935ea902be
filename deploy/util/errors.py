"""Typed errors raised by the library; the CLI turns them into one-line messages.

Every error is a CfsError.  What the caller should do about it is its *group*, one
class each below with its own exit code (README, "Exit codes"):

    UsageError      2  the request itself is wrong: a bad value or name, conflicting options
    NotFoundError   3  no such commit, ref, remote, os, deployment or file
    IntegrityError  4  a signature, digest, binding or record does not check out
    BusyError       5  another process holds the lock
    HostError       6  the host lacks something: a tool, a kernel feature, space

A CfsError in no group exits 1 (anything else: a network failure, a failing command).

One mechanism puts an error in a group: inheritance.  A module's error class (RemoteError,
SysrootError, ...) keeps its name, so callers may catch everything a module raises.  When
all its errors are of one group, the class inherits that group (KargsError is a
UsageError).  When they differ, the module class stays out of every group and has one
subclass per group it needs, named module stem + group: RemoteNotFoundError(RemoteError,
NotFoundError), RemoteUsageError(RemoteError, UsageError).  A class is in at most one
group (a test checks it), so its exit code is never ambiguous.

Messages say what is wrong in the library's terms; what to do about it in the CLI's
terms (a flag, a command to run) goes in `hint`, which the CLI shows after the message.
"""

from __future__ import annotations


class CfsError(Exception):
    """Base class of every error cfsdeploy reports to a user."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class UsageError(CfsError):
    """The request itself is wrong: a bad value or name, options that exclude each other."""

    exit_code = 2


class NotFoundError(CfsError):
    """What the request names does not exist: a commit, ref, remote, os, deployment, file."""

    exit_code = 3


class IntegrityError(CfsError):
    """A signature, digest, binding or record does not check out: corrupt, tampered, damaged."""

    exit_code = 4


class BusyError(CfsError):
    """Another process holds what the request needs; trying again later may work."""

    exit_code = 5


class HostError(CfsError):
    """The host lacks something: a tool, a kernel feature, a permission, disk space."""

    exit_code = 6


GROUPS: tuple[type[CfsError], ...] = (UsageError, NotFoundError, IntegrityError, BusyError, HostError)


class DumpfileError(CfsError):
    """A composefs dumpfile (manifest) is malformed."""

    def __init__(self, message: str, line: int | None = None, *, hint: str | None = None) -> None:
        self.line = line
        super().__init__(f"line {line}: {message}" if line is not None else message, hint=hint)


class TreeError(CfsError):
    """A tree cannot be represented (bad names, hardlinks, sizes...)."""


class ImageError(CfsError):
    """A composefs/EROFS image cannot be written or read."""


class CorruptImageError(ImageError, IntegrityError):
    """A composefs/EROFS image is corrupt, hostile or unsupported."""


class VerityError(CfsError):
    """fs-verity cannot be computed, enabled or measured."""


class VerityHostError(VerityError, HostError):
    """The kernel or filesystem lacks fs-verity."""


class VerityUsageError(VerityError, UsageError):
    """fs-verity was asked of what cannot have it."""


class MountError(HostError):
    """Mounting an image failed."""


class CommandError(CfsError):
    """An external command failed."""


class CommandHostError(CommandError, HostError):
    """An external command is missing or cannot be run."""
