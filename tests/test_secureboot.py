"""The chain of trust's first links, proven in a virtual machine: firmware in Secure
Boot mode that trusts only the test's own db, systemd-boot signed with that db's key,
and a Unified Kernel Image made by cfsdeploy.boot.uki whose command line carries an
image digest.

The machine has no root file system: the kernel prints its command line early, the
initramfs finds no root= and reboots (panic=-1), and QEMU exits (-no-reboot).  A
boot the firmware refuses ends when it is out of boot options.  About 20 s a boot
under software emulation.  See tests/secureboot.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cfsdeploy.boot import uki

from . import secureboot, vm

pytestmark = pytest.mark.vm

DIGEST = "5e" * 32
OTHER_DIGEST = "0d" * 32
CMDLINE = f"console=ttyS0 panic=-1 cfsdeploy.digest={DIGEST}"
# What the boot entry asks for instead: another image, fs-verity off
ENTRY_OPTIONS = f"console=ttyS0 panic=-1 cfsdeploy.digest={OTHER_DIGEST} cfsdeploy.verity=off"
# Not in EFI/Linux/: systemd-boot would list a UKI there as a Type #2 entry of its
# own, with its own command line, and might boot that one instead of the entry's.
UKI_PATH = "EFI/cfsdeploy/test.efi"
REFUSED = f"Error loading \\{UKI_PATH.replace('/', chr(92))}: Access denied"


def report(request: pytest.FixtureRequest, text: str) -> None:
    plugins = request.config.pluginmanager
    with plugins.getplugin("capturemanager").global_and_fixture_disabled():
        plugins.getplugin("terminalreporter").write_line(text)


class Lab:
    """The vendor's keys, a machine that trusts them, and an unsigned UKI."""

    def __init__(self, work: Path) -> None:
        self.work = work
        root = vm.rootfs()
        (kernel,) = sorted(root.glob("boot/vmlinuz-*"))
        kver = kernel.name.removeprefix("vmlinuz-")
        self.keys = secureboot.make_keys(work / "keys")
        self.other = secureboot.make_key(work / "keys", "other")
        self.vars = secureboot.enrolled_vars(self.keys, work / "enrolled.vars")
        self.loader = work / "systemd-bootx64.efi"
        uki.sign(root / secureboot.GUEST_SYSTEMD_BOOT, self.keys.db.key, self.keys.db.cert, self.loader)
        self.unsigned = work / "unsigned.efi"
        uki.build(root / secureboot.GUEST_STUB, kernel, root / f"boot/initrd.img-{kver}", CMDLINE,
                  (root / "usr/lib/os-release").read_bytes(), self.unsigned, uname=kver)

    def signed(self, name: str, pair: secureboot.KeyPair) -> Path:
        out = self.work / f"{name}.efi"
        uki.sign(self.unsigned, pair.key, pair.cert, out)
        return out

    def boot(self, name: str, image: Path, extra: tuple[str, ...] = (), *,
             vars_: Path | None = None) -> vm.Boot:
        """Boot image as the ESP's one entry, whose options line tries to change its
        command line; with the test's keys enrolled unless other variables are given."""
        esp = secureboot.make_esp(self.work / f"{name}.esp", {
            "EFI/BOOT/BOOTX64.EFI": self.loader,
            UKI_PATH: image,
            "loader/loader.conf": b"timeout 0\neditor no\ndefault test.conf\n",
            "loader/entries/test.conf": f"title test\nefi /{UKI_PATH}\noptions {ENTRY_OPTIONS}\n".encode(),
        })
        try:
            return secureboot.boot(esp, vars_ or self.vars, self.work, name, extra=extra)
        finally:
            esp.unlink()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    if reason := secureboot.missing_requirements():
        pytest.skip(f"cannot boot a Secure Boot VM here: {reason}")
    return Lab(tmp_path_factory.mktemp("secureboot"))


def booted(request: pytest.FixtureRequest, lab: Lab, name: str, image: Path,
           extra: tuple[str, ...] = (), *, vars_: Path | None = None) -> vm.Boot:
    b = lab.boot(name, image, extra, vars_=vars_)
    report(request, f"[secureboot] {name}: {b.seconds:.1f} s")
    return b


def test_signed_uki_boots_under_secure_boot_with_its_own_command_line(lab: Lab,
                                                                      request: pytest.FixtureRequest) -> None:
    b = booted(request, lab, "signed", lab.signed("signed", lab.keys.db))
    assert b.lines("secureboot: ") == ["Secure boot enabled"]
    # the entry's options line is ignored: the kernel's command line is the signed .cmdline
    assert b.lines("Command line: ") == [CMDLINE] == [uki.cmdline_of(lab.unsigned)]
    assert b.lines("Kernel command line: ") == [CMDLINE]


def test_without_secure_boot_the_entrys_options_replace_the_command_line(lab: Lab,
                                                                         request: pytest.FixtureRequest) -> None:
    """The control: the same ESP with no keys enrolled (Secure Boot off)."""
    b = booted(request, lab, "no-secure-boot", lab.signed("no-secure-boot", lab.keys.db), vars_=vm.OVMF_VARS)
    assert b.lines("secureboot: ") == ["Secure boot disabled"]
    assert b.lines("Command line: ") == [ENTRY_OPTIONS]


def test_uki_whose_command_line_was_changed_after_signing_is_refused(lab: Lab,
                                                                      request: pytest.FixtureRequest) -> None:
    image = lab.signed("tampered", lab.keys.db)
    secureboot.edit_cmdline(image, DIGEST.encode(), OTHER_DIGEST.encode())
    assert uki.cmdline_of(image) == CMDLINE.replace(DIGEST, OTHER_DIGEST)
    b = booted(request, lab, "tampered", image)
    assert "Linux version" not in b.log
    assert REFUSED in b.log


def test_uki_signed_with_another_key_is_refused(lab: Lab, request: pytest.FixtureRequest) -> None:
    b = booted(request, lab, "other-key", lab.signed("other-key", lab.other))
    assert "Linux version" not in b.log
    assert REFUSED in b.log


def test_smbios_oem_string_still_appends_to_the_signed_command_line(lab: Lab,
                                                                    request: pytest.FixtureRequest) -> None:
    """Not the disk's attacker but the hypervisor (or firmware): systemd-stub appends
    io.systemd.stub.kernel-cmdline-extra under Secure Boot too (only not in a
    confidential VM), so an argument given twice must not let the last one win."""
    extra = f"cfsdeploy.digest={OTHER_DIGEST}"
    b = booted(request, lab, "smbios", lab.signed("smbios", lab.keys.db),
               ("-smbios", f"type=11,value=io.systemd.stub.kernel-cmdline-extra={extra}"))
    assert b.lines("Command line: ") == [f"{CMDLINE} {extra}"]
