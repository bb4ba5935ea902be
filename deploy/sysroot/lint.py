"""What stops a root filesystem tree from deploying or booting, found before it is
committed or deployed (as `bootc container lint`): typed findings, no prose; the
CLI renders them.  Rules and severities: docs/architecture.md, "Lint"."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from ..boot import initramfs
from ..composefs import dumpfile
from ..composefs.scan import scan
from ..composefs.tree import Hardlink, Inode, lookup, resolve, walk
from ..repo.repository import Repository, read_content
from ..util.errors import CfsError, UsageError
from ..util.fsutil import open_beneath
from .commit import kernels_of, manifest_data, newest, searched, version_key


class LintError(CfsError):
    pass


class LintUsageError(LintError, UsageError):
    pass


class Severity(Enum):
    ERROR = "error"
    WARNING = "warning"


class Rule(Enum):
    NO_SYSROOT = "no_sysroot"                              # no /sysroot directory
    NO_KERNEL = "no_kernel"                                # no kernel with an initramfs
    INVALID_KERNEL_VERSION = "invalid_kernel_version"      # a kernel named by no plain version
    SEVERAL_KERNELS = "several_kernels"                    # the newest boots
    KERNEL_WITHOUT_INITRAMFS = "kernel_without_initramfs"  # that kernel is never booted
    INITRAMFS_UNREADABLE = "initramfs_unreadable"          # not cpio, damaged, too large
    INITRAMFS_NO_HOOK = "initramfs_no_hook"                # would not mount the deployment
    INITRAMFS_NO_MODULE = "initramfs_no_module"            # erofs, overlay or loop missing
    NO_CLI = "no_cli"                                      # the machine could not upgrade itself
    NO_GPGV = "no_gpgv"                                    # ... nor verify signed pulls
    FSTAB_ROOT_RW = "fstab_root_rw"                        # / is a read-only image
    FSTAB_NO_ESP = "fstab_no_esp"                          # the boot directory is not mounted
    MACHINE_ID = "machine_id"                              # every machine would share it
    VAR_CONTENT = "var_content"                            # seeded by the first deploy only
    SYMLINK_ESCAPES = "symlink_escapes"                    # climbs above the tree's root


SEVERITY = {
    Rule.NO_SYSROOT: Severity.ERROR, Rule.NO_KERNEL: Severity.ERROR, Rule.INVALID_KERNEL_VERSION: Severity.ERROR,
    Rule.SEVERAL_KERNELS: Severity.WARNING, Rule.KERNEL_WITHOUT_INITRAMFS: Severity.WARNING,
    Rule.INITRAMFS_UNREADABLE: Severity.ERROR, Rule.INITRAMFS_NO_HOOK: Severity.ERROR,
    Rule.INITRAMFS_NO_MODULE: Severity.ERROR, Rule.NO_CLI: Severity.WARNING, Rule.NO_GPGV: Severity.WARNING,
    Rule.FSTAB_ROOT_RW: Severity.WARNING, Rule.FSTAB_NO_ESP: Severity.WARNING, Rule.MACHINE_ID: Severity.WARNING,
    Rule.VAR_CONTENT: Severity.WARNING, Rule.SYMLINK_ESCAPES: Severity.WARNING,
}

Fact = str | int | list[str]


@dataclass(frozen=True)
class Finding:
    rule: Rule
    path: str | None
    facts: dict[str, Fact] = field(default_factory=dict)

    @property
    def severity(self) -> Severity:
        return SEVERITY[self.rule]

    def to_json(self) -> dict[str, object]:
        return {"rule": self.rule.value, "severity": self.severity.value, "path": self.path, "facts": self.facts}


# Bounds on what is read of a tree's files.
MAX_INITRAMFS = 512 << 20
MAX_TEXT = 4 << 20
# The modules the boot hook loads (hooks/), as the initramfs or the kernel has them.
MODULES = ("erofs", "overlay", "loop")
# What the hooks put into an initramfs: cfsdeploy-prepare-root, and what runs it.
PREPARE_ROOT = ("usr/lib/cfsdeploy/cfsdeploy-prepare-root", "lib/cfsdeploy/cfsdeploy-prepare-root")
RUNNERS = re.compile(r"scripts/local-bottom/cfsdeploy|(?:.*/)?hooks/pre-pivot/\d+-cfsdeploy-pre-pivot\.sh")
CLI_PATHS = (b"/usr/bin/cfsdeploy", b"/usr/sbin/cfsdeploy", b"/usr/local/bin/cfsdeploy")
GPGV_PATHS = (b"/usr/bin/gpgv",)
ESP_MOUNTS = ("/boot", "/efi", "/boot/efi")

# Reads a regular file of the tree: its path and node, at most `limit` bytes (else None).
Reader = Callable[[bytes, Inode, int], bytes | None]


def lint_dir(top: str) -> list[Finding]:
    """Lint a directory tree (nothing is stored)."""
    if not os.path.isdir(top):
        raise LintUsageError(f"{top}: not a directory")
    root, _ = scan(top, warn=lambda _m: None)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        def read(path: bytes, node: Inode, limit: int) -> bytes | None:
            if node.size > limit:
                return None
            try:
                with os.fdopen(open_beneath(fd, path.lstrip(b"/"), os.O_RDONLY | os.O_NOFOLLOW), "rb") as fh:
                    if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                        return None
                    data = fh.read(limit + 1)
            except OSError as e:
                raise LintError(f"{top}: cannot read {os.fsdecode(path)}: {e.strerror}") from None
            return data if len(data) <= limit else None
        return lint(root, read)
    finally:
        os.close(fd)


def lint_commit(repo: Repository, rev: str) -> list[Finding]:
    """Lint a commit of a repository, from its manifest and the objects it reads."""
    root = dumpfile.parse(manifest_data(repo, rev))

    def read(path: bytes, node: Inode, limit: int) -> bytes | None:
        return read_content(repo, node, os.fsdecode(path)) if node.size <= limit else None
    return lint(root, read)


def has_errors(findings: list[Finding]) -> bool:
    return any(f.severity == Severity.ERROR for f in findings)


def lint(root: Inode, read: Reader) -> list[Finding]:
    out: list[Finding] = []
    sysroot = lookup(root, b"/sysroot")
    if not (isinstance(sysroot, Inode) and sysroot.is_dir()):
        out.append(Finding(Rule.NO_SYSROOT, "/sysroot"))
    out += _kernels(root, read)
    for rule, paths in ((Rule.NO_CLI, CLI_PATHS), (Rule.NO_GPGV, GPGV_PATHS)):
        if all(lookup(root, p) is None for p in paths):
            out.append(Finding(rule, None, {"searched": [p.decode() for p in paths]}))
    out += _fstab(root, read)
    machine_id = _text(root, b"/etc/machine-id", read)
    if machine_id is not None and machine_id.strip() not in (b"", b"uninitialized"):
        out.append(Finding(Rule.MACHINE_ID, "/etc/machine-id"))
    out += _var(root, _tmpfiles(root, read))
    out += _symlinks(root)
    return out


def _kernels(root: Inode, read: Reader) -> list[Finding]:
    k = kernels_of(root)
    out = [Finding(Rule.INVALID_KERNEL_VERSION, path, {"kver": kver}) for path, kver in k.invalid]
    out += [Finding(Rule.KERNEL_WITHOUT_INITRAMFS, None, {"kver": kver}) for kver in sorted(k.lonely)]
    chosen = newest(k)
    if chosen is None:
        return [*out, Finding(Rule.NO_KERNEL, None, {"searched": searched()})]
    if len(k.found) > 1:
        out.append(Finding(Rule.SEVERAL_KERNELS, None, {"kvers": sorted(k.found, key=version_key), "chosen": chosen}))
    pair = k.found[chosen]
    where = os.fsdecode(pair.initramfs_path)
    data = read(pair.initramfs_path, pair.initramfs, MAX_INITRAMFS)
    if data is None:
        return [*out, Finding(Rule.INITRAMFS_UNREADABLE, where, {"kver": chosen,
                                                                  "reason": initramfs.Damage.TOO_LARGE.value})]
    try:
        names = initramfs.names(data)
    except initramfs.InitramfsDamaged as e:
        return [*out, Finding(Rule.INITRAMFS_UNREADABLE, where, {"kver": chosen, "reason": e.damage.value})]
    if not (any(p in names for p in PREPARE_ROOT) and any(RUNNERS.fullmatch(n) for n in names)):
        out.append(Finding(Rule.INITRAMFS_NO_HOOK, where, {"kver": chosen}))
    builtin = _text(root, b"/usr/lib/modules/" + chosen.encode() + b"/modules.builtin", read) or b""
    for module in MODULES:
        ko = re.compile(rf"(?:usr/)?lib/modules/[^/]+/.*/{module}\.ko(?:\.gz|\.xz|\.zst)?")
        if not any(ko.fullmatch(n) for n in names) and not re.search(
                rb"(?m)(?:^|/)" + module.encode() + rb"\.ko$", builtin):
            out.append(Finding(Rule.INITRAMFS_NO_MODULE, where, {"kver": chosen, "module": module}))
    return out


def _text(root: Inode, path: bytes, read: Reader) -> bytes | None:
    """A small regular file's content; None if it is not one."""
    e = lookup(root, path)
    node = resolve(e) if e is not None else None
    return read(path, node, MAX_TEXT) if node is not None and node.is_reg() else None


def _fstab(root: Inode, read: Reader) -> list[Finding]:
    text = _text(root, b"/etc/fstab", read)
    out = []
    mounts = set()
    for n, line in enumerate((text or b"").decode(errors="replace").splitlines(), 1):
        fields = line.split()
        if len(fields) < 2 or fields[0].startswith("#"):
            continue
        mounts.add(fields[1].rstrip("/") or "/")
        options = fields[3].split(",") if len(fields) > 3 else []
        if fields[1] == "/" and "ro" not in options:
            out.append(Finding(Rule.FSTAB_ROOT_RW, "/etc/fstab", {"line": n}))
    if not mounts & set(ESP_MOUNTS):
        out.append(Finding(Rule.FSTAB_NO_ESP, "/etc/fstab", {"searched": list(ESP_MOUNTS)}))
    return out


# tmpfiles.d(5) directories, in the tree, that systemd-tmpfiles reads at every boot
TMPFILES_DIRS = (b"/usr/lib/tmpfiles.d", b"/etc/tmpfiles.d")


@dataclass(frozen=True)
class Tmpfiles:
    """What the tree's tmpfiles.d makes at boot: these paths, and whole trees below
    the `C` (copy) ones."""
    paths: frozenset[bytes]
    trees: tuple[bytes, ...]

    def covers(self, path: bytes) -> bool:
        return path in self.paths or any(path.startswith(t + b"/") for t in self.trees)


def _tmpfiles(root: Inode, read: Reader) -> Tmpfiles:
    paths: set[bytes] = set()
    trees: list[bytes] = []
    for d in TMPFILES_DIRS:
        conf_dir = lookup(root, d)
        if not (isinstance(conf_dir, Inode) and conf_dir.is_dir()):
            continue
        for name in sorted(conf_dir.children or {}):
            if not name.endswith(b".conf"):
                continue
            for line in (_text(root, d + b"/" + name, read) or b"").splitlines():
                fields = line.split()
                # specifiers (%) and globs name no one path; `w` and the adjusting
                # types (z, x, r, ...) change what exists and make nothing
                if len(fields) < 2 or fields[0].startswith(b"#") or re.search(rb"[%*?\[]", fields[1]):
                    continue
                kind = fields[0].rstrip(b"+!-=~^")
                if kind in (b"f", b"F", b"d", b"D", b"v", b"q", b"Q", b"p", b"L", b"c", b"b"):
                    paths.add(fields[1].rstrip(b"/"))
                elif kind == b"C":
                    trees.append(fields[1].rstrip(b"/"))
    return Tmpfiles(frozenset(paths), tuple(trees))


def _var(root: Inode, made_at_boot: Tmpfiles) -> list[Finding]:
    """Non-directories under /var that tmpfiles.d does not make at every boot,
    counted per /var/<a>/<b>."""
    var = lookup(root, b"/var")
    if not isinstance(var, Inode) or not var.is_dir():
        return []
    counts: dict[str, int] = {}
    for path, e in walk(var):
        if (isinstance(e, Hardlink) or not e.is_dir()) and not made_at_boot.covers(b"/var" + path):
            top = os.fsdecode(b"/var" + b"/".join(path.split(b"/")[:3]))
            counts[top] = counts.get(top, 0) + 1
    return [Finding(Rule.VAR_CONTENT, p, {"entries": n}) for p, n in sorted(counts.items())]


def _symlinks(root: Inode) -> list[Finding]:
    """Symlinks whose target climbs above the root with `..`: in the deployment `/..`
    is `/`, but anywhere else (a checkout, the build host) they lead out of the tree."""
    out = []
    for path, e in walk(root):
        node = resolve(e)
        if not node.is_symlink() or node.payload is None:
            continue
        target = node.payload
        depth = 0 if target.startswith(b"/") else path.count(b"/") - 1
        for part in target.split(b"/"):
            if part == b"..":
                depth -= 1
                if depth < 0:
                    out.append(Finding(Rule.SYMLINK_ESCAPES, os.fsdecode(path), {"target": os.fsdecode(target)}))
                    break
            elif part not in (b"", b"."):
                depth += 1
    return out
