"""Deploying sealed releases: the entry boots the commit's signed UKI (Type #1 with `efi`),
the sysroot maps the image's digest to its one deployment, and nothing changes the
sealed command line."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from cfsdeploy.boot import bootloader, kargs, uki
from cfsdeploy.boot.bootloader import BootError, Kind, RepairKind, parse_entry
from cfsdeploy.composefs.fsverity import Digest
from cfsdeploy.repo.repository import commit_info, sealed_of
from cfsdeploy.sysroot import bydigest
from cfsdeploy.sysroot.cleanup import cleanup
from cfsdeploy.sysroot.cmdline import set_kargs
from cfsdeploy.sysroot.commit import DeployIntegrityError, DeployUsageError
from cfsdeploy.sysroot.deploy import deploy as sysroot_deploy
from cfsdeploy.sysroot.entries import recover
from cfsdeploy.sysroot.finalize import finalize_staged
from cfsdeploy.sysroot.layout import VERITY_PENDING, Sysroot, SysrootUsageError
from cfsdeploy.sysroot.rollback import rollback, undeploy

from .sealing import commit_sealed, sealed_cmdline, vendor_key
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


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory):
    return vendor_key(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def machine(tmp_path: Path, key):
    """A sysroot (this host's kernel gives objects no fs-verity: marked pending, as
    `sysroot init` marks it) whose entries read back as meant in systemd's parser."""
    root = tmp_path / "sysroot"
    with boot_mount(root / "boot"):
        s = Sysroot.init(str(root), OS, karg_list=ROOT_KARGS)
        (root / "cfsdeploy" / VERITY_PENDING).write_bytes(b"")
        m = SimpleNamespace(sysroot=s, root=root, boot=root / "boot", tmp=tmp_path, key=key,
                            tree=make_os_tree(tmp_path / "tree"))
        yield m
        entries_read_as_meant(Sysroot(str(root)), OS)


def sealed(m: SimpleNamespace, version: str = "1", **kw: object) -> str:
    make_os_tree(m.tree, version=version, kernel_seed=f"k{version}".encode())
    return commit_sealed(m.sysroot, m.tree, m.key, m.tmp, version=version, **kw)  # type: ignore[arg-type]


def plain(m: SimpleNamespace, version: str) -> str:
    make_os_tree(m.tree, version=version, kernel_seed=f"k{version}".encode())
    return commit_tree(m.sysroot, m.tree, version=version)


def deploy(m: SimpleNamespace, rev: str = BRANCH, **kw: object):
    return sysroot_deploy(m.sysroot, rev, os_name=OS, **kw)  # type: ignore[arg-type]


def uki_object(m: SimpleNamespace, commit: str) -> bytes:
    s = sealed_of(m.sysroot.repo.resolve(commit))
    assert s is not None
    return Path(m.sysroot.repo.objects.path_of(s.uki)).read_bytes()


def entry_file(m: SimpleNamespace, index: int = 0) -> Path:
    return m.boot / bootloader.ENTRIES / m.sysroot.state(OS).entries[index].filename


# --- the entry and the kernel directory ---------------------------------------------------


def test_sealed_entry_is_title_version_sort_key_and_efi_last(machine) -> None:
    commit = sealed(machine)
    r = deploy(machine)
    digest = hashlib.sha256(uki_object(machine, commit)).hexdigest()[:12]
    assert entry_file(machine).read_text() == (
        "title Test OS 1 (cfsdeploy testos)\nversion 1\nsort-key cfsdeploy-testos\n"
        f"efi /cfsdeploy/{OS}/{KVER}-{digest}/uki.efi\n")
    assert r.kernel.dirname == f"{KVER}-{digest}"


def test_bootctl_reads_the_sealed_entry_as_booting_its_uki_with_no_options(machine) -> None:
    sealed(machine)
    r = deploy(machine, tries=2)
    [listed] = [json.loads(line) for line in bootctl_list(machine.boot).splitlines()]
    assert {k: listed.get(k) for k in ("title", "sortKey", "version", "efi", "triesLeft", "options", "linux")} == {
        "title": "Test OS 1 (cfsdeploy testos)", "sortKey": f"cfsdeploy-{OS}", "version": "1", "efi": r.kernel.efi,
        "triesLeft": 2, "options": None, "linux": None}


def test_sealed_kernel_directory_holds_the_uki_object_and_is_complete(machine) -> None:
    commit = sealed(machine)
    kernel = deploy(machine).kernel
    assert sorted(os.listdir(machine.boot / kernel.relpath)) == ["complete", "uki.efi"]
    assert (machine.boot / kernel.relpath / "uki.efi").read_bytes() == uki_object(machine, commit)


def test_sealed_deployment_records_its_uki_and_no_kernel_arguments(machine) -> None:
    commit = sealed(machine)
    r = deploy(machine)
    s = sealed_of(machine.sysroot.repo.resolve(commit))
    assert s is not None and r.deployment.sealed is not None
    assert (r.deployment.sealed.uki, r.deployment.sealed.kernel, r.deployment.kargs) == (
        s.uki.hex(), r.kernel.dirname, [])


def test_sealed_entry_with_boot_counting_carries_the_tries(machine) -> None:
    sealed(machine)
    deploy(machine, tries=3)
    assert entry_file(machine).name == f"cfsdeploy-{OS}-1+3.conf"


def test_by_digest_link_names_the_deployment(machine) -> None:
    sealed(machine)
    dep = deploy(machine).deployment
    link = machine.root / "cfsdeploy/by-digest" / dep.image_digest
    assert os.readlink(link) == f"../deploy/{OS}/{dep.name}"


def test_a_sealed_boot_is_found_booted_through_its_by_digest_link(machine) -> None:
    commit = sealed(machine)
    dep = deploy(machine).deployment
    booted = Sysroot(str(machine.root), cmdline=uki.cmdline_of(uki_object(machine, commit)))
    assert booted.state(OS).booted == dep


# --- what is refused ---------------------------------------------------------------------


def test_deploying_a_deployed_sealed_image_again_is_refused(machine) -> None:
    sealed(machine)
    deploy(machine)
    with pytest.raises(DeployUsageError, match="already deployed"):
        deploy(machine)


def test_a_sealed_image_deploys_again_once_its_deployment_is_gone(machine) -> None:
    first = sealed(machine)
    plain(machine, "2")
    deploy(machine, first)
    deploy(machine)
    undeploy(machine.sysroot, OS, 1)
    assert deploy(machine, first).deployment.sealed is not None


@pytest.mark.parametrize("kw", [{"append": ("quiet",)}, {"delete": ("rw",)}])
def test_kernel_arguments_for_a_sealed_deploy_are_refused(machine, kw) -> None:
    sealed(machine)
    with pytest.raises(DeployUsageError, match="sealed"):
        deploy(machine, **kw)


@pytest.mark.parametrize("verity", ["try", "off"])
def test_verity_other_than_require_for_a_sealed_deploy_is_refused(machine, verity) -> None:
    sealed(machine)
    with pytest.raises(DeployUsageError, match="verity=require"):
        deploy(machine, verity=verity)


def test_kargs_of_a_sealed_default_are_refused(machine) -> None:
    sealed(machine)
    deploy(machine)
    with pytest.raises(SysrootUsageError, match="sealed"):
        set_kargs(machine.sysroot, OS, append=("quiet",))


@pytest.mark.parametrize("cmdline", [
    lambda d: f"root=LABEL=root cfsdeploy.digest={'0' * 64} cfsdeploy.verity=require",
    lambda d: f"root=LABEL=root cfsdeploy.digest={d.hex()} cfsdeploy.verity=try",
    lambda d: f"root=LABEL=root cfsdeploy.digest={d.hex()}",
    lambda d: f"root=LABEL=root cfsdeploy=/cfsdeploy/deploy/{OS}/0123456789ab.0 cfsdeploy.digest={d.hex()} "
              "cfsdeploy.verity=require",
    lambda d: f"cfsdeploy.digest={'0' * 64} cfsdeploy.digest={d.hex()} cfsdeploy.verity=require",
], ids=["other_image", "verity_try", "no_verity", "names_a_deployment", "digest_twice"])
def test_a_seal_that_does_not_match_its_commit_is_never_installed(machine, cmdline) -> None:
    sealed(machine, cmdline=cmdline)
    with pytest.raises(DeployIntegrityError, match="does not seal"):
        deploy(machine)
    assert not (machine.boot / "cfsdeploy" / OS).exists() or os.listdir(machine.boot / "cfsdeploy" / OS) == []


# --- sealed and unsealed together ----------------------------------------------------------


def test_sealed_and_unsealed_deployments_switch_and_roll_back_in_order(machine) -> None:
    plain(machine, "1")
    one = deploy(machine).deployment
    sealed(machine, "2")
    two = deploy(machine).deployment
    plain(machine, "3")
    machine.sysroot.config.keep_extra = 1
    three = deploy(machine).deployment
    state = machine.sysroot.state(OS)
    assert [d.name for d in state.deployments] == [three.name, two.name, one.name]
    assert [e.sealed for e in state.entries] == [False, True, False]
    # the unsealed one after a sealed one keeps the machine's arguments, not the UKI's none
    assert three.kargs == ROOT_KARGS
    rollback(machine.sysroot, OS)
    assert [d.name for d in machine.sysroot.state(OS).deployments] == [two.name, three.name, one.name]


def test_undeploy_removes_the_by_digest_link_and_cleanup_the_uki(machine) -> None:
    sealed(machine, "1")
    first = deploy(machine)
    plain(machine, "2")
    deploy(machine)
    undeploy(machine.sysroot, OS, 1)
    assert not os.path.lexists(machine.root / "cfsdeploy/by-digest" / first.deployment.image_digest)
    assert not (machine.boot / first.kernel.relpath).exists()


def test_cleanup_removes_a_sealed_deployment_beyond_retention_with_its_link(machine) -> None:
    sealed(machine, "1")
    first = deploy(machine)
    plain(machine, "2")
    deploy(machine)
    plain(machine, "3")
    machine.sysroot.config.keep_extra = 1
    deploy(machine)
    machine.sysroot.config.keep_extra = 0
    r = cleanup(machine.sysroot, OS, prune_objects=False)
    assert r.deployments == [first.deployment.name] and r.kernels == [first.kernel.dirname]
    assert os.listdir(machine.root / "cfsdeploy/by-digest") == []


def test_a_staged_sealed_deploy_finalizes_into_an_efi_entry(machine) -> None:
    plain(machine, "1")
    deploy(machine)
    sealed(machine, "2")
    r = deploy(machine, stage=True)
    assert os.path.islink(machine.root / "cfsdeploy/by-digest" / r.deployment.image_digest)
    done = finalize_staged(machine.sysroot)
    assert done is not None and done.deployment == r.deployment
    assert machine.sysroot.state(OS).entries[0].efi == r.kernel.efi


# --- repair and damage ---------------------------------------------------------------------


def test_a_torn_sealed_kernel_directory_is_written_again_from_the_uki_object(machine) -> None:
    commit = sealed(machine)
    kernel = deploy(machine).kernel
    where = machine.boot / kernel.relpath
    (where / "complete").unlink()
    (where / "uki.efi").write_bytes(b"MZ torn")
    repairs = recover(machine.sysroot)
    assert [(r.kind, r.path, r.kernel) for r in repairs] == [(RepairKind.REINSTALLED_KERNEL, str(where), None)]
    assert (where / "uki.efi").read_bytes() == uki_object(machine, commit) and (where / "complete").exists()


def test_a_foreign_by_digest_link_is_reported_and_kept(machine) -> None:
    sealed(machine)
    dep = deploy(machine).deployment
    link = machine.root / "cfsdeploy/by-digest" / dep.image_digest
    link.unlink()
    link.symlink_to("/etc")
    damaged = [d for d in machine.sysroot.state(OS).damaged if d.kind == Kind.LINK]
    assert [(d.path, d.reason) for d in damaged] == [(str(link), "points to '/etc', not ../deploy/<os>/<deployment>")]
    cleanup(machine.sysroot, OS, prune_objects=False)
    assert os.readlink(link) == "/etc"
    link.unlink()
    link.symlink_to(f"../deploy/{OS}/{dep.name}")  # for the fixture's check


def test_a_link_naming_a_deployment_of_another_image_is_reported_and_kept(machine) -> None:
    plain(machine, "1")
    live = deploy(machine).deployment
    forged = machine.root / "cfsdeploy/by-digest" / ("0" * 64)
    forged.parent.mkdir()
    forged.symlink_to(f"../deploy/{OS}/{live.name}")
    [damaged] = [d for d in machine.sysroot.state(OS).damaged if d.kind == Kind.LINK]
    assert (damaged.path, damaged.mentions([live.name])) == (str(forged), {live.name})
    cleanup(machine.sysroot, OS, prune_objects=False)
    assert os.readlink(forged) == f"../deploy/{OS}/{live.name}"
    forged.unlink()


def test_a_damaged_link_is_refused_by_deploy_naming_it(machine) -> None:
    commit = sealed(machine)
    image = commit_info(machine.sysroot.repo.resolve(commit)).image_digest
    assert image is not None
    (machine.root / "cfsdeploy/by-digest").mkdir()
    (machine.root / "cfsdeploy/by-digest" / image.hex()).write_text("not a link")
    with pytest.raises(bydigest.LinkError, match="not a symbolic link"):
        deploy(machine)
    (machine.root / "cfsdeploy/by-digest" / image.hex()).unlink()


# --- status --------------------------------------------------------------------------------


def test_status_json_says_which_deployments_are_sealed(machine) -> None:
    plain(machine, "1")
    deploy(machine)
    commit = sealed(machine, "2")
    r = deploy(machine)
    env = dict(os.environ, CFSDEPLOY_SYSROOT=str(machine.root), CFSDEPLOY_CMDLINE=str(machine.tmp / "none"))
    p = subprocess.run([sys.executable, "-m", "cfsdeploy.cli", "status", "--json"], env=env,
                       capture_output=True, text=True, check=True)
    deployments = json.loads(p.stdout)["deployments"]
    s = sealed_of(machine.sysroot.repo.resolve(commit))
    assert s is not None
    assert [d["sealed"] for d in deployments] == [{"uki": s.uki.hex(), "efi": r.kernel.efi}, None]
    text = subprocess.run([sys.executable, "-m", "cfsdeploy.cli", "status"], env=env,
                          capture_output=True, text=True, check=True).stdout
    assert f"Sealed:  UKI {s.uki.hex()} ({r.kernel.efi})" in text


# --- entries of the efi form ---------------------------------------------------------------


EFI = "/cfsdeploy/deb/6.1-0123456789ab/uki.efi"


def efi_entry(**kw: object) -> bootloader.BootEntry:
    fields: dict[str, object] = dict(os="deb", index=1, title="Deb 1", linux=None, initrd=None, options=None,
                                     efi=EFI)
    fields.update(kw)
    return bootloader.BootEntry(**fields)  # type: ignore[arg-type]


def test_efi_entry_renders_and_parses_back() -> None:
    e = efi_entry(tries_left=2)
    assert parse_entry(e.filename, e.render()) == e
    assert bootloader.kernel_of(e) == bootloader.Kernel("deb", "6.1-0123456789ab")


@pytest.mark.parametrize("efi", ["/EFI/Linux/evil.efi", "/cfsdeploy/other/6.1-0123456789ab/uki.efi",
                                 "/cfsdeploy/deb/6.1-0123456789ab/vmlinuz", "/cfsdeploy/deb/../x/uki.efi",
                                 "/cfsdeploy/deb/6.1-0123456789AB/uki.efi", "cfsdeploy/deb/6.1-0123456789ab/uki.efi"])
def test_efi_outside_a_kernel_directory_of_the_os_is_refused(efi) -> None:
    with pytest.raises(BootError, match="not the uki.efi of a kernel directory"):
        parse_entry("cfsdeploy-deb-1.conf", efi_entry(efi=None, linux="/x", initrd="/y", options="z")
                    .render().replace(b"options z\ninitrd /y\nlinux /x\n", f"efi {efi}\n".encode()))


@pytest.mark.parametrize("extra", [b"linux /k\n", b"options quiet\n", b"initrd /i\n", b"efi " + EFI.encode() + b"\n"])
def test_efi_entry_with_a_line_of_the_other_form_or_twice_is_damaged(extra) -> None:
    with pytest.raises(BootError):
        parse_entry("cfsdeploy-deb-1.conf", efi_entry().render() + extra)


def test_entry_of_both_forms_is_not_rendered() -> None:
    with pytest.raises(BootError, match="neither"):
        efi_entry(linux="/k").render()


def test_efi_entry_without_efi_is_missing_its_last_line() -> None:
    with pytest.raises(BootError, match="missing"):
        parse_entry("cfsdeploy-deb-1.conf", efi_entry().render().replace(f"efi {EFI}\n".encode(), b"") + b"\n")


def test_options_of_an_efi_entry_name_nothing() -> None:
    assert efi_entry().option(kargs.DEPLOYMENT) is None


def test_sealed_command_line_seals_the_image_with_verity_require() -> None:
    words = kargs.split(sealed_cmdline(Digest(b"\1" * 32)))
    assert (kargs.value(words, kargs.DIGEST), kargs.value(words, kargs.VERITY), kargs.value(words, kargs.DEPLOYMENT)) \
        == ("01" * 32, "require", None)


def test_by_digest_read_refuses_what_is_not_a_digest(tmp_path) -> None:
    with pytest.raises(bydigest.LinkError):
        bydigest.read(str(tmp_path), "../../etc")


def test_a_by_digest_directory_that_is_a_symlink_is_reported_and_not_written_through(machine) -> None:
    elsewhere = machine.tmp / "elsewhere"
    elsewhere.mkdir()
    (machine.root / "cfsdeploy/by-digest").symlink_to(elsewhere)
    sealed(machine)
    assert [(d.kind, d.reason) for d in machine.sysroot.state(OS).damaged] == [(Kind.LINK, "not a directory")]
    with pytest.raises(bydigest.LinkError, match="not a directory"):
        deploy(machine)
    assert os.listdir(elsewhere) == [] and os.listdir(machine.root / "cfsdeploy/deploy" / OS) == ["var"]
    (machine.root / "cfsdeploy/by-digest").unlink()


@pytest.mark.parametrize("digest", ["../../etc", "AB" * 32, "ab" * 31])
def test_a_sealed_boot_naming_no_plain_digest_boots_no_deployment(machine, digest) -> None:
    sealed(machine)
    deploy(machine)
    booted = Sysroot(str(machine.root), cmdline=f"root=LABEL=root cfsdeploy.digest={digest}")
    assert booted.booted_path() is None and booted.state(OS).booted is None


def test_deploy_karg_of_a_sealed_commit_exits_2_with_one_line(machine) -> None:
    sealed(machine)
    p = subprocess.run([sys.executable, "-m", "cfsdeploy.cli", "deploy", BRANCH, "--os", OS, "--karg", "quiet",
                        "--sysroot", str(machine.root)], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("cfsdeploy: ") and len(p.stderr.splitlines()) == 1
    assert "sealed" in p.stderr
