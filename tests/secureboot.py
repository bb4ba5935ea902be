"""Secure Boot for the VM tests: a machine whose firmware trusts only the test's own
keys, and short boots of an ESP on it.

    make_keys()      a throwaway PK, KEK and db (openssl, self-signed)
    enrolled_vars()  an OVMF variables file with them enrolled and Secure Boot on
                     (virt-fw-vars, from PyPI's virt-firmware)
    make_esp()       a FAT image (no partition table: OVMF boots it as a removable
                     disk) filled with mtools, without mounting
    boot()           QEMU in Secure Boot mode: q35 with SMM, the variables' flash
                     writable only from SMM, OVMF's secboot build; until the kernel
                     reboots or the firmware is out of boot options
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cfsdeploy.boot import uki
from cfsdeploy.util.run import run, which

from . import vm

# systemd-boot and the stub of the guest's systemd (257), not the host's
GUEST_SYSTEMD_BOOT = Path("usr/lib/systemd/boot/efi/systemd-bootx64.efi")
GUEST_STUB = Path("usr/lib/systemd/boot/efi/linuxx64.efi.stub")
# The owner GUID recorded with each enrolled certificate
OWNER = "cfde0000-5ec0-4b00-8000-000000000001"
HOST_TOOLS = {"openssl": "openssl", "sbsign": "sbsigntool", "sbverify": "sbsigntool", "objcopy": "binutils"}


@dataclass(frozen=True)
class KeyPair:
    key: Path
    cert: Path


@dataclass(frozen=True)
class Keys:
    pk: KeyPair
    kek: KeyPair
    db: KeyPair


def virt_fw_vars() -> str | None:
    """virt-fw-vars of this Python's environment (the test extra), else on PATH."""
    beside = Path(sys.executable).parent / "virt-fw-vars"
    return str(beside) if beside.exists() else which("virt-fw-vars")


def missing_requirements() -> str | None:
    """Why this host cannot boot a Secure Boot VM, or None."""
    if reason := vm.missing_requirements():
        return reason
    for tool, package in HOST_TOOLS.items():
        if which(tool) is None:
            return f"{tool} missing (Debian package {package})"
    if virt_fw_vars() is None:
        return "virt-fw-vars missing (pip install virt-firmware: the test extra)"
    if not vm.OVMF_CODE_SECBOOT.exists():
        return f"{vm.OVMF_CODE_SECBOOT} missing (Debian package ovmf)"
    return None


def make_key(directory: Path, name: str) -> KeyPair:
    """A throwaway RSA key and its self-signed certificate, in PEM."""
    pair = KeyPair(directory / f"{name}.key", directory / f"{name}.crt")
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "3650",
         "-subj", f"/CN=cfsdeploy test {name}/", "-keyout", pair.key, "-out", pair.cert], capture=True)
    return pair


def make_keys(directory: Path) -> Keys:
    directory.mkdir(parents=True, exist_ok=True)
    return Keys(make_key(directory, "PK"), make_key(directory, "KEK"), make_key(directory, "db"))


def enrolled_vars(keys: Keys, out: Path) -> Path:
    """OVMF's empty variables with PK, KEK and db set and Secure Boot enabled."""
    tool = virt_fw_vars()
    assert tool is not None, "see missing_requirements()"
    run([tool, "--input", vm.OVMF_VARS, "--output", out,
         "--set-pk", OWNER, keys.pk.cert, "--add-kek", OWNER, keys.kek.cert, "--add-db", OWNER, keys.db.cert,
         "--secure-boot"], capture=True)
    return out


def make_esp(path: Path, files: Mapping[str, Path | bytes], size_mib: int = 128) -> Path:
    """A FAT32 image holding files (ESP path -> a file to copy, or its bytes)."""
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size_mib * vm.MIB)
    run(["mkfs.vfat", "-F", "32", "-n", "ESP", path], capture=True)
    made: set[str] = set()
    scratch = path.with_name(path.name + ".file")
    try:
        for name, content in sorted(files.items()):
            parts = name.strip("/").split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in made:
                    vm.mtools("mmd", "-i", path, f"::/{d}")
                    made.add(d)
            if isinstance(content, bytes):
                scratch.write_bytes(content)
                content = scratch
            vm.mtools("mcopy", "-i", path, content, f"::/{'/'.join(parts)}")
    finally:
        scratch.unlink(missing_ok=True)
    return path


def boot(esp: Path, vars_: Path, work: Path, name: str, *, timeout: float = 120,
         extra: Sequence[str] = ()) -> vm.Boot:
    """Power on a Secure Boot machine with esp as its disk (a copy of vars_ as its
    NVRAM), no network and extra QEMU arguments, until it reboots (QEMU exits) or
    its firmware is stuck (QEMU is stopped)."""
    nvram = work / f"{name}.vars"
    nvram.write_bytes(vars_.read_bytes())
    return vm.boot(vm.Disk(esp, nvram, None, {}, secure_boot=True), work, name=name, timeout=timeout, extra=extra)


def edit_cmdline(image: Path, old: bytes, new: bytes) -> None:
    """Replace old by new (as long) in a signed UKI's .cmdline, in place: what an
    attacker with the disk would do; the signature no longer matches."""
    assert len(old) == len(new)
    cmdline = uki.read_headers(image).section(uki.CMDLINE)
    assert cmdline is not None
    with open(image, "r+b") as f:
        f.seek(cmdline.raw_offset)
        data = f.read(cmdline.virtual_size)
        assert old in data
        f.seek(cmdline.raw_offset)
        f.write(data.replace(old, new))
