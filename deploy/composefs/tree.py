"""The in-memory model of a filesystem tree: what a manifest describes and an image holds.

A directory's children map a name (bytes, any byte but NUL and '/') to either an
Inode or a Hardlink.  A Hardlink is a further name for an Inode that already has
its primary name elsewhere; where that primary name sits matters for the image
layout, so it is kept explicit rather than implied by shared objects.
"""

from __future__ import annotations

import gc
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..util.errors import TreeError
from .fsverity import Digest

S_IFMT = 0o170000
S_IFDIR = stat.S_IFDIR
S_IFREG = stat.S_IFREG
S_IFLNK = stat.S_IFLNK
S_IFCHR = stat.S_IFCHR
S_IFBLK = stat.S_IFBLK
S_IFIFO = stat.S_IFIFO
S_IFSOCK = stat.S_IFSOCK
VALID_TYPES = frozenset({S_IFDIR, S_IFREG, S_IFLNK, S_IFCHR, S_IFBLK, S_IFIFO, S_IFSOCK})

DIGEST_SIZE = 32
# Files up to this size are stored inline in the manifest and the image.
INLINE_MAX_RECOMMENDED = 64
# The hard limit the image format accepts for inline content.
INLINE_MAX = 5000
NAME_MAX = 255
PATH_MAX = 4096
# A symlink target is 1..SYMLINK_MAX bytes (the reference: non-empty, shorter than PATH_MAX).
SYMLINK_MAX = PATH_MAX - 1
U32_MAX = 0xFFFFFFFF
# mtime seconds are signed 64-bit, as the reference keeps them (int64_t) and as the
# image's u64 fields carry them, two's complement.
MTIME_MIN = -(2**63)
MTIME_MAX = 2**63 - 1
NSEC_MAX = 999_999_999
# Per-inode xattr budget of the reference writer: 12 bytes of header, then
# 2*4-1 bytes of worst-case overhead plus key and value for each attribute.
XATTR_BUDGET = 0xFFFF // 2
XATTR_NAME_MAX = 255
XATTR_VALUE_MAX = 0xFFFF


@dataclass(slots=True, eq=False)
class Inode:
    mode: int
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    rdev: int = 0
    mtime_sec: int = 0
    mtime_nsec: int = 0
    size: int = 0
    # Symlink target, or for regular files the object path ("ab/cdef...").
    payload: bytes | None = None
    # Inline content of a small regular file.
    content: bytes | None = None
    # Raw 32-byte fs-verity SHA-256 digest of a regular file's content.
    digest: Digest | None = None
    # Extended attributes, in the order they were given.
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    # Children of a directory, None for everything else.
    children: dict[bytes, Inode | Hardlink] | None = None

    @property
    def type(self) -> int:
        return self.mode & S_IFMT

    def is_dir(self) -> bool:
        return self.mode & S_IFMT == S_IFDIR

    def is_reg(self) -> bool:
        return self.mode & S_IFMT == S_IFREG

    def is_symlink(self) -> bool:
        return self.mode & S_IFMT == S_IFLNK

    def is_whiteout(self) -> bool:
        return self.mode & S_IFMT == S_IFCHR and self.rdev == 0


@dataclass(slots=True, eq=False)
class Hardlink:
    target: Inode


def new_dir(mode: int = 0o755, **kw: object) -> Inode:
    return Inode(mode=S_IFDIR | (mode & ~S_IFMT), children={}, **kw)  # type: ignore[arg-type]


def resolve(entry: Inode | Hardlink) -> Inode:
    return entry.target if isinstance(entry, Hardlink) else entry


def check_name(name: bytes) -> None:
    if not name:
        raise TreeError("empty file name")
    if name in (b".", b".."):
        raise TreeError(f"invalid file name {name!r}")
    if b"/" in name or b"\0" in name:
        raise TreeError(f"invalid file name {name!r}")
    if len(name) > NAME_MAX:
        raise TreeError(f"file name longer than {NAME_MAX} bytes: {name[:40]!r}...")


def xattr_cost(key: bytes, value: bytes) -> int:
    return 7 + len(key) + len(value)


def xattrs_size(xattrs: dict[bytes, bytes]) -> int:
    if not xattrs:
        return 0
    return 12 + sum(xattr_cost(k, v) for k, v in xattrs.items())


def check_xattr(key: bytes, value: bytes) -> None:
    if not key:
        raise TreeError("empty xattr name")
    if len(key) > XATTR_NAME_MAX:
        raise TreeError(f"xattr name longer than {XATTR_NAME_MAX} bytes: {key[:40]!r}...")
    if b"\0" in key:
        raise TreeError(f"xattr name contains NUL: {key!r}")
    if len(value) > XATTR_VALUE_MAX:
        raise TreeError(f"xattr {key!r} value longer than {XATTR_VALUE_MAX} bytes")


def check_xattrs_budget(xattrs: dict[bytes, bytes]) -> None:
    if xattrs_size(xattrs) > XATTR_BUDGET:
        raise TreeError(f"xattrs too large: {xattrs_size(xattrs)} bytes (limit {XATTR_BUDGET})")


def check_inode(node: Inode) -> None:
    """Refuse an inode that a manifest or an image cannot carry, or could not read back.

    The one check for every way into a tree: the directory scan, the tar reader and
    the manifest parser (names are checked by check_name, hardlinks where they are
    resolved).  The message does not name the entry: the caller knows its path."""
    mode, ftype, payload = node.mode, node.mode & S_IFMT, node.payload
    # Manifests run to a million lines: one comparison chain for the common case.
    if (ftype in VALID_TYPES and 0 <= mode <= U32_MAX and 0 <= node.uid <= U32_MAX
            and 0 <= node.gid <= U32_MAX and 0 <= node.nlink <= U32_MAX
            and MTIME_MIN <= node.mtime_sec <= MTIME_MAX and 0 <= node.mtime_nsec <= NSEC_MAX
            and 0 <= node.size < 2**64 and 0 <= node.rdev <= U32_MAX):
        pass
    elif ftype not in VALID_TYPES or not 0 <= mode <= U32_MAX:
        raise TreeError(f"invalid mode {mode:o}")
    else:
        for number, what, low, high in (
                (node.uid, "uid", 0, U32_MAX), (node.gid, "gid", 0, U32_MAX),
                (node.nlink, "nlink", 0, U32_MAX), (node.mtime_sec, "mtime", MTIME_MIN, MTIME_MAX),
                (node.mtime_nsec, "mtime nanoseconds", 0, NSEC_MAX), (node.size, "size", 0, 2**64 - 1),
                # The image stores a device number in 32 bits (the kernel's dev_t).
                (node.rdev, "device number", 0, U32_MAX)):
            if not low <= number <= high:
                raise TreeError(f"{what} {number} out of range ({low}..{high})")
    if node.rdev and ftype != S_IFCHR and ftype != S_IFBLK:
        raise TreeError("device number on a non-device")
    if ftype == S_IFLNK:
        if not payload:
            raise TreeError("symlink with an empty target")
        if len(payload) > SYMLINK_MAX:
            raise TreeError(f"symlink target longer than {SYMLINK_MAX} bytes")
        if node.size != len(payload):
            raise TreeError(f"symlink size {node.size} is not its target's length {len(payload)}")
    elif payload is not None and len(payload) >= PATH_MAX:
        raise TreeError(f"payload longer than {PATH_MAX - 1} bytes")
    if payload is not None and b"\0" in payload:
        raise TreeError("symlink target or payload contains NUL")
    content = node.content
    if content is not None:
        if len(content) != node.size:
            raise TreeError(f"content length {len(content)} does not match size {node.size}")
        if len(content) > INLINE_MAX:
            raise TreeError(f"inline content size {len(content)} exceeds maximum {INLINE_MAX}")
    if node.digest is not None and len(node.digest) != DIGEST_SIZE:
        raise TreeError(f"digest of {len(node.digest)} bytes (must be {DIGEST_SIZE})")
    if node.xattrs:
        for key, value in node.xattrs.items():
            check_xattr(key, value)
        check_xattrs_budget(node.xattrs)


def walk(root: Inode) -> Iterator[tuple[bytes, Inode | Hardlink]]:
    """Yield (path, entry) in pre-order, children sorted by name as bytes.

    The root's path is b"/"; other paths are b"/a/b".
    """
    yield b"/", root
    stack: list[tuple[bytes, Inode]] = [(b"", root)]
    # An explicit stack of iterators keeps deep trees off the Python call stack.
    iters = [iter(sorted(root.children or {}))]
    while iters:
        prefix, node = stack[-1]
        name = next(iters[-1], None)
        if name is None:
            iters.pop()
            stack.pop()
            continue
        entry = node.children[name]  # type: ignore[index]
        path = prefix + b"/" + name
        yield path, entry
        if isinstance(entry, Inode) and entry.children is not None:
            stack.append((path, entry))
            iters.append(iter(sorted(entry.children)))


def lookup(root: Inode, path: bytes) -> Inode | Hardlink | None:
    """The entry at an absolute path; hardlinks are never directories, so never traversed."""
    node: Inode | Hardlink = root
    for part in path.split(b"/"):
        if not part:
            continue
        if not isinstance(node, Inode) or node.children is None:
            return None
        nxt = node.children.get(part)
        if nxt is None:
            return None
        node = nxt
    return node


def digest_to_path(digest: bytes) -> bytes:
    """The object path of a digest: 'ab/cdef...' (first byte, '/', the other 31)."""
    h = digest.hex().encode()
    return h[:2] + b"/" + h[2:]


@contextmanager
def no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while building large acyclic object graphs:
    its repeated scans of the growing tree cost more than the work itself."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def fix_dir_nlinks(root: Inode) -> None:
    """Give every directory the link count the image will have: 2 + subdirectories
    (filesystems differ here, e.g. btrfs says 1, so a manifest must not copy it)."""
    for _, entry in walk(root):
        if isinstance(entry, Inode) and entry.children is not None:
            entry.nlink = 2 + sum(1 for c in entry.children.values()
                                  if isinstance(c, Inode) and c.children is not None)


def canonical_hardlinks(root: Inode) -> None:
    """Make the first name of each hardlinked inode in sorted pre-order its primary
    one (an archive may list the names in any order)."""
    places: dict[int, tuple[Inode, list[tuple[dict[bytes, Inode | Hardlink], bytes]]]] = {}
    top = root.children or {}
    stack: list[tuple[dict[bytes, Inode | Hardlink], Iterator[bytes]]] = [(top, iter(sorted(top)))]
    while stack:
        children, names = stack[-1]
        name = next(names, None)
        if name is None:
            stack.pop()
            continue
        entry = children[name]
        target = entry.target if isinstance(entry, Hardlink) else entry
        if target.children is not None:
            stack.append((target.children, iter(sorted(target.children))))
        else:
            places.setdefault(id(target), (target, []))[1].append((children, name))
    for target, locations in places.values():
        for i, (children, name) in enumerate(locations):
            children[name] = target if i == 0 else Hardlink(target)
