"""What the tests of sealed releases share: a tree that can be sealed (the host's
systemd-stub and systemd-boot where a tree has them) and throwaway Secure Boot keys."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from . import secureboot
from .sysroots import make_os_tree

HOST_EFI = Path("/usr/lib/systemd/boot/efi")
STUB = "usr/lib/systemd/boot/efi/linuxx64.efi.stub"
LOADER = "usr/lib/systemd/boot/efi/systemd-bootx64.efi"


def missing_reason() -> str | None:
    for name in ("linuxx64.efi.stub", "systemd-bootx64.efi"):
        if not (HOST_EFI / name).exists():
            return f"{HOST_EFI / name} missing (Debian package systemd-boot-efi)"
    for tool in ("objcopy", "sbsign", "sbverify", "openssl"):
        if shutil.which(tool) is None:
            return f"{tool} missing"
    return None


def add_boot_files(top: Path, *, stub: bool = True, loader: bool = True) -> Path:
    """Put the host's systemd-stub and systemd-boot where a tree has them."""
    (top / STUB).parent.mkdir(parents=True, exist_ok=True)
    if stub:
        shutil.copyfile(HOST_EFI / "linuxx64.efi.stub", top / STUB)
    if loader:
        shutil.copyfile(HOST_EFI / "systemd-bootx64.efi", top / LOADER)
    return top


def sealable_tree(top: Path, *, version: str = "1") -> Path:
    """make_os_tree's tree (a kernel and initramfs in /usr/lib/modules/KVER/), with
    systemd's stub and loader."""
    if reason := missing_reason():
        pytest.skip(reason)
    return add_boot_files(make_os_tree(top, version=version))


def make_key(directory: Path, name: str) -> secureboot.KeyPair:
    directory.mkdir(parents=True, exist_ok=True)
    return secureboot.make_key(directory, name)
