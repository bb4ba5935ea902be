"""Read composefs EROFS images back into the tree model, from the on-disk format.

Images may be hostile: every offset is bounds-checked, the walk is iterative with
loop detection and caps on depth and entry count, and every problem is an
ImageError naming the inode.  The composefs conventions are undone on the way:
overlay xattrs become payload and digest, escaped overlay xattrs are unescaped,
escaped whiteouts become whiteouts again, and the root's whiteout stubs vanish.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from . import erofs as E
from .errors import ImageError
from .tree import (
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

MAX_DEPTH = PATH_MAX // 2
_FTYPE_OF_MODE = {S_IFREG: E.FT_REG_FILE, S_IFDIR: E.FT_DIR, S_IFCHR: E.FT_CHRDEV,
                  S_IFBLK: E.FT_BLKDEV, 0o010000: E.FT_FIFO, 0o140000: E.FT_SOCK,
                  S_IFLNK: E.FT_SYMLINK}
_OVERLAY = b"trusted.overlay."
_ESCAPED = b"trusted.overlay.overlay."
_DROPPED = {b"trusted.overlay.overlay.whiteouts", b"user.overlay.whiteout",
            b"user.overlay.whiteouts"}


@dataclass
class Image:
    root: Inode
    composefs_version: int | None
    has_acl_flag: bool
    build_time: tuple[int, int]
    inodes: int
    blocks: int


@dataclass(slots=True)
class _Raw:
    nid: int
    mode: int
    nlink: int
    size: int
    uid: int
    gid: int
    mtime: tuple[int, int]
    i_u: int
    layout: int
    body: int  # offset just past the inode and its xattrs (the inline tail)
    xattr_start: int
    xattr_size: int


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        n = len(data)
        if n < E.SUPER_OFFSET + E.SUPERBLOCK.size:
            raise ImageError(f"image too small ({n} bytes)")
        magic, version, flags, cfs_version = E.COMPOSEFS_HEADER.unpack_from(data, 0)
        if magic == E.COMPOSEFS_MAGIC:
            if version != E.COMPOSEFS_HEADER_VERSION:
                raise ImageError(f"unsupported composefs header version {version}")
            self.composefs_version: int | None = cfs_version
        else:
            self.composefs_version = None
        self.has_acl = bool(flags & E.COMPOSEFS_FLAGS_HAS_ACL) if magic == E.COMPOSEFS_MAGIC else False
        (sb_magic, _, _, blkszbits, _, root_nid, inos, build_time, build_nsec, blocks,
         meta_blkaddr, xattr_blkaddr, _, _, _) = E.SUPERBLOCK.unpack_from(data, E.SUPER_OFFSET)
        if sb_magic != E.SUPER_MAGIC_V1:
            raise ImageError("not an EROFS image (bad superblock magic)")
        if blkszbits != E.BLKSIZ_BITS:
            raise ImageError(f"unsupported block size 2^{blkszbits} (only 4096)")
        self.meta = meta_blkaddr * E.BLKSIZ
        self.xattr_base = xattr_blkaddr * E.BLKSIZ
        if self.meta >= n:
            raise ImageError("metadata area starts past the end of the image")
        self.root_nid = root_nid
        self.build_time = (build_time, build_nsec)
        self.inos = inos
        self.blocks = blocks

    def _need(self, start: int, length: int, what: str) -> None:
        if start < 0 or length < 0 or start + length > len(self.data):
            raise ImageError(f"{what} runs past the end of the image")

    def inode(self, nid: int) -> _Raw:
        off = self.meta + nid * E.SLOTSIZE
        where = f"inode nid {nid}"
        self._need(off, E.INODE_COMPACT.size, where)
        (fmt,) = struct.unpack_from("<H", self.data, off)
        layout = (fmt >> E.I_DATALAYOUT_BIT) & 7
        if fmt & 1 == 0:
            (_, icount, mode, nlink, size, _, i_u, _, uid, gid, _) = E.INODE_COMPACT.unpack_from(self.data, off)
            isize, mtime = E.INODE_COMPACT.size, self.build_time
        else:
            self._need(off, E.INODE_EXTENDED.size, where)
            (_, icount, mode, _, size, i_u, _, uid, gid, msec, mnsec, nlink) = \
                E.INODE_EXTENDED.unpack_from(self.data, off)
            isize, mtime = E.INODE_EXTENDED.size, (msec, mnsec)
        if mode & S_IFMT not in VALID_TYPES:
            raise ImageError(f"{where}: invalid mode {mode:o}")
        if layout not in (E.INODE_FLAT_PLAIN, E.INODE_FLAT_INLINE, E.INODE_CHUNK_BASED):
            raise ImageError(f"{where}: unsupported data layout {layout} (compressed files are not supported)")
        xsize = 12 + (icount - 1) * 4 if icount else 0
        self._need(off + isize, xsize, f"{where}: xattrs")
        return _Raw(nid, mode, nlink, size, uid, gid, mtime, i_u, layout,
                    off + isize + xsize, off + isize, xsize)

    def content(self, raw: _Raw, limit: int) -> bytes:
        """The content of a flat inode (directory, symlink, inline file)."""
        where = f"inode nid {raw.nid}"
        if raw.layout == E.INODE_CHUNK_BASED:
            raise ImageError(f"{where}: chunk-based data where flat data was expected")
        if raw.size > limit:
            raise ImageError(f"{where}: size {raw.size} too large")
        if raw.layout == E.INODE_FLAT_PLAIN:
            start = raw.i_u * E.BLKSIZ
            self._need(start, raw.size, f"{where}: data")
            return self.data[start:start + raw.size]
        nblocks = -(-raw.size // E.BLKSIZ)
        plain = max(nblocks - 1, 0) * E.BLKSIZ
        tail = raw.size - plain
        if raw.body % E.BLKSIZ + tail > E.BLKSIZ:
            raise ImageError(f"{where}: inline data crosses a block boundary")
        self._need(raw.body, tail, f"{where}: inline data")
        head = b""
        if plain:
            start = raw.i_u * E.BLKSIZ
            self._need(start, plain, f"{where}: data")
            head = self.data[start:start + plain]
        return head + self.data[raw.body:raw.body + tail]

    def xattrs(self, raw: _Raw) -> dict[bytes, bytes]:
        if not raw.xattr_size:
            return {}
        where = f"inode nid {raw.nid}"
        end = raw.xattr_start + raw.xattr_size
        (_, shared_count) = E.XATTR_IBODY_HEADER.unpack_from(self.data, raw.xattr_start)
        pos = raw.xattr_start + E.XATTR_IBODY_HEADER.size
        if pos + 4 * shared_count > end:
            raise ImageError(f"{where}: shared xattr count {shared_count} exceeds the xattr area")
        out: dict[bytes, bytes] = {}
        for i in range(shared_count):
            (xid,) = struct.unpack_from("<I", self.data, pos + 4 * i)
            key, value, _ = self._entry(self.xattr_base + 4 * xid, len(self.data), where)
            out[key] = value
        pos += 4 * shared_count
        while pos + E.XATTR_ENTRY.size <= end:
            key, value, pos = self._entry(pos, end, where)
            out[key] = value
        return out

    def _entry(self, pos: int, end: int, where: str) -> tuple[bytes, bytes, int]:
        if pos + E.XATTR_ENTRY.size > end:
            raise ImageError(f"{where}: xattr entry runs past its area")
        name_len, index, value_size = E.XATTR_ENTRY.unpack_from(self.data, pos)
        body = pos + E.XATTR_ENTRY.size
        if body + name_len + value_size > end:
            raise ImageError(f"{where}: xattr entry runs past its area")
        prefix = E.XATTR_PREFIX_BY_INDEX.get(index, b"" if index == 0 else None)
        if prefix is None:
            raise ImageError(f"{where}: unsupported xattr name index {index}")
        key = prefix + self.data[body:body + name_len]
        if not key or b"\0" in key:
            raise ImageError(f"{where}: invalid xattr name {key!r}")
        value = self.data[body + name_len:body + name_len + value_size]
        return key, value, E.round_up(body + name_len + value_size, 4)

    def dirents(self, raw: _Raw) -> list[tuple[bytes, int, int]]:
        where = f"directory nid {raw.nid}"
        data = self.content(raw, len(self.data))
        out = []
        for bstart in range(0, len(data), E.BLKSIZ):
            block = data[bstart:bstart + E.BLKSIZ]
            if len(block) < E.DIRENT.size:
                raise ImageError(f"{where}: truncated directory block")
            _, first, _ = E.DIRENT.unpack_from(block, 0)
            if first % E.DIRENT.size or not E.DIRENT.size <= first <= len(block):
                raise ImageError(f"{where}: corrupt directory block (name offset {first})")
            count = first // E.DIRENT.size
            heads = [E.DIRENT.unpack_from(block, E.DIRENT.size * i) for i in range(count)]
            for i, (nid, nameoff, ftype) in enumerate(heads):
                if i + 1 < count:
                    nameend = heads[i + 1][1]
                else:
                    nul = block.find(b"\0", nameoff)
                    nameend = len(block) if nul < 0 else nul
                if not first <= nameoff < nameend <= len(block) or nameend - nameoff > NAME_MAX:
                    raise ImageError(f"{where}: corrupt directory entry {i} (name offsets)")
                out.append((block[nameoff:nameend], nid, ftype))
        return out


def _apply_overlay_xattrs(node: Inode, xattrs: dict[bytes, bytes]) -> bool:
    """Move composefs's overlay xattrs into the model; True if it is an escaped whiteout."""
    whiteout = False
    for key, value in xattrs.items():
        if key == b"trusted.overlay.metacopy":
            if node.is_reg() and len(value) == 36:
                node.digest = value[4:]
        elif key == b"trusted.overlay.redirect":
            if node.is_reg():
                node.payload = value[1:] if value.startswith(b"/") else value
        elif key == b"trusted.overlay.overlay.whiteout" and node.is_reg():
            whiteout = True
        elif key in _DROPPED:
            pass
        elif key.startswith(_ESCAPED):
            node.xattrs[_OVERLAY + key[len(_ESCAPED):]] = value
        elif not key.startswith(_OVERLAY):
            node.xattrs[key] = value
    node.xattrs = dict(sorted(node.xattrs.items()))
    return whiteout


def _node(r: _Reader, raw: _Raw) -> Inode | None:
    """The model inode of a raw inode; None for the writer's own whiteout stubs."""
    ftype = raw.mode & S_IFMT
    if ftype == S_IFCHR and raw.i_u == 0:
        return None
    node = Inode(mode=raw.mode, uid=raw.uid, gid=raw.gid, nlink=raw.nlink,
                 mtime_sec=raw.mtime[0], mtime_nsec=raw.mtime[1], size=raw.size)
    if _apply_overlay_xattrs(node, r.xattrs(raw)):
        node.mode = S_IFCHR | (node.mode & ~S_IFMT)
        node.size = 0
        return node
    where = f"inode nid {raw.nid}"
    if ftype == S_IFDIR:
        node.children = {}
    elif ftype in (S_IFCHR, S_IFBLK):
        node.rdev = raw.i_u
    elif ftype == S_IFLNK:
        target = r.content(raw, PATH_MAX - 1)
        if not target:
            raise ImageError(f"{where}: empty symlink target")
        node.payload = target
    elif ftype == S_IFREG and raw.size:
        if raw.layout == E.INODE_CHUNK_BASED:
            if raw.i_u & 0xFFFF & ~E.CHUNK_FORMAT_BLKBITS_MASK:
                raise ImageError(f"{where}: unsupported chunk format {raw.i_u & 0xFFFF:#x}")
        elif raw.size <= INLINE_MAX:
            node.content = r.content(raw, INLINE_MAX)
    if ftype != S_IFREG and raw.layout == E.INODE_CHUNK_BASED:
        raise ImageError(f"{where}: chunk-based layout on a non-regular file")
    return node


def read_image(data: bytes | bytearray | memoryview) -> Image:
    """Parse a composefs (or plain uncompressed EROFS) image into the tree model."""
    r = _Reader(bytes(data))
    with no_gc():
        root_raw = r.inode(r.root_nid)
        if root_raw.mode & S_IFMT != S_IFDIR:
            raise ImageError("the root inode is not a directory")
        root = _node(r, root_raw)
        assert root is not None
        seen: dict[int, Inode] = {r.root_nid: root}
        max_entries = len(r.data) // E.DIRENT.size
        entries = 0
        with_whiteouts: list[Inode] = []
        stack = [(root, iter(sorted(r.dirents(root_raw))))]
        while stack:
            parent, it = stack[-1]
            item = next(it, None)
            if item is None:
                stack.pop()
                continue
            name, nid, ftype = item
            if name in (b".", b".."):
                continue
            entries += 1
            if entries > max_entries:
                raise ImageError("more directory entries than the image can hold")
            if b"/" in name or b"\0" in name:
                raise ImageError(f"invalid file name {name!r}")
            known = seen.get(nid)
            if known is not None:
                if known.children is not None:
                    raise ImageError(f"directory loop: {name!r} points to a directory already seen (nid {nid})")
                parent.children[name] = Hardlink(known)  # type: ignore[index]
                continue
            raw = r.inode(nid)
            if _FTYPE_OF_MODE.get(raw.mode & S_IFMT) != ftype:
                raise ImageError(f"entry {name!r}: file type {ftype} does not match inode nid {nid}")
            node = _node(r, raw)
            if node is None:
                continue
            seen[nid] = node
            parent.children[name] = node  # type: ignore[index]
            if node.is_whiteout():
                with_whiteouts.append(parent)
            if node.children is not None:
                if len(stack) >= MAX_DEPTH:
                    raise ImageError(f"directories nested deeper than {MAX_DEPTH}")
                stack.append((node, iter(sorted(r.dirents(raw)))))
    for d in with_whiteouts:
        # The writer marks directories holding whiteouts opaque "x"; not part of the tree.
        for key in (b"trusted.overlay.opaque", b"user.overlay.opaque"):
            if d.xattrs.get(key) == b"x":
                del d.xattrs[key]
    return Image(root, r.composefs_version, r.has_acl, r.build_time, r.inos, r.blocks)


def read_image_file(path: str | bytes | os.PathLike[str]) -> Image:
    with open(path, "rb") as f:
        return read_image(f.read())
