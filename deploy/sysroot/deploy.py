"""Deploying a commit: the default, after it, or staged."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum

from ..boot import kargs
from ..boot.bootloader import Kernel
from ..composefs.tree import Inode, lookup
from ..repo.checkout import checkout
from ..util.errors import CfsError
from ..util.fsutil import fsync_dir, remove_tree, syncfs
from . import bydigest, deployment, staged
from .commit import (
    Commit,
    DeployHostError,
    DeployUsageError,
    check_objects,
    ensure_image,
    load_commit,
    origin_of,
    os_release,
)
from .deployment import Deployment, Origin, Seal
from .entries import (
    install_kernel,
    load_staged,
    make_etc,
    new_entry,
    order_with,
    prepare,
    set_ref,
    settle,
    switch_in,
    title_of,
    unstage,
)
from .etcmerge import MergeReport
from .layout import VERITY_PENDING, State, Sysroot, default_path
from .locking import NO_WAIT, LockPolicy, locked
from .staged import Staged
from .verity import has_verity


class FinalizeUnit(Enum):
    """What became of the systemd unit that finalizes a staged deployment at shutdown."""
    STARTED = "started"                          # it finalizes the deployment at shutdown
    NOT_DEFAULT_SYSROOT = "not_default_sysroot"  # it finalizes only the booted machine's sysroot
    NO_SYSTEMD = "no_systemd"                    # systemd is not PID 1 here
    FAILED = "failed"                            # starting it failed (see finalize_unit_error)


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
    # When staged: whether finalize-staged runs at shutdown, or someone must run it.
    finalize_unit: FinalizeUnit | None = None
    finalize_unit_error: str | None = None


@locked
def deploy(sysroot: Sysroot, rev: str, *, os_name: str, append: tuple[str, ...] = (),
           delete: tuple[str, ...] = (), make_default: bool = True, tries: int | None = None,
           verity: str | None = None, origin: Origin | None = None, stage: bool = False,
           kver: str | None = None, lock: LockPolicy = NO_WAIT) -> DeployResult:
    """Make a commit bootable with its newest kernel, or kernel `kver`: the default (or
    after it), or staged for finalize_staged.  A sealed commit boots its UKI, whose
    command line is sealed: no kernel argument changes, verity=require only."""
    repo = sysroot.repo
    c = load_commit(repo, rev, kver)
    check_objects(repo, c)
    tries = sysroot.config.tries if tries is None else tries
    if c.sealed is not None:
        _check_sealed_request(c, append, delete, verity)
    verity = "require" if c.sealed is not None else verity or sysroot.config.verity
    state = prepare(sysroot, os_name)
    if c.sealed is not None:
        _refuse_deployed_image(sysroot, c)
    image_built = ensure_image(repo, c)
    if verity == "require" and not has_verity(repo.objects.path_of(c.image_digest), c.image_digest) and not (
            c.sealed is not None and os.path.exists(os.path.join(sysroot.top, VERITY_PENDING))):
        raise DeployHostError("cfsdeploy.verity=require, but the image object has no fs-verity here, so "
                              "the boot would stop", hint="deploy with --verity try (or off), then run "
                              "`cfsdeploy verity enable` on the machine itself")
    merge_dep = state.booted or state.default
    new_kargs = [] if c.sealed is not None else kargs.edit(_base_kargs(sysroot, state), append=append,
                                                            delete=delete)
    origin = origin or origin_of(repo, rev) or (merge_dep.origin if merge_dep else None)

    kernel = install_kernel(sysroot, os_name, c)
    os_dir = sysroot.os_dir(os_name)
    name = deployment.next_name(c.id, os.listdir(os_dir))
    dep = Deployment(os=os_name, name=name, commit=c.id, image_digest=c.image_digest.hex(),
                     kernel_version=c.kver, kargs=new_kargs, origin=origin, version=c.version,
                     created=datetime.now(UTC).isoformat(timespec="seconds"),
                     sealed=Seal(c.sealed.uki.hex(), kernel.dirname) if c.sealed is not None else None)
    staging = tempfile.mkdtemp(prefix=f".{name}.", dir=os_dir)
    report = make_etc(sysroot, c, merge_dep, os.path.join(staging, "etc"))
    deployment.save(staging, dep)
    _ensure_var(sysroot, os_name, c)
    set_ref(repo, dep)
    syncfs(os_dir)
    os.rename(staging, os.path.join(os_dir, name))
    fsync_dir(os_dir)
    if dep.sealed is not None:
        # Before any entry boots the UKI: the boot hook finds the deployment by it.
        bydigest.write(sysroot.top, dep)

    title = title_of(os_release(repo, c.root), c.version, os_name)
    if stage:
        previous = load_staged(sysroot)
        # Replacing the record is the step that stages: a crash before it leaves the
        # previous staged deployment (or none), and this directory a leftover.
        staged.save(sysroot.top, Staged(os_name, name, kernel.dirname, title, verity, tries or None,
                                        make_default, merge_dep.name if merge_dep else None,
                                        staged.current_boot_id()))
        if previous is not None and previous.os != os_name:
            settle(sysroot, previous.os)
        settle(sysroot, os_name)
        index = order_with(state, sysroot, dep, make_default).index(dep)
        unit, error = _arm_finalize(sysroot)
        return DeployResult(dep, index, kernel, image_built, report, merge_dep, staged=True,
                            discarded=previous.name if previous else None, finalize_unit=unit,
                            finalize_unit_error=error)
    discarded = unstage(sysroot, os_name)
    index, removed = switch_in(sysroot, state, dep, new_entry(dep, kernel, title, verity, tries), make_default)
    return DeployResult(dep, index, kernel, image_built, report, merge_dep, removed, discarded=discarded)


def _check_sealed_request(c: Commit, append: tuple[str, ...], delete: tuple[str, ...],
                          verity: str | None) -> None:
    """A sealed commit's command line is its UKI's: refuse what would change it."""
    if append or delete:
        raise DeployUsageError(f"commit {c.id[:12]} is sealed: its kernel command line is its UKI's, "
                               "signed; kernel arguments cannot be added or removed")
    if verity not in (None, "require"):
        raise DeployUsageError(f"commit {c.id[:12]} is sealed: its UKI boots with cfsdeploy.verity=require, "
                               f"not {verity}")


def _refuse_deployed_image(sysroot: Sysroot, c: Commit) -> None:
    """One deployment per sealed image (the boot finds it by the image's digest)."""
    digest = c.image_digest.hex()
    try:
        link = bydigest.read(sysroot.top, digest)
    except bydigest.LinkError as e:
        raise bydigest.LinkError(f"image {digest[:12]} of sealed commit {c.id[:12]}: {e}",
                                 hint="check and remove it") from None
    if link is not None:
        raise DeployUsageError(f"sealed commit {c.id[:12]}: its image is already deployed, as "
                               f"{link.os}/{link.name}; a sealed image has one deployment per sysroot",
                               hint="make it the default with `cfsdeploy rollback`, or pick it in the boot menu")


def _base_kargs(sysroot: Sysroot, state: State) -> list[str]:
    """The kernel arguments a new unsealed deployment starts from: the booted one's,
    else the default's; past sealed ones (whose arguments are their UKI's) to the
    newest unsealed one, else the sysroot's."""
    candidates = [state.booted] if state.booted is not None else []
    return next((d.kargs for d in candidates + state.deployments if d.sealed is None), sysroot.config.kargs)


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


def _arm_finalize(sysroot: Sysroot) -> tuple[FinalizeUnit, str | None]:
    """After staging: have systemd finalize it at shutdown.  The unit finalizes the
    default sysroot, so only that one is armed."""
    if os.path.realpath(sysroot.path) != os.path.realpath(default_path()):
        return FinalizeUnit.NOT_DEFAULT_SYSROOT, None
    try:
        return (FinalizeUnit.STARTED if staged.start_finalize_unit() else FinalizeUnit.NO_SYSTEMD), None
    except CfsError as e:
        return FinalizeUnit.FAILED, str(e)
