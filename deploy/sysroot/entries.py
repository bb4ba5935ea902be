"""What every change of the entries shares: writing, switching and settling them, the
retention rule, and recovering what an interrupted run left.

Every change follows one order, so a crash at any point leaves a bootable machine:
everything a new set of boot entries names (image, kernel, deployment directory) is
written and synced first, then the entries switch in one atomic exchange, and only
then is what the old set alone named removed.  Whatever an interrupted run left
is garbage no entry names, removed by the next run under the lock.

A staged deployment (deploy(stage=True)) stops before the switch; finalize_staged
merges its /etc again and does the switch, at shutdown.  Any other change of the
entries discards it first: it was made against entries that no longer hold.
"""

from __future__ import annotations

import os
from typing import BinaryIO

import pygit2

from ..boot import bootloader, kargs
from ..boot.bootloader import BootEntry, Damaged, Kernel, Kind, Repair, RepairKind
from ..composefs import dumpfile, fsverity
from ..composefs.tree import Inode, lookup
from ..repo.repository import Repository
from ..util.errors import CfsError
from . import bydigest, deployment, staged
from .commit import (
    ETC_PATHS,
    Commit,
    DeployIntegrityError,
    check_seal,
    load_commit,
    manifest_data,
    sealed_uki,
)
from .deployment import Deployment
from .etcmerge import MergeReport, merge_etc
from .layout import State, Sysroot
from .locking import NO_WAIT, LockPolicy, locked
from .staged import Staged

DEPLOY_REF = "refs/deployments"


def options(dep: Deployment, verity: str) -> str:
    """An entry's options: the deployment's kernel arguments, then cfsdeploy's own."""
    return " ".join(dep.kargs + kargs.Own(dep.path, dep.image_digest, verity).args())


def new_entry(dep: Deployment, kernel: Kernel, title: str, verity: str, tries: int | None) -> BootEntry:
    """A new deployment's entry; `tries` puts it on trial (boot counting).  A sealed
    one names its UKI alone: the command line is the UKI's."""
    if dep.sealed is not None:
        return BootEntry(os=dep.os, index=0, title=title, linux=None, initrd=None, options=None,
                         tries_left=tries or None, efi=kernel.efi)
    return BootEntry(os=dep.os, index=0, title=title, linux=kernel.linux, initrd=kernel.initrd,
                     options=options(dep, verity), tries_left=tries or None)


def rewrite(sysroot: Sysroot, state: State, order: list[Deployment],
            new_entries: dict[str, BootEntry] | None = None,
            verity: dict[str, str] | None = None) -> list[BootEntry]:
    """Switch the os's entries to `order`, keeping each kept entry's fields and
    counters; `verity` changes the cfsdeploy.verity= of deployments it names."""
    by_name = {d.name: e for d, e in zip(state.deployments, state.entries, strict=True)}
    by_name.update(new_entries or {})
    set_aside_entries(sysroot, state)
    return bootloader.switch_entries(sysroot.boot, state.os,
                                     [refresh(by_name[d.name], d, (verity or {}).get(d.name)) for d in order],
                                     sysroot.switch_record)


def set_aside_entries(sysroot: Sysroot, state: State) -> None:
    """Before a switch drops them: copy aside the entries that failed to parse or name no
    usable deployment, where they might name a deployment directory that exists, which
    then stays (with the kernels they name)."""
    present = [n for n in sysroot.directories(state.os) if deployment.is_name(n)]
    directory = os.path.join(sysroot.boot, bootloader.ENTRIES)
    drop = [d for d in state.damaged if d.kind == Kind.ENTRY]
    drop += [Damaged(Kind.ENTRY, os.path.join(directory, e.filename), why, e.render()) for e, why in state.broken]
    for d in drop:
        if d.mentions(present):
            sysroot.set_aside(d)


def refresh(e: BootEntry, dep: Deployment, verity: str | None) -> BootEntry:
    """The entry with the deployment's current kernel arguments (a sealed one has none
    of its own: it stays as it is)."""
    if e.options is None:
        return e
    own = kargs.own(kargs.split(e.options))
    verity = verity or (own.verity if own else "require")
    return BootEntry(e.os, e.index, e.title, e.linux, e.initrd, options(dep, verity),
                     e.tries_left, e.tries_done)


def title_of(release: dict[str, str], version: str | None, os_name: str) -> str:
    """The entry's title, from the commit's os-release and version: text of the commit,
    so made one plain line."""
    name = bootloader.clean_title(release.get("PRETTY_NAME") or release.get("NAME") or "") or os_name
    version = bootloader.clean_title(version or "")
    if version and version not in name:
        name += f" {version}"
    return bootloader.clean_title(f"{name[:150]} (cfsdeploy {os_name})")


def kernels_of(state: State) -> list[Kernel]:
    return [k for e in state.entries if (k := bootloader.kernel_of(e)) is not None]


def set_ref(repo: Repository, dep: Deployment) -> None:
    with repo.lock(wait=60):
        repo.git.references.create(f"{DEPLOY_REF}/{dep.os}/{dep.name}", pygit2.Oid(hex=dep.commit), force=True)


def drop_refs(repo: Repository, os_name: str, keep: set[str]) -> None:
    prefix = f"{DEPLOY_REF}/{os_name}/"
    with repo.lock(wait=60):
        for name in list(repo.git.references):
            if name.startswith(prefix) and name[len(prefix):] not in keep:
                repo.git.references.delete(name)


def settle(sysroot: Sysroot, os_name: str) -> tuple[State, list[str]]:
    """After a switch: remove what neither an entry nor the staged record names any
    more; return the new state and the kernels removed."""
    rec = load_staged(sysroot)
    if rec is not None and rec.stale:
        staged.remove(sysroot.top)
        rec = None
    state = sysroot.state(os_name)
    mine = rec if rec is not None and rec.os == os_name else None
    sysroot.remove_strays(state, mine.name if mine else None)
    bydigest.prune(sysroot.top)
    kept = state.kept_by(sysroot.directories(os_name))
    kernels = bootloader.remove_unused_kernels(sysroot.boot, os_name, kernels_of(state) + (
        [Kernel(os_name, mine.kernel)] if mine else []) + [Kernel(os_name, k) for k in kept])
    drop_refs(sysroot.repo, os_name, {d.name for d in state.deployments} | ({mine.name} if mine else set()) | kept)
    return state, kernels


def load_staged(sysroot: Sysroot) -> Staged | None:
    """The staged record (under the lock); a damaged one is moved aside, never acted on."""
    damaged = sysroot.damaged_staged()
    if damaged is not None:
        sysroot.set_aside(damaged, move=True)
    return staged.load(sysroot.top)


def prepare(sysroot: Sysroot, os_name: str) -> State:
    """Under the lock, before a change: finish or clear what interrupted runs left."""
    recover(sysroot)
    return settle(sysroot, os_name)[0]


def repair(sysroot: Sysroot, *, lock: LockPolicy = NO_WAIT) -> list[Repair]:
    """recover() where something looks broken (what status runs: it takes the lock
    only then)."""
    damaged = bootloader.needs_recovery(sysroot.boot, sysroot.switch_record) or any(
        k is not None and not os.path.isfile(os.path.join(sysroot.boot, k.relpath, bootloader.COMPLETE))
        for os_name in sysroot.os_names() for k in kernels_of(sysroot.state(os_name)))
    return recover(sysroot, lock=lock) if damaged else []


@locked
def recover(sysroot: Sysroot, *, lock: LockPolicy = NO_WAIT) -> list[Repair]:
    """Finish an interrupted switch of the boot entries and put back the kernels
    entries name that a crash tore; what was done is also kept in sysroot.repairs."""
    repairs = bootloader.recover(sysroot.boot, sysroot.switch_record)
    for os_name in sysroot.os_names():
        state = sysroot.state(os_name)
        for dep, e in zip(state.deployments, state.entries, strict=True):
            k = bootloader.kernel_of(e)
            if k is None or bootloader.kernel_complete(sysroot.boot, k):
                continue
            where = os.path.join(sysroot.boot, k.relpath)
            try:
                installed = install_kernel(sysroot, os_name, load_commit(sysroot.repo, dep.commit,
                                                                             dep.kernel_version))
            except CfsError as err:
                repairs.append(Repair(RepairKind.BROKEN_KERNEL, where, message=str(err), deployment=dep.name))
                continue
            repairs.append(Repair(RepairKind.REINSTALLED_KERNEL, where, deployment=dep.name,
                                  kernel=None if installed == k else installed.dirname))
    sysroot.repairs += repairs
    return repairs


def unstage(sysroot: Sysroot, os_name: str) -> str | None:
    """Before a change of the entries: forget the staged deployment, whose retention
    and /etc merge assumed the entries as they were (OSTree's rule).  Its directory,
    kernel and ref go at the next settle of its os; returns its name."""
    rec = load_staged(sysroot)
    if rec is None:
        return None
    staged.remove(sysroot.top)
    if rec.os != os_name and rec.os in sysroot.os_names():
        settle(sysroot, rec.os)
    return rec.name


def retain(state: State, sysroot: Sysroot, *, new_default: bool) -> list[Deployment]:
    """Which existing deployments stay (OSTree's rule): the booted one, pinned ones, the
    rollback (the current default when a new deployment takes its place, else the
    second), the default unless replaced, and keep-extra more, in boot order."""
    cfg = sysroot.config
    rollback_index = 0 if new_default else 1
    kept = []
    extra = cfg.keep_extra
    for i, d in enumerate(state.deployments):
        if (d.pinned or d == state.booted or (i == 0 and not new_default)
                or (i == rollback_index and cfg.keep_rollback)):
            kept.append(d)
        elif extra > 0:
            kept.append(d)
            extra -= 1
    return kept


def order_with(state: State, sysroot: Sysroot, dep: Deployment, make_default: bool) -> list[Deployment]:
    """The boot order with a new deployment in it, by the retention rule."""
    kept = retain(state, sysroot, new_default=make_default)
    return [dep] + kept if make_default or not kept else [kept[0], dep] + kept[1:]


def switch_in(sysroot: Sysroot, state: State, dep: Deployment, entry: BootEntry,
              make_default: bool) -> tuple[int, list[str]]:
    """Switch the entries to the new deployment's order, then remove what they no longer
    name; returns its index and the deployments removed."""
    order = order_with(state, sysroot, dep, make_default)
    rewrite(sysroot, state, order, {dep.name: entry})
    new_state, _ = settle(sysroot, dep.os)
    return order.index(dep), [d.name for d in state.deployments if d not in new_state.deployments]


def install_kernel(sysroot: Sysroot, os_name: str, c: Commit) -> Kernel:
    """The commit's kernel and initramfs, or its sealed UKI (once its command line is
    checked against the commit), copied from their objects into the boot directory."""
    store = sysroot.repo.objects
    digests = []
    if c.sealed is not None:
        path = sealed_uki(sysroot.repo, c.sealed, c.id)
        with open(path, "rb") as u:
            _check_object(u, c.sealed.uki, "sealed UKI")
            check_seal(c, path)
            return bootloader.install_uki(sysroot.boot, os_name, c.kver, u)
    for node, what in ((c.kernel, "kernel"), (c.initramfs, "initramfs")):
        if node.digest is None:
            raise DeployIntegrityError(f"commit {c.id[:12]}: the {what} is too small to be real")
        digests.append(node.digest)
    with open(store.path_of(digests[0]), "rb") as k, open(store.path_of(digests[1]), "rb") as i:
        _check_object(k, digests[0], "kernel")
        _check_object(i, digests[1], "initramfs")
        return bootloader.install_kernel(sysroot.boot, os_name, c.kver, k, i)


def _check_object(f: BinaryIO, digest: bytes, what: str) -> None:
    if fsverity.digest_fd(f.fileno()) != digest:
        raise DeployIntegrityError(f"the {what} object {digest.hex()} is corrupt", hint="run `cfsdeploy fsck`")


def make_etc(sysroot: Sysroot, c: Commit, merge_dep: Deployment | None, dest: str) -> MergeReport:
    new_etc = lookup(c.root, b"/etc")
    assert isinstance(new_etc, Inode)
    if merge_dep is None:
        return merge_etc(None, None, new_etc, sysroot.repo.objects, os.fsencode(dest))
    old = dumpfile.parse_paths(manifest_data(sysroot.repo, merge_dep.commit), ETC_PATHS)
    orig = lookup(old, b"/etc")
    local = os.path.join(sysroot.dir_of(merge_dep), "etc")
    return merge_etc(orig if isinstance(orig, Inode) else None, os.fsencode(local), new_etc,
                     sysroot.repo.objects, os.fsencode(dest))
