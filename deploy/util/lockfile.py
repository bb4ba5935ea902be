"""Exclusive lock files (flock) that writers wait on for a while, then give up clearly."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Callable, Iterator

from .errors import BusyError


class LockedError(BusyError):
    pass


def create(path: str) -> None:
    """A new lock file, which only its owner may open (see hold)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))


@contextlib.contextmanager
def hold(path: str, busy: str, *, wait: float = 0.0,
         on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive flock on `path`, waiting up to `wait` seconds (telling
    `on_wait` once); raise LockedError(`busy`) if it stays taken.  The kernel drops
    the lock when the holder dies, so a killed process never leaves it behind."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        # flock needs only a descriptor, a read-only one too: a lock file others can
        # open is one any local user can hold forever, stopping every update.
        if os.fstat(fd).st_mode & 0o077:
            with contextlib.suppress(PermissionError):  # not ours to change
                os.fchmod(fd, 0o600)
        deadline = time.monotonic() + wait
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
            if time.monotonic() >= deadline:
                raise LockedError(busy)
            if not told and on_wait is not None:
                on_wait()
                told = True
            time.sleep(0.1)
        yield
    finally:
        os.close(fd)
