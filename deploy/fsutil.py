"""Crash-safe file writes: temp file, fsync, rename, fsync of the directory."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import tempfile
from typing import Callable

FICLONE = 0x40049409

PathLike = str | bytes | os.PathLike[str] | os.PathLike[bytes]

_libc = ctypes.CDLL(None, use_errno=True)


def fsync_dir(path: PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: PathLike) -> None:
    """Flush everything written to the filesystem holding `path` (syncfs(2)): one
    call instead of an fsync per file, for many files written at once."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), os.fsdecode(path))
    finally:
        os.close(fd)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(a: PathLike, b: PathLike) -> None:
    """Swap two paths in one step (renameat2 RENAME_EXCHANGE): a crash leaves each
    where it was or both swapped.  Fsync both parent directories after."""
    if _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fsdecode(b))


def atomic_write(path: PathLike, write: Callable[[int], None], *, mode: int = 0o644,
                 tmpdir: PathLike | None = None) -> None:
    """Create `path` atomically: `write(fd)` fills a temp file (beside it, or in
    `tmpdir` on the same filesystem), which is fsynced, renamed over `path`, and the
    directory fsynced.
    On any error the temp file is removed and `path` is untouched."""
    path = os.fsdecode(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)[:32]}.", suffix=".tmp",
                               dir=os.fsdecode(tmpdir) if tmpdir is not None else directory)
    try:
        try:
            write(fd)
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)


def atomic_write_bytes(path: PathLike, data: bytes, *, mode: int = 0o644,
                       tmpdir: PathLike | None = None) -> None:
    def write(fd: int) -> None:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]

    atomic_write(path, write, mode=mode, tmpdir=tmpdir)


def copy_fd(src: int, dst: int) -> None:
    """Copy a whole file: reflink where the filesystem can, else copy_file_range over
    the data extents only, so sparse files stay sparse."""
    try:
        fcntl.ioctl(dst, FICLONE, src)
        return
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EBADF):
            raise
    size = os.fstat(src).st_size
    for start, end in data_extents(src, size):
        _copy_range(src, dst, start, end)
    os.ftruncate(dst, size)


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The [start, end) ranges of a file that hold data (all of it where holes are unknown)."""
    extents = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            extents.append((start, end))
            pos = end
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        return [(0, size)] if size else []
    return extents


def _copy_range(src: int, dst: int, offset: int, end: int) -> None:
    while offset < end:
        try:
            n = os.copy_file_range(src, dst, end - offset, offset, offset)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            n = 0
        if n == 0:
            # Plain reads where copy_file_range can't (some filesystems return 0).
            chunk = os.pread(src, min(1 << 20, end - offset), offset)
            if not chunk:
                raise OSError(errno.EIO, "file shrank while it was copied")
            n = os.pwrite(dst, chunk, offset)
        offset += n


def force_rmtree(path: PathLike, *, ignore_errors: bool = False) -> None:
    """Remove a tree even where directories were made read-only (e.g. a checkout)."""
    for top, dirnames, _ in os.walk(path):
        for d in dirnames:
            try:
                os.chmod(os.path.join(top, d), 0o700)
            except OSError:
                pass
    shutil.rmtree(path, ignore_errors=ignore_errors)
