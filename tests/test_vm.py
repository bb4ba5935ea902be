"""A machine's life in a real virtual machine: install, boot, upgrade && reboot,
rollback && reboot, and an upgrade that never completes a boot falling back by itself.

A new user's path, examples/debian's: a Debian 13 tree from debootstrap gets
cfsdeploy's Debian package with apt, lints without errors and is committed, signed
and linted, to a vendor's repository on the host; `cfsdeploy install to-disk`
makes a new machine's disk from it (pulled, signature checked, deployed).  QEMU boots that disk with OVMF
and systemd-boot and no network; a unit in the guest reports what it sees from
inside (tests/vm_check.py) and runs the commands each boot is given.  Later
releases reach the machine on a second disk, its `file://` remote.

  boot 1   release 1, cfsdeploy.verity=try (this host cannot enable fs-verity), on
           trial like every new deployment (2 tries) and blessed once its boot
           completes; `cfsdeploy verity enable`; a local edit in /etc
  boot 2   one object corrupted on the disk meanwhile: verity=require refuses it;
           release 2 offered: `cfsdeploy upgrade && reboot`
  boot 3   release 2, the local /etc edit kept, blessed:
           `cfsdeploy rollback && reboot`
  boot 4   release 1 again; release 3, which never reaches boot-complete.target,
           offered and staged, /etc edited after staging, then reboot: the
           finalize unit merges /etc again and switches the entries at shutdown
  boot 5-6 release 3 on trial, its tries counted down by systemd-boot
  boot 7   the loader boots release 1 by itself; status says release 3 failed

Slow (about 10 minutes under software emulation): select with `-m vm`.  See tests/vm.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

from . import vm

pytestmark = pytest.mark.vm


def report(request: pytest.FixtureRequest, text: str) -> None:
    """Say it on the terminal now, whatever pytest captures."""
    plugins = request.config.pluginmanager
    with plugins.getplugin("capturemanager").global_and_fixture_disabled():
        plugins.getplugin("terminalreporter").write_line(text)


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[vm.Machine]:
    if reason := vm.missing_requirements():
        pytest.skip(f"cannot boot a VM here: {reason}")
    with vm.machine(tmp_path_factory.mktemp("vm"), log=lambda m: report(request, f"[vm] {m}")) as m:
        yield m


def booting(request: pytest.FixtureRequest, m: vm.Machine, b: vm.Boot) -> vm.Boot:
    report(request, "[vm] " + vm.describe(b, m.disk).replace("\n", "\n[vm] "))
    return b


@pytest.fixture(scope="module")
def disk(machine: vm.Machine) -> vm.Disk:
    return machine.disk


@pytest.fixture(scope="module")
def first(machine: vm.Machine, request: pytest.FixtureRequest) -> vm.Boot:
    return booting(request, machine, vm.first_boot(machine))


@pytest.fixture(scope="module")
def second(machine: vm.Machine, first: vm.Boot, request: pytest.FixtureRequest) -> vm.Boot:
    return booting(request, machine, vm.upgrade_boot(machine))


@pytest.fixture(scope="module")
def upgraded(machine: vm.Machine, second: vm.Boot, request: pytest.FixtureRequest) -> vm.Boot:
    return booting(request, machine, vm.upgraded_boot(machine))


@pytest.fixture(scope="module")
def rolled_back(machine: vm.Machine, upgraded: vm.Boot, request: pytest.FixtureRequest) -> vm.Boot:
    return booting(request, machine, vm.rolled_back_boot(machine))


@pytest.fixture(scope="module")
def trials(machine: vm.Machine, rolled_back: vm.Boot, request: pytest.FixtureRequest) -> list[vm.Boot]:
    return [booting(request, machine, b) for b in vm.trial_boots(machine)]


@pytest.fixture(scope="module")
def fallback(machine: vm.Machine, trials: list[vm.Boot], request: pytest.FixtureRequest) -> vm.Boot:
    return booting(request, machine, vm.fallback_boot(machine))


def step_ok(b: vm.Boot, i: int = 0) -> dict[str, object]:
    step = b.steps[i]
    assert step["rc"] == 0, step
    return step


# --- the first boot: the deployment made on the host ----------------------------------


def test_the_tree_with_the_package_installed_lints_without_errors(disk: vm.Disk) -> None:
    findings = json.loads(vm.cfsdeploy("lint", "--json", disk.tree.path))["findings"]
    assert [f for f in findings if f["severity"] == "error"] == []


def test_install_to_disk_names_its_partitions_as_the_trees_fstab_mounts_them(disk: vm.Disk) -> None:
    assert sorted(vm.partitions(disk.path)) == ["esp", "root"]
    assert "PARTLABEL=esp /boot vfat" in (disk.tree.path / "etc/fstab").read_text()


def test_boots_the_deployment_made_on_the_host(first: vm.Boot, disk: vm.Disk) -> None:
    assert first["cmdline"] == {"cfsdeploy": disk.deployment_path,
                                "cfsdeploy.digest": disk.deployment["image_digest"],
                                "cfsdeploy.verity": "try"}


def test_root_is_a_read_only_overlay_named_composefs(first: vm.Boot) -> None:
    assert (first["root.fstype"], first["root.source"], first["root.readonly"]) == ("overlay", "composefs", True)
    assert (first["root.metacopy"], first["root.redirect_dir"]) == ("on", "on")


def test_overlay_lower_is_the_image_and_its_data_only_lower_the_repository_objects(first: vm.Boot) -> None:
    lower, sep, data = str(first["root.lowerdir"]).partition("::")
    assert sep and lower and ":" not in data
    assert data.endswith("/cfsdeploy/repo/objects")


def test_image_is_its_object_mounted_as_erofs_through_a_read_only_loop_device(first: vm.Boot,
                                                                               disk: vm.Disk) -> None:
    assert first["image.path"] == "/sysroot" + vm.object_path(str(disk.deployment["image_digest"]))
    (loop,) = first["image.loops"]  # type: ignore[misc]
    assert loop["ro"] and loop["erofs"], loop


def test_try_boots_an_image_without_fs_verity_on_its_computed_digest(first: vm.Boot) -> None:
    assert str(first["image.measured"]).startswith("none")
    assert "computed" in first.prepared and first.prepared.endswith("verity=try")
    assert first["root.verity"] == ""


def test_etc_is_the_deployments_own_and_writable(first: vm.Boot, disk: vm.Disk) -> None:
    assert first["mount./etc"]["root"] == f"{disk.deployment_path}/etc"  # type: ignore[index]
    assert first["writable./etc"] == "yes"


def test_var_is_the_oss_own_and_writable(first: vm.Boot) -> None:
    assert first["mount./var"]["root"] == f"/cfsdeploy/deploy/{vm.OS_NAME}/var"  # type: ignore[index]
    assert first["writable./var"] == "yes"


def test_usr_is_read_only(first: vm.Boot) -> None:
    assert first["writable./usr"] == "EROFS"


def test_sysroot_is_the_physical_root_and_boot_the_writable_esp(first: vm.Boot) -> None:
    assert first["mount./sysroot"]["fstype"] == "ext4"  # type: ignore[index]
    assert first["mount./sysroot"]["root"] == "/"  # type: ignore[index]
    assert first["mount./boot"]["fstype"] == "vfat"  # type: ignore[index]
    assert first["writable./boot"] == "yes"


def test_status_in_the_guest_names_the_booted_deployment(first: vm.Boot, disk: vm.Disk) -> None:
    assert first["status.rc"] == 0
    booted = [d["name"] for d in first["status.deployments"] if d["booted"]]  # type: ignore[union-attr,index]
    assert booted == [disk.deployment["name"]]


def test_files_read_back_as_committed(first: vm.Boot, disk: vm.Disk) -> None:
    assert first["canaries"] == disk.tree.canaries


def test_systemd_reaches_multi_user_with_no_failed_units(first: vm.Boot) -> None:
    assert first["systemd.multi_user"] == "active"
    assert first["systemd.failed"] == []
    assert "error" not in first.results, first["error"]


def test_shutdown_unmounts_every_filesystem(first: vm.Boot) -> None:
    # /var is busy while journald writes there until the very end (systemd#867): then
    # systemd-shutdown unmounts it, and everything else
    assert "systemd-shutdown[1]: All filesystems unmounted." in first.log


def test_boot_times_are_measured(first: vm.Boot) -> None:
    assert set(first.milestones) == set(vm.MILESTONES)
    assert first.prepare_root is not None
    assert set(first["times"]) == {"kernel+initramfs", "userspace"}  # type: ignore[arg-type]


# --- fs-verity enabled in the guest; an object corrupted on the disk between boots ------


def test_verity_enable_succeeds_in_the_guest(first: vm.Boot) -> None:
    step_ok(first, 0)


def test_after_verity_enable_the_entry_requires_verity(second: vm.Boot) -> None:
    assert second["cmdline"]["cfsdeploy.verity"] == "require"  # type: ignore[index]
    assert second["root.verity"] == "require"


def test_kernel_measures_the_digest_the_command_line_names(second: vm.Boot, disk: vm.Disk) -> None:
    assert second["image.measured"] == disk.deployment["image_digest"]
    assert "measured by the kernel" in second.prepared and second.prepared.endswith("verity=require")


def test_object_corrupted_on_the_disk_reads_as_an_error_not_wrong_data(second: vm.Boot) -> None:
    assert second["canaries"][vm.CORRUPTED] == "EIO"  # type: ignore[index]
    assert "FILE CORRUPTED!" in second.log  # fs-verity's own word on it


def test_intact_objects_still_read_back(second: vm.Boot, disk: vm.Disk) -> None:
    assert second["canaries"][vm.INTACT] == disk.tree.canaries[vm.INTACT]  # type: ignore[index]


def test_second_boot_reaches_multi_user_with_no_failed_units(second: vm.Boot) -> None:
    assert second["systemd.multi_user"] == "active"
    assert second["systemd.failed"] == []


# --- upgrade && reboot, from a file:// remote on a second disk --------------------------


def test_upgrade_in_the_guest_deploys_the_signed_release_2_and_reboots(second: vm.Boot,
                                                                       machine: vm.Machine) -> None:
    out = str(step_ok(second)["stdout"])
    assert f"deployed {machine.releases[2][:12]}" in out
    assert second.ended == "reboot"


def test_the_reboot_lands_in_release_2(upgraded: vm.Boot, machine: vm.Machine) -> None:
    assert upgraded.booted["commit"] == machine.releases[2]  # type: ignore[index]
    assert upgraded["files"]["/" + vm.RELEASE_FILE] == "2\n"  # type: ignore[index]


def test_a_local_etc_edit_survives_the_upgrade(upgraded: vm.Boot) -> None:
    assert upgraded["files"]["/" + vm.ETC_EDITED] == vm.LOCAL_EDIT + "\n"  # type: ignore[index]


def test_an_untouched_etc_file_follows_the_new_release(upgraded: vm.Boot) -> None:
    assert upgraded["files"]["/" + vm.ETC_DEFAULT] == "release=2\n"  # type: ignore[index]


def test_releases_that_complete_their_boot_are_blessed(first: vm.Boot, upgraded: vm.Boot) -> None:
    for b in (first, upgraded):
        booted = b.booted
        assert booted is not None and b["systemd.boot_complete"] == "active", b.name
        # systemd-bless-boot dropped the counter from the entry's name
        assert booted["tries_left"] is None and re.fullmatch(r"cfsdeploy-debian-\d+\.conf", booted["entry"]), b.name


def test_release_1_is_kept_as_the_rollback(upgraded: vm.Boot, machine: vm.Machine) -> None:
    default, rollback = upgraded["status.deployments"][:2]  # type: ignore[index]
    assert (default["commit"], default["booted"]) == (machine.releases[2], True)
    assert rollback["commit"] == machine.releases[1]


def test_the_upgraded_system_reaches_multi_user_with_no_failed_units(upgraded: vm.Boot) -> None:
    assert upgraded["systemd.multi_user"] == "active"
    assert upgraded["systemd.failed"] == []


# --- rollback && reboot -------------------------------------------------------------------


def test_rollback_and_reboot_lands_back_in_release_1(upgraded: vm.Boot, rolled_back: vm.Boot,
                                                     machine: vm.Machine) -> None:
    step_ok(upgraded)
    assert upgraded.ended == "reboot"
    assert rolled_back.booted["commit"] == machine.releases[1]  # type: ignore[index]
    assert rolled_back["files"]["/" + vm.RELEASE_FILE] == "1\n"  # type: ignore[index]


def test_after_the_rollback_release_1_keeps_its_own_etc(rolled_back: vm.Boot) -> None:
    files = rolled_back["files"]
    assert files["/" + vm.ETC_EDITED] == vm.LOCAL_EDIT + "\n"  # type: ignore[index]
    assert files["/" + vm.ETC_DEFAULT] == "release=1\n"  # type: ignore[index]


# --- a release that never completes a boot, deployed with boot counting -----------------


def test_upgrade_stage_leaves_the_boot_entries_until_shutdown(rolled_back: vm.Boot, machine: vm.Machine) -> None:
    out = str(step_ok(rolled_back)["stdout"])
    assert f"staged {machine.releases[3][:12]}" in out and "becomes the default at shutdown" in out
    assert rolled_back.ended == "reboot"


def test_the_staged_release_is_finalized_at_shutdown_with_etc_edited_after_staging(
        trials: list[vm.Boot], machine: vm.Machine) -> None:
    first_try = trials[0]
    assert first_try.booted["commit"] == machine.releases[3]  # type: ignore[index]
    files = first_try["files"]
    assert files["/" + vm.ETC_AFTER_STAGING] == vm.STAGED_EDIT + "\n"  # type: ignore[index]
    assert files["/" + vm.ETC_EDITED] == vm.LOCAL_EDIT + "\n"  # type: ignore[index]
    assert files["/" + vm.ETC_DEFAULT] == "release=3\n"  # type: ignore[index]


def test_each_trial_boot_uses_one_try_and_never_reaches_boot_complete(trials: list[vm.Boot],
                                                                      machine: vm.Machine) -> None:
    assert len(trials) == vm.TRIES
    for i, b in enumerate(trials):
        booted = b.booted
        assert booted is not None and booted["commit"] == machine.releases[3], b.name
        # systemd-boot counts a try down as it starts the entry
        assert (booted["tries_left"], booted["tries_done"]) == (vm.TRIES - 1 - i, i + 1), b.name
        assert not booted["boot_failed"], b.name  # not while a try runs
        assert b["systemd.boot_complete"] != "active", b.name
        assert b["systemd.failed"] == [vm.NEVER_COMPLETES_UNIT.rsplit("/", 1)[1]], b.name
    assert "on its last try" in str(trials[-1]["status.text"])


def test_with_its_tries_used_up_the_loader_boots_release_1_by_itself(fallback: vm.Boot,
                                                                     machine: vm.Machine) -> None:
    assert fallback.booted["commit"] == machine.releases[1]  # type: ignore[index]
    assert fallback["files"]["/" + vm.RELEASE_FILE] == "1\n"  # type: ignore[index]


def test_status_says_the_default_failed_to_boot(fallback: vm.Boot, machine: vm.Machine) -> None:
    default = fallback["status.deployments"][0]  # type: ignore[index]
    assert (default["commit"], default["boot_failed"], default["booted"]) == (machine.releases[3], True, False)
    text = str(fallback["status.text"])
    assert "FAILED TO BOOT" in text
    assert f"the default deployment {default['name']} failed to boot; running " in text


def test_the_fallback_boot_reaches_multi_user_with_no_failed_units(fallback: vm.Boot) -> None:
    assert fallback["systemd.multi_user"] == "active"
    assert fallback["systemd.failed"] == []
