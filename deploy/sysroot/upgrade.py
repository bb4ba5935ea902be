"""Upgrade and switch: pull the head of a deployment's origin and deploy it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from ..composefs import dumpfile
from ..composefs.tree import Inode
from ..repo.repository import Repository
from ..repo.treediff import TreeDiff, diff
from .commit import DeployIntegrityError, manifest_data
from .deploy import DeployResult, deploy
from .deployment import Deployment, Origin
from .entries import prepare
from .layout import Sysroot, SysrootUsageError, staged_status
from .locking import NO_WAIT, LockPolicy, locked

if TYPE_CHECKING:
    from ..remote.pull import PullProgress, PullResult


class UpgradeOutcome(Enum):
    """What an upgrade (or switch, or check) found and did."""
    UP_TO_DATE = "up_to_date"            # the origin's head is what runs
    PENDING_REBOOT = "pending_reboot"    # the head is deployed (the default) or staged, not yet booted
    UPDATE_AVAILABLE = "update_available"  # a check found a head to deploy
    DEPLOYED = "deployed"                # the head is deployed (see `deployed`)
    STAGED = "staged"                    # the head is staged (see `deployed`)


@dataclass
class UpgradeResult:
    outcome: UpgradeOutcome
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
            kver: str | None = None, progress: Callable[[PullProgress], None] | None = None,
            lock: LockPolicy = NO_WAIT) -> UpgradeResult:
    """Pull the newest commit of the booted (or default) deployment's origin, or of a
    new origin (switch), and deploy it as the default, keeping the rollback (or stage
    it, to become the default at shutdown), with its newest kernel or kernel `kver`."""
    state = prepare(sysroot, os_name)
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
                      options=PullOptions(lock_wait=lock.wait, on_lock_wait=lock.on_wait))
        rev = f"{origin.remote}/{origin.branch}"
    else:
        rev = origin.branch
    head = str(repo.resolve(rev).id)
    result = UpgradeResult(UpgradeOutcome.UPDATE_AVAILABLE, origin, current, head, pulled, None, None)
    if current is not None:
        same_origin = origin == current.origin
        if same_origin and head in (current.commit, state.default.commit if state.default else None,
                                    _staged_commit(sysroot, os_name)):
            result.outcome = (UpgradeOutcome.UP_TO_DATE if head == current.commit
                              else UpgradeOutcome.PENDING_REBOOT)
            return result
        if same_origin and not allow_downgrade:
            _check_not_older(repo, current.commit, head)
        result.changes = diff(_full_manifest(repo, current.commit), _full_manifest(repo, head))
    if check:
        return result
    result.deployed = deploy(sysroot, head, os_name=os_name, origin=origin, tries=tries, stage=stage,
                             kver=kver)
    result.outcome = UpgradeOutcome.STAGED if stage else UpgradeOutcome.DEPLOYED
    return result


def _staged_commit(sysroot: Sysroot, os_name: str) -> str | None:
    s = staged_status(sysroot, os_name)
    return s.deployment.commit if s is not None and s.deployment is not None else None


def _full_manifest(repo: Repository, rev: str) -> Inode:
    return dumpfile.parse(manifest_data(repo, rev))


def parse_refspec(refspec: str) -> Origin:
    """REMOTE:BRANCH, or BRANCH of the machine's own repository."""
    remote, sep, branch = refspec.rpartition(":")
    if not branch or (sep and not remote):
        raise SysrootUsageError(f"expected REMOTE:BRANCH or BRANCH, not {refspec!r}")
    return Origin(branch, remote or None)
