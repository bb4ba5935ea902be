"""A cfsdeploy deployment boots in a real virtual machine.

A Debian 13 tree with cfsdeploy and its initramfs hooks is committed and deployed
onto a disk on the host; QEMU boots it with OVMF and systemd-boot, with no network,
and a unit in the guest reports what it sees from inside (tests/vm_check.py).  The
first boot uses cfsdeploy.verity=try, since this host cannot enable fs-verity; in
it, `cfsdeploy verity enable` enables fs-verity on the repository.  Between the
boots one object is corrupted on the disk image; the second boot must then require
fs-verity and refuse that object's data.

Slow (a few minutes under software emulation): select with `-m vm`.  See tests/vm.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from . import vm

pytestmark = pytest.mark.vm


def report(request: pytest.FixtureRequest, text: str) -> None:
    """Say it on the terminal now, whatever pytest captures."""
    plugins = request.config.pluginmanager
    with plugins.getplugin("capturemanager").global_and_fixture_disabled():
        plugins.getplugin("terminalreporter").write_line(text)


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> tuple[Path, vm.Disk]:
    if reason := vm.missing_requirements():
        pytest.skip(f"cannot boot a VM here: {reason}")
    work = tmp_path_factory.mktemp("vm")
    tree = vm.make_tree(work / "tree", log=lambda m: report(request, f"[vm] {m}"))
    disk = vm.make_disk(tree, work, log=lambda m: report(request, f"[vm] {m}"))
    vm.remove_tree(tree.path)
    return work, disk


@pytest.fixture(scope="module")
def disk(machine: tuple[Path, vm.Disk]) -> vm.Disk:
    return machine[1]


@pytest.fixture(scope="module")
def first(machine: tuple[Path, vm.Disk], request: pytest.FixtureRequest) -> vm.Boot:
    work, disk = machine
    b = vm.first_boot(disk, work)
    report(request, "[vm] boot 1 (cfsdeploy.verity=try):\n" + vm.describe(b, disk))
    return b


@pytest.fixture(scope="module")
def second(machine: tuple[Path, vm.Disk], first: vm.Boot, request: pytest.FixtureRequest) -> vm.Boot:
    if not vm.has_verity_enable():
        pytest.skip("this cfsdeploy has no `verity enable` yet")
    work, disk = machine
    b = vm.second_boot(disk, work)
    report(request, f"[vm] boot 2 (after verity enable, {vm.CORRUPTED} corrupted):\n" + vm.describe(b, disk))
    return b


# --- the first boot: the deployment made on the host ----------------------------------


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


# --- fs-verity enabled in the guest; an object corrupted on the disk between boots ------


def test_verity_enable_succeeds_in_the_guest(first: vm.Boot, second: vm.Boot) -> None:
    enable = first.steps[0]
    assert enable["rc"] == 0, enable


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
