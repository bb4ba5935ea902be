"""Exclusive lock files (flock) that writers wait on for a while, then give up clearly."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from typing import Callable, Iterator

from .errors import CfsError


class LockedError(CfsError):
    pass


@contextlib.contextmanager
def hold(path: str, busy: str, *, wait: float = 0.0,
         on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive flock on `path`, waiting up to `wait` seconds (telling
    `on_wait` once); raise LockedError(`busy`) if it stays taken.  The kernel drops
    the lock when the holder dies, so a killed process never leaves it behind."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
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
