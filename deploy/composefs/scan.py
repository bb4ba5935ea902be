"""Read a directory tree from disk into the tree model, with full metadata.

Regular files over 64 bytes become external objects named by their fs-verity
digest (copied into an object store when one is given); smaller ones are inlined.
Hardlinks are found by (st_dev, st_ino); the first name in sorted pre-order is the
primary one.  Paths are bytes throughout: names need not be UTF-8.

The scan runs in two passes: a walk in sorted order that builds the whole tree
from lstat (and takes digests from a DigestCache where it may), then the reading
of the remaining files, shared between forked worker processes (threads would
serialize on the GIL: hashlib takes it for every 4 KiB block).  The result
depends only on the tree, never on the number of workers or the order of work.
A file that differs from what the walk saw, or changes while it is read, is an
error.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import multiprocessing
import os
import signal
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from ..util.errors import CfsError, TreeError
from . import fsverity
from .digestcache import DigestCache
from .fsverity import Digest
from .objects import ObjectStore, ObjectWriteError
from .tree import (
    INLINE_MAX_RECOMMENDED,
    Hardlink,
    Inode,
    check_inode,
    check_name,
    digest_to_path,
    fix_dir_nlinks,
)

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


@dataclass
class ScanStats:
    entries: int = 0
    files: int = 0
    file_bytes: int = 0  # the size of the regular files, in all
    objects_written: int = 0
    cache_hits: int = 0  # files whose digest came from the cache: not read
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
        out[name] = os.getxattr(path, name, follow_symlinks=False)
    return out


def _inode_from_stat(st: os.stat_result, xattrs: dict[bytes, bytes]) -> Inode:
    sec, nsec = divmod(st.st_mtime_ns, 1_000_000_000)
    # nlink counts names inside the tree only (see _Walk.entry); directories' are fixed after.
    return Inode(mode=st.st_mode, uid=st.st_uid, gid=st.st_gid, nlink=1,
                 rdev=st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0,
                 mtime_sec=sec, mtime_nsec=nsec, xattrs=xattrs)


def scan(top: str | bytes, *, store: ObjectStore | None = None,
         warn: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
         progress: Callable[[ScanStats], None] | None = None,
         threads: int | None = None, cache: DigestCache | None = None,
         identities: dict[bytes, tuple[int, int]] | None = None) -> tuple[Inode, ScanStats]:
    """Scan the directory `top` into a tree.  Sockets are skipped with a warning
    (they cannot be stored); anything unreadable raises TreeError naming the path.

    `threads` is how many files are read at once, by as many processes (default:
    one per CPU; one when this process has threads, which forking could deadlock).
    A digest from `cache` is used only if `store` (when given) holds its object;
    digests computed are put into the cache.  `identities`, if given, gets the
    (st_dev, st_ino) of every path scanned, `top` included, for a caller that reads
    the tree again and must know it reads what was scanned."""
    if threads is None:
        threads = len(os.sched_getaffinity(0))
    if threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")
    top_b = os.fsencode(top)
    stats = ScanStats()
    try:
        st = os.lstat(top_b)
    except OSError as e:
        raise TreeError(f"cannot read tree {os.fsdecode(top_b)}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise TreeError(f"not a directory: {os.fsdecode(top_b)}")
    if identities is not None:
        identities[top_b] = (st.st_dev, st.st_ino)
    root = _inode_from_stat(st, read_xattrs(top_b))
    root.children = {}
    root.size = 0
    try:
        check_inode(root)
    except TreeError as e:
        raise _named(top_b, e) from None
    walk = _Walk(store, cache, stats, identities)
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
            entry = walk.entry(path)
        except (OSError, CfsError) as e:
            raise _named(path, e) from None
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
    _read_files(walk.to_read, store, threads, cache, stats, progress)
    fix_dir_nlinks(root)
    return root, stats


def _named(path: bytes, e: OSError | CfsError) -> TreeError:
    """The error about `path` to report for `e`."""
    if isinstance(e, OSError):
        return TreeError(f"cannot read {os.fsdecode(path)}: {e.strerror}")
    return TreeError(f"{os.fsdecode(path)}: {e}")


def _listdir(path: bytes) -> list[bytes]:
    try:
        return sorted(os.listdir(path))
    except OSError as e:
        raise TreeError(f"cannot list {os.fsdecode(path)}: {e.strerror}") from None


class _Walk:
    """The first pass: one entry at a time from lstat; files to read are queued."""

    def __init__(self, store: ObjectStore | None, cache: DigestCache | None, stats: ScanStats,
                 identities: dict[bytes, tuple[int, int]] | None) -> None:
        self.store = store
        self.identities = identities
        self.cache = cache
        self.stats = stats
        self.seen: dict[tuple[int, int], Inode] = {}
        self.to_read: list[tuple[bytes, os.stat_result, Inode]] = []

    def entry(self, path: bytes) -> Inode | Hardlink | None:
        st = os.lstat(path)
        mode = st.st_mode
        if self.identities is not None:
            self.identities[path] = (st.st_dev, st.st_ino)
        if stat.S_ISSOCK(mode):
            return None
        if not stat.S_ISDIR(mode) and st.st_nlink > 1:
            primary = self.seen.get((st.st_dev, st.st_ino))
            if primary is not None:
                # Links from outside the tree are not counted: the manifest
                # depends on the tree alone.
                primary.nlink += 1
                return Hardlink(primary)
        node = _inode_from_stat(st, read_xattrs(path))
        if stat.S_ISDIR(mode):
            node.children = {}
        elif stat.S_ISLNK(mode):
            node.payload = os.readlink(path)
            node.size = len(node.payload)
        elif stat.S_ISREG(mode):
            self._file(path, st, node)
        check_inode(node)
        if not stat.S_ISDIR(mode) and st.st_nlink > 1:
            self.seen[(st.st_dev, st.st_ino)] = node
        return node

    def _file(self, path: bytes, st: os.stat_result, node: Inode) -> None:
        self.stats.files += 1
        self.stats.file_bytes += st.st_size
        node.size = st.st_size
        if st.st_size <= INLINE_MAX_RECOMMENDED:
            node.content = _read_small(path, st) or None
            return
        digest = self.cache.get(st) if self.cache is not None else None
        if digest is not None and (self.store is None or self.store.has(digest)):
            _set_digest(node, digest)
            self.stats.cache_hits += 1
        else:
            self.to_read.append((path, st, node))


def _set_digest(node: Inode, digest: Digest) -> None:
    node.digest = digest
    node.payload = digest_to_path(digest)


def _check_unchanged(seen: os.stat_result, now: os.stat_result) -> None:
    if (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns, now.st_ctime_ns) != (
            seen.st_dev, seen.st_ino, seen.st_size, seen.st_mtime_ns, seen.st_ctime_ns):
        raise TreeError("file changed while it was read")


def _open(path: bytes) -> int:
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY)


def _read_small(path: bytes, st: os.stat_result) -> bytes:
    fd = _open(path)
    try:
        _check_unchanged(st, os.fstat(fd))
        data = os.pread(fd, st.st_size + 1, 0)
        if len(data) != st.st_size:
            raise TreeError("file changed while it was read")
        _check_unchanged(st, os.fstat(fd))
        return data
    finally:
        os.close(fd)


def _digest_and_store(job: tuple[bytes, os.stat_result], store: ObjectStore | None) -> tuple[Digest, bool]:
    """The file's digest, and whether its object was new to the store."""
    path, st = job
    try:
        fd = _open(path)
        try:
            _check_unchanged(st, os.fstat(fd))
            # One CPU per file: the files themselves are shared between workers.
            digest = fsverity.digest_fd(fd, threads=1)
            written = store is not None and store.add_fd(fd, digest)
            _check_unchanged(st, os.fstat(fd))
            return digest, written
        finally:
            os.close(fd)
    except ObjectWriteError:
        raise  # the store's failure, not the file's
    except (OSError, CfsError) as e:
        raise _named(path, e) from None


def _die_with_parent(parent: int) -> None:
    # A worker must not outlive a killed commit: it holds the repository lock's fd.
    if _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0 or os.getppid() != parent:
        os._exit(1)


# Files handed to a worker at once: few enough to share the tail evenly.
_CHUNK = 16


def _read_files(jobs: list[tuple[bytes, os.stat_result, Inode]], store: ObjectStore | None,
                threads: int, cache: DigestCache | None, stats: ScanStats,
                progress: Callable[[ScanStats], None] | None) -> None:
    """The second pass: digest (and store) the queued files, `threads` at a time."""
    work = functools.partial(_digest_and_store, store=store)
    args = [(path, st) for path, st, _ in jobs]

    def collect(results: Iterable[tuple[Digest, bool]]) -> None:
        # In queue order, so the first failure reported is the first in the walk.
        for (_, st, node), (digest, written) in zip(jobs, results, strict=True):
            _set_digest(node, digest)
            stats.objects_written += written
            if cache is not None:
                cache.put(st, digest)
            if progress is not None:
                progress(stats)

    if threads == 1 or len(jobs) < 2 * _CHUNK or not fsverity.can_fork():
        collect(map(work, args))
        return
    pool = ProcessPoolExecutor(max_workers=threads, mp_context=multiprocessing.get_context("fork"),
                               initializer=_die_with_parent, initargs=(os.getpid(),))
    try:
        collect(pool.map(work, args, chunksize=_CHUNK))
    finally:
        pool.shutdown(cancel_futures=True)
