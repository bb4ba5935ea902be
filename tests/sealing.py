"""What the tests of sealed releases share: a tree that can be sealed (the host's
systemd-stub and systemd-boot where a tree has them), throwaway vendor keys, and
sealed commits made without the sealing porcelain (seal.py), so that deploy's tests
can also make seals that do not match their commit: a real UKI built from the host's
stub and the tree's kernel and initramfs, and systemd-boot, both signed with the
vendor's key and stored as objects."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from cfsdeploy.boot import uki
from cfsdeploy.composefs.fsverity import Digest
from cfsdeploy.composefs.tree import Inode
from cfsdeploy.repo.repository import Repository, Sealed, Sealer
from cfsdeploy.sysroot.layout import Sysroot

from . import secureboot
from .sysroots import BRANCH, KVER, make_os_tree

HOST_EFI = Path("/usr/lib/systemd/boot/efi")
HOST_STUB = HOST_EFI / "linuxx64.efi.stub"
HOST_LOADER = HOST_EFI / "systemd-bootx64.efi"
# where a tree has them
STUB = "usr/lib/systemd/boot/efi/linuxx64.efi.stub"
LOADER = "usr/lib/systemd/boot/efi/systemd-bootx64.efi"


def missing_reason() -> str | None:
    for path in (HOST_STUB, HOST_LOADER):
        if not path.exists():
            return f"{path} missing (Debian package systemd-boot-efi)"
    for tool in ("objcopy", "sbsign", "sbverify", "openssl"):
        if shutil.which(tool) is None:
            return f"{tool} missing"
    return None


def add_boot_files(top: Path, *, stub: bool = True, loader: bool = True) -> Path:
    """Put the host's systemd-stub and systemd-boot where a tree has them."""
    (top / STUB).parent.mkdir(parents=True, exist_ok=True)
    if stub:
        shutil.copyfile(HOST_STUB, top / STUB)
    if loader:
        shutil.copyfile(HOST_LOADER, top / LOADER)
    return top


def sealable_tree(top: Path, *, version: str = "1") -> Path:
    """make_os_tree's tree (a kernel and initramfs in /usr/lib/modules/KVER/), with
    systemd's stub and loader."""
    if reason := missing_reason():
        pytest.skip(reason)
    return add_boot_files(make_os_tree(top, version=version))


def vendor_key(directory: Path) -> secureboot.KeyPair:
    if reason := missing_reason():
        pytest.skip(reason)
    directory.mkdir(parents=True, exist_ok=True)
    return secureboot.make_key(directory, "vendor")


def sealed_cmdline(image: Digest) -> str:
    """What the sealing porcelain puts in .cmdline, with a vendor's karg."""
    return f"root=LABEL=root rw cfsdeploy.digest={image.hex()} cfsdeploy.verity=require console=ttyS0"


def sealer(repo: Repository, tree: Path, key: secureboot.KeyPair, work: Path, *,
           cmdline: Callable[[Digest], str] = sealed_cmdline, kver: str = KVER) -> Sealer:
    """A sealer for Repository.commit: the UKI of the tree's kernel `kver`, signed."""
    def seal(root: Inode, image: Digest) -> Sealed:
        work.mkdir(parents=True, exist_ok=True)
        modules = tree / "usr/lib/modules" / kver
        unsigned, signed, loader = work / "unsigned.efi", work / "uki.efi", work / "loader.efi"
        uki.build(HOST_STUB, modules / "vmlinuz", modules / "initramfs.img", cmdline(image),
                  (tree / "usr/lib/os-release").read_bytes(), unsigned, uname=kver)
        uki.sign(unsigned, key.key, key.cert, signed)
        uki.sign(HOST_LOADER, key.key, key.cert, loader)
        return Sealed(repo.objects.add_bytes(signed.read_bytes()), repo.objects.add_bytes(loader.read_bytes()))
    return seal


def commit_sealed(sysroot: Sysroot, tree: Path, key: secureboot.KeyPair, work: Path, *, version: str = "1",
                  branch: str = BRANCH, cmdline: Callable[[Digest], str] = sealed_cmdline) -> str:
    repo = sysroot.repo
    return repo.commit(tree, branch, f"build {version}", version=version,
                       sealer=sealer(repo, tree, key, work / f"seal-{version}", cmdline=cmdline)).commit
