"""Read a directory tree from disk into the tree model, with full metadata.

Regular files over 64 bytes become external objects named by their fs-verity
digest (copied into an object store when one is given); smaller ones are inlined.
Hardlinks are found by (st_dev, st_ino); the first name in sorted pre-order is the
primary one.  Paths are bytes throughout: names need not be UTF-8.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator

from . import fsverity
from .dumpfile import check_xattr, check_xattrs_budget
from .errors import TreeError
from .objects import ObjectStore
from .tree import (
    INLINE_MAX_RECOMMENDED,
    PATH_MAX,
    Hardlink,
    Inode,
    check_name,
    digest_to_path,
    fix_dir_nlinks,
)


@dataclass
class ScanStats:
    entries: int = 0
    files: int = 0
    bytes: int = 0
    objects_written: int = 0
    skipped: list[bytes] = field(default_factory=list)


def read_xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    out: dict[bytes, bytes] = {}
    for name in sorted(os.fsencode(n) for n in names):
        value = os.getxattr(path, name, follow_symlinks=False)
        check_xattr(name, value)
        out[name] = value
    check_xattrs_budget(out)
    return out


def _inode_from_stat(st: os.stat_result, xattrs: dict[bytes, bytes]) -> Inode:
    sec, nsec = divmod(st.st_mtime_ns, 1_000_000_000)
    return Inode(mode=st.st_mode, uid=st.st_uid, gid=st.st_gid, nlink=st.st_nlink,
                 rdev=st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0,
                 mtime_sec=sec, mtime_nsec=nsec, xattrs=xattrs)


def scan(top: str | bytes, *, store: ObjectStore | None = None,
         warn: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
         progress: Callable[[ScanStats], None] | None = None) -> tuple[Inode, ScanStats]:
    """Scan the directory `top` into a tree.  Sockets are skipped with a warning
    (they cannot be stored); anything unreadable raises TreeError naming the path."""
    top_b = os.fsencode(top)
    stats = ScanStats()
    try:
        st = os.lstat(top_b)
    except OSError as e:
        raise TreeError(f"cannot read tree {os.fsdecode(top_b)}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise TreeError(f"not a directory: {os.fsdecode(top_b)}")
    root = _inode_from_stat(st, read_xattrs(top_b))
    root.children = {}
    root.size = 0
    seen: dict[tuple[int, int], Inode] = {}
    # Depth-first in sorted pre-order, so the first name of a hardlinked file in
    # manifest order is its primary one.
    stack: list[tuple[bytes, Inode, Iterator[bytes]]] = [(top_b, root, iter(_listdir(top_b)))]
    while stack:
        dirpath, dirnode, names = stack[-1]
        name = next(names, None)
        if name is None:
            stack.pop()
            continue
        path = dirpath + b"/" + name
        try:
            check_name(name)
            entry = _scan_one(path, seen, store, stats)
        except OSError as e:
            raise TreeError(f"cannot read {os.fsdecode(path)}: {e.strerror}") from None
        except TreeError as e:
            raise TreeError(f"{os.fsdecode(path)}: {e}") from None
        if entry is None:
            warn(f"warning: skipping socket {os.fsdecode(path)}")
            stats.skipped.append(path)
            continue
        dirnode.children[name] = entry  # type: ignore[index]
        stats.entries += 1
        if progress is not None:
            progress(stats)
        if isinstance(entry, Inode) and entry.children is not None:
            stack.append((path, entry, iter(_listdir(path))))
    fix_dir_nlinks(root)
    return root, stats


def _listdir(path: bytes) -> list[bytes]:
    try:
        return sorted(os.listdir(path))
    except OSError as e:
        raise TreeError(f"cannot list {os.fsdecode(path)}: {e.strerror}") from None


def _scan_one(path: bytes, seen: dict[tuple[int, int], Inode], store: ObjectStore | None,
              stats: ScanStats) -> Inode | Hardlink | None:
    st = os.lstat(path)
    mode = st.st_mode
    if stat.S_ISSOCK(mode):
        return None
    if not stat.S_ISDIR(mode) and st.st_nlink > 1:
        primary = seen.get((st.st_dev, st.st_ino))
        if primary is not None:
            return Hardlink(primary)
    node = _inode_from_stat(st, read_xattrs(path))
    if stat.S_ISDIR(mode):
        node.children = {}
    elif stat.S_ISLNK(mode):
        target = os.readlink(path)
        if len(target) >= PATH_MAX:
            raise TreeError(f"symlink target longer than {PATH_MAX - 1} bytes")
        node.payload = target
        node.size = len(target)
    elif stat.S_ISREG(mode):
        _read_file(path, st, node, store, stats)
    if not stat.S_ISDIR(mode) and st.st_nlink > 1:
        seen[(st.st_dev, st.st_ino)] = node
    return node


def _read_file(path: bytes, st: os.stat_result, node: Inode, store: ObjectStore | None,
               stats: ScanStats) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        before = os.fstat(fd)
        size = before.st_size
        stats.files += 1
        stats.bytes += size
        if size <= INLINE_MAX_RECOMMENDED:
            data = os.pread(fd, size + 1, 0)
            if len(data) != size:
                raise TreeError("file changed while it was read")
            node.content = data or None
        else:
            node.digest = fsverity.digest_fd(fd)
            node.payload = digest_to_path(node.digest)
            if store is not None and store.add_fd(fd, node.digest):
                stats.objects_written += 1
        after = os.fstat(fd)
        if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (
                before.st_size, before.st_mtime_ns, before.st_ctime_ns):
            raise TreeError("file changed while it was read")
        node.size = size
    finally:
        os.close(fd)
