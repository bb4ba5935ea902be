"""Finalizing the staged deployment, at shutdown."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from enum import Enum

from ..boot.bootloader import Kernel
from ..util.fsutil import exchange, fsync_dir, remove_tree, syncfs
from . import staged
from .commit import Commit, load_commit
from .deployment import Deployment
from .entries import make_etc, new_entry, prepare, switch_in
from .etcmerge import MergeReport
from .layout import Sysroot, staged_deployment
from .locking import NO_WAIT, LockPolicy, locked
from .staged import Staged


class DiscardReason(Enum):
    """Why a staged record was discarded instead of finalized."""
    STALE = "stale"                      # staged during an earlier boot that ended without finalizing it
    OS_GONE = "os_gone"                  # its os is gone from the sysroot
    DEPLOYMENT_GONE = "deployment_gone"  # its deployment directory is gone
    KERNEL_GONE = "kernel_gone"          # its kernel directory is gone from the boot directory


@dataclass
class FinalizeResult:
    staged: Staged
    deployment: Deployment | None    # None: the record was discarded instead (see `discarded`)
    index: int = 0
    # None: the /etc merged at staging was kept (its merge source is gone when
    # staged.merge_from is not None).
    etc: MergeReport | None = None
    merged_from: Deployment | None = None
    removed: list[str] = field(default_factory=list)
    discarded: DiscardReason | None = None


@locked
def finalize_staged(sysroot: Sysroot, *, lock: LockPolicy = NO_WAIT) -> FinalizeResult | None:
    """Make the staged deployment bootable, as deploy would have at staging: /etc merged
    again from the merge source's /etc as it is now, then the entries switched by the
    same retention rule.  None when nothing is staged.

    The record goes just before the switch, so a crash leaves the old entries and a
    leftover directory, or the new entries; a rerun redoes or discards it cleanly."""
    damaged = sysroot.damaged_staged()
    if damaged is not None:
        where = sysroot.set_aside(damaged, move=True)
        raise staged.StagedError(f"{damaged.path}: {damaged.reason}: moved to {where}; nothing is finalized")
    rec = staged.load(sysroot.top)
    if rec is None:
        return None
    known = rec.os in sysroot.os_names()
    dep = staged_deployment(sysroot, rec) if known else None
    why = _unusable(sysroot, rec, dep, known)
    if why is not None:
        staged.remove(sysroot.top)
        if known:
            prepare(sysroot, rec.os)
        return FinalizeResult(rec, None, discarded=why)
    assert dep is not None
    state = prepare(sysroot, rec.os)
    merge_dep = next((d for d in state.deployments if d.name == rec.merge_from), None)
    report = None
    if merge_dep is not None:
        c = load_commit(sysroot.repo, dep.commit, dep.kernel_version)
        report = _remake_etc(sysroot, c, merge_dep, dep)
    staged.remove(sysroot.top)
    entry = new_entry(dep, Kernel(rec.os, rec.kernel), rec.title, rec.verity, rec.tries)
    index, removed = switch_in(sysroot, state, dep, entry, rec.default)
    return FinalizeResult(rec, dep, index, report, merge_dep, removed)


def _unusable(sysroot: Sysroot, rec: Staged, dep: Deployment | None, known_os: bool) -> DiscardReason | None:
    """Why a staged record cannot be finalized, if it cannot."""
    if rec.stale:
        return DiscardReason.STALE
    if not known_os:
        return DiscardReason.OS_GONE
    if dep is None:
        return DiscardReason.DEPLOYMENT_GONE
    if not os.path.isdir(os.path.join(sysroot.boot, Kernel(rec.os, rec.kernel).relpath)):
        return DiscardReason.KERNEL_GONE
    return None


def _remake_etc(sysroot: Sysroot, c: Commit, merge_dep: Deployment, dep: Deployment) -> MergeReport:
    """Merge /etc again aside, then exchange it for the deployment's in one step, so the
    deployment has a whole /etc at every moment.  What is left aside (the old one, or
    a half-made one after a crash) is a leftover the next settle removes."""
    os_dir = sysroot.os_dir(dep.os)
    aside = tempfile.mkdtemp(prefix=f".{dep.name}.etc.", dir=os_dir)
    report = make_etc(sysroot, c, merge_dep, os.path.join(aside, "etc"))
    syncfs(aside)
    exchange(os.path.join(aside, "etc"), os.path.join(sysroot.dir_of(dep), "etc"))
    fsync_dir(sysroot.dir_of(dep))
    fsync_dir(aside)
    remove_tree(aside)
    return report
