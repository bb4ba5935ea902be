"""Boot Loader Specification Type #1 entries, kernels in the boot directory, and the switch.

    BOOT/loader/entries/cfsdeploy-<os>-<n>[+<left>[-<done>]].conf
    BOOT/cfsdeploy/<os>/<kver>-<12 hex of sha256(kernel+initramfs)>/{vmlinuz,initramfs.img}

An os's deployments are its entries in order of <n>, highest first: the highest is the
default, the next the rollback.  GRUB sorts entries by file name (read as a version,
descending) and systemd-boot by `sort-key` ascending then `version` descending; all of
an os's entries share one sort-key and carry <n> as version, so both agree.

The switch: the whole new set of entries (ours rewritten, other entries copied) is
written to loader/entries.staged and exchanged with loader/entries in one
renameat2(RENAME_EXCHANGE), which ext4, xfs, btrfs and (since Linux 6.0) vfat ESPs do
atomically.  A crash leaves either the old directory or the new one in place, never a
mix; the leftover staged directory is removed by the next writer.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
from dataclasses import dataclass, replace
from typing import BinaryIO, Iterable

from .errors import CfsError
from .fsutil import exchange, fsync_dir, remove_tree

ENTRIES = "loader/entries"
STAGED = "loader/entries.staged"
KERNEL = "vmlinuz"
INITRAMFS = "initramfs.img"
MAX_TRIES = 99

_ENTRY_NAME = re.compile(r"cfsdeploy-(?P<os>[A-Za-z0-9_.]+)-(?P<n>\d+)(?:\+(?P<left>\d+)(?:-(?P<done>\d+))?)?\.conf")
_KEYS = ("title", "version", "sort-key", "linux", "initrd", "options")


class BootError(CfsError):
    pass


@dataclass(frozen=True)
class BootEntry:
    os: str
    index: int
    title: str
    linux: str
    initrd: str
    options: str
    # systemd-boot's boot counting: tries left and tries done (None: not counting).
    tries_left: int | None = None
    tries_done: int | None = None

    @property
    def id(self) -> str:
        return f"cfsdeploy-{self.os}-{self.index}"

    @property
    def sort_key(self) -> str:
        return f"cfsdeploy-{self.os}"

    @property
    def filename(self) -> str:
        suffix = ""
        if self.tries_left is not None:
            suffix = f"+{self.tries_left}"
            if self.tries_done is not None:
                suffix += f"-{self.tries_done}"
        return f"{self.id}{suffix}.conf"

    @property
    def failed(self) -> bool:
        """The loader used up its tries: it will boot this entry only when asked to."""
        return self.tries_left == 0

    def option(self, key: str) -> str | None:
        for word in self.options.split():
            k, sep, v = word.partition("=")
            if k == key and sep:
                return v
        return None

    def render(self) -> bytes:
        lines = [f"title {self.title}", f"version {self.index}", f"sort-key {self.sort_key}",
                 f"linux {self.linux}", f"initrd {self.initrd}", f"options {self.options}"]
        return ("\n".join(lines) + "\n").encode()


def parse_entry(filename: str, data: bytes) -> BootEntry:
    m = _ENTRY_NAME.fullmatch(filename)
    if m is None:
        raise BootError(f"{filename}: not a cfsdeploy boot entry name")
    fields: dict[str, str] = {}
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise BootError(f"{filename}: not UTF-8") from None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        fields[key] = value.strip()
    missing = [k for k in ("title", "linux", "initrd", "options") if k not in fields]
    if missing:
        raise BootError(f"{filename}: missing {', '.join(missing)}")
    return BootEntry(os=m["os"], index=int(m["n"]), title=fields["title"], linux=fields["linux"],
                     initrd=fields["initrd"], options=fields["options"],
                     tries_left=int(m["left"]) if m["left"] is not None else None,
                     tries_done=int(m["done"]) if m["done"] is not None else None)


def entry_os(filename: str) -> str | None:
    m = _ENTRY_NAME.fullmatch(filename)
    return m["os"] if m else None


def read_entries(boot: str, os_name: str) -> list[BootEntry]:
    """The os's entries in boot order (default first)."""
    directory = os.path.join(boot, ENTRIES)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if entry_os(name) == os_name:
            with open(os.path.join(directory, name), "rb") as f:
                out.append(parse_entry(name, f.read()))
    out.sort(key=lambda e: e.index, reverse=True)
    if len({e.index for e in out}) != len(out):
        raise BootError(f"{directory}: two entries of os {os_name!r} share a number")
    return out


def number(entries: Iterable[BootEntry]) -> list[BootEntry]:
    """Renumber entries given in boot order so the first gets the highest number."""
    entries = list(entries)
    return [replace(e, index=len(entries) - i) for i, e in enumerate(entries)]


def clean_staged(boot: str) -> None:
    """Remove what an interrupted switch left behind (call under the lock)."""
    remove_tree(os.path.join(boot, STAGED), ignore_errors=True)


def switch_entries(boot: str, os_name: str, entries: list[BootEntry]) -> None:
    """Make `entries` the os's whole set of boot entries, in one atomic step."""
    loader = os.path.join(boot, "loader")
    current = os.path.join(boot, ENTRIES)
    staged = os.path.join(boot, STAGED)
    os.makedirs(loader, exist_ok=True)
    clean_staged(boot)
    os.mkdir(staged)
    try:
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(current)):
                if entry_os(name) != os_name:
                    with open(os.path.join(current, name), "rb") as f:
                        _write_synced(os.path.join(staged, name), f.read())
        for e in entries:
            if e.os != os_name:
                raise BootError(f"entry {e.id} is not of os {os_name!r}")
            _write_synced(os.path.join(staged, e.filename), e.render())
        fsync_dir(staged)
        if os.path.isdir(current):
            _exchange(staged, current)
        else:
            os.rename(staged, current)
        fsync_dir(loader)
    except OSError as e:
        clean_staged(boot)
        if e.errno == errno.ENOSPC:
            raise BootError(f"boot directory {boot} is full: cannot write boot entries") from None
        raise
    clean_staged(boot)


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _exchange(a: str, b: str) -> None:
    try:
        exchange(a, b)
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise BootError(f"the filesystem of {b} cannot exchange directories atomically "
                            "(renameat2 RENAME_EXCHANGE; vfat needs Linux 6.0 or newer)") from None
        raise


# --- kernels ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    """A kernel and initramfs installed in the boot directory."""
    os: str
    dirname: str          # <kver>-<12 hex>

    @property
    def relpath(self) -> str:
        return f"cfsdeploy/{self.os}/{self.dirname}"

    @property
    def linux(self) -> str:
        return f"/{self.relpath}/{KERNEL}"

    @property
    def initrd(self) -> str:
        return f"/{self.relpath}/{INITRAMFS}"


def kernel_of(entry: BootEntry) -> Kernel | None:
    m = re.fullmatch(r"/cfsdeploy/([^/]+)/([^/]+)/" + re.escape(KERNEL), entry.linux)
    return Kernel(m[1], m[2]) if m else None


def install_kernel(boot: str, os_name: str, kver: str, kernel: BinaryIO, initramfs: BinaryIO) -> Kernel:
    """Copy a kernel and its initramfs into the boot directory, once per distinct pair."""
    h = hashlib.sha256()
    need = 0
    for f in (kernel, initramfs):
        f.seek(0)
        while chunk := f.read(1 << 20):
            h.update(chunk)
            need += len(chunk)
    k = Kernel(os_name, f"{kver}-{h.hexdigest()[:12]}")
    dest = os.path.join(boot, k.relpath)
    if os.path.isdir(dest):
        return k
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    st = os.statvfs(parent)
    if st.f_bavail * st.f_frsize < need + (1 << 16):
        free = st.f_bavail * st.f_frsize
        raise BootError(f"boot directory {boot} is full: the kernel and initramfs need "
                        f"{need} bytes, {free} are free (try `cfsdeploy cleanup`)")
    staging = os.path.join(parent, f".{k.dirname}.tmp")
    remove_tree(staging, ignore_errors=True)
    os.mkdir(staging)
    try:
        for f, name in ((kernel, KERNEL), (initramfs, INITRAMFS)):
            f.seek(0)
            with open(os.path.join(staging, name), "xb") as out:
                shutil.copyfileobj(f, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
        fsync_dir(staging)
        os.rename(staging, dest)
        fsync_dir(parent)
    except OSError as e:
        remove_tree(staging, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise BootError(f"boot directory {boot} is full: cannot install kernel {kver} "
                            "(try `cfsdeploy cleanup`)") from None
        raise
    return k


def remove_unused_kernels(boot: str, os_name: str, keep: Iterable[Kernel]) -> list[str]:
    """Remove the os's kernel directories (and staging leftovers) not in `keep`."""
    keep_names = {k.dirname for k in keep if k.os == os_name}
    top = os.path.join(boot, "cfsdeploy", os_name)
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(top)):
            if name not in keep_names:
                remove_tree(os.path.join(top, name))
                removed.append(name)
        if removed:
            fsync_dir(top)
    return removed

