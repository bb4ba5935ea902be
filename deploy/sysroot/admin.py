"""Changing a sysroot's deployments: deploy, rollback, undeploy, pin, kargs, cleanup.

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

import dataclasses
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import wraps
from typing import TYPE_CHECKING, Concatenate, ParamSpec, TypeVar

import pygit2

from ..boot import bootloader, kargs
from ..boot.bootloader import BootEntry, Damaged, Kernel, Kind, Repair, RepairKind
from ..composefs import dumpfile, fsverity, imagewriter
from ..composefs.tree import Inode, lookup, resolve
from ..repo.checkout import checkout
from ..repo.repository import (
    MANIFEST,
    TRAILER_FORMAT,
    TRAILER_VERSION,
    Repository,
    image_digest_of,
    prune,
    read_content,
    trailers,
)
from ..repo.treediff import TreeDiff, diff
from ..util.errors import CfsError, HostError, IntegrityError, UsageError, VerityError
from ..util.fsutil import exchange, fsync_dir, remove_tree, syncfs
from . import deployment, staged
from .deployment import Deployment, Origin
from .etcmerge import MergeReport, merge_etc
from .layout import (
    State,
    Sysroot,
    SysrootNotFoundError,
    SysrootUsageError,
    staged_deployment,
    staged_status,
)
from .staged import Staged

if TYPE_CHECKING:
    from ..remote.pull import PullProgress, PullResult

DEPLOY_REF = "refs/deployments"
Log = Callable[[str], None]
P = ParamSpec("P")
R = TypeVar("R")


def locked(fn: Callable[Concatenate[Sysroot, P], R]) -> Callable[Concatenate[Sysroot, P], R]:
    """Run a change of deployments under the sysroot's lock (taken once: a locked
    change may call another)."""
    @wraps(fn)
    def inner(sysroot: Sysroot, *args: P.args, **kw: P.kwargs) -> R:
        if sysroot.locked:
            return fn(sysroot, *args, **kw)
        with sysroot.lock(wait=sysroot.lock_wait, on_wait=sysroot.on_lock_wait):
            sysroot.locked = True
            try:
                return fn(sysroot, *args, **kw)
            finally:
                sysroot.locked = False
    return inner


class DeployError(CfsError):
    pass


class DeployUsageError(DeployError, UsageError):
    pass


class DeployIntegrityError(DeployError, IntegrityError):
    pass


class DeployHostError(DeployError, HostError):
    pass


# --- reading a commit ------------------------------------------------------------------


# What deploying reads of a manifest; the rest is never parsed (see load_commit).
DEPLOY_PATHS = (rb"/(?:etc|var)(?:/[^ \n]*)?|/sysroot|/usr/lib/os-release"
                rb"|/usr/lib/modules/[^/ \n]+/(?:vmlinuz|initramfs\.img)")
ETC_PATHS = rb"/etc(?:/[^ \n]*)?"


@dataclass
class Commit:
    """What deploying needs to know about a commit."""
    id: str
    manifest: bytes
    # A partial tree: DEPLOY_PATHS and their ancestors only.
    root: Inode
    image_digest: bytes
    image_format: int
    version: str | None
    kver: str
    kernel: Inode
    initramfs: Inode


def load_commit(repo: Repository, rev: str) -> Commit:
    """Read a commit for deploying.  Only the paths deploying uses are parsed, so
    the time taken hardly grows with the size of the tree."""
    c = repo.resolve(rev)
    cid = str(c.id)
    try:
        data = c.tree[MANIFEST].data
    except KeyError:
        raise DeployIntegrityError(f"commit {cid} has no {MANIFEST}") from None
    root = dumpfile.parse_paths(data, DEPLOY_PATHS)
    for d in (b"/etc", b"/var", b"/sysroot"):
        e = lookup(root, d)
        if not isinstance(e, Inode) or not e.is_dir():
            raise DeployUsageError(f"commit {cid[:12]} has no {d.decode()} directory (a root filesystem needs it)")
    kver, kernel, initramfs = find_kernel(root, cid)
    t = trailers(c.message)
    fmt = t.get(TRAILER_FORMAT, "0")
    # The version is text of the commit that goes into records and titles: one plain line.
    version = bootloader.clean_title(t[TRAILER_VERSION]) or None if TRAILER_VERSION in t else None
    return Commit(cid, data, root, image_digest_of(c), int(fmt) if fmt.isdigit() else 0,
                  version, kver, kernel, initramfs)


def origin_of(repo: Repository, rev: str) -> Origin | None:
    """The branch a revision names, which upgrades then follow; None for a commit id."""
    if f"refs/heads/{rev}" in repo.git.references:
        return Origin(rev)
    remote, sep, branch = rev.partition("/")
    if sep and f"refs/remotes/{rev}" in repo.git.references:
        return Origin(branch, remote)
    return None


def find_kernel(root: Inode, cid: str) -> tuple[str, Inode, Inode]:
    """The first /usr/lib/modules/<kver>/ with a vmlinuz, and its initramfs.img."""
    modules = lookup(root, b"/usr/lib/modules")
    if isinstance(modules, Inode) and modules.children:
        for kver in sorted(modules.children):
            d = modules.children[kver]
            if not isinstance(d, Inode) or d.children is None or b"vmlinuz" not in d.children:
                continue
            kernel = resolve(d.children[b"vmlinuz"])
            initrd = d.children.get(b"initramfs.img")
            if not kernel.is_reg():
                continue
            # The name becomes a directory of the boot directory and a line of the entry.
            try:
                name = bootloader.check_kver(kver.decode("ascii", errors="replace"))
            except bootloader.BootError as e:
                raise DeployUsageError(f"commit {cid[:12]}, /usr/lib/modules: {e}") from None
            if initrd is None or not resolve(initrd).is_reg():
                raise DeployUsageError(f"commit {cid[:12]} has a kernel {name} but no "
                                       f"/usr/lib/modules/{name}/initramfs.img")
            return name, kernel, resolve(initrd)
    raise DeployUsageError(f"commit {cid[:12]} has no kernel (/usr/lib/modules/<version>/vmlinuz)")


def _missing_objects(repo: Repository, c: Commit) -> None:
    missing = sorted(d.hex() for d in repo.objects.missing(dumpfile.external_digests(c.manifest)))
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DeployIntegrityError(f"commit {c.id[:12]} misses {len(missing)} objects: {shown}",
                                   hint="run `cfsdeploy fsck`, or pull again")


def ensure_image(repo: Repository, c: Commit, log: Log = lambda m: None) -> bool:
    """Make sure the commit's image object exists and is the image of its manifest;
    True if it had to be built.

    A commit whose manifest was built into its image here before (at commit, pull or
    an earlier deploy) needs only the image object's digest checked.  Any other is
    built from its whole manifest and refused unless that gives the digest it names."""
    path = repo.objects.path_of(c.image_digest)
    if repo.is_verified(c.id, c.image_digest) and os.path.exists(path):
        if fsverity.digest_file(path) != c.image_digest:
            raise DeployIntegrityError(f"image object {c.image_digest.hex()} is corrupt", hint="run `cfsdeploy fsck`")
        return False
    log(f"building the image of commit {c.id[:12]} from its manifest")
    built = imagewriter.build(dumpfile.parse(c.manifest), min_version=c.image_format,
                              max_version=c.image_format).image
    if fsverity.digest_bytes(built) != c.image_digest:
        raise DeployIntegrityError(f"commit {c.id[:12]}: its manifest does not give the image its "
                                   "Composefs-Digest names; refusing to deploy it")
    with repo.lock(wait=60):
        if os.path.exists(path):
            with open(path, "rb") as f:
                if f.read() != built:
                    raise DeployIntegrityError(f"image object {c.image_digest.hex()} is corrupt",
                                               hint="run `cfsdeploy fsck`")
        else:
            repo.objects.add_bytes(built)
        repo.mark_verified(c.id, c.image_digest)
    return True


def os_release(repo: Repository, root: Inode) -> dict[str, str]:
    for path in (b"/etc/os-release", b"/usr/lib/os-release"):
        e = lookup(root, path)
        if e is None:
            continue
        node = resolve(e)
        if node.is_symlink():
            target = node.payload or b""
            base = path.rsplit(b"/", 1)[0]
            e = lookup(root, target if target.startswith(b"/") else os.path.normpath(base + b"/" + target))
            node = resolve(e) if e is not None else node
        if node.is_reg():
            out = {}
            for line in read_content(repo, node, os.fsdecode(path)).decode(errors="replace").splitlines():
                k, sep, v = line.partition("=")
                if sep:
                    out[k.strip()] = v.strip().strip("\"'")
            return out
    return {}


# --- entries ------------------------------------------------------------------------------


def _options(dep: Deployment, verity: str) -> str:
    """An entry's options: the deployment's kernel arguments, then cfsdeploy's own."""
    return " ".join(dep.kargs + kargs.Own(dep.path, dep.image_digest, verity).args())


def _entry(dep: Deployment, kernel: Kernel, title: str, verity: str, tries: int | None) -> BootEntry:
    """A new deployment's entry; `tries` puts it on trial (boot counting)."""
    return BootEntry(os=dep.os, index=0, title=title, linux=kernel.linux, initrd=kernel.initrd,
                     options=_options(dep, verity), tries_left=tries or None)


def _rewrite(sysroot: Sysroot, state: State, order: list[Deployment],
             new_entries: dict[str, BootEntry] | None = None,
             verity: dict[str, str] | None = None) -> list[BootEntry]:
    """Switch the os's entries to `order`, keeping each kept entry's fields and
    counters; `verity` changes the cfsdeploy.verity= of deployments it names."""
    by_name = {d.name: e for d, e in zip(state.deployments, state.entries)}
    by_name.update(new_entries or {})
    _set_aside_entries(sysroot, state)
    return bootloader.switch_entries(sysroot.boot, state.os,
                                     [_refresh(by_name[d.name], d, (verity or {}).get(d.name)) for d in order],
                                     sysroot.switch_record)


def _set_aside_entries(sysroot: Sysroot, state: State) -> None:
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


def _refresh(e: BootEntry, dep: Deployment, verity: str | None) -> BootEntry:
    """The entry with the deployment's current kernel arguments."""
    own = kargs.own(kargs.split(e.options))
    verity = verity or (own.verity if own else "require")
    return BootEntry(e.os, e.index, e.title, e.linux, e.initrd, _options(dep, verity),
                     e.tries_left, e.tries_done)


def _title(release: dict[str, str], version: str | None, os_name: str) -> str:
    """The entry's title, from the commit's os-release and version: text of the commit,
    so made one plain line."""
    name = bootloader.clean_title(release.get("PRETTY_NAME") or release.get("NAME") or "") or os_name
    version = bootloader.clean_title(version or "")
    if version and version not in name:
        name += f" {version}"
    return bootloader.clean_title(f"{name[:150]} (cfsdeploy {os_name})")


def _kernels(state: State) -> list[Kernel]:
    return [k for e in state.entries if (k := bootloader.kernel_of(e)) is not None]


def _set_ref(repo: Repository, dep: Deployment) -> None:
    with repo.lock(wait=60):
        repo.git.references.create(f"{DEPLOY_REF}/{dep.os}/{dep.name}", pygit2.Oid(hex=dep.commit), force=True)


def _drop_refs(repo: Repository, os_name: str, keep: set[str]) -> None:
    prefix = f"{DEPLOY_REF}/{os_name}/"
    with repo.lock(wait=60):
        for name in list(repo.git.references):
            if name.startswith(prefix) and name[len(prefix):] not in keep:
                repo.git.references.delete(name)


def _settle(sysroot: Sysroot, os_name: str) -> tuple[State, list[str]]:
    """After a switch: remove what neither an entry nor the staged record names any
    more; return the new state and the kernels removed."""
    rec = _load_staged(sysroot)
    if rec is not None and rec.stale:
        staged.remove(sysroot.top)
        rec = None
    state = sysroot.state(os_name)
    mine = rec if rec is not None and rec.os == os_name else None
    sysroot.remove_strays(state, mine.name if mine else None)
    kept = state.kept_by(sysroot.directories(os_name))
    kernels = bootloader.remove_unused_kernels(sysroot.boot, os_name, _kernels(state) + (
        [Kernel(os_name, mine.kernel)] if mine else []) + [Kernel(os_name, k) for k in kept])
    _drop_refs(sysroot.repo, os_name, {d.name for d in state.deployments} | ({mine.name} if mine else set()) | kept)
    return state, kernels


def _load_staged(sysroot: Sysroot) -> Staged | None:
    """The staged record (under the lock); a damaged one is moved aside, never acted on."""
    damaged = sysroot.damaged_staged()
    if damaged is not None:
        sysroot.set_aside(damaged, move=True)
    return staged.load(sysroot.top)


def _prepare(sysroot: Sysroot, os_name: str) -> State:
    """Under the lock, before a change: finish or clear what interrupted runs left."""
    recover(sysroot)
    return _settle(sysroot, os_name)[0]


def repair(sysroot: Sysroot) -> list[Repair]:
    """recover() where something looks broken (what status runs: it takes the lock
    only then)."""
    damaged = bootloader.needs_recovery(sysroot.boot, sysroot.switch_record) or any(
        k is not None and not os.path.isfile(os.path.join(sysroot.boot, k.relpath, bootloader.COMPLETE))
        for os_name in sysroot.os_names() for k in _kernels(sysroot.state(os_name)))
    return recover(sysroot) if damaged else []


@locked
def recover(sysroot: Sysroot) -> list[Repair]:
    """Finish an interrupted switch of the boot entries and put back the kernels
    entries name that a crash tore; what was done is also kept in sysroot.repairs."""
    repairs = bootloader.recover(sysroot.boot, sysroot.switch_record)
    for os_name in sysroot.os_names():
        state = sysroot.state(os_name)
        for dep, e in zip(state.deployments, state.entries):
            k = bootloader.kernel_of(e)
            if k is None or bootloader.kernel_complete(sysroot.boot, k):
                continue
            where = os.path.join(sysroot.boot, k.relpath)
            try:
                installed = _install_kernel(sysroot, os_name, load_commit(sysroot.repo, dep.commit))
            except CfsError as err:
                repairs.append(Repair(RepairKind.BROKEN_KERNEL, where, f"for {dep.name}: {err}"))
                continue
            repairs.append(Repair(RepairKind.REINSTALLED_KERNEL, where,
                                  f"for {dep.name}" + ("" if installed == k else f" as {installed.dirname}")))
    sysroot.repairs += repairs
    return repairs


# --- deploy -----------------------------------------------------------------------------


def _unstage(sysroot: Sysroot, os_name: str, log: Log) -> str | None:
    """Before a change of the entries: forget the staged deployment, whose retention
    and /etc merge assumed the entries as they were (OSTree's rule).  Its directory,
    kernel and ref go at the next settle of its os; returns its name."""
    rec = _load_staged(sysroot)
    if rec is None:
        return None
    staged.remove(sysroot.top)
    if rec.os != os_name and rec.os in sysroot.os_names():
        _settle(sysroot, rec.os)
    log(f"discarded the staged deployment {rec.name}")
    return rec.name


@dataclass
class DeployResult:
    deployment: Deployment
    # Its place in boot order (when staged: the place it takes when finalized).
    index: int
    kernel: Kernel
    image_built: bool
    etc: MergeReport
    merged_from: Deployment | None
    removed: list[str] = field(default_factory=list)
    staged: bool = False
    # The staged deployment this one replaced or discarded.
    discarded: str | None = None


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


@locked
def deploy(sysroot: Sysroot, rev: str, *, os_name: str, append: tuple[str, ...] = (),
           delete: tuple[str, ...] = (), make_default: bool = True, tries: int | None = None,
           verity: str | None = None, origin: Origin | None = None, stage: bool = False,
           log: Log = lambda m: None) -> DeployResult:
    """Make a commit bootable: the default (or after it), or staged for finalize_staged."""
    repo = sysroot.repo
    c = load_commit(repo, rev)
    _missing_objects(repo, c)
    tries = sysroot.config.tries if tries is None else tries
    verity = verity or sysroot.config.verity
    state = _prepare(sysroot, os_name)
    image_built = ensure_image(repo, c, log)
    if verity == "require" and not _has_verity(repo.objects.path_of(c.image_digest), c.image_digest):
        raise DeployHostError("cfsdeploy.verity=require, but the image object has no fs-verity here, so "
                              "the boot would stop", hint="deploy with --verity try (or off), then run "
                              "`cfsdeploy verity enable` on the machine itself")
    merge_dep = state.booted or state.default
    base_kargs = merge_dep.kargs if merge_dep else sysroot.config.kargs
    new_kargs = kargs.edit(base_kargs, append=append, delete=delete)
    origin = origin or origin_of(repo, rev) or (merge_dep.origin if merge_dep else None)

    kernel = _install_kernel(sysroot, os_name, c)
    os_dir = sysroot.os_dir(os_name)
    name = deployment.next_name(c.id, os.listdir(os_dir))
    dep = Deployment(os=os_name, name=name, commit=c.id, image_digest=c.image_digest.hex(),
                     kernel_version=c.kver, kargs=new_kargs, origin=origin, version=c.version,
                     created=datetime.now(UTC).isoformat(timespec="seconds"))
    staging = tempfile.mkdtemp(prefix=f".{name}.", dir=os_dir)
    report = _make_etc(sysroot, c, merge_dep, os.path.join(staging, "etc"))
    deployment.save(staging, dep)
    _ensure_var(sysroot, os_name, c)
    _set_ref(repo, dep)
    syncfs(os_dir)
    os.rename(staging, os.path.join(os_dir, name))
    fsync_dir(os_dir)

    title = _title(os_release(repo, c.root), c.version, os_name)
    if stage:
        previous = _load_staged(sysroot)
        # Replacing the record is the step that stages: a crash before it leaves the
        # previous staged deployment (or none), and this directory a leftover.
        staged.save(sysroot.top, Staged(os_name, name, kernel.dirname, title, verity, tries or None,
                                        make_default, merge_dep.name if merge_dep else None,
                                        staged.current_boot_id()))
        if previous is not None and previous.os != os_name:
            _settle(sysroot, previous.os)
        _settle(sysroot, os_name)
        index = _order(state, sysroot, dep, make_default).index(dep)
        return DeployResult(dep, index, kernel, image_built, report, merge_dep, staged=True,
                            discarded=previous.name if previous else None)
    discarded = _unstage(sysroot, os_name, log)
    index, removed = _switch_in(sysroot, state, dep, _entry(dep, kernel, title, verity, tries), make_default)
    return DeployResult(dep, index, kernel, image_built, report, merge_dep, removed, discarded=discarded)


def _order(state: State, sysroot: Sysroot, dep: Deployment, make_default: bool) -> list[Deployment]:
    """The boot order with a new deployment in it, by the retention rule."""
    kept = retain(state, sysroot, new_default=make_default)
    return [dep] + kept if make_default or not kept else [kept[0], dep] + kept[1:]


def _switch_in(sysroot: Sysroot, state: State, dep: Deployment, entry: BootEntry,
               make_default: bool) -> tuple[int, list[str]]:
    """Switch the entries to the new deployment's order, then remove what they no longer
    name; returns its index and the deployments removed."""
    order = _order(state, sysroot, dep, make_default)
    _rewrite(sysroot, state, order, {dep.name: entry})
    new_state, _ = _settle(sysroot, dep.os)
    return order.index(dep), [d.name for d in state.deployments if d not in new_state.deployments]


def _install_kernel(sysroot: Sysroot, os_name: str, c: Commit) -> Kernel:
    store = sysroot.repo.objects
    paths = []
    for node, what in ((c.kernel, "kernel"), (c.initramfs, "initramfs")):
        if node.digest is None:
            raise DeployIntegrityError(f"commit {c.id[:12]}: the {what} is too small to be real")
        paths.append(store.path_of(node.digest))
    with open(paths[0], "rb") as k, open(paths[1], "rb") as i:
        for f, node, what in ((k, c.kernel, "kernel"), (i, c.initramfs, "initramfs")):
            if fsverity.digest_fd(f.fileno()) != node.digest:
                raise DeployIntegrityError(f"the {what} object {node.digest.hex()} is corrupt",
                                           hint="run `cfsdeploy fsck`")
        return bootloader.install_kernel(sysroot.boot, os_name, c.kver, k, i)


def _make_etc(sysroot: Sysroot, c: Commit, merge_dep: Deployment | None, dest: str) -> MergeReport:
    new_etc = lookup(c.root, b"/etc")
    assert isinstance(new_etc, Inode)
    if merge_dep is None:
        return merge_etc(None, None, new_etc, sysroot.repo.objects, os.fsencode(dest))
    old = dumpfile.parse_paths(sysroot.repo.resolve(merge_dep.commit).tree[MANIFEST].data, ETC_PATHS)
    orig = lookup(old, b"/etc")
    local = os.path.join(sysroot.dir_of(merge_dep), "etc")
    return merge_etc(orig if isinstance(orig, Inode) else None, os.fsencode(local), new_etc,
                     sysroot.repo.objects, os.fsencode(dest))


def _ensure_var(sysroot: Sysroot, os_name: str, c: Commit) -> None:
    """The os's /var takes the first deployed commit's /var while it is empty, and then
    belongs to the machine: upgrades never touch it (OSTree's rule, as for a
    container volume)."""
    var = sysroot.var_dir(os_name)
    if os.path.isdir(var) and os.listdir(var):
        return
    node = lookup(c.root, b"/var")
    assert isinstance(node, Inode)
    staging = os.path.join(sysroot.os_dir(os_name), ".var.new")
    remove_tree(staging, ignore_errors=True)
    checkout(node, sysroot.repo.objects, staging)
    syncfs(staging)
    os.rename(staging, var)  # replaces the empty directory in one step
    fsync_dir(os.path.dirname(var))


# --- rollback, undeploy, pin, kargs, cleanup ----------------------------------------------


@locked
def rollback(sysroot: Sysroot, os_name: str, log: Log = lambda m: None) -> tuple[Deployment, Deployment]:
    """Make the previous deployment the default (or the booted one, when an upgrade
    is pending).  Returns (new default, old default)."""
    state = _prepare(sysroot, os_name)
    if len(state.deployments) < 2:
        raise SysrootNotFoundError("there is no other deployment to roll back to")
    old = state.deployments[0]
    target = state.booted if state.booted is not None and state.booted != old else state.deployments[1]
    _unstage(sysroot, os_name, log)
    _rewrite(sysroot, state, [target] + [d for d in state.deployments if d != target])
    _settle(sysroot, os_name)
    return target, old


@locked
def undeploy(sysroot: Sysroot, os_name: str, index: int, log: Log = lambda m: None) -> Deployment:
    state = _prepare(sysroot, os_name)
    dep = state.find(index)
    if dep == state.booted:
        raise SysrootUsageError(f"deployment {index} ({dep.name}) is the booted one; it stays")
    if len(state.deployments) == 1:
        raise SysrootUsageError("refusing to remove the only deployment: nothing would boot")
    _unstage(sysroot, os_name, log)
    _rewrite(sysroot, state, [d for d in state.deployments if d != dep])
    _settle(sysroot, os_name)
    return dep


@locked
def pin(sysroot: Sysroot, os_name: str, index: int, pinned: bool = True) -> Deployment:
    state = _prepare(sysroot, os_name)
    dep = state.find(index).with_(pinned=pinned)
    deployment.save(sysroot.dir_of(dep), dep)
    return dep


@locked
def set_kargs(sysroot: Sysroot, os_name: str, *, append: tuple[str, ...] = (), delete: tuple[str, ...] = (),
              replace: tuple[str, ...] = (), log: Log = lambda m: None) -> Deployment:
    """Edit the default deployment's kernel arguments (a new entry set, switched atomically)."""
    state = _prepare(sysroot, os_name)
    if state.default is None:
        raise SysrootNotFoundError(f"os {os_name!r} has no deployment")
    dep = state.default.with_(kargs=kargs.edit(state.default.kargs, append=append, delete=delete,
                                               replace=replace))
    _unstage(sysroot, os_name, log)
    deployment.save(sysroot.dir_of(dep), dep)
    state.deployments[0] = dep
    _rewrite(sysroot, state, state.deployments)
    _settle(sysroot, os_name)
    return dep


# --- finalizing the staged deployment -------------------------------------------------------


@dataclass
class FinalizeResult:
    staged: Staged
    deployment: Deployment | None    # None: the record was discarded instead (see `discarded`)
    index: int = 0
    etc: MergeReport | None = None   # None: the /etc merged at staging was kept
    merged_from: Deployment | None = None
    removed: list[str] = field(default_factory=list)
    discarded: str | None = None     # why the record was discarded


@locked
def finalize_staged(sysroot: Sysroot, log: Log = lambda m: None) -> FinalizeResult | None:
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
            _prepare(sysroot, rec.os)
        return FinalizeResult(rec, None, discarded=why)
    assert dep is not None
    state = _prepare(sysroot, rec.os)
    merge_dep = next((d for d in state.deployments if d.name == rec.merge_from), None)
    report = None
    if merge_dep is not None:
        report = _remake_etc(sysroot, load_commit(sysroot.repo, dep.commit), merge_dep, dep)
    elif rec.merge_from is not None:
        log(f"the merge source {rec.merge_from} is gone: keeping /etc as merged at staging")
    staged.remove(sysroot.top)
    entry = _entry(dep, Kernel(rec.os, rec.kernel), rec.title, rec.verity, rec.tries)
    index, removed = _switch_in(sysroot, state, dep, entry, rec.default)
    return FinalizeResult(rec, dep, index, report, merge_dep, removed)


def _unusable(sysroot: Sysroot, rec: Staged, dep: Deployment | None, known_os: bool) -> str | None:
    """Why a staged record cannot be finalized, if it cannot."""
    if rec.stale:
        return "it was staged during an earlier boot that ended without finalizing it"
    if not known_os:
        return f"its os {rec.os!r} is gone"
    if dep is None:
        return f"its deployment {rec.name} is gone"
    if not os.path.isdir(os.path.join(sysroot.boot, Kernel(rec.os, rec.kernel).relpath)):
        return f"its kernel {rec.kernel} is gone from {sysroot.boot}"
    return None


def _remake_etc(sysroot: Sysroot, c: Commit, merge_dep: Deployment, dep: Deployment) -> MergeReport:
    """Merge /etc again aside, then exchange it for the deployment's in one step, so the
    deployment has a whole /etc at every moment.  What is left aside (the old one, or
    a half-made one after a crash) is a leftover the next settle removes."""
    os_dir = sysroot.os_dir(dep.os)
    aside = tempfile.mkdtemp(prefix=f".{dep.name}.etc.", dir=os_dir)
    report = _make_etc(sysroot, c, merge_dep, os.path.join(aside, "etc"))
    syncfs(aside)
    exchange(os.path.join(aside, "etc"), os.path.join(sysroot.dir_of(dep), "etc"))
    fsync_dir(sysroot.dir_of(dep))
    fsync_dir(aside)
    remove_tree(aside)
    return report


@dataclass
class CleanupResult:
    deployments: list[str]
    kernels: list[str]
    objects: int
    bytes_freed: int


@locked
def cleanup(sysroot: Sysroot, os_name: str, *, prune_objects: bool = True) -> CleanupResult:
    """Drop deployments beyond the retention (never the default, booted or pinned),
    then kernels and objects nothing needs."""
    state = _prepare(sysroot, os_name)
    kept = retain(state, sysroot, new_default=False)
    dropped = [d.name for d in state.deployments if d not in kept]
    if dropped or state.broken or any(d.kind == Kind.ENTRY for d in state.damaged):
        _rewrite(sysroot, state, kept)
    _, kernels = _settle(sysroot, os_name)
    removed, freed = 0, 0
    if prune_objects:
        with sysroot.repo.lock(wait=60):
            r = prune(sysroot.repo)
        removed, freed = r.removed, r.bytes_freed
    return CleanupResult(dropped, kernels, removed, freed)


# --- fs-verity ----------------------------------------------------------------------------


def _has_verity(path: str, digest: bytes) -> bool:
    """Whether the kernel holds fs-verity for the object, with the digest of its name."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        return fsverity.measure_verity(fd) == digest
    except VerityError:
        return False
    finally:
        os.close(fd)


def _verity_good(repo: Repository, dep: Deployment, good: set[bytes]) -> bool:
    """Whether the deployment's image and every object it names measure right."""
    manifest = repo.resolve(dep.commit).tree[MANIFEST].data
    return bytes.fromhex(dep.image_digest) in good and dumpfile.external_digests(manifest) <= good


@dataclass
class VerityResult:
    objects: int
    enabled: int
    problems: list[str]
    # Deployments whose entries now say cfsdeploy.verity=require.
    required: list[str]


@locked
def enable_verity(sysroot: Sysroot, os_name: str, *, progress: Callable[[int, int], None] | None = None
                  ) -> VerityResult:
    """Enable fs-verity on every object of the repository (for a sysroot written where
    the kernel could not, e.g. a disk image made on another machine), then make the
    entries of deployments whose image and objects all measure right require it."""
    repo = sysroot.repo
    paths = []
    for sub in sorted(os.listdir(repo.objects.path)):
        subdir = os.path.join(repo.objects.path, sub)
        if len(sub) == 2 and os.path.isdir(subdir):
            paths += [(sub + name, os.path.join(subdir, name)) for name in sorted(os.listdir(subdir))]
    good: set[bytes] = set()
    problems = []
    with repo.lock(wait=60):
        for i, (name, path) in enumerate(paths):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                fsverity.enable_verity(fd)
                measured = fsverity.measure_verity(fd)
            except VerityError as e:
                problems.append(f"{name}: {e}")
                if len(problems) >= 10:
                    break
                continue
            finally:
                os.close(fd)
            if measured.hex() != name:
                problems.append(f"{name}: corrupt object (its content has digest {measured.hex()}; run fsck)")
            else:
                good.add(measured)
            if progress is not None:
                progress(i + 1, len(paths))
    state = _prepare(sysroot, os_name)
    switch = {}
    for d in state.deployments:
        if _verity_good(repo, d, good):
            switch[d.name] = "require"
    if switch:
        _rewrite(sysroot, state, state.deployments, verity=switch)
    st = staged_status(sysroot, os_name)
    if st is not None and st.deployment is not None and _verity_good(repo, st.deployment, good):
        staged.save(sysroot.top, dataclasses.replace(st.record, verity="require"))
        switch[st.record.name] = "require"
    if not problems and sysroot.config.verity != "require":
        sysroot.config.verity = "require"
        sysroot.save_config()
    return VerityResult(len(paths), len(good), problems, sorted(switch))


# --- upgrade, switch --------------------------------------------------------------------------


@dataclass
class UpgradeResult:
    origin: Origin
    current: Deployment | None       # the booted (or default) deployment before
    commit: str                      # the origin's head after the pull
    pulled: PullResult | None        # None for an origin that is a local branch
    deployed: DeployResult | None    # None when there was nothing new (or only a check)
    changes: TreeDiff | None

    @property
    def available(self) -> bool:
        """Something newer than the running deployment exists (deployed or not)."""
        return self.current is None or self.commit != self.current.commit


def _check_not_older(repo: Repository, current: str, new: str) -> None:
    """A commit that is an ancestor of the deployed one, or older than it, is a
    downgrade: a mirror must not bring back an old (validly signed) release."""
    a, b = repo.resolve(current), repo.resolve(new)
    if repo.git.descendant_of(a.id, b.id) or b.commit_time < a.commit_time:
        raise DeployIntegrityError(f"the origin's head {new[:12]} is older than the deployed {current[:12]}: "
                                   "refusing to downgrade", hint="--allow-downgrade to do it anyway")


@locked
def upgrade(sysroot: Sysroot, os_name: str, *, origin: Origin | None = None, check: bool = False,
            allow_downgrade: bool = False, tries: int | None = None, stage: bool = False,
            progress: Callable[[PullProgress], None] | None = None, log: Log = lambda m: None) -> UpgradeResult:
    """Pull the newest commit of the booted (or default) deployment's origin, or of a
    new origin (switch), and deploy it as the default, keeping the rollback (or stage
    it, to become the default at shutdown)."""
    state = _prepare(sysroot, os_name)
    current = state.booted or state.default
    origin = origin or (current.origin if current else None)
    if origin is None:
        which = f"deployment {current.name} follows" if current else f"os {os_name!r} has no deployment and"
        raise SysrootUsageError(f"{which} no branch", hint="`cfsdeploy switch REMOTE:BRANCH` chooses one")
    from ..remote.pull import PullOptions, pull  # only here: HTTP and TLS cost every other command time

    repo = sysroot.repo
    pulled = None
    if origin.remote is not None:
        # Only the head: a machine needs what it deploys, not the history's manifests.
        pulled = pull(repo, origin.remote, origin.branch, depth=1, allow_downgrade=allow_downgrade, progress=progress,
                      options=PullOptions(lock_wait=sysroot.lock_wait, on_lock_wait=sysroot.on_lock_wait))
        rev = f"{origin.remote}/{origin.branch}"
    else:
        rev = origin.branch
    head = str(repo.resolve(rev).id)
    result = UpgradeResult(origin, current, head, pulled, None, None)
    if current is not None:
        same_origin = origin == current.origin
        if same_origin and head in (current.commit, state.default.commit if state.default else None,
                                    _staged_commit(sysroot, os_name)):
            return result
        if same_origin and not allow_downgrade:
            _check_not_older(repo, current.commit, head)
        result.changes = diff(_full_manifest(repo, current.commit), _full_manifest(repo, head))
    if check:
        return result
    result.deployed = deploy(sysroot, head, os_name=os_name, origin=origin, tries=tries, stage=stage, log=log)
    return result


def _staged_commit(sysroot: Sysroot, os_name: str) -> str | None:
    s = staged_status(sysroot, os_name)
    return s.deployment.commit if s is not None and s.deployment is not None else None


def _full_manifest(repo: Repository, rev: str) -> Inode:
    return dumpfile.parse(repo.resolve(rev).tree[MANIFEST].data)


def parse_refspec(refspec: str) -> Origin:
    """REMOTE:BRANCH, or BRANCH of the machine's own repository."""
    remote, sep, branch = refspec.rpartition(":")
    if not branch or (sep and not remote):
        raise SysrootUsageError(f"expected REMOTE:BRANCH or BRANCH, not {refspec!r}")
    return Origin(branch, remote or None)
