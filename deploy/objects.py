"""The object store: file contents named by their fs-verity digest (objects/XX/YYYY...).

This is the composefs "basedir": an image's regular files redirect into it.
Objects are immutable; a new one is written to a temp file on the same filesystem,
fsynced, and renamed into place, so a crash never leaves a half-written object
under a valid name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Callable, Iterable

from . import fsverity
from .fsutil import atomic_write, copy_fd, fsync_dir
from .tree import digest_to_path

PathLike = str | bytes | os.PathLike[str]


class ObjectStore:
    def __init__(self, path: PathLike, tmpdir: PathLike | None = None) -> None:
        self.path = os.fsdecode(path)
        self.tmpdir = os.fsdecode(tmpdir) if tmpdir is not None else self.path

    def path_of(self, digest: bytes) -> str:
        return os.path.join(self.path, os.fsdecode(digest_to_path(digest)))

    def has(self, digest: bytes) -> bool:
        return os.path.exists(self.path_of(digest))

    def missing(self, digests: Iterable[bytes]) -> list[bytes]:
        """Those of `digests` not in the store: one directory listing per XX/ instead of
        a lookup per object."""
        by_dir: dict[str, list[bytes]] = {}
        for d in digests:
            by_dir.setdefault(d[:1].hex(), []).append(d)
        out = []
        for sub, wanted in by_dir.items():
            try:
                present = set(os.listdir(os.path.join(self.path, sub)))
            except FileNotFoundError:
                present = set()
            out += [d for d in wanted if d[1:].hex() not in present]
        return out

    def add_fd(self, src: int, digest: bytes) -> bool:
        """Store the content of `src` (whose digest the caller computed) unless present.

        Returns True if a new object was written."""
        return self._add(digest, lambda fd: copy_fd(src, fd))

    def add_bytes(self, data: bytes) -> bytes:
        """Store a buffer (e.g. an image) and return its digest."""
        digest = fsverity.digest_bytes(data)

        def fill(fd: int) -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]

        self._add(digest, fill)
        return digest

    def add_stream(self, read: Callable[[int], bytes], size: int) -> bytes:
        """Store `size` bytes from `read` (hashed as they are written); return the digest."""
        hasher = fsverity.Hasher()
        fd, tmp = tempfile.mkstemp(prefix=".obj-", dir=self.tmpdir)
        try:
            try:
                left = size
                while left:
                    chunk = read(min(1 << 20, left))
                    if not chunk:
                        raise EOFError("input ended early")
                    hasher.update(chunk)
                    os.write(fd, chunk)
                    left -= len(chunk)
                os.fchmod(fd, 0o644)
                os.fsync(fd)
            finally:
                os.close(fd)
            digest = hasher.digest()
            self.adopt(tmp, digest)
            return digest
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def adopt(self, path: str, digest: bytes, *, sync_dir: bool = True) -> bool:
        """Move a complete file, already on disk (fsynced), from the store's filesystem
        into place as object `digest` (which the caller checked it is), or drop it if
        that object exists.  Without sync_dir the caller makes the rename durable.

        Returns True if a new object was added."""
        dest = self.path_of(digest)
        if os.path.exists(dest):
            os.unlink(path)
            return False
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        _enable_verity(path)
        os.rename(path, dest)
        if sync_dir:
            fsync_dir(os.path.dirname(dest))
        return True

    def _add(self, digest: bytes, fill: Callable[[int], None]) -> bool:
        dest = self.path_of(digest)
        if os.path.exists(dest):
            return False
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        atomic_write(dest, fill, tmpdir=self.tmpdir, before_rename=_enable_verity)
        return True


def _enable_verity(path: str) -> None:
    # fs-verity needs a file with no writers; enable it before the object is visible.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fsverity.try_enable_verity(fd)
    finally:
        os.close(fd)
