"""Crash-safe file writes (temp file, fsync, rename, fsync of the directory), and the
two ways into trees others can write: opening a path beneath a directory without
following any symlink, and removing a tree without ever following one."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import tempfile
from collections.abc import Callable, Iterator

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


class UnsafePathError(OSError):
    """A path beneath a directory cannot be opened without following a symlink, or
    names something outside it."""


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SYS_OPENAT2 = 437  # the same number on every architecture
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _parts(rel: bytes) -> list[bytes]:
    parts = [p for p in rel.split(b"/") if p]
    if not parts or b"\0" in rel or any(p in (b".", b"..") for p in parts):
        raise UnsafePathError(errno.EXDEV, "not a plain path beneath the directory", os.fsdecode(rel))
    return parts


def open_beneath(dirfd: int, rel: bytes, flags: int) -> int:
    """Open `rel` (a relative path of plain names) beneath the directory `dirfd`, with no
    symlink followed in any component: openat2(RESOLVE_NO_SYMLINKS|RESOLVE_BENEATH),
    or, where the kernel lacks it, a walk of directory fds opened with O_NOFOLLOW.
    A symlink anywhere on the way raises UnsafePathError (errno ELOOP)."""
    parts = _parts(rel)
    flags |= os.O_CLOEXEC | os.O_NOFOLLOW
    how = _OpenHow(flags, 0, _RESOLVE_NO_SYMLINKS | _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(_SYS_OPENAT2, dirfd, b"/".join(parts), ctypes.byref(how), ctypes.sizeof(how))
    if fd >= 0:
        return int(fd)
    err = ctypes.get_errno()
    if err == errno.ENOSYS:
        return open_beneath_walk(dirfd, rel, flags)
    raise _open_error(err, rel)


def open_beneath_walk(dirfd: int, rel: bytes, flags: int) -> int:
    """open_beneath for kernels without openat2: one component at a time."""
    parts = _parts(rel)
    fd = dirfd
    try:
        for part in parts[:-1]:
            nxt = _open_dir_nofollow(part, rel, fd)
            if fd != dirfd:
                os.close(fd)
            fd = nxt
        try:
            return os.open(parts[-1], flags | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=fd)
        except OSError as e:
            raise _open_error(e.errno or errno.EIO, rel) from None
    finally:
        if fd != dirfd:
            os.close(fd)


def _open_dir_nofollow(path: bytes, rel: bytes, dir_fd: int | None = None) -> int:
    try:
        return os.open(path, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        # O_DIRECTORY makes a symlink ENOTDIR: say which it was, as openat2 does.
        err = e.errno or errno.EIO
        if err == errno.ENOTDIR and stat.S_ISLNK(os.lstat(path, dir_fd=dir_fd).st_mode):
            err = errno.ELOOP
        raise _open_error(err, rel) from None


def _open_error(err: int, rel: bytes) -> OSError:
    if err in (errno.ELOOP, errno.EXDEV):
        return UnsafePathError(err, "a symlink is on the way", os.fsdecode(rel))
    return OSError(err, os.strerror(err), os.fsdecode(rel))


def remove_tree(path: PathLike, *, ignore_errors: bool = False) -> None:
    """Remove path and, if it is a directory, everything in it, following no symlink
    ever: a symlink (as path or inside) is unlinked as an entry, directories are
    entered through fds opened with O_NOFOLLOW|O_DIRECTORY, made writable (checkouts
    have read-only ones) only through those fds, and never across a mount.  A missing
    path is nothing to remove.  With ignore_errors, the first failure ends the removal
    quietly, leaving the rest."""
    path_b = os.path.abspath(os.fsencode(path))
    parent, name = os.path.split(path_b)
    try:
        # Not even the directory holding it may be a symlink (say deploy/<os> made one).
        pfd = _open_dir_nofollow(parent, parent)
    except FileNotFoundError:
        return
    except OSError:
        if ignore_errors:
            return
        raise
    try:
        _remove_entry(pfd, name)
    except FileNotFoundError:
        pass
    except OSError as e:
        if not ignore_errors:
            if e.filename is None:
                e.filename = os.fsdecode(path_b)
            raise
    finally:
        os.close(pfd)


def _remove_entry(pfd: int, name: bytes) -> None:
    """Remove name in pfd: unlink() never follows a symlink, and tells a directory
    (EISDIR), which is emptied through its own fd, depth first, then removed."""
    top = _unlink_or_open(pfd, name, None)
    if top is None:
        return
    dev = os.fstat(top).st_dev
    stack = [(pfd, name, top, _names(top))]
    try:
        while stack:
            parent_fd, dir_name, fd, names = stack[-1]
            child = next(names, None)
            if child is None:
                stack.pop()
                os.close(fd)
                os.rmdir(dir_name, dir_fd=parent_fd)
                continue
            child_fd = _unlink_or_open(fd, child, dev)
            if child_fd is not None:
                stack.append((fd, child, child_fd, _names(child_fd)))
    finally:
        for _, _, fd, _ in stack:
            os.close(fd)


def _unlink_or_open(pfd: int, name: bytes, dev: int | None) -> int | None:
    """Unlink name in pfd, or, for a directory, open it to be emptied.  What is swapped
    between the two (a directory for a symlink) is unlinked all the same."""
    for _ in range(2):
        try:
            os.unlink(name, dir_fd=pfd)
            return None
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            pass
        try:
            return _open_dir(pfd, name, dev)
        except OSError as e:
            if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
    raise OSError(errno.EAGAIN, "keeps changing between a directory and something else", os.fsdecode(name))


def _names(fd: int) -> Iterator[bytes]:
    # listdir() of an fd gives str names; bytes are the names themselves.
    return iter([os.fsencode(n) for n in os.listdir(fd)])


def _open_dir(pfd: int, name: bytes, dev: int | None) -> int:
    """Open the directory name in pfd to empty it, writable by its owner."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
    except PermissionError:
        # Not even readable (mode 0000, not root): make it so through an O_PATH fd of
        # that very directory, never through a path that could be swapped.
        path_fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            os.chmod(f"/proc/self/fd/{path_fd}", 0o700)
            fd = os.open(f"/proc/self/fd/{path_fd}", _DIR_FLAGS & ~os.O_NOFOLLOW)
        finally:
            os.close(path_fd)
    try:
        st = os.fstat(fd)
        if dev is not None and st.st_dev != dev:
            raise OSError(errno.EXDEV, "a mount point inside the tree: not removed", os.fsdecode(name))
        if st.st_mode & 0o700 != 0o700:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd
