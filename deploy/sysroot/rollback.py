"""Rollback, undeploy and pin: changes of which deployments boot, and in what order."""

from __future__ import annotations

from dataclasses import dataclass

from . import deployment
from .deployment import Deployment
from .entries import prepare, rewrite, settle, unstage
from .layout import Sysroot, SysrootNotFoundError, SysrootUsageError
from .locking import NO_WAIT, LockPolicy, locked


@dataclass(frozen=True)
class RollbackResult:
    default: Deployment          # the new default
    previous: Deployment         # the default before
    discarded: str | None        # the staged deployment discarded


@dataclass(frozen=True)
class UndeployResult:
    deployment: Deployment       # the one removed
    discarded: str | None        # the staged deployment discarded


@locked
def rollback(sysroot: Sysroot, os_name: str, *, lock: LockPolicy = NO_WAIT) -> RollbackResult:
    """Make the previous deployment the default (or the booted one, when an upgrade
    is pending)."""
    state = prepare(sysroot, os_name)
    if len(state.deployments) < 2:
        raise SysrootNotFoundError("there is no other deployment to roll back to")
    old = state.deployments[0]
    target = state.booted if state.booted is not None and state.booted != old else state.deployments[1]
    discarded = unstage(sysroot, os_name)
    rewrite(sysroot, state, [target] + [d for d in state.deployments if d != target])
    settle(sysroot, os_name)
    return RollbackResult(target, old, discarded)


@locked
def undeploy(sysroot: Sysroot, os_name: str, index: int, *, lock: LockPolicy = NO_WAIT) -> UndeployResult:
    state = prepare(sysroot, os_name)
    dep = state.find(index)
    if dep == state.booted:
        raise SysrootUsageError(f"deployment {index} ({dep.name}) is the booted one; it stays")
    if len(state.deployments) == 1:
        raise SysrootUsageError("refusing to remove the only deployment: nothing would boot")
    discarded = unstage(sysroot, os_name)
    rewrite(sysroot, state, [d for d in state.deployments if d != dep])
    settle(sysroot, os_name)
    return UndeployResult(dep, discarded)


@locked
def pin(sysroot: Sysroot, os_name: str, index: int, pinned: bool = True, *,
        lock: LockPolicy = NO_WAIT) -> Deployment:
    state = prepare(sysroot, os_name)
    dep = state.find(index).with_(pinned=pinned)
    deployment.save(sysroot.dir_of(dep), dep)
    return dep
