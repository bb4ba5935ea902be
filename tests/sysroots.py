"""Test sysroots: small OS trees with a kernel, committed, and boot directories that are
filesystems of their own, as ESPs are."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cfsdeploy.boot import bootloader, kargs
from cfsdeploy.sysroot import deployment
from cfsdeploy.sysroot.layout import Sysroot

KVER = "6.12.0-test"
OS = "testos"
BRANCH = "testos/stable"
ROOT_KARGS = ["root=UUID=0f0e0d0c-0b0a-0908-0706-050403020100", "rw"]


def make_os_tree(top: Path, *, version: str = "1", files: int = 20, kernel_seed: bytes = b"k1") -> Path:
    """A root filesystem with what deploying needs: a kernel and initramfs in
    /usr/lib/modules/<kver>/, os-release, /etc, /var and an empty /sysroot."""
    for d in ("usr/bin", f"usr/lib/modules/{KVER}", "etc/default", "var/lib/app", "sysroot"):
        (top / d).mkdir(parents=True, exist_ok=True)
    (top / "usr/lib/os-release").write_text(f'NAME="Test OS"\nPRETTY_NAME="Test OS {version}"\nVERSION_ID={version}\n')
    with contextlib.suppress(FileNotFoundError):
        (top / "etc/os-release").unlink()
    (top / "etc/os-release").symlink_to("../usr/lib/os-release")
    (top / f"usr/lib/modules/{KVER}/vmlinuz").write_bytes(kernel_seed * 40_000)
    (top / f"usr/lib/modules/{KVER}/initramfs.img").write_bytes(kernel_seed[::-1] * 60_000)
    (top / "etc/hostname").write_text("testbox\n")
    (top / "etc/default/app").write_text(f"SETTING={version}\n")
    (top / "var/lib/app/state").write_text("initial\n")
    for i in range(files):
        (top / f"usr/bin/tool{i}").write_bytes(bytes([i]) * (1000 + i) + version.encode())
    return top


def commit_tree(sysroot: Sysroot, tree: Path, *, version: str = "1", branch: str = BRANCH) -> str:
    return sysroot.repo.commit(tree, branch, f"build {version}", version=version).commit


@contextlib.contextmanager
def boot_mount(path: Path, *, size_mib: int = 64) -> Iterator[Path]:
    """A boot directory that is the root of its own filesystem, as an ESP is (tmpfs:
    this host kernel has no vfat; a small one gives a real ENOSPC)."""
    if os.geteuid() != 0:
        pytest.skip("a boot filesystem needs root to mount")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "boot", str(path)],
                   check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True, capture_output=True)


def bootctl_list(boot: Path) -> str:
    """What systemd's own parser of Type #1 entries makes of a boot directory."""
    if shutil.which("bootctl") is None:
        pytest.skip("bootctl missing (Debian package systemd-boot)")
    env = dict(os.environ, SYSTEMD_RELAX_ESP_CHECKS="1")
    return subprocess.run(["bootctl", f"--esp-path={boot}", "--no-pager", "--json=short", "list"],
                           check=True, capture_output=True, text=True, env=env).stdout


def bootctl_reads(boot: Path, meant: dict[str, tuple[str, list[str]]], sealed: dict[str, str] | None = None) -> None:
    """systemd's parser reads exactly the entry files of `meant` (file name: title and
    arguments), each with its title, and with an options line the kernel splits into
    exactly the arguments meant; those of `sealed` (file name: UKI) boot that UKI, with
    no options line (and no arguments meant)."""
    sealed = sealed or {}
    listed = {os.path.basename(e["path"]): e for e in map(json.loads, bootctl_list(boot).splitlines())}
    assert sorted(listed) == sorted(meant)
    for name, (title, args) in meant.items():
        assert listed[name]["title"] == title, name
        if name in sealed:
            assert (listed[name]["efi"], "options" in listed[name], "linux" in listed[name], args) == (
                sealed[name], False, False, []), name
        else:
            assert kargs.split(listed[name]["options"]) == args, name


def entries_read_as_meant(sysroot: Sysroot, os_name: str) -> None:
    """The guard of every test that writes a sysroot's entries: each entry file parses
    back, in systemd's parser, to the arguments its deployment's record holds, then
    cfsdeploy's own three naming that deployment."""
    state = sysroot.state(os_name)
    assert ([d for d in state.damaged if d.kind == bootloader.Kind.ENTRY], state.broken) == ([], [])
    meant, sealed = {}, {}
    for e, dep in zip(state.entries, state.deployments, strict=True):
        record = deployment.load(sysroot.dir_of(dep))
        if record.sealed is not None:
            assert e.efi == bootloader.Kernel(dep.os, record.sealed.kernel).efi
            meant[e.filename], sealed[e.filename] = (e.title, []), e.efi
            continue
        verity = e.option(kargs.VERITY)
        assert verity in kargs.VERITY_MODES
        meant[e.filename] = (e.title, record.kargs + kargs.Own(record.path, record.image_digest, verity).args())
    names = os.listdir(os.path.join(sysroot.boot, bootloader.ENTRIES)) if state.entries else []
    assert sorted(names) == sorted(meant)
    if meant:
        bootctl_reads(Path(sysroot.boot), meant, sealed)
