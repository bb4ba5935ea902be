"""Read a root filesystem from a tar archive into the tree model, streaming.

Image builders hand over tarballs; they are read in one pass without unpacking to
disk: each file's content is hashed while it is copied into the object store's
staging area.  Paths that are absolute or climb out with "..", and hardlinks to
names outside the archive, are refused.  xattrs come from PAX SCHILY.xattr records.
PAX numbers are read strictly (tarfile turns a bad one into 0 silently), and every
entry passes the same check as a scanned directory's or a manifest's.
"""

from __future__ import annotations

import os
import re
import stat
import tarfile
from collections.abc import Callable, Iterator
from typing import IO

from ..util.errors import TreeError
from . import fsverity
from .objects import ObjectStore
from .scan import ScanStats
from .tree import (
    INLINE_MAX_RECOMMENDED,
    U32_MAX,
    Hardlink,
    Inode,
    canonical_hardlinks,
    check_inode,
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


# A PAX time: decimal seconds since the epoch, maybe negative, maybe with a fraction
# (POSIX allows 21 digits before the point); unsigned numbers are plain digits.
_PAX_TIME = re.compile(r"(-?)([0-9]{1,21})(?:\.([0-9]+))?")
_PAX_UINT = re.compile(r"[0-9]{1,20}")


def _pax_time(text: str) -> tuple[int, int]:
    """(seconds, nanoseconds) of a PAX time, as GNU tar reads it: "-5.5" is 5.5 s
    before the epoch, (-6, 500000000); digits past nanoseconds round down."""
    m = _PAX_TIME.fullmatch(text)
    if m is None:
        raise TreeError(f"invalid PAX mtime {text[:40]!r}")
    sign, whole, frac = m.group(1), m.group(2), m.group(3) or ""
    ns = int(whole) * 10**9 + int((frac + "000000000")[:9])
    if sign:
        ns = -ns - (1 if frac[9:].strip("0") else 0)
    sec, nsec = divmod(ns, 10**9)
    return sec, nsec


def _pax_uint(member: tarfile.TarInfo, key: str, default: int) -> int:
    text = member.pax_headers.get(key)
    if text is None:
        return default
    if _PAX_UINT.fullmatch(text) is None:
        raise TreeError(f"invalid PAX {key} {text[:40]!r}")
    return int(text)


def _metadata(member: tarfile.TarInfo, ftype: int) -> Inode:
    """The inode of a member before its content: mode, owner, time, xattrs, device."""
    text = member.pax_headers.get("mtime")
    # Without a PAX record tarfile gives the header's integer.
    sec, nsec = _pax_time(text) if text is not None else (int(member.mtime), 0)
    # tarfile used the PAX size already, and a bad one as 0: refuse it instead.
    _pax_uint(member, "size", 0)
    xattrs = {os.fsencode(k[len(_XATTR):]): v.encode("utf-8", "surrogateescape")
              for k, v in sorted(member.pax_headers.items()) if k.startswith(_XATTR)}
    node = Inode(mode=ftype | (member.mode & 0o7777), uid=_pax_uint(member, "uid", member.uid),
                 gid=_pax_uint(member, "gid", member.gid), mtime_sec=sec, mtime_nsec=nsec,
                 xattrs=xattrs)
    if ftype in (stat.S_IFCHR, stat.S_IFBLK):
        if not (0 <= member.devmajor <= U32_MAX and 0 <= member.devminor <= U32_MAX):
            raise TreeError(f"invalid device number {member.devmajor},{member.devminor}")
        node.rdev = os.makedev(member.devmajor, member.devminor)
    return node


def _inode(tar: tarfile.TarFile, member: tarfile.TarInfo, ftype: int, store: ObjectStore | None,
           stats: ScanStats) -> Inode:
    """The checked inode of a member, its content hashed (and stored)."""
    node = _metadata(member, ftype)
    if ftype == stat.S_IFDIR:
        node.children = {}
        node.nlink = 2
    elif ftype == stat.S_IFLNK:
        node.payload = os.fsencode(member.linkname)
        node.size = len(node.payload)
    elif ftype == stat.S_IFREG:
        src = tar.extractfile(member)
        assert src is not None
        node.size = member.size
        stats.files += 1
        stats.file_bytes += member.size
        if member.size <= INLINE_MAX_RECOMMENDED:
            node.content = src.read() or None
        else:
            node.digest = _store(src, member.size, store)
            node.payload = digest_to_path(node.digest)
    check_inode(node)
    return node


def _members(tar: tarfile.TarFile, path: str) -> Iterator[tarfile.TarInfo]:
    while True:
        try:
            member = tar.next()
        except (tarfile.TarError, ValueError) as e:
            # tarfile lets the int() of some PAX records (GNU.sparse.*) fail through.
            raise TreeError(f"corrupt archive {path}: {e}") from None
        if member is None:
            return
        yield member


def _store(src: IO[bytes], size: int, store: ObjectStore | None) -> fsverity.Digest:
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
        tar = tarfile.open(path, mode="r|*")  # reads the first member: see _members
    except (OSError, tarfile.TarError, ValueError) as e:
        raise TreeError(f"cannot read archive {path}: {e}") from None
    with tar:
        try:
            for member in _members(tar, path):
                _add(tar, member, root, names, store, stats, warn)
                if progress is not None:
                    progress(stats)
        except tarfile.TarError as e:
            raise TreeError(f"corrupt archive {path}: {e}") from None
    canonical_hardlinks(root)
    fix_dir_nlinks(root)
    return root, stats


def _add(tar: tarfile.TarFile, member: tarfile.TarInfo, root: Inode,
         names: dict[tuple[bytes, ...], Inode], store: ObjectStore | None, stats: ScanStats,
         warn: Callable[[str], None]) -> None:
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
    try:
        node = _inode(tar, member, ftype, store, stats)
    except TreeError as e:
        raise TreeError(f"{member.name}: {e}") from None
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
