"""upgrade and switch: pull the origin's newest signed commit and deploy it; rollback goes back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from cfsdeploy.remote import remotes
from cfsdeploy.remote.pull import BindingError, DowngradeError
from cfsdeploy.sysroot.deploy import deploy
from cfsdeploy.sysroot.deployment import Origin
from cfsdeploy.sysroot.layout import Sysroot, SysrootUsageError
from cfsdeploy.sysroot.rollback import rollback
from cfsdeploy.sysroot.upgrade import UpgradeOutcome, upgrade

from .pullkit import builder_key, nginx, publish, serve_branch_as  # noqa: F401  (fixtures)
from .sysroots import OS, ROOT_KARGS, boot_mount, entries_read_as_meant, make_os_tree

BRANCH = "testos/stable"


@pytest.fixture
def fleet(tmp_path, builder_key):  # noqa: F811
    """A build server's repository (served as files) and a machine following it."""
    tree = make_os_tree(tmp_path / "tree")
    server = tmp_path / "server"
    publish(server, tree, BRANCH, "build 1", key=builder_key)
    root = tmp_path / "machine"
    with boot_mount(root / "boot"):
        s = Sysroot.init(str(root), OS, karg_list=ROOT_KARGS)
        remotes.add(s.repo, "origin", f"file://{server}", key_files=[builder_key.public], branch=BRANCH)
        yield SimpleNamespace(sysroot=s, tree=tree, server=server, root=root, tmp=tmp_path, key=builder_key)
        entries_read_as_meant(Sysroot(str(root)), OS)


def release(f, version: str, branch: str = BRANCH) -> str:
    make_os_tree(f.tree, version=version)
    return publish(f.server, f.tree, branch, f"build {version}", key=f.key)


def install(f) -> None:
    """The first deployment, following origin:BRANCH."""
    upgrade(f.sysroot, OS, origin=Origin(BRANCH, "origin"))
    f.sysroot = booted(f)


def booted(f, index: int = 0) -> Sysroot:
    entry = f.sysroot.state(OS).entries[index]
    return Sysroot(str(f.root), cmdline=entry.options)


def test_switch_installs_the_origins_head(fleet) -> None:
    r = upgrade(fleet.sysroot, OS, origin=Origin(BRANCH, "origin"))
    d = r.deployed.deployment
    assert d.origin == Origin(BRANCH, "origin") and d.commit == r.commit
    assert r.pulled.signer is not None


def test_upgrade_deploys_the_new_head_and_keeps_the_rollback(fleet) -> None:
    install(fleet)
    old = fleet.sysroot.state(OS).default
    new = release(fleet, "2")
    r = upgrade(fleet.sysroot, OS)
    assert r.outcome == UpgradeOutcome.DEPLOYED and r.deployed.deployment.commit == new
    state = fleet.sysroot.state(OS)
    assert state.default.commit == new and state.rollback == old
    assert {os.fsdecode(p) for p in r.changes.modified} >= {"/etc/default/app", "/usr/lib/os-release"}


def test_upgrade_with_tries_puts_the_new_entry_on_trial(fleet) -> None:
    install(fleet)
    release(fleet, "2")
    upgrade(fleet.sysroot, OS, tries=3)
    default, rollback = fleet.sysroot.state(OS).entries[:2]
    assert (default.tries_left, default.tries_done) == (3, None)
    assert rollback.tries_left is None


def test_upgrade_with_nothing_new_changes_nothing(fleet) -> None:
    install(fleet)
    before = fleet.sysroot.state(OS).deployments
    r = upgrade(fleet.sysroot, OS)
    assert r.outcome == UpgradeOutcome.UP_TO_DATE and not r.available and r.deployed is None
    assert fleet.sysroot.state(OS).deployments == before


def test_upgrade_already_deployed_is_not_deployed_twice(fleet) -> None:
    install(fleet)
    release(fleet, "2")
    upgrade(fleet.sysroot, OS)
    r = upgrade(fleet.sysroot, OS)
    assert r.outcome == UpgradeOutcome.PENDING_REBOOT and r.deployed is None
    assert len(fleet.sysroot.state(OS).deployments) == 2


def test_check_only_reports(fleet) -> None:
    install(fleet)
    release(fleet, "2")
    r = upgrade(fleet.sysroot, OS, check=True)
    assert r.outcome == UpgradeOutcome.UPDATE_AVAILABLE and r.deployed is None
    assert len(fleet.sysroot.state(OS).deployments) == 1


def test_local_etc_edit_survives_the_upgrade(fleet) -> None:
    install(fleet)
    dep = fleet.sysroot.state(OS).default
    (fleet.root / "cfsdeploy/deploy" / OS / dep.name / "etc/hostname").write_text("edited\n")
    release(fleet, "2")
    d = upgrade(fleet.sysroot, OS).deployed.deployment
    etc = fleet.root / "cfsdeploy/deploy" / OS / d.name / "etc"
    assert (etc / "hostname").read_text() == "edited\n" and (etc / "default/app").read_text() == "SETTING=2\n"


def test_rollback_after_upgrade_goes_back(fleet) -> None:
    install(fleet)
    first = fleet.sysroot.state(OS).default
    release(fleet, "2")
    upgrade(fleet.sysroot, OS)
    assert rollback(fleet.sysroot, OS).default == first


def test_server_going_back_in_time_is_refused(fleet) -> None:
    install(fleet)
    release(fleet, "2")
    upgrade(fleet.sysroot, OS)
    server = fleet.server / "git"
    subprocess.run(["git", "--git-dir", str(server), "update-ref", f"refs/heads/{BRANCH}", f"{BRANCH}~1"], check=True)
    subprocess.run(["git", "--git-dir", str(server), "update-server-info"], check=True)
    with pytest.raises(DowngradeError):
        upgrade(fleet.sysroot, OS)


def test_upgrade_refuses_a_head_made_for_another_branch(fleet, nginx) -> None:  # noqa: F811
    os.symlink(fleet.server, nginx.root / "bound")
    remotes.add(fleet.sysroot.repo, "web", nginx.url("bound"), key_files=[fleet.key.public])
    upgrade(fleet.sysroot, OS, origin=Origin(BRANCH, "web"))
    fleet.sysroot = booted(fleet)
    before = fleet.sysroot.state(OS).deployments
    ref = fleet.sysroot.repo.git.references[f"refs/remotes/web/{BRANCH}"].target
    debug = release(fleet, "2-debug", branch="testos/debug")
    serve_branch_as(fleet.server, BRANCH, debug)
    with pytest.raises(BindingError, match=f"made for testos/debug, not {BRANCH}"):
        upgrade(fleet.sysroot, OS)
    assert fleet.sysroot.state(OS).deployments == before
    assert fleet.sysroot.repo.git.references[f"refs/remotes/web/{BRANCH}"].target == ref


def test_switch_refuses_a_head_made_for_another_branch(fleet) -> None:
    install(fleet)
    serve_branch_as(fleet.server, "testos/testing", release(fleet, "2-debug", branch="testos/debug"))
    with pytest.raises(BindingError, match="made for testos/debug, not testos/testing"):
        upgrade(fleet.sysroot, OS, origin=Origin("testos/testing", "origin"))
    assert [d.origin for d in fleet.sysroot.state(OS).deployments] == [Origin(BRANCH, "origin")]


def test_origin_needed(fleet) -> None:
    install(fleet)
    dep = fleet.sysroot.state(OS).default
    local = Sysroot(str(fleet.root), cmdline="")
    deploy(local, dep.commit, os_name=OS)
    with pytest.raises(SysrootUsageError, match="no branch"):
        # A machine never told what to follow: the commit id was deployed on a fresh os.
        upgrade(Sysroot.init(str(fleet.root), "other"), "other")


def test_switch_to_another_branch(fleet) -> None:
    install(fleet)
    testing = release(fleet, "3-beta", branch="testos/testing")
    r = upgrade(fleet.sysroot, OS, origin=Origin("testos/testing", "origin"))
    assert r.deployed.deployment.commit == testing
    assert fleet.sysroot.state(OS).default.origin == Origin("testos/testing", "origin")


def cli(f, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CFSDEPLOY_SYSROOT=str(f.root), CFSDEPLOY_CMDLINE=str(f.tmp / "cmdline"))
    return subprocess.run([sys.executable, "-m", "cfsdeploy.cli", *args], env=env, capture_output=True, text=True)


def test_cli_journey_over_nginx(fleet, nginx) -> None:  # noqa: F811
    """switch, upgrade --check (exit 77 when nothing is new), upgrade, status, rollback."""
    os.symlink(fleet.server, nginx.root / "repo")
    remotes.add(fleet.sysroot.repo, "web", nginx.url("repo"), key_files=[fleet.key.public], branch=BRANCH)
    (fleet.tmp / "cmdline").write_text("")
    p = cli(fleet, "switch", f"web:{BRANCH}")
    assert p.returncode == 0, p.stderr
    (fleet.tmp / "cmdline").write_text(fleet.sysroot.state(OS).entries[0].options)
    p = cli(fleet, "upgrade", "--check")
    assert p.returncode == 77 and "no update" in p.stdout
    release(fleet, "2")
    assert cli(fleet, "upgrade", "--check").returncode == 0
    p = cli(fleet, "upgrade")
    assert p.returncode == 0 and "reboot to activate it" in p.stdout, p.stderr
    assert "M /etc/default/app (content)" in p.stdout
    rows = json.loads(cli(fleet, "status", "--json").stdout)["deployments"]
    assert [(r["default"], r["booted"]) for r in rows] == [(True, False), (False, True)]
    assert rows[0]["origin"] == {"branch": BRANCH, "remote": "web"}
    assert cli(fleet, "rollback").returncode == 0
