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
import enum
import errno
import hashlib
import os
import re
import shutil
import stat
import unicodedata
from dataclasses import dataclass, replace
from typing import BinaryIO, Iterable

from . import kargs
from .errors import CfsError
from .fsutil import exchange, fsync_dir

ENTRIES = "loader/entries"
STAGED = "loader/entries.staged"
KERNEL = "vmlinuz"
INITRAMFS = "initramfs.img"
MAX_TRIES = 99

# Names that become paths and entry text.  '-' is kept out of os names: GRUB reads entry
# file names as name-version-release.
OS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.]{0,63}")
# A kernel version: a /usr/lib/modules/<kver> directory of a commit, then part of the
# kernel directory's name and of the entry's linux and initrd lines.
KVER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}")
KERNEL_DIR = re.compile(r"(?P<kver>[A-Za-z0-9][A-Za-z0-9._+~-]{0,127})-[0-9a-f]{12}")
# Loose, so that every entry of an os is seen as its own (and checked, see _check_entry).
_ENTRY_NAME = re.compile(r"cfsdeploy-(?P<os>[A-Za-z0-9_.]+)-(?P<n>\d+)(?:\+(?P<left>\d+)(?:-(?P<done>\d+))?)?\.conf")
_KEYS = ("title", "version", "sort-key", "linux", "initrd", "options")
MAX_ENTRY = 64 << 10
MAX_TITLE = 200
# What a line of an entry never holds: control characters (a newline would start a
# line of its own) and the line separators Python's str.splitlines() would cut at.
NOT_TEXT = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class BootError(CfsError):
    pass


def check_kver(name: str) -> str:
    """A kernel version fit to name a directory and to go into entries, or BootError."""
    if not KVER.fullmatch(name) or ".." in name:
        raise BootError(f"invalid kernel version {name!r} (letters, digits and ._+~-, "
                        "at most 128, no '..')")
    return name


def clean_title(text: str) -> str:
    """Text from a commit (os-release, its version) made fit for an entry's title line."""
    text = "".join(" " if unicodedata.category(c)[0] in "CZ" else c for c in text)
    return " ".join(text.split())[:MAX_TITLE]


class Kind(str, enum.Enum):
    ENTRY = "entry"          # a boot entry of the os
    STAGED = "staged"        # the staged record
    ASIDE = "aside"          # a damaged record set aside


@dataclass(frozen=True)
class Damaged:
    """A record read from disk that failed its checks: reported, never acted on.
    Whatever deployment or kernel its bytes might name is kept while it exists."""
    kind: Kind
    path: str
    reason: str
    data: bytes

    def mentions(self, names: Iterable[str]) -> set[str]:
        return {n for n in names if n.encode() in self.data}


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
        """The value of `key=` as the kernel and the initramfs read the options."""
        return kargs.value(kargs.split(self.options), key)

    def fields(self) -> dict[str, str]:
        return {"title": self.title, "version": str(self.index), "sort-key": self.sort_key,
                "linux": self.linux, "initrd": self.initrd, "options": self.options}

    def render(self) -> bytes:
        """The entry file; BootError for a field that would not parse back as it is."""
        _check_entry(self.filename, self.fields())
        return "".join(f"{k} {v}\n" for k, v in self.fields().items()).encode()


def _check_entry(filename: str, fields: dict[str, str]) -> None:
    """The checks an entry passes both ways, written and read: plain lines, paths in
    the boot directory, options the kernel reads as they are meant."""
    m = _ENTRY_NAME.fullmatch(filename)
    if m is None or not OS_NAME.fullmatch(m["os"]) or any(len(n or "") > 9 for n in m.group("n", "left", "done")):
        raise BootError(f"{filename!r}: not a cfsdeploy boot entry name")
    for k, v in fields.items():
        if NOT_TEXT.search(v) or v != v.strip() or not v:
            raise BootError(f"{filename}: its {k} line {v!r} is empty, or not one plain line")
    if len(fields["title"]) > MAX_TITLE:
        raise BootError(f"{filename}: its title is longer than {MAX_TITLE} characters")
    if fields["version"] != str(int(m["n"])) or fields["sort-key"] != f"cfsdeploy-{m['os']}":
        raise BootError(f"{filename}: its version or sort-key is not the one of its name")
    for k in ("linux", "initrd"):
        if not _BOOT_PATH.fullmatch(fields[k]) or "/../" in fields[k] + "/":
            raise BootError(f"{filename}: its {k} {fields[k]!r} is not a plain path in the boot directory")
    options = fields["options"]
    if options.count('"') % 2 or len(options) > kargs.MAX_LINE:
        raise BootError(f"{filename}: its options have an unbalanced quote, or are longer "
                        f"than {kargs.MAX_LINE} characters")


_BOOT_PATH = re.compile(r"(?:/[A-Za-z0-9._+~-]+)+")


def parse_entry(filename: str, data: bytes) -> BootEntry:
    """An entry as cfsdeploy writes it, or BootError: a damaged entry is never half-read."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise BootError(f"{filename}: not UTF-8") from None
    fields: dict[str, str] = {}
    # Lines end at '\n' only, as systemd-boot and GRUB read them.
    for line in text.split("\n"):
        if not line.strip(" ") or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        if key not in _KEYS:
            raise BootError(f"{filename}: unexpected line {line[:80]!r}")
        if key in fields:
            raise BootError(f"{filename}: two {key} lines")
        fields[key] = value.strip(" ")
    missing = [k for k in _KEYS if k not in fields]
    if missing:
        raise BootError(f"{filename}: missing {', '.join(missing)}")
    _check_entry(filename, fields)
    m = _ENTRY_NAME.fullmatch(filename)
    assert m is not None
    return BootEntry(os=m["os"], index=int(m["n"]), title=fields["title"], linux=fields["linux"],
                     initrd=fields["initrd"], options=fields["options"],
                     tries_left=int(m["left"]) if m["left"] is not None else None,
                     tries_done=int(m["done"]) if m["done"] is not None else None)


def entry_os(filename: str) -> str | None:
    m = _ENTRY_NAME.fullmatch(filename)
    return m["os"] if m else None


def read_record(path: str, limit: int = MAX_ENTRY) -> bytes:
    """A small regular file's bytes, never through a symlink; BootError otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise BootError(f"{path}: cannot be read ({os.strerror(e.errno or 0)})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BootError(f"{path}: not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise BootError(f"{path}: larger than {limit} bytes")
    return data


def read_entries(boot: str, os_name: str) -> tuple[list[BootEntry], list[Damaged]]:
    """The os's entries in boot order (default first), and those that failed to parse
    or share their number with another (which of them boots is the loader's guess)."""
    directory = os.path.join(boot, ENTRIES)
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return [], []
    out: list[BootEntry] = []
    damaged = []
    for name in names:
        if entry_os(name) != os_name:
            continue
        path = os.path.join(directory, name)
        data = b""
        try:
            data = read_record(path)
            out.append(parse_entry(name, data))
        except BootError as e:
            damaged.append(Damaged(Kind.ENTRY, path, str(e).removeprefix(f"{path}: ").removeprefix(f"{name}: "), data))
    numbers = [e.index for e in out]
    for twin in [e for e in out if numbers.count(e.index) > 1]:
        out.remove(twin)
        damaged.append(Damaged(Kind.ENTRY, os.path.join(directory, twin.filename),
                               f"another entry has its number {twin.index}", twin.render()))
    out.sort(key=lambda e: e.index, reverse=True)
    return out, damaged


def number(entries: Iterable[BootEntry]) -> list[BootEntry]:
    """Renumber entries given in boot order so the first gets the highest number."""
    entries = list(entries)
    return [replace(e, index=len(entries) - i) for i, e in enumerate(entries)]


def clean_staged(boot: str) -> None:
    """Remove what an interrupted switch left behind (call under the lock)."""
    shutil.rmtree(os.path.join(boot, STAGED), ignore_errors=True)


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
    if m is None or not OS_NAME.fullmatch(m[1]) or not KERNEL_DIR.fullmatch(m[2]):
        return None
    return Kernel(m[1], m[2])


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
    shutil.rmtree(staging, ignore_errors=True)
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
        shutil.rmtree(staging, ignore_errors=True)
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
                shutil.rmtree(os.path.join(top, name))
                removed.append(name)
        if removed:
            fsync_dir(top)
    return removed

