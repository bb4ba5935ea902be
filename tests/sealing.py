"""Sealed commits for tests, made without the sealing porcelain: a real UKI built from
the host's systemd stub and the tree's kernel and initramfs, signed with a throwaway
key, and systemd-boot signed with it too, both stored as objects of the repository."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cfsdeploy.boot import uki
from cfsdeploy.composefs.fsverity import Digest
from cfsdeploy.composefs.tree import Inode
from cfsdeploy.repo.repository import Repository, Sealed, Sealer
from cfsdeploy.sysroot.layout import Sysroot

from . import secureboot
from .sysroots import BRANCH, KVER

STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
LOADER = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")


def sealed_cmdline(image: Digest) -> str:
    """What the sealing porcelain puts in .cmdline (SEAL.md), with a vendor's karg."""
    return f"root=LABEL=root rw cfsdeploy.digest={image.hex()} cfsdeploy.verity=require console=ttyS0"


def vendor_key(directory: Path) -> secureboot.KeyPair:
    for tool in (STUB, LOADER):
        if not tool.exists():
            pytest.skip(f"{tool} missing (Debian package systemd-boot-efi)")
    directory.mkdir(parents=True, exist_ok=True)
    return secureboot.make_key(directory, "vendor")


def sealer(repo: Repository, tree: Path, key: secureboot.KeyPair, work: Path, *,
           cmdline: Callable[[Digest], str] = sealed_cmdline, kver: str = KVER) -> Sealer:
    """A sealer for Repository.commit: the UKI of the tree's kernel `kver`, signed."""
    def seal(root: Inode, image: Digest) -> Sealed:
        work.mkdir(parents=True, exist_ok=True)
        modules = tree / "usr/lib/modules" / kver
        unsigned, signed, loader = work / "unsigned.efi", work / "uki.efi", work / "loader.efi"
        uki.build(STUB, modules / "vmlinuz", modules / "initramfs.img", cmdline(image),
                  (tree / "usr/lib/os-release").read_bytes(), unsigned, uname=kver)
        uki.sign(unsigned, key.key, key.cert, signed)
        uki.sign(LOADER, key.key, key.cert, loader)
        return Sealed(repo.objects.add_bytes(signed.read_bytes()), repo.objects.add_bytes(loader.read_bytes()))
    return seal


def commit_sealed(sysroot: Sysroot, tree: Path, key: secureboot.KeyPair, work: Path, *, version: str = "1",
                  branch: str = BRANCH, cmdline: Callable[[Digest], str] = sealed_cmdline) -> str:
    repo = sysroot.repo
    return repo.commit(tree, branch, f"build {version}", version=version,
                       sealer=sealer(repo, tree, key, work / f"seal-{version}", cmdline=cmdline)).commit
