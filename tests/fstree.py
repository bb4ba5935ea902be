"""Test support: build a directory tree holding everything a root filesystem can, and
compare two trees metadata and all.

Paths are bytes throughout because the tree holds names that are not UTF-8.
"""

from __future__ import annotations

import errno
import io
import os
import random
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

from cfsdeploy.util.run import run

UIDS = (0, 1, 1000, 65534, 65535, 65536, 4000000000)
# (major, minor): classic, a major above 255, and the largest dev_t Linux encodes.
CHAR_DEVICES = {b"null": (1, 3), b"tty0": (4, 0), b"major-511": (511, 70000)}
BLOCK_DEVICES = {b"sda": (8, 0), b"nvme": (259, 1), b"max": (4095, 1048575)}
ODD_NAMES = (
    b"\xff\xfe",
    b"n" * 255,
    b"with space",
    b"new\nline",
    b"a=b",
    b"back\\slash",
    b"comma,colon:",
    "\u00e9t\u00e9".encode(),
)
SPARSE_SIZE = 3 << 30
# Offsets of the sparse file's data extents: the start, the middle, the last byte.
SPARSE_EXTENTS = (0, 1 << 30, SPARSE_SIZE - 1)
MANY_ENTRIES = 5000
DEPTH = 50
# Base mtime (2023-11-14) in ns; each entry gets its own offset with odd nanoseconds.
MTIME_BASE_NS = 1_700_000_000_000_000_000


def _write(path: bytes, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def make_everything_tree(root: Path) -> None:
    """Fill the (existing or new) directory root with every file type and metadata.

    Needs root: it creates devices, chowns, and sets trusted.* xattrs.  The content
    is deterministic (seeded), mtimes included, so two calls build equal trees.
    """
    assert os.geteuid() == 0, "make_everything_tree needs root (mknod, chown, trusted.* xattrs)"
    rng = random.Random(0xC0FFEE)
    top = os.fsencode(root)
    os.makedirs(top, exist_ok=True)

    def p(*parts: bytes) -> bytes:
        return os.path.join(top, *parts)

    def mkdir(*parts: bytes) -> bytes:
        path = p(*parts)
        os.mkdir(path)
        return path

    mkdir(b"regular")
    for name, size in (
        (b"empty", 0),
        (b"one", 1),
        (b"sixty-four", 64),
        (b"sixty-five", 65),
        (b"page", 4096),
        (b"page-plus-one", 4097),
        (b"mebibyte", 1 << 20),
    ):
        _write(p(b"regular", name), rng.randbytes(size))

    # A 3 GiB file with three small extents; the rest are holes, so it costs ~12 KiB.
    with open(p(b"regular", b"sparse"), "wb") as f:
        for offset in SPARSE_EXTENTS:
            f.seek(offset)
            f.write(rng.randbytes(min(4096, SPARSE_SIZE - offset)))

    # One inode, three names in three directories.
    mkdir(b"hardlinks")
    mkdir(b"hardlinks", b"a")
    mkdir(b"hardlinks", b"b")
    _write(p(b"hardlinks", b"a", b"first"), rng.randbytes(100))
    os.link(p(b"hardlinks", b"a", b"first"), p(b"hardlinks", b"b", b"second"))
    os.link(p(b"hardlinks", b"a", b"first"), p(b"hardlinks", b"third"))

    mkdir(b"symlinks")
    os.symlink(b"../regular/one", p(b"symlinks", b"relative"))
    os.symlink(b"/etc/hostname", p(b"symlinks", b"absolute"))
    os.symlink(b"nowhere/at/all", p(b"symlinks", b"dangling"))
    os.symlink(b"l/" * 1999 + b"xy", p(b"symlinks", b"long"))  # 4000 bytes
    os.symlink(b"\xff\xfe", p(b"symlinks", b"to-non-utf8"))

    mkdir(b"special")
    for name, (major, minor) in CHAR_DEVICES.items():
        os.mknod(p(b"special", b"char-" + name), stat.S_IFCHR | 0o620, os.makedev(major, minor))
    for name, (major, minor) in BLOCK_DEVICES.items():
        os.mknod(p(b"special", b"block-" + name), stat.S_IFBLK | 0o660, os.makedev(major, minor))
    os.mkfifo(p(b"special", b"fifo"), 0o644)
    os.mknod(p(b"special", b"socket"), stat.S_IFSOCK | 0o755)

    mkdir(b"modes")
    for name, mode in (
        (b"none", 0o000),
        (b"setuid", 0o4755),
        (b"setgid", 0o2711),
        (b"all-bits", 0o7777),
        (b"write-only", 0o222),
    ):
        _write(p(b"modes", name), name)
        os.chmod(p(b"modes", name), mode)
    for name, mode in ((b"sticky", 0o1777), (b"setgid-dir", 0o2775), (b"closed", 0o000)):
        os.chmod(mkdir(b"modes", name), mode)

    mkdir(b"owners")
    for i, uid in enumerate(UIDS):
        path = p(b"owners", b"file-%d" % uid)
        _write(path, b"")
        os.chown(path, uid, UIDS[-1 - i])  # uid and gid differ, both cover all values
        os.chown(mkdir(b"owners", b"dir-%d" % uid), uid, uid)
    os.symlink(b"file-0", p(b"owners", b"symlink"))
    os.chown(p(b"owners", b"symlink"), 65536, 4000000000, follow_symlinks=False)
    path = p(b"owners", b"setuid-after-chown")
    _write(path, b"#!/bin/sh\n")
    os.chown(path, 1000, 1000)
    os.chmod(path, 0o6755)  # chown clears set[ug]id, so chmod comes second

    mkdir(b"xattrs")
    path = p(b"xattrs", b"file")
    _write(path, b"x")
    for name, value in (
        (b"user.plain", b"value"),
        (b"user.binary", bytes(range(256))),
        (b"user.empty", b""),
        (b"user.\xff-non-utf8", b"\x00\x01"),
        (b"trusted.overlay.not-ours", b"y"),
        (b"trusted.secret", b"\x00" * 10),
        (b"security.test", b"label\x00"),
    ):
        os.setxattr(path, name, value)
    path = p(b"xattrs", b"big")
    _write(path, b"")
    os.setxattr(path, b"user.big", rng.randbytes(3000))
    os.setxattr(mkdir(b"xattrs", b"dir"), b"user.dir", b"on a directory")
    os.symlink(b"file", p(b"xattrs", b"symlink"))
    os.setxattr(p(b"xattrs", b"symlink"), b"trusted.link", b"on a symlink", follow_symlinks=False)
    os.mkfifo(p(b"xattrs", b"fifo"))
    os.setxattr(p(b"xattrs", b"fifo"), b"trusted.fifo", b"on a fifo")
    # Many xattrs on one inode, sharing values, as SELinux-labelled trees do.
    path = p(b"xattrs", b"many")
    _write(path, b"")
    for i in range(40):
        os.setxattr(path, b"user.n%02d" % i, b"shared-value" if i % 2 else b"v%d" % i)

    mkdir(b"acl")
    _write(p(b"acl", b"file"), b"acl")
    run(["setfacl", "-m", "u:1000:rwx,g:100:r-x,u:65534:---,m::rwx", p(b"acl", b"file")])
    mkdir(b"acl", b"dir")
    run(["setfacl", "-m", "u:1000:r-x", "-d", "-m", "u:1000:rwx,g::r-x", p(b"acl", b"dir")])
    run(["setfacl", "-m", "u:1000:r-x", p(b"acl", b"dir")])

    mkdir(b"names")
    for name in ODD_NAMES:
        _write(p(b"names", name), name)
    mkdir(b"names", b"dir with space")

    mkdir(b"many")
    for i in range(MANY_ENTRIES):
        _write(p(b"many", b"entry-%05d" % i), b"")

    path = mkdir(b"deep")
    for i in range(DEPTH):
        path = os.path.join(path, b"d%02d" % i)
        os.mkdir(path)
    _write(os.path.join(path, b"bottom"), b"deep")

    _set_mtimes(top)


def _set_mtimes(top: bytes) -> None:
    """Give every entry its own mtime with nonzero nanoseconds, every fifth one before
    1970, children before parents so creating children cannot disturb a directory's
    mtime afterwards."""
    paths: list[bytes] = []
    for dirpath, dirnames, filenames in os.walk(top, topdown=False):
        paths.extend(os.path.join(dirpath, n) for n in filenames)
        # os.walk lists symlinks to directories under dirnames
        paths.extend(os.path.join(dirpath, n) for n in dirnames if os.path.islink(os.path.join(dirpath, n)))
        paths.append(dirpath)
    for i, path in enumerate(paths):
        ns = MTIME_BASE_NS + i * 1_000_003_001
        if i % 5 == 2:
            ns = -ns // 10**5  # 1969-12-31, around 19:00
        os.utime(path, ns=(ns, ns), follow_symlinks=False)


@dataclass(frozen=True, slots=True)
class Entry:
    st: os.stat_result
    xattrs: dict[bytes, bytes]
    target: bytes | None  # symlink target


def _listxattrs(path: bytes, ignore: tuple[bytes, ...]) -> dict[bytes, bytes]:
    names = [os.fsencode(n) for n in os.listxattr(path, follow_symlinks=False)]
    return {
        n: os.getxattr(path, n, follow_symlinks=False)
        for n in names
        if not n.startswith(ignore)
    }


def _scan(top: bytes, ignore: tuple[bytes, ...]) -> dict[bytes, Entry]:
    """All entries under top keyed by relative path (b"" for top itself)."""
    entries: dict[bytes, Entry] = {}

    def add(rel: bytes, path: bytes) -> None:
        st = os.lstat(path)
        target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
        entries[rel] = Entry(st, _listxattrs(path, ignore), target)
        if stat.S_ISDIR(st.st_mode):
            with os.scandir(path) as it:
                for d in it:
                    add(os.path.join(rel, d.name) if rel else d.name, d.path)

    add(b"", top)
    return entries


def _next_data(fd: int, pos: int, size: int) -> int:
    try:
        return os.lseek(fd, pos, os.SEEK_DATA)
    except OSError as e:
        if e.errno == errno.ENXIO:  # only a hole remains
            return size
        raise


def _same_content(a: bytes, b: bytes, size: int) -> bool:
    """Compare two equally sized files, skipping ranges that are holes in both."""
    chunk = 1 << 20
    # Reused buffers: a fresh 1 MiB bytes per read would page-fault its way through GiBs.
    buf_a, buf_b = bytearray(chunk), bytearray(chunk)
    fa = os.open(a, os.O_RDONLY)
    try:
        fb = os.open(b, os.O_RDONLY)
        try:
            pos = 0
            while pos < size:
                data_at = min(_next_data(fa, pos, size), _next_data(fb, pos, size))
                if data_at > pos:
                    pos = data_at
                    continue
                n = min(chunk, size - pos)
                if n < chunk:  # the tail: bytearray == is a memcmp, memoryview == is not
                    buf_a, buf_b = bytearray(n), bytearray(n)
                if os.preadv(fa, [buf_a], pos) != n or os.preadv(fb, [buf_b], pos) != n or buf_a != buf_b:
                    return False
                pos += n
            return True
        finally:
            os.close(fb)
    finally:
        os.close(fa)


def _show(rel: bytes) -> str:
    return "/" + rel.decode("utf-8", "backslashreplace").replace("\n", "\\n")


def compare_trees(
    expected: Path,
    actual: Path,
    *,
    content: bool = True,
    ignore_xattr_prefixes: tuple[bytes, ...] = (),
) -> list[str]:
    """Differences between two trees, one human-readable line each; [] if identical.

    Compared for every entry: type, full st_mode, uid, gid, nlink, mtime (ns) and
    xattrs (POSIX ACLs included, as system.posix_acl_* xattrs).  mtime counts for
    symlinks and directories too: lutimes sets them, images keep them, and
    make_everything_tree sets directory mtimes last.  Sizes count for regular
    files and symlinks only (directory sizes are filesystem-specific); rdev for
    devices; the target for symlinks; the bytes of regular files if content.
    Names of the top directories themselves are not compared.
    """
    ignore = tuple(ignore_xattr_prefixes)
    exp = _scan(os.fsencode(expected), ignore)
    act = _scan(os.fsencode(actual), ignore)
    diffs = [f"{_show(r)}: missing" for r in sorted(exp.keys() - act.keys())]
    diffs += [f"{_show(r)}: unexpected" for r in sorted(act.keys() - exp.keys())]
    for rel in sorted(exp.keys() & act.keys()):
        e, a = exp[rel], act[rel]
        where = _show(rel)
        et, at = stat.S_IFMT(e.st.st_mode), stat.S_IFMT(a.st.st_mode)
        if et != at:
            diffs.append(f"{where}: type {et:#o} != {at:#o}")
            continue

        def differ(what: str, x: object, y: object, where: str = where) -> None:
            if x != y:
                diffs.append(f"{where}: {what} {x} != {y}")

        differ("mode", oct(e.st.st_mode), oct(a.st.st_mode))
        differ("uid", e.st.st_uid, a.st.st_uid)
        differ("gid", e.st.st_gid, a.st.st_gid)
        differ("nlink", e.st.st_nlink, a.st.st_nlink)
        differ("mtime_ns", e.st.st_mtime_ns, a.st.st_mtime_ns)
        if stat.S_ISREG(et) or stat.S_ISLNK(et):
            differ("size", e.st.st_size, a.st.st_size)
        if stat.S_ISCHR(et) or stat.S_ISBLK(et):
            differ("rdev", _dev(e.st.st_rdev), _dev(a.st.st_rdev))
        differ("symlink target", e.target, a.target)
        for name in sorted(e.xattrs.keys() | a.xattrs.keys()):
            differ(f"xattr {name!r}", e.xattrs.get(name), a.xattrs.get(name))
        if (
            content
            and stat.S_ISREG(et)
            and e.st.st_size == a.st.st_size
            and not _same_content(
                os.path.join(os.fsencode(expected), rel), os.path.join(os.fsencode(actual), rel), e.st.st_size
            )
        ):
            diffs.append(f"{where}: content differs")
    return diffs


def _dev(rdev: int) -> str:
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def tar_with(name: str, *, kind: bytes = tarfile.REGTYPE, linkname: str = "",
             pax: dict[str, str] | None = None) -> bytes:
    """A PAX archive of one member, empty, with the PAX records given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = linkname
        info.pax_headers = pax or {}
        tar.addfile(info, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
    return buf.getvalue()
