"""Cleanup: deployments beyond the retention, then kernels and objects nothing needs."""

from __future__ import annotations

from dataclasses import dataclass

from ..boot.bootloader import Kind
from ..repo.repository import prune
from .entries import prepare, retain, rewrite, settle
from .layout import Sysroot
from .locking import NO_WAIT, LockPolicy, locked


@dataclass
class CleanupResult:
    deployments: list[str]
    kernels: list[str]
    objects: int
    bytes_freed: int


@locked
def cleanup(sysroot: Sysroot, os_name: str, *, prune_objects: bool = True,
            lock: LockPolicy = NO_WAIT) -> CleanupResult:
    """Drop deployments beyond the retention (never the default, booted or pinned),
    then kernels and objects nothing needs."""
    state = prepare(sysroot, os_name)
    kept = retain(state, sysroot, new_default=False)
    dropped = [d.name for d in state.deployments if d not in kept]
    if dropped or state.broken or any(d.kind == Kind.ENTRY for d in state.damaged):
        rewrite(sysroot, state, kept)
    _, kernels = settle(sysroot, os_name)
    removed, freed = 0, 0
    if prune_objects:
        with sysroot.repo.lock(wait=60):
            r = prune(sysroot.repo)
        removed, freed = r.removed, r.bytes_freed
    return CleanupResult(dropped, kernels, removed, freed)
