"""Each change of deployments takes the sysroot lock itself, waiting as its LockPolicy says."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from cfsdeploy.sysroot.deploy import deploy
from cfsdeploy.sysroot.layout import Sysroot
from cfsdeploy.sysroot.locking import LockPolicy
from cfsdeploy.sysroot.rollback import pin
from cfsdeploy.sysroot.upgrade import upgrade
from cfsdeploy.util.lockfile import LockedError

from .sysroots import BRANCH, OS, ROOT_KARGS, boot_mount, commit_tree, make_os_tree


@pytest.fixture
def machine(tmp_path: Path):
    root = tmp_path / "sysroot"
    with boot_mount(root / "boot"):
        s = Sysroot.init(str(root), OS, karg_list=ROOT_KARGS)
        commit_tree(s, make_os_tree(tmp_path / "tree"))
        deploy(s, BRANCH, os_name=OS)
        yield SimpleNamespace(sysroot=s, tree=tmp_path / "tree")


def held_elsewhere(s: Sysroot) -> subprocess.Popen[bytes]:
    """Another process holding the sysroot lock until it is killed."""
    code = ("import fcntl, sys, time; f = open(sys.argv[1], 'rb'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('held', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, f"{s.top}/lock"], stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline() == b"held\n"
    return p


def test_a_change_waits_as_its_policy_says_then_fails_typed(machine: SimpleNamespace) -> None:
    told: list[bool] = []
    p = held_elsewhere(machine.sysroot)
    try:
        with pytest.raises(LockedError):
            pin(machine.sysroot, OS, 0, lock=LockPolicy(0.2, lambda: told.append(True)))
    finally:
        p.kill()
        p.wait()
    assert told == [True] and not machine.sysroot.state(OS).deployments[0].pinned


def test_a_change_gets_the_lock_once_the_other_process_lets_go(machine: SimpleNamespace) -> None:
    p = held_elsewhere(machine.sysroot)
    threading.Timer(0.3, p.kill).start()
    try:
        assert pin(machine.sysroot, OS, 0, lock=LockPolicy(30)).pinned
    finally:
        p.wait()


def test_a_change_calling_another_takes_the_lock_once(machine: SimpleNamespace) -> None:
    """upgrade deploys under the lock it holds: no wait for itself."""
    make_os_tree(machine.tree, version="2")
    commit_tree(machine.sysroot, machine.tree, version="2")
    r = upgrade(machine.sysroot, OS, lock=LockPolicy(0))
    assert r.deployed is not None and r.deployed.index == 0
