"""Editing the default deployment's kernel command line."""

from __future__ import annotations

from dataclasses import dataclass

from ..boot import kargs
from . import deployment
from .deployment import Deployment
from .entries import prepare, rewrite, settle, unstage
from .layout import Sysroot, SysrootNotFoundError, SysrootUsageError
from .locking import NO_WAIT, LockPolicy, locked


@dataclass(frozen=True)
class KargsResult:
    deployment: Deployment       # the default, with its new kernel arguments
    discarded: str | None        # the staged deployment discarded


@locked
def set_kargs(sysroot: Sysroot, os_name: str, *, append: tuple[str, ...] = (), delete: tuple[str, ...] = (),
              replace: tuple[str, ...] = (), lock: LockPolicy = NO_WAIT) -> KargsResult:
    """Edit the default deployment's kernel arguments (a new entry set, switched atomically)."""
    state = prepare(sysroot, os_name)
    if state.default is None:
        raise SysrootNotFoundError(f"os {os_name!r} has no deployment")
    if state.default.sealed is not None:
        raise SysrootUsageError(f"the default deployment {state.default.name} is sealed: its kernel command "
                                "line is its UKI's, signed")
    dep = state.default.with_(kargs=kargs.edit(state.default.kargs, append=append, delete=delete,
                                               replace=replace))
    discarded = unstage(sysroot, os_name)
    deployment.save(sysroot.dir_of(dep), dep)
    state.deployments[0] = dep
    rewrite(sysroot, state, state.deployments)
    settle(sysroot, os_name)
    return KargsResult(dep, discarded)
