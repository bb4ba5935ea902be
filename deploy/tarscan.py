"""Read a root filesystem from a tar archive into the tree model, streaming.

Image builders hand over tarballs; they are read in one pass without unpacking to
disk: each file's content is hashed while it is copied into the object store's
staging area.  Paths that are absolute or climb out with "..", and hardlinks to
names outside the archive, are refused.  xattrs come from PAX SCHILY.xattr records.
"""

from __future__ import annotations

import os
import stat
import tarfile
from typing import IO, Callable

from . import fsverity
from .errors import TreeError
from .objects import ObjectStore
from .scan import ScanStats
from .tree import (
    INLINE_MAX_RECOMMENDED,
    Hardlink,
    Inode,
    canonical_hardlinks,
    check_name,
    digest_to_path,
    fix_dir_nlinks,
)

_TYPES = {tarfile.REGTYPE: stat.S_IFREG, tarfile.AREGTYPE: stat.S_IFREG,
          tarfile.CONTTYPE: stat.S_IFREG, tarfile.DIRTYPE: stat.S_IFDIR,
          tarfile.SYMTYPE: stat.S_IFLNK, tarfile.CHRTYPE: stat.S_IFCHR,
          tarfile.BLKTYPE: stat.S_IFBLK, tarfile.FIFOTYPE: stat.S_IFIFO}
_XATTR = "SCHILY.xattr."


def _parts(name: str) -> list[bytes]:
    raw = os.fsencode(name)
    if raw.startswith(b"/"):
        raise TreeError(f"absolute path in archive: {name}")
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise TreeError(f"path climbs out of the root: {name}")
    for p in parts:
        check_name(p)
    return parts


def _mtime(member: tarfile.TarInfo) -> tuple[int, int]:
    text = member.pax_headers.get("mtime")
    if text:
        sec, _, frac = text.partition(".")
        return int(sec), int((frac + "000000000")[:9]) if frac else 0
    return int(member.mtime), 0


def _store(src: IO[bytes], size: int, store: ObjectStore | None) -> bytes:
    """The digest of a member's content, copied into the store as it is hashed."""
    if store is not None:
        try:
            return store.add_stream(src.read, size)
        except EOFError:
            raise TreeError("archive ends inside a file") from None
    hasher = fsverity.Hasher()
    while chunk := src.read(1 << 20):
        hasher.update(chunk)
    return hasher.digest()


def scan_tar(path: str, *, store: ObjectStore | None = None,
             warn: Callable[[str], None] = lambda m: None,
             progress: Callable[[ScanStats], None] | None = None) -> tuple[Inode, ScanStats]:
    stats = ScanStats()
    root = Inode(mode=stat.S_IFDIR | 0o755, nlink=2, children={})
    names: dict[tuple[bytes, ...], Inode] = {(): root}
    try:
        tar = tarfile.open(path, mode="r|*")
    except (OSError, tarfile.TarError) as e:
        raise TreeError(f"cannot read archive {path}: {e}") from None
    with tar:
        try:
            for member in tar:
                _add(tar, member, root, names, store, stats, warn)
                if progress is not None:
                    progress(stats)
        except tarfile.TarError as e:
            raise TreeError(f"corrupt archive {path}: {e}") from None
    canonical_hardlinks(root)
    fix_dir_nlinks(root)
    return root, stats


def _add(tar: tarfile.TarFile, member: tarfile.TarInfo, root: Inode,
         names: dict[tuple[bytes, ...], Inode], store: ObjectStore | None, stats: ScanStats, warn: Callable[[str], None]) -> None:
    parts = tuple(_parts(member.name))
    if member.type == tarfile.LNKTYPE:
        target = names.get(tuple(_parts(member.linkname)))
        if target is None or target.children is not None:
            raise TreeError(f"hardlink {member.name} to {member.linkname}: no such file earlier in the archive")
        parent = _parent(names, parts, member.name)
        parent.children[parts[-1]] = Hardlink(target)  # type: ignore[index]
        target.nlink += 1
        return
    ftype = _TYPES.get(member.type)
    if ftype is None:
        warn(f"warning: skipping {member.name}: unsupported tar entry type {member.type!r}")
        return
    sec, nsec = _mtime(member)
    xattrs = {os.fsencode(k[len(_XATTR):]): v.encode("utf-8", "surrogateescape")
              for k, v in sorted(member.pax_headers.items()) if k.startswith(_XATTR)}
    node = Inode(mode=ftype | (member.mode & 0o7777), uid=member.uid, gid=member.gid,
                 mtime_sec=sec, mtime_nsec=nsec, xattrs=xattrs)
    if ftype == stat.S_IFDIR:
        node.children = {}
        node.nlink = 2
    elif ftype == stat.S_IFLNK:
        node.payload = os.fsencode(member.linkname)
        node.size = len(node.payload)
    elif ftype in (stat.S_IFCHR, stat.S_IFBLK):
        node.rdev = os.makedev(member.devmajor, member.devminor)
    elif ftype == stat.S_IFREG:
        src = tar.extractfile(member)
        assert src is not None
        node.size = member.size
        stats.files += 1
        stats.bytes += member.size
        if member.size <= INLINE_MAX_RECOMMENDED:
            node.content = src.read() or None
        else:
            node.digest = _store(src, member.size, store)
            node.payload = digest_to_path(node.digest)
    if not parts:
        # The archive's "./" entry: the root's own metadata.
        node.children = root.children
        root.mode, root.uid, root.gid = node.mode, node.uid, node.gid
        root.mtime_sec, root.mtime_nsec, root.xattrs = node.mtime_sec, node.mtime_nsec, node.xattrs
        return
    parent = _parent(names, parts, member.name)
    existing = parent.children.get(parts[-1])  # type: ignore[union-attr]
    if existing is not None:
        if isinstance(existing, Inode) and existing.children is not None and node.children is not None:
            node.children = existing.children  # a directory listed after its contents
        else:
            raise TreeError(f"duplicate entry in archive: {member.name}")
    parent.children[parts[-1]] = node  # type: ignore[index]
    names[parts] = node
    stats.entries += 1


def _parent(names: dict[tuple[bytes, ...], Inode], parts: tuple[bytes, ...], name: str) -> Inode:
    parent = names.get(parts[:-1])
    if parent is None or parent.children is None:
        raise TreeError(f"{name}: parent directory missing in archive")
    return parent
