"""No command follows a symlink out of the sysroot.

Every command runs over a sysroot whose deployments' etc/, the os's var/ and
deploy/<os>/ (and the boot directory's kernels, the repository's tmp/ and objects/)
hold symlinks to a canary tree outside it, the kind a local user can make in an /etc
directory they own or in /var.  Afterwards the canary is the same in every name,
mode, owner and byte.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from cfsdeploy.repo.repository import prune
from cfsdeploy.sysroot.cleanup import cleanup as sysroot_cleanup
from cfsdeploy.sysroot.cmdline import set_kargs
from cfsdeploy.sysroot.finalize import finalize_staged
from cfsdeploy.sysroot.rollback import rollback as sysroot_rollback
from cfsdeploy.sysroot.rollback import undeploy as sysroot_undeploy
from cfsdeploy.sysroot.upgrade import upgrade as sysroot_upgrade

from .sysroots import OS, commit_tree
from .test_deploy import booted_into, deploy, machine, new_version  # noqa: F401

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a canary owned by another user"),
]

USER = 1000
OBJECT_NAME = "cd" * 31  # what prune takes for an object in objects/XX/


def make_canary(top: Path) -> Path:
    """A tree of the modes removal used to clobber: sticky and world-writable like
    /tmp, read-only, private, owned by a user, with files of known content."""
    top.mkdir()
    for rel, mode in (("", 0o1777), ("sub", 0o755), ("sub/deeper", 0o555), ("private", 0o700), ("objects", 0o755)):
        d = top / rel
        d.mkdir(exist_ok=True)
        os.chown(d, USER, USER)
        d.chmod(mode)
    for rel, data, mode in (("file", b"canary\n", 0o600), ("sub/conf", b"setting=1\n", 0o644),
                            ("private/key", b"secret\n", 0o400), (f"objects/{OBJECT_NAME}", b"an object?\n", 0o444)):
        f = top / rel
        f.write_bytes(data)
        os.chown(f, USER, USER)
        f.chmod(mode)
    return top


def snapshot(top: Path) -> dict[str, tuple[int, int, int, bytes | None]]:
    """Every entry's mode, owner and content, no symlink followed."""
    out = {}
    for d, dirs, files in os.walk(top):
        for name in ["", *dirs, *files]:
            p = os.path.join(d, name)
            st = os.lstat(p)
            data = Path(p).read_bytes() if stat.S_ISREG(st.st_mode) else None
            out[os.path.relpath(p, top)] = (st.st_mode, st.st_uid, st.st_gid, data)
    return out


def salt(m: SimpleNamespace, canary: Path) -> None:
    """Symlinks to the canary wherever a command reads or removes."""
    os_dir = m.root / "cfsdeploy/deploy" / OS
    links = [os_dir / "canary", os_dir / "var" / "canary",
             m.boot / "cfsdeploy" / OS / "canary", m.root / "cfsdeploy/repo/tmp/canary"]
    for dep in os_dir.iterdir():
        if (dep / "etc").is_dir() and not dep.is_symlink():
            links += [dep / "etc" / "canary", dep / "etc" / "canary-sub"]
            (dep / "etc" / "owned").mkdir()
            links.append(dep / "etc" / "owned" / "canary")
    for link in links:
        link.symlink_to(canary / "sub" if link.name == "canary-sub" else canary)
    # A leftover deployment directory, all symlinks inside.
    (os_dir / ".0123456789ab.0.leftover").mkdir()
    (os_dir / ".0123456789ab.0.leftover" / "etc").symlink_to(canary)
    # objects/XX as a symlink to a directory holding a name prune takes for an object.
    objects = m.root / "cfsdeploy/repo/objects"
    free = next(f"{i:02x}" for i in range(256) if not (objects / f"{i:02x}").exists())
    (objects / free).symlink_to(canary / "objects")


def two_deployments(m: SimpleNamespace) -> None:
    commit_tree(m.sysroot, m.tree)
    deploy(m)
    new_version(m, "2")
    deploy(m)


# Each prepares the machine for the command and returns the command.
Action = Callable[[], object]


def deploy_again(m: SimpleNamespace) -> Action:
    two_deployments(m)
    new_version(m, "3")
    return lambda: deploy(m)


def upgrade(m: SimpleNamespace) -> Action:
    two_deployments(m)
    new_version(m, "3")
    return lambda: sysroot_upgrade(m.sysroot, OS)


def rollback(m: SimpleNamespace) -> Action:
    two_deployments(m)
    return lambda: sysroot_rollback(m.sysroot, OS)


def undeploy(m: SimpleNamespace) -> Action:
    two_deployments(m)
    return lambda: sysroot_undeploy(m.sysroot, OS, 1)


def cleanup(m: SimpleNamespace) -> Action:
    two_deployments(m)
    m.sysroot.config.keep_rollback = False  # so the rollback goes too
    return lambda: sysroot_cleanup(m.sysroot, OS)


def kargs(m: SimpleNamespace) -> Action:
    two_deployments(m)
    return lambda: set_kargs(m.sysroot, OS, append=("quiet",))


def stage_and_finalize(m: SimpleNamespace) -> Action:
    commit_tree(m.sysroot, m.tree)
    deploy(m)
    m.sysroot = booted_into(m)
    new_version(m, "2")
    deploy(m, stage=True)
    return lambda: finalize_staged(m.sysroot)


def prune_objects(m: SimpleNamespace) -> Action:
    two_deployments(m)
    repo = m.sysroot.repo

    def act() -> None:
        with repo.lock():
            prune(repo)
    return act


COMMANDS: dict[str, Callable[[SimpleNamespace], Action]] = {
    "deploy": deploy_again, "upgrade": upgrade, "rollback": rollback, "undeploy": undeploy,
    "cleanup": cleanup, "kargs": kargs, "stage-and-finalize": stage_and_finalize, "prune": prune_objects,
}


@pytest.mark.parametrize("command", COMMANDS)
def test_command_leaves_a_canary_behind_symlinks_untouched(machine: SimpleNamespace, command: str) -> None:
    act = COMMANDS[command](machine)
    canary = make_canary(machine.tmp / "canary")
    before = snapshot(canary)
    salt(machine, canary)
    act()
    assert snapshot(canary) == before
