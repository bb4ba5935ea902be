"""Boot Loader Specification Type #1 entries, kernels in the boot directory, and the switch.

    BOOT/loader/entries/cfsdeploy-<os>-<n>[+<left>[-<done>]].conf
    BOOT/cfsdeploy/<os>/<kver>-<12 hex of sha256(kernel+initramfs)>/{vmlinuz,initramfs.img,complete}
    BOOT/cfsdeploy/<os>/<kver>-<12 hex of sha256(UKI)>/{uki.efi,complete}      (a sealed release)
    SYSROOT/cfsdeploy/boot-switch.json      the switch in progress (removed when done)

An os's deployments are its entries in order of <n>, highest first: the highest is the
default, the next the rollback.  GRUB sorts entries by file name (read as a version,
descending) and systemd-boot by `sort-key` ascending then `version` descending; all of
an os's entries share one sort-key and carry <n> as version, so both agree.

The boot directory is usually a vfat ESP: no journal, and Linux writes a change's
FAT sectors and directory sectors back in no set order.  So nothing here relies on
a rename (a torn one leaves two names on the same clusters); every step is made
durable (syncfs) before the next one starts, and each step is one whose partial
writes still leave a bootable directory:

  1. a kernel directory is written under its final name, made durable, then marked
     `complete` (an empty file: a name and no clusters); no entry names it before;
  2. the switch is recorded on the sysroot (journaled) before the boot directory
     changes, so an interrupted one is finished by recover();
  3. new entry files get numbers above every existing one and are written default
     first: once the default's file is on disk it wins, before that the old
     default still does;
  4. only when all new files are durable do replaced entries go, names first while
     the files are held open, then their clusters (remove_durably);
  5. kernel directories no entry names go last, the same way.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import Enum, StrEnum
from typing import BinaryIO

from ..util.errors import CfsError, HostError, IntegrityError
from ..util.fsutil import atomic_write_bytes, fsync_dir, syncfs
from . import kargs

ENTRIES = "loader/entries"
STAGED = "loader/entries.staged"  # what switches of older versions left
KERNEL = "vmlinuz"
INITRAMFS = "initramfs.img"
UKI = "uki.efi"
MAX_TRIES = 99

# Names that become paths and entry text.  '-' is kept out of os names: GRUB reads entry
# file names as name-version-release.
OS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.]{0,63}")
# A kernel version: a <kver> of a commit's kernel (sysroot.commit.KERNEL_SOURCES), then part of the
# kernel directory's name and of the entry's linux and initrd lines.
KVER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}")
KERNEL_DIR = re.compile(r"(?P<kver>[A-Za-z0-9][A-Za-z0-9._+~-]{0,127})-[0-9a-f]{12}")
# Loose, so that every entry of an os is seen as its own (and checked, see _check_entry).
_ENTRY_NAME = re.compile(r"cfsdeploy-(?P<os>[A-Za-z0-9_.]+)-(?P<n>\d+)(?:\+(?P<left>\d+)(?:-(?P<done>\d+))?)?\.conf")
# The two forms of an entry, in the order written: the kernel, its initramfs and the
# command line, or (a sealed release) a signed UKI that holds all three.
LINUX_KEYS = ("title", "version", "sort-key", "options", "initrd", "linux")
EFI_KEYS = ("title", "version", "sort-key", "efi")
MAX_ENTRY = 64 << 10
MAX_TITLE = 200
# What a line of an entry never holds: control characters (a newline would start a
# line of its own) and the line separators Python's str.splitlines() would cut at.
NOT_TEXT = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class BootError(CfsError):
    pass


class BootIntegrityError(BootError, IntegrityError):
    pass


class BootHostError(BootError, HostError):
    pass


def check_kver(name: str) -> str:
    """A kernel version fit to name a directory and to go into entries, or BootError."""
    if not KVER.fullmatch(name) or ".." in name:
        raise BootIntegrityError(f"invalid kernel version {name!r} (letters, digits and ._+~-, "
                                 "at most 128, no '..')")
    return name


def clean_title(text: str) -> str:
    """Text from a commit (os-release, its version) made fit for an entry's title line."""
    text = "".join(" " if unicodedata.category(c)[0] in "CZ" else c for c in text)
    return " ".join(text.split())[:MAX_TITLE]


class Kind(StrEnum):
    ENTRY = "entry"          # a boot entry of the os
    STAGED = "staged"        # the staged record
    ASIDE = "aside"          # a damaged record set aside
    LINK = "link"            # a link of SYSROOT/cfsdeploy/by-digest/


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
    """linux, initrd and options; or efi alone (a sealed release's UKI, whose command
    line is its own): the other form's fields are None."""
    os: str
    index: int
    title: str
    linux: str | None
    initrd: str | None
    options: str | None
    # systemd-boot's boot counting: tries left and tries done (None: not counting).
    tries_left: int | None = None
    tries_done: int | None = None
    efi: str | None = None

    @property
    def sealed(self) -> bool:
        return self.efi is not None

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
        """The value of `key=` as the kernel and the initramfs read the options (None
        in a sealed entry, which has none)."""
        return kargs.value(kargs.split(self.options), key) if self.options is not None else None

    def fields(self) -> dict[str, str | None]:
        """The entry's lines, in the order written: `linux` (or `efi`) last, since a file
        cut short by a crash then lacks it, and loaders skip it."""
        values = self._values()
        return {k: values[k] for k in (EFI_KEYS if self.sealed else LINUX_KEYS)}

    def _values(self) -> dict[str, str | None]:
        return {"title": self.title, "version": str(self.index), "sort-key": self.sort_key,
                "options": self.options, "initrd": self.initrd, "linux": self.linux, "efi": self.efi}

    def render(self) -> bytes:
        """The entry file; BootError for a field that would not parse back as it is, or
        fields of both forms (or neither)."""
        _check_entry(self.filename, self._values())
        return "".join(f"{k} {v}\n" for k, v in self.fields().items()).encode()


def _check_entry(filename: str, fields: dict[str, str | None]) -> None:
    """The checks an entry passes both ways, written and read: one of the two forms,
    plain lines, paths in the boot directory, options the kernel reads as they are
    meant, a UKI in a kernel directory of the entry's os."""
    m = _ENTRY_NAME.fullmatch(filename)
    if m is None or not OS_NAME.fullmatch(m["os"]) or any(len(n or "") > 9 for n in m.group("n", "left", "done")):
        raise BootIntegrityError(f"{filename!r}: not a cfsdeploy boot entry name")
    keys = tuple(k for k, v in fields.items() if v is not None)
    if sorted(keys) not in (sorted(LINUX_KEYS), sorted(EFI_KEYS)):
        raise BootIntegrityError(f"{filename}: has {', '.join(keys)}: neither {', '.join(LINUX_KEYS)} "
                                 f"nor {', '.join(EFI_KEYS)}")
    for k, v in fields.items():
        if v is not None and (NOT_TEXT.search(v) or v != v.strip() or not v):
            raise BootIntegrityError(f"{filename}: its {k} line {v!r} is empty, or not one plain line")
    if len(fields["title"] or "") > MAX_TITLE:
        raise BootIntegrityError(f"{filename}: its title is longer than {MAX_TITLE} characters")
    if fields["version"] != str(int(m["n"])) or fields["sort-key"] != f"cfsdeploy-{m['os']}":
        raise BootIntegrityError(f"{filename}: its version or sort-key is not the one of its name")
    if "efi" in keys:
        efi = fields["efi"]
        assert efi is not None
        if _uki_of(m["os"], efi) is None:
            raise BootIntegrityError(f"{filename}: its efi {efi!r} is not the {UKI} of a kernel directory "
                                     f"of os {m['os']}")
        return
    for k in ("linux", "initrd"):
        path = fields[k]
        if path is None or not _BOOT_PATH.fullmatch(path) or "/../" in path + "/":
            raise BootIntegrityError(f"{filename}: its {k} {path!r} is not a plain path in the boot directory")
    options = fields["options"]
    if options is None or options.count('"') % 2 or len(options) > kargs.MAX_LINE:
        raise BootIntegrityError(f"{filename}: its options have an unbalanced quote, or are longer "
                                 f"than {kargs.MAX_LINE} characters")


_BOOT_PATH = re.compile(r"(?:/[A-Za-z0-9._+~-]+)+")


def parse_entry(filename: str, data: bytes) -> BootEntry:
    """An entry as cfsdeploy writes it, or BootError: a damaged entry is never half-read."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise BootIntegrityError(f"{filename}: not UTF-8") from None
    fields: dict[str, str | None] = {}
    # Lines end at '\n' only, as systemd-boot and GRUB read them.
    for line in text.split("\n"):
        if not line.strip(" ") or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        if key not in LINUX_KEYS + EFI_KEYS:
            raise BootIntegrityError(f"{filename}: unexpected line {line[:80]!r}")
        if key in fields:
            raise BootIntegrityError(f"{filename}: two {key} lines")
        fields[key] = value.strip(" ")
    missing = [k for k in (EFI_KEYS if "efi" in fields else LINUX_KEYS) if k not in fields]
    if missing:
        raise BootIntegrityError(f"{filename}: missing {', '.join(missing)}")
    _check_entry(filename, fields)
    m = _ENTRY_NAME.fullmatch(filename)
    assert m is not None and fields["title"] is not None
    return BootEntry(os=m["os"], index=int(m["n"]), title=fields["title"], linux=fields.get("linux"),
                     initrd=fields.get("initrd"), options=fields.get("options"),
                     tries_left=int(m["left"]) if m["left"] is not None else None,
                     tries_done=int(m["done"]) if m["done"] is not None else None, efi=fields.get("efi"))


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
            raise BootIntegrityError(f"{path}: not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise BootIntegrityError(f"{path}: larger than {limit} bytes")
    return data


def read_entries(boot: str, os_name: str) -> list[BootEntry]:
    """The os's entries that parse, in boot order (default first)."""
    return scan_entries(boot, os_name)[0]


def scan_entries(boot: str, os_name: str) -> tuple[list[BootEntry], list[Damaged]]:
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


def number(entries: Iterable[BootEntry], existing: Iterable[BootEntry] = (), above: int = 0) -> list[BootEntry]:
    """Number entries given in boot order so the first gets the highest number.

    An entry already on disk (in `existing`) keeps its file (number, boot counter)
    when its text is unchanged and its number still sorts above the entry after it;
    every other one gets a number above `above` and all that exist, so new files
    never collide with the ones they replace, and the first one written (the
    default) takes over the boot at once (see switch_entries)."""
    entries = list(entries)
    on_disk = {e.filename: e for e in existing}
    top = max([above, *(e.index for e in on_disk.values())])
    out: list[BootEntry] = []
    floor = 0
    for e in reversed(entries):
        if not (e.index > floor and on_disk.get(e.filename) == e):
            top += 1
            e = replace(e, index=top)
        floor = e.index
        out.append(e)
    return out[::-1]


@dataclass(frozen=True)
class Plan:
    """A switch of an os's entries, as recorded before it starts: the files to
    write, default first, and the entries (by id) to remove once they are durable."""
    os: str
    write: list[tuple[str, bytes]]
    remove: list[str]

    def to_json(self) -> dict[str, object]:
        return {"os": self.os, "write": [[n, d.decode()] for n, d in self.write], "remove": self.remove}

    @classmethod
    def parse(cls, data: bytes) -> Plan:
        """A plan read back from disk, checked before anything is done with it."""
        try:
            doc = json.loads(data)
            os_name, write, remove = doc["os"], doc["write"], doc["remove"]
            if not (isinstance(os_name, str) and isinstance(write, list) and isinstance(remove, list)):
                raise TypeError
            plan = cls(os_name, [(str(n), str(d).encode()) for n, d in write], [str(i) for i in remove])
        except (ValueError, KeyError, TypeError, UnicodeEncodeError):
            raise BootIntegrityError("not a boot-entry switch record") from None
        for name, text in plan.write:
            if entry_os(name) != plan.os:
                raise BootIntegrityError(f"switch record names {name!r}, not an entry of os {plan.os!r}")
            parse_entry(name, text)
        for id_ in plan.remove:
            if entry_os(id_ + ".conf") != plan.os:
                raise BootIntegrityError(f"switch record removes {id_!r}, not an entry of os {plan.os!r}")
        return plan


class RepairKind(Enum):
    FINISHED_SWITCH = "finished_switch"      # an interrupted switch of entries, completed
    REMOVED_LEFTOVER = "removed_leftover"    # what an interrupted older switch left
    DAMAGED_RECORD = "damaged_record"        # a switch record that does not parse, set aside
    SUSPECT_LEFTOVER = "suspect_leftover"    # a leftover that may share clusters: left for fsck
    REINSTALLED_KERNEL = "reinstalled_kernel"  # an entry's kernel or initramfs was missing or torn
    BROKEN_KERNEL = "broken_kernel"          # ... and could not be put back


@dataclass(frozen=True)
class Repair:
    kind: RepairKind
    path: str
    message: str | None = None     # the error: DAMAGED_RECORD, BROKEN_KERNEL
    os: str | None = None          # whose entries: FINISHED_SWITCH
    written: int = 0               # entries written and removed: FINISHED_SWITCH
    removed: int = 0
    deployment: str | None = None  # whose kernel: REINSTALLED_KERNEL, BROKEN_KERNEL
    same_as: str | None = None     # the directory with the same files: SUSPECT_LEFTOVER
    kernel: str | None = None      # the kernel directory installed, when not path's: REINSTALLED_KERNEL

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind.value, "path": self.path, "message": self.message, "os": self.os,
                "written": self.written, "removed": self.removed, "deployment": self.deployment,
                "same_as": self.same_as, "kernel": self.kernel}


def entry_files(boot: str, os_name: str) -> dict[str, str]:
    """The os's entry files by entry id (its name without the boot counter), whatever
    their content."""
    out = {}
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(os.path.join(boot, ENTRIES)):
            if entry_os(name) == os_name:
                out[_id(name)] = name
    return out


def switch_entries(boot: str, os_name: str, entries: list[BootEntry], record: str) -> list[BootEntry]:
    """Make `entries` (in boot order) the os's whole set of boot entries; returns them
    numbered.  The plan is first made durable in `record` (on the sysroot, whose
    journal orders what vfat does not), so that recover() completes an interrupted
    switch; on the boot directory, the new files, default first, are durable before
    any old one goes (see docs/architecture.md, "Writing the boot directory")."""
    for e in entries:
        if e.os != os_name:
            raise BootIntegrityError(f"entry {e.id} is not of os {os_name!r}")
    files = entry_files(boot, os_name)
    try:
        current = read_entries(boot, os_name)
    except BootError:
        current = []
    numbered = number(entries, current, above=max((_number_of(i) for i in files), default=0))
    keep = {e.filename for e in numbered}
    plan = Plan(os_name, [(e.filename, e.render()) for e in numbered if e not in current],
                sorted(i for i, name in files.items() if name not in keep))
    if not plan.write and not plan.remove:
        return numbered
    atomic_write_bytes(record, json.dumps(plan.to_json()).encode())
    _carry_out(boot, plan, record)
    return numbered


def _carry_out(boot: str, plan: Plan, record: str) -> None:
    """Apply a recorded plan and drop the record; where the boot directory is full,
    undo what was written (nothing old is removed before every new file is there)."""
    try:
        _apply(boot, plan)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        present = entry_files(boot, plan.os)
        remove_durably(boot, [os.path.join(boot, ENTRIES, present[i])
                              for i in {_id(n) for n, _ in plan.write} if i in present])
        os.unlink(record)
        fsync_dir(os.path.dirname(record))
        raise BootHostError(f"boot directory {boot} is full: cannot write boot entries") from None
    os.unlink(record)
    fsync_dir(os.path.dirname(record))


def _id(filename: str) -> str:
    m = _ENTRY_NAME.fullmatch(filename)
    assert m is not None
    return f"cfsdeploy-{m['os']}-{m['n']}"


def _number_of(entry_id: str) -> int:
    return int(entry_id.rsplit("-", 1)[1])


def _apply(boot: str, plan: Plan) -> None:
    """Carry out a plan, or finish one a crash interrupted: files already written
    whole are kept (whatever boot counting renamed them to), torn ones rewritten."""
    directory = os.path.join(boot, ENTRIES)
    if not os.path.isdir(directory):
        os.makedirs(directory)
        syncfs(boot)
    present = entry_files(boot, plan.os)
    pending, torn = [], []
    for name, data in plan.write:
        have = present.get(_id(name))
        if have is None or _read(os.path.join(directory, have)) != data:
            pending.append((name, data))
            if have is not None:
                torn.append(os.path.join(directory, have))
    remove_durably(boot, torn)
    for name, data in pending:
        _write_synced(os.path.join(directory, name), data)
    syncfs(boot)
    present = entry_files(boot, plan.os)
    remove_durably(boot, [os.path.join(directory, present[i]) for i in plan.remove if i in present])


def _read(path: str) -> bytes | None:
    """An entry file's bytes (read_record's checks), or None for one that cannot serve."""
    try:
        return read_record(path)
    except BootError:
        return None


def recover(boot: str, record: str) -> list[Repair]:
    """Finish what an interrupted switch left (call under the lock): the switch
    recorded in `record`, and the staging directory of older versions."""
    repairs = []
    leftover = os.path.join(boot, STAGED)
    if os.path.isdir(leftover) and not os.path.islink(leftover):
        ours = os.path.join(boot, ENTRIES)
        if _listing(leftover) == _listing(ours):
            # Both names may hold the same clusters after a torn exchange on vfat:
            # removing one would free the other's files.  fsck.vfat sorts it out.
            repairs.append(Repair(RepairKind.SUSPECT_LEFTOVER, leftover, same_as=ours))
        else:
            remove_durably(boot, _tree(leftover))
            repairs.append(Repair(RepairKind.REMOVED_LEFTOVER, leftover))
    if not os.path.lexists(record):
        return repairs
    try:
        plan = Plan.parse(read_record(record, 1 << 20))
    except BootError as e:
        aside = record + ".damaged"
        os.replace(record, aside)
        fsync_dir(os.path.dirname(record))
        return repairs + [Repair(RepairKind.DAMAGED_RECORD, aside, message=str(e))]
    _carry_out(boot, plan, record)
    return repairs + [Repair(RepairKind.FINISHED_SWITCH, os.path.join(boot, ENTRIES), os=plan.os,
                             written=len(plan.write), removed=len(plan.remove))]


def needs_recovery(boot: str, record: str) -> bool:
    """Whether recover() has anything to do (a cheap look, without the lock)."""
    return os.path.lexists(record) or os.path.lexists(os.path.join(boot, STAGED))


def _listing(directory: str) -> list[tuple[str, bytes | None]]:
    try:
        return sorted((n, _read(os.path.join(directory, n))) for n in os.listdir(directory))
    except OSError:
        return []


def _write_synced(path: str, data: bytes) -> None:
    """Create a file and make it durable: on vfat, fsync writes its data, then its
    directory entry, then its clusters in the FAT."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _tree(top: str) -> list[str]:
    """Every path below and including top, children before their directory; symlinks
    are names to remove, never followed."""
    if not stat.S_ISDIR(os.lstat(top).st_mode):
        return [top]
    out = []
    with os.scandir(top) as it:
        for d in it:
            if d.is_dir(follow_symlinks=False):
                out += _tree(d.path)
            else:
                out.append(d.path)
    return out + [top]


def remove_durably(boot: str, paths: list[str]) -> None:
    """Remove files and directories (children listed before their directory) from the
    boot filesystem so that at every instant each is either there whole or unnamed.

    vfat frees a removed file's clusters in the FAT and drops its name from its
    directory in one writeback, in no set order: a name that reaches the disk after
    its clusters were freed (and perhaps given to a new file) is what broke ESPs.
    So the names go first, each file held open so its clusters stay allocated, and
    are made durable; only then are the files closed and their clusters freed."""
    if not paths:
        return
    held = []
    try:
        for p in paths:
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                os.unlink(p)
                continue
            held.append(os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC))
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(p)
            else:
                os.unlink(p)
        syncfs(boot)
    finally:
        for fd in held:
            os.close(fd)
    syncfs(boot)


# --- kernels ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    """A kernel and initramfs installed in the boot directory, or a sealed release's UKI."""
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

    @property
    def efi(self) -> str:
        return f"/{self.relpath}/{UKI}"


def kernel_of(entry: BootEntry) -> Kernel | None:
    """The kernel directory of ours an entry names, if it names one."""
    if entry.efi is not None:
        return _uki_of(entry.os, entry.efi)
    m = re.fullmatch(r"/cfsdeploy/([^/]+)/([^/]+)/" + re.escape(KERNEL), entry.linux or "")
    if m is None or not OS_NAME.fullmatch(m[1]) or not KERNEL_DIR.fullmatch(m[2]):
        return None
    return Kernel(m[1], m[2])


def _uki_of(os_name: str, efi: str) -> Kernel | None:
    """The kernel directory whose UKI `efi` is; None unless it is exactly that, in one
    of os_name's: a sealed entry names nothing else."""
    m = re.fullmatch(r"/cfsdeploy/([^/]+)/([^/]+)/" + re.escape(UKI), efi)
    if m is None or m[1] != os_name or not KERNEL_DIR.fullmatch(m[2]) or ".." in m[2]:
        return None
    return Kernel(m[1], m[2])


COMPLETE = "complete"


def install_kernel(boot: str, os_name: str, kver: str, kernel: BinaryIO, initramfs: BinaryIO) -> Kernel:
    """Copy a kernel and its initramfs into the boot directory, once per distinct pair."""
    return _install(boot, os_name, kver, [(KERNEL, kernel), (INITRAMFS, initramfs)])


def install_uki(boot: str, os_name: str, kver: str, uki: BinaryIO) -> Kernel:
    """Copy a sealed release's UKI into the boot directory, once per distinct UKI."""
    return _install(boot, os_name, kver, [(UKI, uki)])


def _install(boot: str, os_name: str, kver: str, files: list[tuple[str, BinaryIO]]) -> Kernel:
    """A kernel directory named for the sha256 of the files' bytes, written in place,
    durable, then marked complete (see the module's docstring, step 1)."""
    h = hashlib.sha256()
    need = 0
    for _, f in files:
        f.seek(0)
        while chunk := f.read(1 << 20):
            h.update(chunk)
            need += len(chunk)
    k = Kernel(os_name, f"{kver}-{h.hexdigest()[:12]}")
    dest = os.path.join(boot, k.relpath)
    if kernel_complete(boot, k):
        return k
    if os.path.lexists(dest):  # torn by a crash: no entry can name it yet
        remove_durably(boot, _tree(dest))
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    st = os.statvfs(parent)
    if st.f_bavail * st.f_frsize < need + (1 << 16):
        free = st.f_bavail * st.f_frsize
        raise BootHostError(f"boot directory {boot} is full: {' and '.join(n for n, _ in files)} need "
                            f"{need} bytes, {free} are free", hint="try `cfsdeploy cleanup`")
    try:
        os.mkdir(dest)
        for name, f in files:
            f.seek(0)
            with open(os.path.join(dest, name), "xb") as out:
                while chunk := f.read(1 << 20):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        syncfs(boot)
        _write_synced(os.path.join(dest, COMPLETE), b"")
        syncfs(boot)
    except OSError as e:
        with contextlib.suppress(OSError):
            remove_durably(boot, _tree(dest))
        if e.errno == errno.ENOSPC:
            raise BootHostError(f"boot directory {boot} is full: cannot install kernel {kver}",
                                hint="try `cfsdeploy cleanup`") from None
        raise
    return k


def kernel_complete(boot: str, k: Kernel) -> bool:
    """Whether the kernel directory was written whole; one from an older version
    (which renamed it into place whole) is checked against its name once and marked.
    (Older versions wrote no UKI: one without `complete` is torn.)"""
    dest = os.path.join(boot, k.relpath)
    if os.path.isfile(os.path.join(dest, COMPLETE)):
        return True
    h = hashlib.sha256()
    try:
        for name in (KERNEL, INITRAMFS):
            with open(os.path.join(dest, name), "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
    except OSError:
        return False
    if not k.dirname.endswith("-" + h.hexdigest()[:12]):
        return False
    _write_synced(os.path.join(dest, COMPLETE), b"")
    syncfs(boot)
    return True


def remove_unused_kernels(boot: str, os_name: str, keep: Iterable[Kernel]) -> list[str]:
    """Remove the os's kernel directories (and staging leftovers) not in `keep`."""
    keep_names = {k.dirname for k in keep if k.os == os_name}
    top = os.path.join(boot, "cfsdeploy", os_name)
    try:
        removed = sorted(n for n in os.listdir(top) if n not in keep_names)
    except FileNotFoundError:
        return []
    remove_durably(boot, [p for n in removed for p in _tree(os.path.join(top, n))])
    return removed
