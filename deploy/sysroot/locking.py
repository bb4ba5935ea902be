"""The sysroot lock around a change of deployments, and how long a change waits for it."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import wraps
from typing import ParamSpec, TypeVar

from .layout import Sysroot

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class LockPolicy:
    """How long a change waits for another process's lock, and whom it tells that it waits."""
    wait: float = 0.0
    on_wait: Callable[[], None] | None = None


NO_WAIT = LockPolicy()

# The sysroots whose lock this thread holds: a locked change may call another, which
# must not lock again (flock() on a second descriptor would wait for the first).
_held = threading.local()


@contextmanager
def hold(sysroot: Sysroot, policy: LockPolicy) -> Iterator[None]:
    """The sysroot's lock, taken unless this thread holds it already."""
    held: set[str] = _held.__dict__.setdefault("tops", set())
    top = os.path.realpath(sysroot.top)
    if top in held:
        yield
        return
    with sysroot.lock(wait=policy.wait, on_wait=policy.on_wait):
        held.add(top)
        try:
            yield
        finally:
            held.discard(top)


def locked(fn: Callable[P, R]) -> Callable[P, R]:
    """Run a change of deployments (whose first argument is the Sysroot) under the
    sysroot's lock, waiting as its keyword argument `lock` (a LockPolicy) says."""
    @wraps(fn)
    def inner(*args: P.args, **kw: P.kwargs) -> R:
        sysroot = args[0]
        assert isinstance(sysroot, Sysroot)
        policy = kw.get("lock", NO_WAIT)
        assert isinstance(policy, LockPolicy)
        with hold(sysroot, policy):
            return fn(*args, **kw)
    return inner
