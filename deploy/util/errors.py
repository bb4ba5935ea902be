"""Typed errors raised by the library; the CLI turns them into one-line messages."""

from __future__ import annotations


class CfsError(Exception):
    """Base class of every error cfsdeploy reports to a user."""

    exit_code = 1


class DumpfileError(CfsError):
    """A composefs dumpfile (manifest) is malformed."""

    def __init__(self, message: str, line: int | None = None) -> None:
        self.line = line
        super().__init__(f"line {line}: {message}" if line is not None else message)


class TreeError(CfsError):
    """A tree cannot be represented (bad names, hardlinks, sizes...)."""


class ImageError(CfsError):
    """A composefs/EROFS image is corrupt, hostile or unsupported."""


class VerityError(CfsError):
    """fs-verity is unavailable or a digest does not match."""


class MountError(CfsError):
    """Mounting an image failed."""


class CommandError(CfsError):
    """An external command failed."""
