"""Write composefs EROFS images, byte for byte what the reference mkcomposefs writes.

The layout decisions that fix the bytes (see REFERENCE-NOTES section 8):
- inodes in breadth-first order from the root, children sorted by name, hardlinks
  sharing their target's inode; "." and ".." dirents; directory nlink = 2 + subdirs;
- overlayfs xattrs: existing trusted.overlay.* escaped, metacopy (with the
  fs-verity digest) and redirect (to the object path) on external files, whiteouts
  escaped, the root opaque and 256 whiteout stubs "00".."ff" hiding the object dirs;
- xattr (key, value) pairs used by more than one inode go to a shared table sorted
  in descending order, the rest inline;
- compact inodes where the mtime equals the minimum and values fit, else extended;
- inline tails never cross a block boundary, with the reference's padding rules.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain

from ..util.errors import ImageError, TreeError
from . import erofs as E
from .tree import (
    INLINE_MAX,
    S_IFBLK,
    S_IFCHR,
    S_IFDIR,
    S_IFLNK,
    S_IFMT,
    S_IFREG,
    VALID_TYPES,
    XATTR_BUDGET,
    Hardlink,
    Inode,
    check_xattr,
    no_gc,
    xattr_cost,
    xattrs_size,
)

FORMAT_VERSION_MAX = 1
MAX_NONINLINE_CHUNKS = 1024

_OVERLAY = b"trusted.overlay."
_OVERLAY_ESCAPED = b"trusted.overlay.overlay."
_METACOPY = b"trusted.overlay.metacopy"
_REDIRECT = b"trusted.overlay.redirect"
_OPAQUE = b"trusted.overlay.opaque"
_ESC_WHITEOUT = b"trusted.overlay.overlay.whiteout"
_ESC_WHITEOUTS = b"trusted.overlay.overlay.whiteouts"
_ESC_OPAQUE = b"trusted.overlay.overlay.opaque"
_USER_WHITEOUT = b"user.overlay.whiteout"
_USER_WHITEOUTS = b"user.overlay.whiteouts"
_USER_OPAQUE = b"user.overlay.opaque"
_ACL_KEYS = (b"system.posix_acl_access", b"system.posix_acl_default")


class _Node:
    """One inode as the writer lays it out (a working copy: the input tree is not touched)."""

    __slots__ = (
        "src", "mode", "size", "nlink", "xattrs", "xbudget", "children", "parent",
        "ino", "nid", "compact", "n_blocks", "tail", "ipad", "xattr_size",
        "shared", "inline", "dir_entries",
    )

    def __init__(self, src: Inode, parent: _Node | None) -> None:
        self.src = src
        self.mode = src.mode
        # A symlink's size is its target's length, whatever the input said.
        self.size = len(src.payload or b"") if src.mode & S_IFMT == S_IFLNK else src.size
        self.nlink = src.nlink
        self.xattrs = dict(src.xattrs) if src.xattrs else {}
        self.xbudget = xattrs_size(self.xattrs) if src.xattrs else 0
        # (name, node, is_hardlink), built in sorted order
        self.children: list[tuple[bytes, _Node, bool]] = []
        self.parent = parent if parent is not None else self
        self.ino = 0
        self.nid = 0
        self.compact = True
        self.n_blocks = 0
        self.tail = 0
        self.ipad = 0
        self.xattr_size = 0
        self.shared: list[int] = []
        self.inline: list[tuple[bytes, bytes]] = []
        self.dir_entries: list[tuple[bytes, _Node]] = []

    def set_xattr(self, key: bytes, value: bytes) -> None:
        # The reference keeps a running byte budget per inode; adding the
        # overlay attributes can push a file over it, and then it fails.
        old = self.xattrs.pop(key, None)
        if old is not None:
            self.xbudget = self.xbudget - xattr_cost(key, old) if self.xattrs else 0
        cost = xattr_cost(key, value) + (0 if self.xattrs else 12)
        if self.xbudget + cost > XATTR_BUDGET:
            raise ImageError(f"xattrs too large after adding {key.decode(errors='replace')}")
        self.xbudget += cost
        self.xattrs[key] = value


@dataclass(frozen=True, slots=True)
class BuildResult:
    image: bytes
    version: int


def _needs_v1(root: Inode) -> bool:
    stack = [root]
    while stack:
        node = stack.pop()
        if node.mode & S_IFMT == S_IFCHR and node.rdev == 0:
            return True
        if node.children:
            stack.extend(c for c in node.children.values() if isinstance(c, Inode))
    return False


def _clone(root: Inode) -> _Node:
    """Copy the tree into writer nodes, children sorted, hardlinks resolved."""
    by_src: dict[int, _Node] = {}
    links: list[tuple[_Node, int, bytes, Inode]] = []
    top = _Node(root, None)
    by_src[id(root)] = top
    stack = [top]
    while stack:
        node = stack.pop()
        children = node.src.children
        if children is None:
            continue
        kids: list[tuple[bytes, _Node, bool]] = []
        for name in sorted(children):
            entry = children[name]
            if isinstance(entry, Hardlink):
                links.append((node, len(kids), name, entry.target))
                kids.append((name, node, True))  # placeholder, fixed below
            else:
                if entry.mode & S_IFMT not in VALID_TYPES:
                    raise ImageError(f"invalid file mode {entry.mode:o} for {name!r}")
                child = _Node(entry, node)
                by_src[id(entry)] = child
                kids.append((name, child, False))
                stack.append(child)
        node.children = kids
    for parent, index, name, target in links:
        tnode = by_src.get(id(target))
        if tnode is None:
            raise ImageError(f"hardlink {name!r} points outside the tree")
        if tnode.mode & S_IFMT == S_IFDIR:
            raise ImageError(f"hardlink {name!r} points to a directory")
        parent.children[index] = (name, tnode, True)
    return top


def _check(node: _Node) -> None:
    if node.mode & S_IFMT not in VALID_TYPES:
        raise ImageError(f"invalid file mode {node.mode:o}")
    src = node.src
    if node.mode & S_IFMT == S_IFREG and node.size > 0 and src.content is None:
        bits = E.chunk_bits(node.size)
        if -(-node.size // (1 << bits)) > MAX_NONINLINE_CHUNKS:
            raise ImageError(f"file too big: {node.size} bytes")
    if src.content is not None and len(src.content) > INLINE_MAX:
        raise ImageError(f"inline content of {len(src.content)} bytes exceeds {INLINE_MAX}")
    try:
        for k, v in node.xattrs.items():
            check_xattr(k, v)
    except TreeError as e:
        raise ImageError(str(e)) from None
    if node.xbudget > XATTR_BUDGET:
        raise ImageError(f"xattrs too large: {node.xbudget} bytes (limit {XATTR_BUDGET})")


def _add_overlay_xattrs(node: _Node, version: int) -> None:
    src = node.src
    ftype = node.mode & S_IFMT
    if any(k.startswith(_OVERLAY) for k in node.xattrs):
        # Escape so overlayfs shows them to users instead of acting on them.
        node.xattrs = {(_OVERLAY_ESCAPED + k[len(_OVERLAY):] if k.startswith(_OVERLAY) else k): v
                       for k, v in node.xattrs.items()}
    if ftype == S_IFREG and node.size > 0 and src.content is None:
        meta = b"\x00\x24\x00\x01" + src.digest if src.digest is not None else b""
        node.set_xattr(_METACOPY, meta)
        if src.payload:
            node.set_xattr(_REDIRECT, b"/" + src.payload)
    if ftype == S_IFCHR and src.rdev == 0:
        # A whiteout in the tree becomes a regular file overlayfs shows as a whiteout.
        node.size = 0
        node.mode = S_IFREG | (node.mode & ~S_IFMT)
        node.set_xattr(_ESC_WHITEOUT, b"")
        node.set_xattr(_USER_WHITEOUT, b"")
        parent = node.parent
        parent.set_xattr(_ESC_WHITEOUTS, b"")
        parent.set_xattr(_USER_WHITEOUTS, b"")
        if version >= 1:
            parent.set_xattr(_ESC_OPAQUE, b"x")
            parent.set_xattr(_USER_OPAQUE, b"x")


def _rewrite(root: _Node, version: int) -> None:
    stack = [root]
    while stack:
        node = stack.pop()
        _check(node)
        _add_overlay_xattrs(node, version)
        # Pre-order like the reference, so parents are rewritten before children.
        stack.extend(c for _, c, is_link in reversed(node.children) if not is_link)
    root.set_xattr(_OPAQUE, b"y")
    # Whiteout stubs hide the object directories when the image is a normal lower.
    existing = {name for name, _, _ in root.children}
    selinux = root.xattrs.get(b"security.selinux")
    stubs = []
    for i in range(256):
        name = b"%02x" % i
        if name in existing:
            continue
        stub = _Node(Inode(mode=S_IFCHR | 0o644, uid=root.src.uid, gid=root.src.gid,
                           mtime_sec=root.src.mtime_sec, mtime_nsec=root.src.mtime_nsec), root)
        if selinux is not None:
            stub.set_xattr(b"security.selinux", selinux)
        stubs.append((name, stub, False))
    if stubs:
        root.children = sorted(root.children + stubs, key=lambda c: c[0])


def _bfs(root: _Node) -> list[_Node]:
    order = [root]
    i = 0
    while i < len(order):
        node = order[i]
        node.ino = i
        order.extend(c for _, c, is_link in node.children if not is_link)
        i += 1
    return order


_split_cache: dict[bytes, tuple[int, bytes, int]] = {}


def _split(key: bytes) -> tuple[int, bytes, int]:
    """(prefix index, suffix, filter bit) of an xattr name; names repeat a lot, so memoized."""
    hit = _split_cache.get(key)
    if hit is None:
        index, suffix = E.xattr_split(key)
        hit = _split_cache[key] = (index, suffix, E.xattr_filter_bit(index, suffix))
    return hit


def _entry_size(key: bytes, value: bytes) -> int:
    return E.round_up(4 + len(_split(key)[1]) + len(value), 4)


def _encode_xattr(key: bytes, value: bytes) -> bytes:
    index, suffix, _ = _split(key)
    raw = E.XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
    return raw + b"\0" * (-len(raw) % 4)


def _xattr_filter(keys: Iterable[bytes]) -> int:
    bits = 0
    for key in keys:
        bits |= 1 << _split(key)[2]
    return E.XATTR_FILTER_DEFAULT & ~bits


def _dir_blocks(entries: list[tuple[bytes, _Node]]) -> list[list[tuple[bytes, _Node]]]:
    """Pack dirents greedily into 4096-byte blocks; the last one may be partial."""
    blocks: list[list[tuple[bytes, _Node]]] = [[]]
    used = 0
    for entry in entries:
        size = 12 + len(entry[0])
        if used + size > E.BLKSIZ:
            blocks.append([])
            used = 0
        blocks[-1].append(entry)
        used += size
    return blocks


def _encode_dirents(entries: list[tuple[bytes, _Node]]) -> bytes:
    nameoff = 12 * len(entries)
    heads = []
    for name, target in entries:
        heads.append(E.DIRENT.pack(target.nid, nameoff, E.FILE_TYPE_OF_MODE[target.mode & S_IFMT]))
        nameoff += len(name)
    return b"".join(heads) + b"".join(name for name, _ in entries)


class _Layout:
    def __init__(self, nodes: list[_Node], version: int) -> None:
        self.nodes = nodes
        self.version = version
        root = nodes[0]
        self.min_mtime = min((n.src.mtime_sec, n.src.mtime_nsec) for n in nodes)
        self.has_acl = any(k in n.xattrs for n in nodes for k in _ACL_KEYS)
        for node in nodes:
            if node.mode & S_IFMT == S_IFDIR:
                node.nlink = 2 + sum(1 for _, c, is_link in node.children
                                     if not is_link and c.mode & S_IFMT == S_IFDIR)
                dots = [(b".", node), (b"..", node.parent)]
                node.dir_entries = sorted([(n, c) for n, c, _ in node.children] + dots,
                                          key=lambda e: e[0])
        self.root = root
        self._shared_xattrs()
        self._inodes()

    def _shared_xattrs(self) -> None:
        counts = Counter(chain.from_iterable(node.xattrs.items() for node in self.nodes))
        shared = [kv for kv, n in counts.items() if n > 1]
        # Descending by key, then longer value first, then value bytes descending.
        shared.sort(key=lambda kv: (kv[0], len(kv[1]), kv[1]), reverse=True)
        offsets: dict[tuple[bytes, bytes], int] = {}
        pos = 0
        for kv in shared:
            offsets[kv] = pos
            pos += _entry_size(*kv)
        self.shared_table = shared
        self.shared_size = pos
        limit = E.XATTR_LONG_PREFIX
        for node in self.nodes:
            if not node.xattrs:
                node.xattr_size = 0
                continue
            shared_offs: list[int] = []
            inline: list[tuple[bytes, bytes]] = []
            node.shared, node.inline = shared_offs, inline
            for kv in sorted(node.xattrs.items()):
                off = offsets.get(kv)
                if off is not None and len(shared_offs) < limit:
                    shared_offs.append(off)
                else:
                    inline.append(kv)
            size = 12 + 4 * len(shared_offs) + sum(_entry_size(*kv) for kv in inline)
            node.xattr_size = E.round_up(size, 4)

    def _data_shape(self, node: _Node) -> None:
        ftype = node.mode & S_IFMT
        src = node.src
        node.n_blocks = node.tail = 0
        if ftype == S_IFDIR:
            blocks = _dir_blocks(node.dir_entries)
            last = sum(12 + len(n) for n, _ in blocks[-1])
            node.n_blocks = len(blocks) - 1
            node.tail = last
            # Never inline more than half a block.
            if last > E.BLKSIZ // 2:
                node.n_blocks += 1
                node.tail = 0
        elif ftype == S_IFLNK:
            node.tail = len(src.payload or b"")
        elif ftype == S_IFREG and node.size > 0:
            if src.content is not None:
                node.n_blocks, node.tail = divmod(node.size, E.BLKSIZ)
                if node.tail > E.BLKSIZ // 2:
                    node.n_blocks += 1
                    node.tail = 0
            else:
                bits = E.chunk_bits(node.size)
                node.tail = 4 * -(-node.size // (1 << bits))

    def _fits_compact(self, node: _Node) -> bool:
        src = node.src
        if (src.mtime_sec, src.mtime_nsec) != self.min_mtime:
            return False
        if node.nlink > 0xFFFF or src.uid > 0xFFFF or src.gid > 0xFFFF:
            return False
        if node.mode & S_IFMT == S_IFDIR:
            size = node.n_blocks * E.BLKSIZ + node.tail
        else:
            size = node.size
        return size <= 0xFFFFFFFF

    def _tail_padding(self, node: _Node, pos: int, inode_size: int) -> int:
        """Padding before an inode so its inline tail stays inside one block."""
        non_tail = inode_size + node.xattr_size
        if node.mode & S_IFMT == S_IFLNK:
            # A symlink keeps inode and target in one block, or moves the target out.
            total = non_tail + node.tail
            if total // E.BLKSIZ > 0:
                node.n_blocks += 1
                node.tail = 0
            if pos // E.BLKSIZ != (pos + total - 1) // E.BLKSIZ:
                return E.round_up(pos, E.BLKSIZ) - pos
            return 0
        remainder = E.BLKSIZ - (pos + non_tail) % E.BLKSIZ
        if remainder < node.tail:
            extra = E.round_up(remainder, E.SLOTSIZE)
            remainder = E.BLKSIZ - (pos + non_tail + extra) % E.BLKSIZ
            if node.tail <= remainder:
                return extra
            node.n_blocks += 1
            node.tail = 0
            return E.round_up(pos, E.BLKSIZ) - pos
        return 0

    def _inodes(self) -> None:
        pos = E.SUPER_OFFSET + E.SUPERBLOCK.size
        self.n_data_blocks = 0
        for node in self.nodes:
            self._data_shape(node)
            node.compact = self._fits_compact(node)
            inode_size = 32 if node.compact else 64
            aligned = E.round_up(pos, E.SLOTSIZE)
            extra = self._tail_padding(node, aligned, inode_size)
            node.ipad = aligned - pos + extra
            pos = aligned + extra
            node.nid = pos // E.SLOTSIZE
            self.n_data_blocks += node.n_blocks
            pos += inode_size + node.xattr_size + node.tail
        self.inodes_end = E.round_up(pos, E.SLOTSIZE)
        self.data_start = E.round_up(self.inodes_end + self.shared_size, E.BLKSIZ)
        if self.root.nid > 0xFFFF:
            raise ImageError("root inode out of range")

    def write(self) -> bytes:
        out = bytearray()
        flags = E.COMPOSEFS_FLAGS_HAS_ACL if self.has_acl else 0
        out += E.COMPOSEFS_HEADER.pack(E.COMPOSEFS_MAGIC, E.COMPOSEFS_HEADER_VERSION, flags,
                                       self.version)
        out += bytes(E.SUPER_OFFSET - len(out))
        out += E.SUPERBLOCK.pack(
            E.SUPER_MAGIC_V1, 0, E.FEATURE_COMPAT_MTIME | E.FEATURE_COMPAT_XATTR_FILTER,
            E.BLKSIZ_BITS, 0, self.root.nid, len(self.nodes), self.min_mtime[0],
            self.min_mtime[1], self.data_start // E.BLKSIZ + self.n_data_blocks,
            0, self.inodes_end // E.BLKSIZ, bytes(16), bytes(16), 0)
        block_end = self.data_start
        for node in self.nodes:
            block_end = self._write_inode(out, node, block_end)
        out += bytes(-len(out) % E.SLOTSIZE)
        assert len(out) == self.inodes_end
        for kv in self.shared_table:
            out += _encode_xattr(*kv)
        out += bytes(-len(out) % E.BLKSIZ)
        assert len(out) == self.data_start
        for node in self.nodes:
            self._write_blocks(out, node)
        if len(out) != block_end:
            raise ImageError("internal layout error: data blocks do not add up")
        return bytes(out)

    def _write_inode(self, out: bytearray, node: _Node, block_end: int) -> int:
        src = node.src
        ftype = node.mode & S_IFMT
        out += bytes(node.ipad)
        layout = E.INODE_FLAT_INLINE if node.tail > 0 else E.INODE_FLAT_PLAIN
        chunk_format = None
        if ftype == S_IFDIR:
            size = node.n_blocks * E.BLKSIZ + node.tail
        elif ftype == S_IFREG:
            size = node.size
            if size > 0 and src.content is None:
                layout = E.INODE_CHUNK_BASED
                chunk_format = E.chunk_bits(size) - E.BLKSIZ_BITS
        elif ftype == S_IFLNK:
            size = node.tail if node.n_blocks == 0 else node.size
        else:
            size = 0
        i_u = 0
        if ftype in (S_IFCHR, S_IFBLK):
            i_u = src.rdev & 0xFFFFFFFF
        elif ftype in (S_IFDIR, S_IFREG, S_IFLNK) and node.n_blocks > 0:
            i_u = block_end // E.BLKSIZ
            block_end += E.BLKSIZ * node.n_blocks
        if chunk_format is not None:
            # i_u is a union: the chunk format overlays the low half of the block address.
            i_u = (i_u & 0xFFFF0000) | chunk_format
        icount = (node.xattr_size - 12) // 4 + 1 if node.xattr_size else 0
        if icount > 0xFFFF:
            raise ImageError("too many xattrs for one inode")
        mode = node.mode & 0xFFFF
        if node.compact:
            out += E.INODE_COMPACT.pack(layout << 1, icount, mode, node.nlink, size, 0, i_u,
                                        node.ino, src.uid, src.gid, 0)
        else:
            out += E.INODE_EXTENDED.pack(layout << 1 | 1, icount, mode, 0, size, i_u, node.ino,
                                         src.uid, src.gid, src.mtime_sec, src.mtime_nsec,
                                         node.nlink)
        if node.xattr_size:
            start = len(out)
            out += E.XATTR_IBODY_HEADER.pack(_xattr_filter(node.xattrs), len(node.shared))
            base = self.inodes_end % E.BLKSIZ
            for off in node.shared:
                out += struct.pack("<I", (base + off) // 4)
            for kv in node.inline:
                out += _encode_xattr(*kv)
            out += bytes(node.xattr_size - (len(out) - start))
        if node.tail:
            if ftype == S_IFDIR:
                out += _encode_dirents(_dir_blocks(node.dir_entries)[-1])
            elif ftype == S_IFLNK:
                out += src.payload or b""
            elif src.content is not None:
                out += src.content[node.size - node.tail:]
            else:
                out += b"\xff\xff\xff\xff" * (node.tail // 4)
        return block_end

    def _write_blocks(self, out: bytearray, node: _Node) -> None:
        if not node.n_blocks:
            return
        ftype = node.mode & S_IFMT
        src = node.src
        if ftype == S_IFDIR:
            blocks = _dir_blocks(node.dir_entries)
            full = blocks if node.tail == 0 else blocks[:-1]
            for block in full:
                data = _encode_dirents(block)
                out += data + bytes(E.BLKSIZ - len(data))
            return
        if ftype == S_IFREG and src.content is None:
            # A chunk index that did not fit inline: one block of null chunks.
            out += b"\xff" * E.BLKSIZ
            return
        content = (src.payload if ftype == S_IFLNK else src.content) or b""
        if node.n_blocks > 1:
            # The reference writes only the first block here and then aborts.
            raise ImageError("inline content too large to lay out")
        first = content[:E.BLKSIZ]
        out += first + bytes(E.BLKSIZ - len(first))


def build(root: Inode, *, min_version: int = 0, max_version: int = FORMAT_VERSION_MAX) -> BuildResult:
    """Build the image of a tree.  Format version 1 only where the tree needs it
    (whiteouts), unless min_version asks for it."""
    if not 0 <= min_version <= FORMAT_VERSION_MAX or not 0 <= max_version <= FORMAT_VERSION_MAX:
        raise ImageError(f"format version must be 0..{FORMAT_VERSION_MAX}")
    if root.mode & S_IFMT != S_IFDIR or root.children is None:
        raise ImageError("the root must be a directory")
    max_version = max(max_version, min_version)
    version = min_version
    if version < 1 <= max_version and _needs_v1(root):
        version = 1
    with no_gc():
        top = _clone(root)
        _rewrite(top, version)
        nodes = _bfs(top)
        return BuildResult(_Layout(nodes, version).write(), version)
