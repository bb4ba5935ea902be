"""Deployments on a sysroot: deploy, status, rollback, undeploy, pin, kargs, cleanup."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pygit2
import pytest

from cfsdeploy.boot import bootloader
from cfsdeploy.boot.kargs import KargsError
from cfsdeploy.repo.fsck import fsck
from cfsdeploy.repo.repository import RepositoryNotFoundError
from cfsdeploy.sysroot.cleanup import cleanup
from cfsdeploy.sysroot.cmdline import set_kargs
from cfsdeploy.sysroot.commit import (
    DeployError,
    DeployHostError,
    DeployIntegrityError,
    DeployUsageError,
    version_key,
)
from cfsdeploy.sysroot.deploy import DeployResult
from cfsdeploy.sysroot.deploy import deploy as sysroot_deploy
from cfsdeploy.sysroot.deployment import Origin
from cfsdeploy.sysroot.entries import recover
from cfsdeploy.sysroot.layout import BootCounting, Sysroot, SysrootError, status_rows
from cfsdeploy.sysroot.rollback import pin, rollback, undeploy
from cfsdeploy.sysroot.upgrade import upgrade

from .sysroots import (
    BRANCH,
    KVER,
    OS,
    ROOT_KARGS,
    boot_mount,
    bootctl_list,
    commit_tree,
    entries_read_as_meant,
    make_os_tree,
)


@pytest.fixture
def machine(tmp_path):
    """A sysroot whose boot directory is a filesystem of its own.  At the end, every
    entry written must read back, in systemd's parser, as meant."""
    root = tmp_path / "sysroot"
    with boot_mount(root / "boot"):
        s = Sysroot.init(str(root), OS, karg_list=ROOT_KARGS)
        tree = make_os_tree(tmp_path / "tree")
        yield SimpleNamespace(sysroot=s, tree=tree, root=root, boot=root / "boot", tmp=tmp_path)
        entries_read_as_meant(Sysroot(str(root)), OS)


def deploy(m, rev: str = BRANCH, **kw) -> DeployResult:
    return sysroot_deploy(m.sysroot, rev, os_name=OS, **kw)


def booted_into(m, index: int = 0) -> Sysroot:
    """The sysroot as the machine sees it after booting entry `index`."""
    entry = m.sysroot.state(OS).entries[index]
    return Sysroot(str(m.root), cmdline=f"BOOT_IMAGE=x {entry.options}")


def new_version(m, version: str) -> str:
    make_os_tree(m.tree, version=version)
    return commit_tree(m.sysroot, m.tree, version=version)


def names(m) -> list[str]:
    return [d.name for d in m.sysroot.state(OS).deployments]


def test_sysroot_init_lays_out_the_contract(machine) -> None:
    top = machine.root / "cfsdeploy"
    pending = [] if host_has_verity(machine.tmp) else ["verity-pending"]
    assert sorted(os.listdir(top)) == ["config.toml", "deploy", "lock", "repo", *pending]
    assert os.listdir(top / "deploy" / OS) == ["var"]
    assert machine.sysroot.config.kargs == ROOT_KARGS


def test_deploy_lays_out_the_deployment(machine) -> None:
    cid = commit_tree(machine.sysroot, machine.tree)
    r = deploy(machine)
    d = r.deployment
    assert d.name == f"{cid[:12]}.0" and d.commit == cid and d.kernel_version == KVER
    top = machine.root / "cfsdeploy" / "deploy" / OS / d.name
    assert sorted(os.listdir(top)) == ["deployment.json", "etc"]
    assert (top / "etc" / "hostname").read_text() == "testbox\n"
    assert json.loads((top / "deployment.json").read_text())["image_digest"] == d.image_digest
    assert machine.sysroot.repo.objects.has(bytes.fromhex(d.image_digest))
    kernel = machine.tree / f"usr/lib/modules/{KVER}/vmlinuz"
    assert (machine.boot / r.kernel.relpath / "vmlinuz").read_bytes() == kernel.read_bytes()


def test_entry_names_kernel_initramfs_and_arguments(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    d = deploy(machine).deployment
    entry = machine.sysroot.state(OS).entries[0]
    assert entry.filename == f"cfsdeploy-{OS}-1.conf"
    assert entry.options.split() == ROOT_KARGS + [
        f"cfsdeploy=/cfsdeploy/deploy/{OS}/{d.name}", f"cfsdeploy.digest={d.image_digest}",
        "cfsdeploy.verity=try"]
    assert entry.title == f"Test OS 1 (cfsdeploy {OS})"


def test_bootctl_accepts_the_entries(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    deploy(machine)
    new_version(machine, "2")
    deploy(machine)
    listed = [json.loads(line) for line in bootctl_list(machine.boot).splitlines()]
    assert [e["title"] for e in listed] == [f"Test OS 2 (cfsdeploy {OS})", f"Test OS 1 (cfsdeploy {OS})"]
    for e in listed:
        assert (machine.boot / e["linux"][1:]).is_file()
        assert all((machine.boot / i[1:]).is_file() for i in e["initrd"])


def test_new_deployment_is_default_and_previous_is_rollback(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    first = deploy(machine).deployment
    new_version(machine, "2")
    second = deploy(machine).deployment
    state = machine.sysroot.state(OS)
    assert state.default == second and state.rollback == first


def test_deploy_keeps_new_rollback_and_booted_only(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    a = deploy(machine).deployment
    machine.sysroot = booted_into(machine)
    made = []
    for v in ("2", "3", "4"):
        new_version(machine, v)
        made.append(deploy(machine).deployment.name)
    assert names(machine) == [made[2], made[1], a.name]


def test_pinned_deployment_survives_retention(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    a = deploy(machine).deployment
    pin(machine.sysroot, OS, 0)
    for v in ("2", "3", "4"):
        new_version(machine, v)
        deploy(machine)
    assert a.name in names(machine)
    assert machine.sysroot.state(OS).deployments[-1].pinned


def test_keep_extra_keeps_more_deployments(machine) -> None:
    machine.sysroot.config.keep_extra = 2
    commit_tree(machine.sysroot, machine.tree)
    deploy(machine)
    for v in ("2", "3", "4", "5"):
        new_version(machine, v)
        deploy(machine)
    assert len(names(machine)) == 4


def test_same_kernel_is_installed_once(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    deploy(machine)
    new_version(machine, "2")
    deploy(machine)
    assert len(os.listdir(machine.boot / "cfsdeploy" / OS)) == 1


def test_dropped_deployment_takes_its_kernel_and_directory_along(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    a = deploy(machine).deployment
    for v, seed in (("2", b"k2"), ("3", b"k3")):
        make_os_tree(machine.tree, version=v, kernel_seed=seed)
        commit_tree(machine.sysroot, machine.tree, version=v)
        deploy(machine)
    assert a.name not in os.listdir(machine.root / "cfsdeploy" / "deploy" / OS)
    assert len(os.listdir(machine.boot / "cfsdeploy" / OS)) == 2
    assert f"refs/deployments/{OS}/{a.name}" not in machine.sysroot.repo.git.references


def test_no_default_adds_after_the_default(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    a = deploy(machine).deployment
    new_version(machine, "2")
    b = deploy(machine, make_default=False).deployment
    assert names(machine) == [a.name, b.name]


def test_rollback_swaps_default_and_previous(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    a = deploy(machine).deployment
    new_version(machine, "2")
    b = deploy(machine).deployment
    r = rollback(machine.sysroot, OS)
    assert (r.default, r.previous) == (a, b) and names(machine) == [a.name, b.name]


def test_rollback_with_pending_upgrade_goes_back_to_booted(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    deploy(machine)
    new_version(machine, "2")
    b = deploy(machine).deployment
    machine.sysroot = booted_into(machine, 0)
    new_version(machine, "3")
    c = deploy(machine).deployment
    r = rollback(machine.sysroot, OS)
    assert (r.default, r.previous) == (b, c)


def test_rollback_needs_two_deployments(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    deploy(machine)
    with pytest.raises(SysrootError, match="no other deployment"):
        rollback(machine.sysroot, OS)


def test_undeploy_removes_a_deployment(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    a = deploy(machine).deployment
    new_version(machine, "2")
    b = deploy(machine).deployment
    assert undeploy(machine.sysroot, OS, 1).deployment == a
    assert names(machine) == [b.name]
    assert a.name not in os.listdir(machine.root / "cfsdeploy" / "deploy" / OS)


def test_undeploy_refuses_the_booted_and_the_last(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    deploy(machine)
    with pytest.raises(SysrootError, match="only deployment"):
        undeploy(machine.sysroot, OS, 0)
    new_version(machine, "2")
    deploy(machine)
    machine.sysroot = booted_into(machine, 1)
    with pytest.raises(SysrootError, match="booted"):
        undeploy(machine.sysroot, OS, 1)


def test_kargs_edit_the_default_entry(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    deploy(machine)
    d = set_kargs(machine.sysroot, OS, append=("quiet",), delete=("rw",), replace=("root=/dev/vdb",)).deployment
    assert d.kargs == ["root=/dev/vdb", "quiet"]
    assert machine.sysroot.state(OS).entries[0].options.startswith("root=/dev/vdb quiet cfsdeploy=")


def test_kargs_carry_over_to_the_next_deployment(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    deploy(machine, append=("console=ttyS0",))
    new_version(machine, "2")
    d = deploy(machine, delete=("rw",)).deployment
    assert d.kargs == [ROOT_KARGS[0], "console=ttyS0"]


@pytest.mark.parametrize("arg", ["cfsdeploy.verity=off", 'systemd.setenv="A=1 cfsdeploy=x"'])
def test_cfsdeploy_arguments_cannot_be_set_by_hand(machine, arg) -> None:
    commit_tree(machine.sysroot, machine.tree)
    with pytest.raises(KargsError, match="set by cfsdeploy"):
        deploy(machine, append=(arg,))
    assert machine.sysroot.state(OS).deployments == []


def test_kargs_replace_with_a_newline_is_refused_and_changes_nothing(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    a = deploy(machine, append=("console=ttyS0",)).deployment
    before = entries_files(machine)
    with pytest.raises(KargsError, match="printable ASCII"):
        set_kargs(machine.sysroot, OS, replace=("console=ttyS0=ttyS1\nlinux /evil",))
    assert entries_files(machine) == before and names(machine) == [a.name]


def test_quoted_karg_with_spaces_boots_as_meant_through_every_rewrite(machine) -> None:
    meant = 'systemd.setenv="A=1 B=2"'
    commit_tree(machine.sysroot, machine.tree)
    deploy(machine, append=(meant,))
    new_version(machine, "2")
    deploy(machine)
    set_kargs(machine.sysroot, OS, append=("quiet",))
    rollback(machine.sysroot, OS)
    state = machine.sysroot.state(OS)
    assert [d.kargs for d in state.deployments] == [ROOT_KARGS + [meant], ROOT_KARGS + [meant, "quiet"]]
    # ... and the fixture's guard checks that bootctl reads both entries so.


def test_title_from_the_commit_is_one_plain_line(machine) -> None:
    (machine.tree / "usr/lib/os-release").write_bytes(b'PRETTY_NAME="Evil\x1b[2J\x00OS\xe2\x80\xae 1"\n')
    commit_tree(machine.sysroot, machine.tree)
    deploy(machine)
    assert machine.sysroot.state(OS).entries[0].title == f"Evil [2J OS 1 (cfsdeploy {OS})"


@pytest.mark.parametrize("kver", ["6.1\noptions systemd.unit=rescue.target x=", ".6.12"])
@pytest.mark.parametrize("stage", [False, True], ids=["deploy", "stage"])
def test_module_directory_that_is_no_plain_version_is_refused(machine, kver, stage) -> None:
    hostile = machine.tree / "usr/lib/modules" / kver
    shutil.copytree(machine.tree / f"usr/lib/modules/{KVER}", hostile)
    commit_tree(machine.sysroot, machine.tree)
    before = snapshot(machine)
    with pytest.raises(DeployError, match="invalid kernel version"):
        deploy(machine, stage=stage)
    assert snapshot(machine) == before


def test_boot_counting_tries_name_the_new_entry(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    deploy(machine)
    new_version(machine, "2")
    deploy(machine, tries=3)
    files = sorted(os.listdir(machine.boot / "loader" / "entries"))
    assert files == [f"cfsdeploy-{OS}-1.conf", f"cfsdeploy-{OS}-2+3.conf"]
    assert status_rows(machine.sysroot.state(OS))[0].boot_counting == BootCounting.TRIAL


def test_sysroot_tries_put_every_new_deployment_on_trial(tmp_path) -> None:
    root = tmp_path / "sysroot"
    with boot_mount(root / "boot"):
        s = Sysroot.init(str(root), OS, karg_list=ROOT_KARGS, tries=2)
        commit_tree(s, make_os_tree(tmp_path / "tree"))
        sysroot_deploy(s, BRANCH, os_name=OS)
        assert os.listdir(root / "boot/loader/entries") == [f"cfsdeploy-{OS}-1+2.conf"]


def test_boot_counter_state_survives_a_rewrite(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    deploy(machine, tries=3)
    entries = machine.boot / "loader" / "entries"
    # The boot loader counted one failed attempt.
    os.rename(entries / f"cfsdeploy-{OS}-1+3.conf", entries / f"cfsdeploy-{OS}-1+2-1.conf")
    new_version(machine, "2")
    deploy(machine)
    assert f"cfsdeploy-{OS}-1+2-1.conf" in os.listdir(entries)


def tries_used_up(m) -> None:
    """Version 2 deployed with 2 tries, both used up by the loader without a blessing."""
    commit_tree(m.sysroot, m.tree)
    deploy(m)
    new_version(m, "2")
    deploy(m, tries=2)
    entries = m.boot / "loader" / "entries"
    os.rename(entries / f"cfsdeploy-{OS}-2+2.conf", entries / f"cfsdeploy-{OS}-2+0-2.conf")


def test_status_says_loudly_that_an_entry_failed(machine) -> None:
    tries_used_up(machine)
    rows = status_rows(booted_into(machine, 1).state(OS))
    assert rows[0].boot_failed and rows[0].boot_counting == BootCounting.FAILED
    assert rows[1].booted and rows[1].rollback


def test_status_of_a_boot_on_its_last_try_is_not_yet_a_failure(machine) -> None:
    tries_used_up(machine)
    rows = status_rows(booted_into(machine, 0).state(OS))
    assert rows[0].booted and not rows[0].boot_failed
    assert rows[0].boot_counting == BootCounting.LAST_TRY


def test_var_is_made_once_and_never_touched_by_upgrades(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    deploy(machine)
    var = machine.root / "cfsdeploy" / "deploy" / OS / "var"
    assert (var / "lib/app/state").read_text() == "initial\n"
    (var / "lib/app/state").write_text("machine data\n")
    (machine.tree / "var/lib/app/state").write_text("new default\n")
    new_version(machine, "2")
    deploy(machine)
    assert (var / "lib/app/state").read_text() == "machine data\n"


def test_local_etc_edit_survives_an_upgrade(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    a = deploy(machine).deployment
    machine.sysroot = booted_into(machine)
    (machine.root / "cfsdeploy/deploy" / OS / a.name / "etc/hostname").write_text("mine\n")
    new_version(machine, "2")
    r = deploy(machine)
    etc = machine.root / "cfsdeploy/deploy" / OS / r.deployment.name / "etc"
    assert (etc / "hostname").read_text() == "mine\n"
    assert (etc / "default/app").read_text() == "SETTING=2\n"
    assert r.etc.modified == [b"/etc/hostname"] and r.merged_from == a


def test_origin_is_the_branch_deployed(machine) -> None:
    cid = commit_tree(machine.sysroot, machine.tree)
    assert deploy(machine, origin=Origin(BRANCH)).deployment.origin == Origin(BRANCH)
    # A commit id keeps the origin the machine follows.
    assert deploy(machine, cid).deployment.origin == Origin(BRANCH)


def test_prune_keeps_objects_of_deployments_whose_branch_moved(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    deploy(machine)
    repo = machine.sysroot.repo
    repo.git.references.delete(f"refs/heads/{BRANCH}")
    r = cleanup(machine.sysroot, OS)
    assert r.objects == 0 and fsck(repo).ok


def test_cleanup_applies_the_retention(machine) -> None:
    machine.sysroot.config.keep_extra = 5
    commit_tree(machine.sysroot, machine.tree)
    for v in ("2", "3", "4"):
        deploy(machine)
        new_version(machine, v)
    machine.sysroot.config.keep_extra = 0
    r = cleanup(machine.sysroot, OS)
    assert len(r.deployments) == 1 and len(names(machine)) == 2


# --- errors: clear, and nothing half-written -------------------------------------------


def snapshot(m) -> list[str]:
    out = []
    for top in (m.root, m.boot):
        for dirpath, dirnames, files in os.walk(top):
            if "repo" in Path(dirpath).parts:
                continue
            out += [os.path.join(dirpath, n) for n in dirnames + files]
    return sorted(out)


def test_unknown_revision_is_a_clear_error(machine) -> None:
    with pytest.raises(RepositoryNotFoundError, match="unknown revision 'nope'"):
        deploy(machine, "nope")


def test_commit_without_kernel_is_refused(machine) -> None:
    for f in (machine.tree / f"usr/lib/modules/{KVER}").iterdir():
        f.unlink()
    commit_tree(machine.sysroot, machine.tree)
    before = snapshot(machine)
    with pytest.raises(DeployError, match="has no kernel"):
        deploy(machine)
    assert snapshot(machine) == before


def test_commit_without_sysroot_dir_is_refused(machine) -> None:
    (machine.tree / "sysroot").rmdir()
    commit_tree(machine.sysroot, machine.tree)
    with pytest.raises(DeployError, match="no /sysroot directory"):
        deploy(machine)


def test_missing_objects_are_named(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    objects = machine.sysroot.repo.objects
    victim = next(p for p in Path(objects.path).rglob("*") if p.is_file() and p.stat().st_size == 1006)
    victim.unlink()
    before = snapshot(machine)
    missing = f"misses 1 objects: {victim.parent.name}{victim.name}"
    with pytest.raises(DeployIntegrityError, match=missing) as info:
        deploy(machine)
    assert "fsck" in (info.value.hint or "")
    assert snapshot(machine) == before


def test_manifest_that_does_not_give_its_image_is_refused(machine) -> None:
    cid = commit_tree(machine.sysroot, machine.tree)
    repo = machine.sysroot.repo
    c = repo.resolve(cid)
    digest = c.message.split("Composefs-Digest: ")[1][:64]
    message = c.message.replace(digest, "11" * 32)
    forged = repo.git.create_commit(None, c.author, c.committer, message, c.tree_id, [])
    with pytest.raises(DeployError, match="does not give the image"):
        deploy(machine, str(forged))


def test_full_boot_directory_leaves_old_state(tmp_path) -> None:
    root = tmp_path / "sysroot"
    with boot_mount(root / "boot", size_mib=1) as boot:
        s = Sysroot.init(str(root), OS, karg_list=ROOT_KARGS)
        tree = make_os_tree(tmp_path / "tree")
        (tree / f"usr/lib/modules/{KVER}/initramfs.img").write_bytes(os.urandom(2 << 20))
        commit_tree(s, tree)
        with pytest.raises(bootloader.BootHostError, match="boot directory .* is full"):
            sysroot_deploy(s, BRANCH, os_name=OS)
        assert s.state(OS).deployments == []
        assert os.listdir(boot) in ([], ["cfsdeploy"]) and not list((boot).rglob("*.img"))
        assert os.listdir(root / "cfsdeploy/deploy" / OS) == ["var"]


def test_concurrent_deploy_waits_for_the_lock_or_fails_clearly(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    with machine.sysroot.lock():
        env = dict(os.environ, CFSDEPLOY_SYSROOT=str(machine.root))
        p = subprocess.run([sys.executable, "-m", "cfsdeploy.cli", "deploy", BRANCH, "--os", OS,
                            "--wait-lock", "0.3"], env=env, capture_output=True, text=True)
    assert p.returncode == 5
    busy = f"cfsdeploy: sysroot {machine.root} is locked by another cfsdeploy process"
    assert p.stderr.strip().splitlines()[-1] == busy
    assert machine.sysroot.state(OS).deployments == []


# --- the command line ------------------------------------------------------------------------


def cli(m, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CFSDEPLOY_SYSROOT=str(m.root), CFSDEPLOY_CMDLINE=str(m.tmp / "cmdline"))
    return subprocess.run([sys.executable, "-m", "cfsdeploy.cli", *args], env=env, capture_output=True, text=True)


def test_cli_deploy_status_rollback(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    (machine.tmp / "cmdline").write_text("quiet\n")
    assert cli(machine, "deploy", BRANCH).returncode == 0
    new_version(machine, "2")
    out = cli(machine, "deploy", BRANCH, "--tries", "2")
    assert out.returncode == 0 and "this is now the default" in out.stdout, out.stderr
    (machine.tmp / "cmdline").write_text(machine.sysroot.state(OS).entries[1].options)
    rows = json.loads(cli(machine, "status", "--json").stdout)["deployments"]
    assert [(r["default"], r["rollback"], r["booted"], r["tries_left"]) for r in rows] == [
        (True, False, False, 2), (False, True, True, None)]
    assert "on trial: 2 tries left" in cli(machine, "status").stdout
    assert cli(machine, "rollback").returncode == 0
    assert json.loads(cli(machine, "status", "--json").stdout)["deployments"][0]["booted"]


def test_cli_errors_are_one_line(machine) -> None:
    p = cli(machine, "deploy", "nope")
    assert p.returncode == 3 and p.stderr == "cfsdeploy: unknown revision 'nope'\n"


def test_deployment_refs_keep_commits_for_git(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    d = deploy(machine).deployment
    ref = machine.sysroot.repo.git.references[f"refs/deployments/{OS}/{d.name}"]
    assert ref.target == pygit2.Oid(hex=d.commit)


def test_commit_never_verified_here_gets_its_image_built_and_checked(machine) -> None:
    cid = commit_tree(machine.sysroot, machine.tree)
    repo = machine.sysroot.repo
    c = repo.resolve(cid)
    os.unlink(os.path.join(repo.path, "verified", cid))
    os.unlink(repo.objects.path_of(bytes.fromhex(c.message.split("Composefs-Digest: ")[1][:64])))
    r = deploy(machine)
    assert r.image_built and repo.is_verified(cid, bytes.fromhex(r.deployment.image_digest))
    assert not deploy(machine).image_built


def test_corrupt_image_object_is_refused(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    d = deploy(machine).deployment
    path = machine.sysroot.repo.objects.path_of(bytes.fromhex(d.image_digest))
    data = bytearray(open(path, "rb").read())
    data[2000] ^= 1
    os.chmod(path, 0o644)
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(DeployError, match="corrupt"):
        deploy(machine)


def test_entry_of_a_vanished_deployment_is_reported_and_dropped(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    a = deploy(machine).deployment
    new_version(machine, "2")
    deploy(machine)
    shutil.rmtree(machine.root / "cfsdeploy/deploy" / OS / a.name)
    state = machine.sysroot.state(OS)
    assert [d.name for d in state.deployments] != [] and "missing its deployment.json" in state.broken[0][1]
    p = cli(machine, "status")
    assert p.returncode == 0 and "cannot boot" in p.stderr
    cleanup(machine.sysroot, OS, prune_objects=False)
    assert machine.sysroot.state(OS).broken == [] and len(names(machine)) == 1


# --- fs-verity: this host's kernel has none, so these show the path of a machine without it


def host_has_verity(directory: Path) -> bool:
    from cfsdeploy.composefs import fsverity

    f = directory / "probe"
    f.write_bytes(b"x")
    fd = os.open(f, os.O_RDONLY)
    try:
        return fsverity.try_enable_verity(fd)
    finally:
        os.close(fd)


def test_sysroot_without_verity_starts_deployments_with_try(machine) -> None:
    expected = "require" if host_has_verity(machine.tmp) else "try"
    assert machine.sysroot.config.verity == expected


def test_sysroot_without_verity_is_marked_verity_pending(machine) -> None:
    # For the boot hook: a first boot with verity=require enables it on every object.
    assert (machine.root / "cfsdeploy/verity-pending").exists() == (not host_has_verity(machine.tmp))


def test_deploy_refuses_require_where_the_image_has_no_verity(machine) -> None:
    if host_has_verity(machine.tmp):
        pytest.skip("this kernel has fs-verity: the refusal cannot happen")
    commit_tree(machine.sysroot, machine.tree)
    with pytest.raises(DeployHostError, match="the boot would stop") as info:
        deploy(machine, verity="require")
    assert "verity enable" in (info.value.hint or "")
    assert machine.sysroot.state(OS).deployments == []


def test_verity_enable_reports_why_it_cannot_and_changes_nothing(machine) -> None:
    if host_has_verity(machine.tmp):
        pytest.skip("this kernel has fs-verity: see the VM test for the journey")
    commit_tree(machine.sysroot, machine.tree)
    deploy(machine)
    before = entries_files(machine)
    p = cli(machine, "verity", "enable")
    assert p.returncode == 1 and "fs-verity" in p.stderr
    assert "0 deployments now boot with cfsdeploy.verity=require" in p.stdout
    assert entries_files(machine) == before


def test_verity_enable_that_cannot_keeps_the_verity_pending_marker(machine) -> None:
    if host_has_verity(machine.tmp):
        pytest.skip("this kernel has fs-verity: the VM test shows the marker removed")
    commit_tree(machine.sysroot, machine.tree)
    assert cli(machine, "verity", "enable").returncode == 1
    assert (machine.root / "cfsdeploy/verity-pending").exists()


def entries_files(m) -> dict[str, bytes]:
    d = m.boot / "loader/entries"
    return {n: (d / n).read_bytes() for n in os.listdir(d)}


def test_etc_and_var_hardlinked_to_usr_are_deployed_as_files(machine) -> None:
    # Trees deduplicated by hardlink tools link /etc and /var names to files under /usr.
    (machine.tree / "usr/share").mkdir()
    (machine.tree / "usr/share/z").write_bytes(b"shared default\n" * 10)
    os.link(machine.tree / "usr/share/z", machine.tree / "etc/y")
    os.link(machine.tree / "usr/share/z", machine.tree / "etc/y2")
    os.link(machine.tree / "usr/share/z", machine.tree / "var/lib/app/x")
    commit_tree(machine.sysroot, machine.tree)
    r = deploy(machine)
    etc = machine.root / "cfsdeploy/deploy" / OS / r.deployment.name / "etc"
    var = machine.root / "cfsdeploy/deploy" / OS / "var"
    assert (etc / "y").read_bytes() == (var / "lib/app/x").read_bytes() == b"shared default\n" * 10
    # Inside /etc the two names stay one file.
    assert (etc / "y").stat().st_ino == (etc / "y2").stat().st_ino
    machine.sysroot = booted_into(machine)
    new_version(machine, "2")
    assert deploy(machine).etc.modified == []


# --- damaged records: reported, set aside, and never a reason to delete ------------------


def two_kernels(m) -> tuple[DeployResult, DeployResult]:
    """Version 1 (the rollback) and 2 (the default), each with a kernel of its own."""
    commit_tree(m.sysroot, m.tree)
    a = deploy(m)
    make_os_tree(m.tree, version="2", kernel_seed=b"k2")
    commit_tree(m.sysroot, m.tree, version="2")
    return a, deploy(m)


def kept(m, r: DeployResult) -> bool:
    """The deployment's directory, kernel and ref are all still there."""
    return ((m.root / "cfsdeploy/deploy" / OS / r.deployment.name / "etc").is_dir()
            and (m.boot / r.kernel.relpath / "vmlinuz").is_file()
            and f"refs/deployments/{OS}/{r.deployment.name}" in m.sysroot.repo.git.references)


def aside(m) -> list[str]:
    d = m.root / "cfsdeploy/aside"
    return sorted(os.listdir(d)) if d.is_dir() else []


def test_unparsable_entry_is_reported_and_keeps_its_deployment(machine) -> None:
    a, b = two_kernels(machine)
    entry = machine.boot / "loader/entries" / f"cfsdeploy-{OS}-1.conf"
    entry.write_bytes(entry.read_bytes() + b"linux /evil\n")
    st = json.loads(cli(machine, "status", "--json").stdout)
    assert [(d["kind"], d["path"], d["message"]) for d in st["damaged"]] == [("entry", str(entry), "two linux lines")]
    assert st["damaged"][0]["keeps"] == sorted([a.deployment.name, a.kernel.dirname])
    p = cli(machine, "status")
    assert p.returncode == 0 and f"WARNING: damaged boot entry {entry}: two linux lines" in p.stderr
    for command in (["kargs", "--append", "quiet"], ["cleanup"], ["deploy", BRANCH]):
        p = cli(machine, *command)
        assert p.returncode == 0, p.stderr
    assert kept(machine, a) and aside(machine)[0].startswith(entry.name)
    st = json.loads(cli(machine, "status", "--json").stdout)
    keeps = sorted([a.deployment.name, a.kernel.dirname])
    assert [(d["kind"], d["keeps"]) for d in st["damaged"]] == [("aside", keeps)]


def test_empty_entry_blocks_no_command(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    deploy(machine)
    empty = machine.boot / "loader/entries" / f"cfsdeploy-{OS}-7.conf"
    empty.write_bytes(b"")
    p = cli(machine, "status")
    assert p.returncode == 0 and "it names nothing there is" in p.stderr
    new_version(machine, "2")
    for command in (["deploy", BRANCH], ["rollback"], ["kargs", "--append", "quiet"], ["cleanup"]):
        p = cli(machine, *command)
        assert p.returncode == 0, p.stderr
    assert not empty.exists() and aside(machine) == []


def test_damaged_deployment_record_keeps_its_directory(machine) -> None:
    a, b = two_kernels(machine)
    record = machine.root / "cfsdeploy/deploy" / OS / a.deployment.name / "deployment.json"
    record.write_text(json.dumps(json.loads(record.read_text()) | {"kernel_version": "6.1\noptions x"}))
    assert "malformed (bad kernel_version)" in machine.sysroot.state(OS).broken[0][1]
    cleanup(machine.sysroot, OS, prune_objects=False)
    assert kept(machine, a) and names(machine) == [b.deployment.name]
    assert aside(machine) == [f"cfsdeploy-{OS}-1.conf.{aside(machine)[0].rsplit('.', 1)[1]}"]


@pytest.mark.parametrize("change", [
    {"os": "other"}, {"name": "0123456789ab.0"}, {"commit": "x"}, {"image_digest": "00"},
    {"kernel_version": "6.1\noptions x"}, {"kargs": "quiet"}, {"kargs": ["a\nb"]}, {"origin": {"branch": 1}},
    {"pinned": "yes"}, {"extra": 1},
])
def test_deployment_record_is_checked_field_by_field(machine, change) -> None:
    from cfsdeploy.sysroot import deployment

    commit_tree(machine.sysroot, machine.tree)
    d = deploy(machine).deployment
    directory = machine.root / "cfsdeploy/deploy" / OS / d.name
    record = directory / "deployment.json"
    good = json.loads(record.read_text())
    record.write_text(json.dumps(good | change))
    with pytest.raises(deployment.DeploymentError, match="malformed"):
        deployment.load(str(directory))
    record.write_text(json.dumps(good))


# Kernels where distributions put them (docs/architecture.md, "Kernels").
LAYOUTS = {
    "modules": ("usr/lib/modules/{k}/vmlinuz", "usr/lib/modules/{k}/initramfs.img"),
    "debian": ("boot/vmlinuz-{k}", "boot/initrd.img-{k}"),
    "dracut": ("boot/vmlinuz-{k}", "boot/initramfs-{k}.img"),
}


def put_kernel(tree: Path, layout: str, kver: str, *, initramfs: bool = True) -> tuple[bytes, bytes]:
    """A kernel `kver` (and its initramfs) in one layout; returns their contents."""
    contents = (f"kernel {kver} {layout}".encode() * 500, f"initramfs {kver} {layout}".encode() * 500)
    for template, data in zip(LAYOUTS[layout][:2 if initramfs else 1], contents, strict=False):
        path = tree / template.format(k=kver)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return contents


def only_kernels(tree: Path) -> Path:
    """The tree without make_os_tree's kernel, for tests that put their own."""
    shutil.rmtree(tree / f"usr/lib/modules/{KVER}")
    return tree


def installed(m, r: DeployResult) -> tuple[bytes, bytes]:
    d = m.boot / r.kernel.relpath
    return (d / "vmlinuz").read_bytes(), (d / "initramfs.img").read_bytes()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernel_of_each_layout_deploys(machine, layout) -> None:
    contents = put_kernel(only_kernels(machine.tree), layout, "6.1.0-18-amd64")
    commit_tree(machine.sysroot, machine.tree)
    r = deploy(machine)
    assert r.deployment.kernel_version == "6.1.0-18-amd64"
    assert installed(machine, r) == contents


def test_newest_kernel_by_version_is_deployed(machine) -> None:
    only_kernels(machine.tree)
    for kver in ("6.12.9", "6.12.10", "6.9.1"):
        put_kernel(machine.tree, "modules", kver)
    commit_tree(machine.sysroot, machine.tree)
    assert deploy(machine).deployment.kernel_version == "6.12.10"


def test_newest_kernel_is_chosen_across_layouts(machine) -> None:
    only_kernels(machine.tree)
    put_kernel(machine.tree, "modules", "6.1.0")
    newest = put_kernel(machine.tree, "debian", "6.1.1")
    commit_tree(machine.sysroot, machine.tree)
    r = deploy(machine)
    assert (r.deployment.kernel_version, installed(machine, r)) == ("6.1.1", newest)


def test_kver_picks_that_kernel(machine) -> None:
    only_kernels(machine.tree)
    older = put_kernel(machine.tree, "dracut", "6.12.9")
    put_kernel(machine.tree, "dracut", "6.12.10")
    commit_tree(machine.sysroot, machine.tree)
    r = deploy(machine, kver="6.12.9")
    assert (r.deployment.kernel_version, installed(machine, r)) == ("6.12.9", older)


def test_same_version_in_two_layouts_is_taken_from_the_first_in_search_order(machine) -> None:
    only_kernels(machine.tree)
    first = put_kernel(machine.tree, "modules", "6.12.1")
    put_kernel(machine.tree, "debian", "6.12.1")
    commit_tree(machine.sysroot, machine.tree)
    assert installed(machine, deploy(machine)) == first


def test_debian_initrd_is_preferred_to_dracut_name(machine) -> None:
    only_kernels(machine.tree)
    put_kernel(machine.tree, "dracut", "6.12.1")
    debian = put_kernel(machine.tree, "debian", "6.12.1")
    commit_tree(machine.sysroot, machine.tree)
    assert installed(machine, deploy(machine)) == debian


def test_initramfs_of_another_layout_is_not_paired(machine) -> None:
    only_kernels(machine.tree)
    put_kernel(machine.tree, "modules", "6.12.1", initramfs=False)
    (machine.tree / "boot").mkdir()
    (machine.tree / "boot/initrd.img-6.12.1").write_bytes(b"i" * 5000)
    commit_tree(machine.sysroot, machine.tree)
    with pytest.raises(DeployError, match="without an initramfs: 6.12.1"):
        deploy(machine)


def test_missing_kernel_names_every_path_searched(machine) -> None:
    only_kernels(machine.tree)
    commit_tree(machine.sysroot, machine.tree)
    with pytest.raises(DeployError) as e:
        deploy(machine)
    for path in ("/usr/lib/modules/<kver>/vmlinuz", "/usr/lib/modules/<kver>/initramfs.img", "/boot/vmlinuz-<kver>",
                 "/boot/initrd.img-<kver>", "/boot/initramfs-<kver>.img"):
        assert path in str(e.value)


def test_missing_kver_names_the_paths_searched_and_the_kernels_there(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    with pytest.raises(DeployError, match=r"no kernel 6\.99 .*/boot/vmlinuz-6\.99, .*; it has 6\.12\.0-test"):
        deploy(machine, kver="6.99")


def test_kernel_without_initramfs_is_no_candidate(machine) -> None:
    only_kernels(machine.tree)
    put_kernel(machine.tree, "debian", "6.12.10", initramfs=False)
    put_kernel(machine.tree, "debian", "6.12.9")
    commit_tree(machine.sysroot, machine.tree)
    assert deploy(machine).deployment.kernel_version == "6.12.9"


@pytest.mark.parametrize("kver", ["../6.1", "6.1 x", ".6"])
def test_kver_that_is_no_plain_version_is_refused(machine, kver) -> None:
    commit_tree(machine.sysroot, machine.tree)
    with pytest.raises(DeployUsageError, match="--kver: invalid kernel version"):
        deploy(machine, kver=kver)


def test_boot_kernel_that_is_no_plain_version_is_refused(machine) -> None:
    put_kernel(machine.tree, "debian", ".6.12")
    commit_tree(machine.sysroot, machine.tree)
    with pytest.raises(DeployUsageError, match="/boot/vmlinuz-.6.12: invalid kernel version"):
        deploy(machine)


@pytest.mark.parametrize(("older", "newer"), [("6.12.9", "6.12.10"), ("6.9", "6.12"), ("6.12", "6.12.1"),
                                              ("6.12.0", "6.12.0-rt"), ("5.10.0-9-amd64", "5.10.0-10-amd64")])
def test_kernel_versions_compare_as_versions(older, newer) -> None:
    assert version_key(older) < version_key(newer)


def test_kver_given_to_deploy_is_used_when_its_kernel_is_put_back(machine) -> None:
    only_kernels(machine.tree)
    older = put_kernel(machine.tree, "modules", "6.12.9")
    put_kernel(machine.tree, "modules", "6.12.10")
    commit_tree(machine.sysroot, machine.tree)
    r = deploy(machine, kver="6.12.9")
    shutil.rmtree(machine.boot / r.kernel.relpath)
    recover(Sysroot(str(machine.root)))
    assert installed(machine, r) == older


def test_cli_deploy_kver(machine) -> None:
    only_kernels(machine.tree)
    put_kernel(machine.tree, "modules", "6.12.9")
    put_kernel(machine.tree, "modules", "6.12.10")
    commit_tree(machine.sysroot, machine.tree)
    p = cli(machine, "deploy", BRANCH, "--kver", "6.12.9")
    assert p.returncode == 0, p.stderr
    assert "kernel 6.12.9 in" in p.stdout


def test_upgrade_deploys_the_kver_given(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    deploy(machine)
    put_kernel(machine.tree, "modules", "6.13.0")
    older = put_kernel(machine.tree, "modules", "6.12.9")
    commit_tree(machine.sysroot, machine.tree, version="2")
    r = upgrade(machine.sysroot, OS, kver="6.12.9").deployed
    assert r is not None
    assert (r.deployment.kernel_version, installed(machine, r)) == ("6.12.9", older)
