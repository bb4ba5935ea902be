"""Sealed releases on a machine whose firmware enforces Secure Boot with the
vendor's own keys: the chain of trust from the firmware to every file.

The vendor commits each release sealed (`commit --seal`): a UKI whose signed command
line names the release's image and verity=require, and systemd-boot, both signed
with the vendor's db key.  `install to-disk` puts that systemd-boot and the UKI on the
ESP.  The installing host cannot enable fs-verity, so the machine is provisioned
once, as a factory would, before its keys are enrolled: the release's kernel and
initramfs started directly (not the UKI) with verity=try run `cfsdeploy verity
enable`.  (The other way, the first sealed boot's initramfs enabling fs-verity on
every object, works too, but under emulation each `fsverity enable` costs 150 ms:
half an hour for this tree.)  Then the machine's OVMF variables enroll the vendor's
PK, KEK and db, and Secure Boot is on.

  boot 1  release 1 sealed: the kernel's command line is the UKI's, exactly; the image
          measured by the kernel is the one it names; / with verity=require
  boot 2  meanwhile, on the disk, an object corrupted: it reads as EIO;
          `cfsdeploy upgrade && reboot` to release 2
  boot 3  release 2 sealed, blessed by boot counting: `cfsdeploy rollback && reboot`
  boot 4  meanwhile, on the disk, the default entry given options that name another
          image and verity=off: release 1 again, with its UKI's command line exactly
  boot 5  release 1's UKI edited on the ESP: the firmware refuses to start it

Slow (about 10 minutes under software emulation): select with `-m vm`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cfsdeploy.boot import uki

from . import secureboot, vm

pytestmark = pytest.mark.vm

# What systemd-boot prints when the firmware refuses an image
REFUSED = "Access denied"


@dataclass
class Lab:
    m: vm.Machine
    keys: secureboot.Keys
    provisioned: vm.Boot | None = None

    def uki_of(self, release: int) -> Path:
        """Where the release's sealed UKI is in the vendor's repository."""
        show = json.loads(vm.cfsdeploy("show", "--json", "--repo", self.m.builder.repo, self.m.releases[release]))
        return self.m.builder.repo / vm.object_path(show["sealed"]["uki"]).removeprefix("/cfsdeploy/repo/")

    def image_of(self, release: int) -> str:
        show = json.loads(vm.cfsdeploy("show", "--json", "--repo", self.m.builder.repo, self.m.releases[release]))
        return str(show["image_digest"])


def report(request: pytest.FixtureRequest, text: str) -> None:
    plugins = request.config.pluginmanager
    with plugins.getplugin("capturemanager").global_and_fixture_disabled():
        plugins.getplugin("terminalreporter").write_line(text)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Lab]:
    if reason := secureboot.missing_requirements():
        pytest.skip(f"cannot boot a Secure Boot VM here: {reason}")
    work = tmp_path_factory.mktemp("sealed")
    keys = secureboot.make_keys(work / "keys")
    seal = ("--seal", "--secureboot-key", str(keys.db.key), "--secureboot-cert", str(keys.db.cert),
            "--seal-karg", "console=ttyS0", "--seal-karg", "panic=10")
    with vm.machine(work, log=lambda m: report(request, f"[sealed] {m}"), seal=seal) as m:
        lab = Lab(m, keys)
        lab.provisioned = provision(lab)
        report(request, "[sealed] " + vm.describe(lab.provisioned, m.disk).replace("\n", "\n[sealed] "))
        secureboot.enrolled_vars(keys, m.disk.vars)
        m.disk.secure_boot = True
        yield lab


def provision(lab: Lab) -> vm.Boot:
    """The factory's one boot: the deployment's kernel and initramfs started by the
    firmware directly, with an unsealed command line (verity=try), run `cfsdeploy
    verity enable`."""
    tree, d = lab.m.disk.tree, lab.m.disk.deployment
    assert tree is not None
    boot = tree.path / "boot"
    args = (f"root=LABEL=root rw console=ttyS0 panic=10 cfsdeploy={lab.m.disk.deployment_path} "
            f"cfsdeploy.digest={d['image_digest']} cfsdeploy.verity=try")
    return vm.boot(lab.m.disk, lab.m.work, name="provision", steps=["cfsdeploy verity enable"],
                   extra=["-kernel", str(boot / f"vmlinuz-{tree.kver}"), "-initrd",
                          str(boot / f"initrd.img-{tree.kver}"), "-append", args])


def booting(request: pytest.FixtureRequest, lab: Lab, name: str, steps: tuple[str, ...] = ()) -> vm.Boot:
    b = lab.m.boot(name, steps)
    report(request, "[sealed] " + vm.describe(b, lab.m.disk).replace("\n", "\n[sealed] "))
    return b


def edit_esp(disk: vm.Disk, edit: Callable[[Path], None]) -> None:
    esp = vm.extract_esp(disk.path, disk.path.with_suffix(".esp"))
    try:
        edit(esp)
        vm.replace_esp(disk.path, esp)
    finally:
        esp.unlink()


def default_entry(esp: Path) -> tuple[str, str]:
    """The ESP's default entry (the highest number): its name and text."""
    names = [n for n in vm.mtools("mdir", "-b", "-i", esp, "::/loader/entries").split() if n.endswith(".conf")]
    name = max(names, key=lambda n: int(n.rsplit("-", 1)[1].split("+")[0].split(".")[0]))
    return name, vm.mtools("mtype", "-i", esp, name)


@pytest.fixture(scope="module")
def first(lab: Lab, request: pytest.FixtureRequest) -> vm.Boot:
    return booting(request, lab, "sealed1", ("cfsdeploy status",))


@pytest.fixture(scope="module")
def second(lab: Lab, first: vm.Boot, request: pytest.FixtureRequest) -> vm.Boot:
    vm.corrupt(lab.m.disk, vm.object_path(lab.m.disk.tree.canary_objects[vm.CORRUPTED]))
    lab.m.release(2)
    return booting(request, lab, "sealed2", (f"{vm.MOUNT_UPDATES} && cfsdeploy upgrade && reboot",))


@pytest.fixture(scope="module")
def upgraded(lab: Lab, second: vm.Boot, request: pytest.FixtureRequest) -> vm.Boot:
    return booting(request, lab, "sealed3", ("cfsdeploy rollback && reboot",))


@pytest.fixture(scope="module")
def rolled_back(lab: Lab, upgraded: vm.Boot, request: pytest.FixtureRequest) -> vm.Boot:
    def tamper(esp: Path) -> None:
        name, text = default_entry(esp)
        forged = esp.with_suffix(".entry")
        forged.write_text(text + f"options cfsdeploy.digest={lab.image_of(2)} cfsdeploy.verity=off\n")
        vm.mtools("mcopy", "-o", "-i", esp, forged, name)
        forged.unlink()
    edit_esp(lab.m.disk, tamper)
    return booting(request, lab, "sealed4", ("cfsdeploy status",))


@pytest.fixture(scope="module")
def tampered(lab: Lab, rolled_back: vm.Boot, request: pytest.FixtureRequest) -> vm.Boot:
    def tamper(esp: Path) -> None:
        _, text = default_entry(esp)
        efi = next(line.split(None, 1)[1] for line in text.splitlines() if line.startswith("efi "))
        image = esp.with_suffix(".uki")
        vm.mtools("mcopy", "-n", "-i", esp, f"::{efi}", image)
        secureboot.edit_cmdline(image, b"verity=require", b"verity=off    ")
        vm.mtools("mcopy", "-o", "-i", esp, image, f"::{efi}")
        image.unlink()
    edit_esp(lab.m.disk, tamper)
    return booting(request, lab, "sealed5")


def test_sealed_release_boots_with_exactly_its_ukis_command_line(first: vm.Boot, lab: Lab) -> None:
    assert first["cmdline.raw"] == uki.cmdline_of(lab.uki_of(1))


def test_sealed_command_line_names_the_image_and_no_deployment(first: vm.Boot, lab: Lab) -> None:
    assert first["cmdline"] == {"cfsdeploy.digest": lab.image_of(1), "cfsdeploy.verity": "require"}


def test_provisioning_enables_fs_verity_on_every_object(lab: Lab) -> None:
    assert lab.provisioned is not None
    assert lab.provisioned.steps[0]["rc"] == 0, lab.provisioned.steps[0]


def test_the_sealed_boot_measures_its_image_and_requires_verity_of_every_file(first: vm.Boot, lab: Lab) -> None:
    assert first["image.measured"] == lab.image_of(1)
    assert first["root.verity"] == "require"


def test_status_says_the_booted_deployment_is_sealed(first: vm.Boot) -> None:
    assert first.booted is not None and first.booted["sealed"]


def test_sealed_boot_reaches_multi_user_with_no_failed_units(first: vm.Boot) -> None:
    assert first["systemd.multi_user"] == "active" and first["systemd.failed"] == []


def test_options_added_to_the_entry_on_the_disk_change_nothing(rolled_back: vm.Boot, lab: Lab) -> None:
    assert rolled_back["cmdline"] == {"cfsdeploy.digest": lab.image_of(1), "cfsdeploy.verity": "require"}
    assert rolled_back["root.verity"] == "require"


def test_an_object_corrupted_on_the_disk_reads_as_an_error(second: vm.Boot) -> None:
    assert second["canaries"][vm.CORRUPTED] == "EIO"  # type: ignore[index]


def test_upgrade_and_reboot_lands_in_the_next_sealed_release(second: vm.Boot, upgraded: vm.Boot,
                                                              lab: Lab) -> None:
    assert second.steps[0]["rc"] == 0, second.steps[0]
    assert upgraded["cmdline.raw"] == uki.cmdline_of(lab.uki_of(2))
    assert upgraded["image.measured"] == lab.image_of(2)


def test_the_upgraded_sealed_release_is_blessed_by_boot_counting(upgraded: vm.Boot) -> None:
    assert upgraded["systemd.boot_complete"] == "active"
    assert upgraded.booted is not None and upgraded.booted["tries_left"] is None


def test_rollback_and_reboot_lands_back_in_the_first_sealed_release(upgraded: vm.Boot, rolled_back: vm.Boot,
                                                                    lab: Lab) -> None:
    assert upgraded.steps[0]["rc"] == 0, upgraded.steps[0]
    assert rolled_back["cmdline.raw"] == uki.cmdline_of(lab.uki_of(1))


def test_a_uki_edited_on_the_disk_is_refused_by_the_firmware(tampered: vm.Boot) -> None:
    assert "Linux version" not in tampered.log
    assert REFUSED in tampered.log
