"""Read composefs EROFS images back into the tree model, from the on-disk format.

Images may be corrupt or hostile, so every offset is checked against the image
before it is read, the walk uses an explicit stack with a depth cap, a directory
reached twice is reported as a loop, and the bytes the reader copies out of the
image (directory data, inline content, symlink targets, xattrs) are budgeted to
the image size: in a well-formed image these areas never overlap, so a budget
overrun means inodes share data and the work would otherwise grow without bound.
Every problem is an ImageError naming the inode (nid) it was found in.

The composefs conventions are undone on the way: metacopy and redirect xattrs
become digest and payload, escaped overlay xattrs are unescaped, escaped whiteouts
become whiteouts again and the writer's own whiteout stubs are skipped.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from ..util.errors import CorruptImageError, ImageError
from . import erofs as E
from .fsverity import Digest
from .tree import (
    DIGEST_SIZE,
    INLINE_MAX,
    NAME_MAX,
    PATH_MAX,
    S_IFBLK,
    S_IFCHR,
    S_IFDIR,
    S_IFLNK,
    S_IFMT,
    S_IFREG,
    VALID_TYPES,
    Hardlink,
    Inode,
    no_gc,
)

# Every level of a path costs at least two bytes ("/x").
MAX_DEPTH = PATH_MAX // 2
SYMLINK_MAX = PATH_MAX - 1

_FLAT = (E.INODE_FLAT_PLAIN, E.INODE_FLAT_INLINE)

_OVERLAY = b"trusted.overlay."
_ESCAPED = b"trusted.overlay.overlay."
_METACOPY = b"trusted.overlay.metacopy"
_REDIRECT = b"trusted.overlay.redirect"
_ESCAPED_WHITEOUT = b"trusted.overlay.overlay.whiteout"
# Markers the writer adds around whiteouts; they are not part of the tree.
_WHITEOUT_MARKERS = frozenset({b"trusted.overlay.overlay.whiteouts", b"user.overlay.whiteout",
                               b"user.overlay.whiteouts"})
_WHITEOUT_OPAQUE = (b"trusted.overlay.opaque", b"user.overlay.opaque")
# metacopy value: version 0, length 36, flags 0, hash algorithm 1 (SHA-256), digest.
_METACOPY_HEADER = bytes((0, 4 + DIGEST_SIZE, 0, 1))


@dataclass
class Image:
    root: Inode
    composefs_version: int | None  # None: no composefs header (plain EROFS)
    has_acl_flag: bool
    build_time: tuple[int, int]
    inodes: int
    blocks: int


@dataclass(slots=True)
class _Raw:
    """One on-disk inode, decoded but not interpreted."""

    nid: int
    mode: int
    nlink: int
    size: int
    uid: int
    gid: int
    mtime: tuple[int, int]
    i_u: int
    layout: int
    xattr_start: int
    xattr_size: int
    body: int  # just past the inode and its xattrs: where an inline tail or chunk map starts

    @property
    def type(self) -> int:
        return self.mode & S_IFMT


class _Reader:
    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.data = memoryview(data).cast("B")
        n = len(self.data)
        if n < E.SUPER_OFFSET + E.SUPERBLOCK.size:
            raise CorruptImageError(f"image too small for an EROFS superblock ({n} bytes)")
        magic, version, flags, cfs_version = E.COMPOSEFS_HEADER.unpack_from(self.data, 0)
        self.composefs_version: int | None = None
        self.has_acl = False
        if magic == E.COMPOSEFS_MAGIC:
            if version != E.COMPOSEFS_HEADER_VERSION:
                raise CorruptImageError(f"unsupported composefs header version {version}")
            if cfs_version > E.COMPOSEFS_VERSION_MAX:
                raise CorruptImageError(f"unsupported composefs version {cfs_version}")
            self.composefs_version = cfs_version
            self.has_acl = bool(flags & E.COMPOSEFS_FLAGS_HAS_ACL)
        (sb_magic, _, compat, blkszbits, extslots, self.root_nid, self.inos, build_time,
         build_nsec, self.blocks, meta_blkaddr, xattr_blkaddr, _, _,
         incompat) = E.SUPERBLOCK.unpack_from(self.data, E.SUPER_OFFSET)
        if sb_magic != E.SUPER_MAGIC_V1:
            raise CorruptImageError("not an EROFS image (bad superblock magic)")
        if blkszbits != E.BLKSIZ_BITS:
            raise CorruptImageError(f"unsupported block size 2^{blkszbits}: only 4096-byte blocks are supported")
        if incompat & ~E.FEATURE_INCOMPAT_ALL:
            raise CorruptImageError(f"unsupported EROFS incompat features {incompat & ~E.FEATURE_INCOMPAT_ALL:#x}")
        if incompat & E.FEATURE_INCOMPAT_XATTR_PREFIXES or self.data[E.SUPER_OFFSET + E.SB_XATTR_PREFIX_COUNT]:
            raise CorruptImageError("long xattr name prefixes are not supported")
        if self.blocks * E.BLKSIZ > n:
            raise CorruptImageError(f"image truncated: the superblock counts {self.blocks} blocks "
                                    f"({self.blocks * E.BLKSIZ} bytes) but the image has {n} bytes")
        self.build_time = (build_time, build_nsec)
        self.meta = meta_blkaddr * E.BLKSIZ
        self.xattr_base = xattr_blkaddr * E.BLKSIZ
        # composefs puts meta_blkaddr at 0, so small nids would land on the superblock.
        self.inodes_start = E.SUPER_OFFSET + E.SUPERBLOCK.size + extslots * E.SB_EXTSLOT_SIZE
        self.filter = bool(compat & E.FEATURE_COMPAT_XATTR_FILTER)
        self.budget = n
        self._shared: dict[int, tuple[int, bytes, bytes, bytes]] = {}
        self._filter_bits: dict[tuple[int, bytes], int] = {}

    def need(self, start: int, length: int, what: str) -> None:
        if start + length > len(self.data):
            raise CorruptImageError(f"{what} runs past the end of the image")

    def spend(self, length: int, what: str) -> None:
        self.budget -= length
        if self.budget < 0:
            raise CorruptImageError(f"{what}: inodes claim more data than the image holds")

    def read(self, start: int, length: int) -> bytes:
        return self.data[start:start + length].tobytes()

    def inode(self, nid: int) -> _Raw:
        where = f"inode nid {nid}"
        off = self.meta + nid * E.SLOTSIZE
        if off < self.inodes_start:
            raise CorruptImageError(f"{where} overlaps the superblock")
        self.need(off, E.INODE_COMPACT.size, where)
        (fmt,) = struct.unpack_from("<H", self.data, off)
        if fmt & ~E.I_ALL:
            raise CorruptImageError(f"{where}: unsupported i_format {fmt:#x}")
        layout = fmt >> E.I_DATALAYOUT_BIT
        if layout in (E.INODE_COMPRESSED_FULL, E.INODE_COMPRESSED_COMPACT):
            raise CorruptImageError(f"{where}: compressed files are not supported")
        if layout not in (*_FLAT, E.INODE_CHUNK_BASED):
            raise CorruptImageError(f"{where}: unknown data layout {layout}")
        if fmt >> E.I_VERSION_BIT & 1:
            self.need(off, E.INODE_EXTENDED.size, where)
            (_, icount, mode, _, size, i_u, _, uid, gid, msec, mnsec,
             nlink) = E.INODE_EXTENDED.unpack_from(self.data, off)
            isize, mtime = E.INODE_EXTENDED.size, (msec, mnsec)
        else:
            (_, icount, mode, nlink, size, _, i_u, _, uid, gid,
             _) = E.INODE_COMPACT.unpack_from(self.data, off)
            isize, mtime = E.INODE_COMPACT.size, self.build_time
        if mode & S_IFMT not in VALID_TYPES:
            raise CorruptImageError(f"{where}: invalid file type in mode {mode:#o}")
        xsize = E.XATTR_IBODY_HEADER.size + (icount - 1) * 4 if icount else 0
        self.need(off + isize, xsize, f"{where}: xattr area ({icount} slots)")
        return _Raw(nid, mode, nlink, size, uid, gid, mtime, i_u, layout,
                    off + isize, xsize, off + isize + xsize)

    def _extent(self, raw: _Raw) -> tuple[int, int, int]:
        """(start of the data blocks, their byte count, inline tail length) of a flat inode,
        all checked to lie within the image."""
        where = f"inode nid {raw.nid}"
        nblocks = -(-raw.size // E.BLKSIZ)
        if raw.layout == E.INODE_FLAT_PLAIN:
            head, tail = raw.size, 0
        else:
            # The last block, however full, is inline after the inode and xattrs.
            head = max(nblocks - 1, 0) * E.BLKSIZ
            tail = raw.size - head
            if raw.body % E.BLKSIZ + tail > E.BLKSIZ:
                raise CorruptImageError(f"{where}: inline data of {tail} bytes crosses a block boundary")
            self.need(raw.body, tail, f"{where}: inline data")
        start = (raw.i_u * E.BLKSIZ) if head else 0
        self.need(start, head, f"{where}: data blocks")
        return start, head, tail

    def check_extent(self, raw: _Raw) -> None:
        self._extent(raw)

    def flat_data(self, raw: _Raw) -> bytes:
        """The whole content of a flat inode (directory, symlink, small file)."""
        start, head, tail = self._extent(raw)
        self.spend(raw.size, f"inode nid {raw.nid}")
        if not tail:
            return self.read(start, head)
        if not head:
            return self.read(raw.body, tail)
        return self.read(start, head) + self.read(raw.body, tail)

    def check_chunks(self, raw: _Raw) -> None:
        """A chunk-based file's chunk map must fit in the image (it bounds the file size)."""
        where = f"inode nid {raw.nid}"
        fmt = raw.i_u & 0xFFFF
        if fmt & ~(E.CHUNK_FORMAT_BLKBITS_MASK | E.CHUNK_FORMAT_INDEXES):
            raise CorruptImageError(f"{where}: unsupported chunk format {fmt:#x}")
        bits = E.BLKSIZ_BITS + (fmt & E.CHUNK_FORMAT_BLKBITS_MASK)
        unit = 8 if fmt & E.CHUNK_FORMAT_INDEXES else 4
        count = -(-raw.size >> bits)
        self.need(E.round_up(raw.body, unit), count * unit, f"{where}: chunk map of {count} chunks")

    def xattrs(self, raw: _Raw) -> dict[bytes, bytes]:
        """The inode's xattrs (shared ones first, then inline), as stored."""
        if not raw.xattr_size:
            return {}
        where = f"inode nid {raw.nid}"
        self.spend(raw.xattr_size, f"{where}: xattr area")
        end = raw.xattr_start + raw.xattr_size
        name_filter, shared_count = E.XATTR_IBODY_HEADER.unpack_from(self.data, raw.xattr_start)
        pos = raw.xattr_start + E.XATTR_IBODY_HEADER.size
        if pos + 4 * shared_count > end:
            raise CorruptImageError(f"{where}: {shared_count} shared xattrs do not fit its xattr area "
                                    f"of {raw.xattr_size} bytes")
        entries = [self._shared_entry(xid, where)
                   for xid in struct.unpack_from(f"<{shared_count}I", self.data, pos)]
        pos += 4 * shared_count
        while pos < end:
            index, suffix, key, value, pos = self._entry(pos, end, f"{where}: xattr entry")
            entries.append((index, suffix, key, value))
        out: dict[bytes, bytes] = {}
        for index, suffix, key, value in entries:
            if key in out:
                raise CorruptImageError(f"{where}: duplicate xattr {key!r}")
            # A set filter bit tells the kernel the name is absent: it would not find it.
            if self.filter and name_filter >> self._filter_bit(index, suffix) & 1:
                raise CorruptImageError(f"{where}: xattr name filter hides {key!r}")
            out[key] = value
        return out

    def _filter_bit(self, index: int, suffix: bytes) -> int:
        bit = self._filter_bits.get((index, suffix))
        if bit is None:
            bit = self._filter_bits[index, suffix] = E.xattr_filter_bit(index, suffix)
        return bit

    def _shared_entry(self, xid: int, where: str) -> tuple[int, bytes, bytes, bytes]:
        # Inodes share these entries by design, so each is read (and paid for) once.
        hit = self._shared.get(xid)
        if hit is None:
            what = f"{where}: shared xattr id {xid}"
            start = self.xattr_base + 4 * xid
            index, suffix, key, value, end = self._entry(start, len(self.data), what)
            self.spend(end - start, what)
            hit = self._shared[xid] = (index, suffix, key, value)
        return hit

    def _entry(self, pos: int, end: int, what: str) -> tuple[int, bytes, bytes, bytes, int]:
        """Decode the xattr entry at pos, which must end by end: (index, suffix, key, value, next)."""
        past = "the end of the image" if end == len(self.data) else "its xattr area"
        if pos + E.XATTR_ENTRY.size > end:
            raise CorruptImageError(f"{what} runs past {past}")
        name_len, index, value_size = E.XATTR_ENTRY.unpack_from(self.data, pos)
        name_at = pos + E.XATTR_ENTRY.size
        value_at = name_at + name_len
        if value_at + value_size > end:
            raise CorruptImageError(f"{what} runs past {past}")
        if index & E.XATTR_LONG_PREFIX:
            raise CorruptImageError(f"{what}: long xattr name prefixes are not supported")
        prefix = E.XATTR_PREFIX_BY_INDEX.get(index, b"" if index == 0 else None)
        if prefix is None:
            raise CorruptImageError(f"{what}: unknown xattr name index {index}")
        suffix = self.read(name_at, name_len)
        key = prefix + suffix
        if not key or b"\0" in key:
            raise CorruptImageError(f"{what}: invalid xattr name {key!r}")
        return index, suffix, key, self.read(value_at, value_size), E.round_up(value_at + value_size, 4)

    def dirents(self, raw: _Raw) -> list[tuple[bytes, int, int]]:
        """All entries of a directory, "." and ".." included: (name, nid, file type).

        Checks the block structure and that names are valid and strictly ascending
        (the kernel looks names up by binary search)."""
        where = f"directory nid {raw.nid}"
        if raw.layout not in _FLAT:
            raise CorruptImageError(f"{where}: chunk-based directories are not supported")
        data = self.flat_data(raw)
        out: list[tuple[bytes, int, int]] = []
        prev = b""
        for bstart in range(0, len(data), E.BLKSIZ):
            block = data[bstart:bstart + E.BLKSIZ]
            bwhere = f"{where}, block {bstart // E.BLKSIZ}"
            if len(block) < E.DIRENT.size:
                raise CorruptImageError(f"{bwhere}: truncated directory block")
            (_, first, _) = E.DIRENT.unpack_from(block, 0)
            if first % E.DIRENT.size or not E.DIRENT.size <= first < len(block):
                raise CorruptImageError(f"{bwhere}: corrupt directory block (first name offset {first})")
            count = first // E.DIRENT.size
            heads = [E.DIRENT.unpack_from(block, E.DIRENT.size * i) for i in range(count)]
            for i, (nid, nameoff, ftype) in enumerate(heads):
                if i + 1 < count:
                    nameend = heads[i + 1][1]
                else:
                    nul = block.find(b"\0", nameoff)
                    nameend = len(block) if nul < 0 else nul
                if not nameoff < nameend <= len(block):
                    raise CorruptImageError(f"{bwhere}: entry {i} has bad name offsets {nameoff}..{nameend}")
                name = block[nameoff:nameend]
                if len(name) > NAME_MAX:
                    raise CorruptImageError(f"{bwhere}: file name longer than {NAME_MAX} bytes: {name[:64]!r}...")
                if b"/" in name or b"\0" in name:
                    raise CorruptImageError(f"{bwhere}: invalid file name {name!r}")
                if name <= prev:
                    problem = "duplicate entry" if name == prev else "entries out of order at"
                    raise CorruptImageError(f"{bwhere}: {problem} {name!r}")
                prev = name
                out.append((name, nid, ftype))
        return out

    def children(self, raw: _Raw, parent_nid: int) -> list[tuple[bytes, int, int]]:
        """A directory's entries without "." and "..", after checking those point home."""
        where = f"directory nid {raw.nid}"
        out = []
        dots = {}
        for name, nid, ftype in self.dirents(raw):
            if name in (b".", b".."):
                if ftype != E.FT_DIR:
                    raise CorruptImageError(f"{where}: {name!r} entry has file type {ftype}")
                dots[name] = nid
            else:
                out.append((name, nid, ftype))
        for name, expect in ((b".", raw.nid), (b"..", parent_nid)):
            if dots.get(name) != expect:
                raise CorruptImageError(f"{where}: {name!r} entry missing or not pointing at nid {expect}")
        return out


def _node(r: _Reader, raw: _Raw) -> Inode | None:
    """The model inode of an on-disk inode; None for the writer's own whiteout stubs."""
    where = f"inode nid {raw.nid}"
    ftype = raw.type
    if ftype == S_IFCHR and raw.i_u == 0:
        return None
    if ftype != S_IFREG and raw.layout == E.INODE_CHUNK_BASED:
        raise CorruptImageError(f"{where}: chunk-based layout on a non-regular file")
    node = Inode(mode=raw.mode, uid=raw.uid, gid=raw.gid, nlink=raw.nlink,
                 mtime_sec=raw.mtime[0], mtime_nsec=raw.mtime[1], size=raw.size)
    xattrs = r.xattrs(raw)
    if ftype == S_IFREG and _ESCAPED_WHITEOUT in xattrs:
        # An escaped whiteout: a regular file standing in for a 0:0 char device.
        node.mode = S_IFCHR | (raw.mode & ~S_IFMT)
        node.size = 0
    elif ftype == S_IFDIR:
        node.children = {}
    elif ftype in (S_IFCHR, S_IFBLK):
        node.rdev = raw.i_u
    elif ftype == S_IFLNK:
        if not 0 < raw.size <= SYMLINK_MAX:
            raise CorruptImageError(f"{where}: symlink target of {raw.size} bytes (must be 1..{SYMLINK_MAX})")
        target = r.flat_data(raw)
        if b"\0" in target:
            raise CorruptImageError(f"{where}: symlink target contains NUL")
        node.payload = target
    elif ftype == S_IFREG and raw.size:
        if raw.layout == E.INODE_CHUNK_BASED:
            r.check_chunks(raw)
        elif raw.size <= INLINE_MAX:
            node.content = r.flat_data(raw)
        else:
            r.check_extent(raw)
    _set_xattrs(node, xattrs, where)
    return node


def _set_xattrs(node: Inode, xattrs: dict[bytes, bytes], where: str) -> None:
    """Map composefs's overlay xattrs back into the model; keep the rest sorted by name."""
    out: dict[bytes, bytes] = {}
    for key, value in xattrs.items():
        if key == _METACOPY:
            if node.is_reg() and value:
                if len(value) != len(_METACOPY_HEADER) + DIGEST_SIZE or not value.startswith(_METACOPY_HEADER):
                    raise CorruptImageError(f"{where}: unsupported trusted.overlay.metacopy value {value[:8].hex()}...")
                node.digest = Digest(value[len(_METACOPY_HEADER):])
        elif key == _REDIRECT:
            if node.is_reg():
                payload = value[1:] if value.startswith(b"/") else value
                if not payload or b"\0" in payload or len(payload) >= PATH_MAX:
                    raise CorruptImageError(f"{where}: invalid trusted.overlay.redirect {value[:64]!r}")
                node.payload = payload
        elif key == _ESCAPED_WHITEOUT or key in _WHITEOUT_MARKERS:
            pass
        elif key.startswith(_ESCAPED):
            out[_OVERLAY + key[len(_ESCAPED):]] = value
        elif not key.startswith(_OVERLAY):
            out[key] = value
    node.xattrs = dict(sorted(out.items()))


def read_image(data: bytes | bytearray | memoryview) -> Image:
    """Parse a composefs (or plain uncompressed EROFS) image into the tree model."""
    r = _Reader(data)
    with no_gc():
        root_raw = r.inode(r.root_nid)
        if root_raw.type != S_IFDIR:
            raise CorruptImageError(f"root inode nid {r.root_nid} is not a directory")
        root = _node(r, root_raw)
        assert root is not None
        # nid -> (model inode, on-disk type) of every primary name so far.
        seen: dict[int, tuple[Inode, int]] = {r.root_nid: (root, S_IFDIR)}
        with_whiteouts: dict[int, Inode] = {}
        stack = [(root, r.root_nid, iter(r.children(root_raw, r.root_nid)))]
        while stack:
            parent, parent_nid, entries = stack[-1]
            item = next(entries, None)
            if item is None:
                stack.pop()
                continue
            name, nid, ftype = item
            where = f"directory nid {parent_nid}, entry {name!r}"
            known = seen.get(nid)
            if known is not None:
                node, disk_type = known
                if disk_type == S_IFDIR:
                    raise CorruptImageError(f"{where}: directory loop (directory nid {nid} reached twice)")
                if E.FILE_TYPE_OF_MODE[disk_type] != ftype:
                    raise CorruptImageError(f"{where}: file type {ftype} does not match inode nid {nid}")
                parent.children[name] = Hardlink(node)  # type: ignore[index]
                continue
            raw = r.inode(nid)
            if E.FILE_TYPE_OF_MODE[raw.type] != ftype:
                raise CorruptImageError(f"{where}: file type {ftype} does not match inode nid {nid} "
                                        f"(mode {raw.mode:#o})")
            new = _node(r, raw)
            if new is None:
                continue
            seen[nid] = (new, raw.type)
            parent.children[name] = new  # type: ignore[index]
            if new.is_whiteout():
                with_whiteouts[id(parent)] = parent
            if new.children is not None:
                if len(stack) >= MAX_DEPTH:
                    raise CorruptImageError(f"{where}: directories nested deeper than {MAX_DEPTH}")
                stack.append((new, nid, iter(r.children(raw, parent_nid))))
    for d in with_whiteouts.values():
        # The writer marks directories holding whiteouts opaque "x"; that is not part of the tree.
        for key in _WHITEOUT_OPAQUE:
            if d.xattrs.get(key) == b"x":
                del d.xattrs[key]
    return Image(root, r.composefs_version, r.has_acl, r.build_time, r.inos, r.blocks)


def read_image_file(path: str | bytes | os.PathLike[str]) -> Image:
    """Read an image file whole: a copy in memory cannot shrink under the reader, a map could."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageError(f"cannot read image {os.fsdecode(path)}: {e.strerror}") from e
    return read_image(data)
