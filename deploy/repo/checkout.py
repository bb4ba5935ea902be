"""Materialize a commit's tree in a directory, with full metadata.

Entries are created in manifest order, each owner set before its mode (chown
clears setuid bits and file capabilities) and its xattrs after; directories get
their mode, xattrs and mtime last, deepest first, so a read-only directory can
still be filled.  The tree is built beside the destination and renamed into place.

A subtree (deploy checks out /etc and /var alone) may hold hardlinks to a file whose
primary name lies outside it, as trees deduplicated by hardlink tools do: the first
such name inside the subtree becomes the file, and the others link to it.
"""

from __future__ import annotations

import os
import stat
import tempfile

from ..composefs.objects import ObjectStore
from ..composefs.tree import Hardlink, Inode, walk
from ..util.errors import CfsError, IntegrityError, UsageError
from ..util.fsutil import copy_fd, remove_tree


class CheckoutError(CfsError):
    pass


class CheckoutUsageError(CheckoutError, UsageError):
    pass


class CheckoutIntegrityError(CheckoutError, IntegrityError):
    pass


def _finish(path: bytes, node: Inode) -> None:
    os.lchown(path, node.uid, node.gid)
    if not node.is_symlink():
        os.chmod(path, stat.S_IMODE(node.mode))
    for key, value in node.xattrs.items():
        os.setxattr(path, key, value, follow_symlinks=False)
    os.utime(path, ns=(node.mtime_sec * 10**9 + node.mtime_nsec,) * 2, follow_symlinks=False)


def _create(path: bytes, node: Inode, store: ObjectStore) -> None:
    ftype = node.mode & 0o170000
    if node.is_reg():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if node.content is not None:
                os.write(fd, node.content)
            elif node.size:
                if node.digest is None:
                    raise CheckoutIntegrityError(f"{os.fsdecode(path)}: the manifest names no object")
                try:
                    src = os.open(store.path_of(node.digest), os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    raise CheckoutIntegrityError(f"object {node.digest.hex()} is missing",
                                                 hint="run fsck, or pull") from None
                try:
                    copy_fd(src, fd)
                finally:
                    os.close(src)
        finally:
            os.close(fd)
    elif node.is_symlink():
        os.symlink(node.payload or b"", path)
    elif ftype in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
        os.mknod(path, ftype | 0o600, node.rdev)
    else:
        raise CheckoutIntegrityError(f"{os.fsdecode(path)}: unsupported file type {ftype:o}")


def checkout(root: Inode, store: ObjectStore, dest: str | os.PathLike[str]) -> None:
    dest_s = os.path.abspath(os.fspath(dest))
    if os.path.lexists(dest_s):
        raise CheckoutUsageError(f"refusing to check out over existing {dest_s}")
    parent = os.path.dirname(dest_s)
    staging = os.fsencode(tempfile.mkdtemp(prefix=f".{os.path.basename(dest_s)}.", dir=parent))
    try:
        dirs: list[tuple[bytes, Inode]] = []
        links: list[tuple[bytes, Inode]] = []
        primary: dict[int, bytes] = {}
        for rel, entry in walk(root):
            path = staging if rel == b"/" else staging + rel
            if isinstance(entry, Hardlink):
                links.append((path, entry.target))
                continue
            primary[id(entry)] = path
            if entry.children is not None:
                if rel != b"/":
                    os.mkdir(path, 0o700)
                dirs.append((path, entry))
            else:
                _create(path, entry, store)
                _finish(path, entry)
        for path, target in links:
            first = primary.get(id(target))
            if first is None:
                _create(path, target, store)
                _finish(path, target)
                primary[id(target)] = path
            else:
                os.link(first, path)
        for path, node in reversed(dirs):
            _finish(path, node)
        os.rename(staging, dest_s)
    except BaseException:
        remove_tree(staging, ignore_errors=True)
        raise

