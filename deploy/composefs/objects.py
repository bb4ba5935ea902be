"""The object store: file contents named by their fs-verity digest (objects/XX/YYYY...).

This is the composefs "basedir": an image's regular files redirect into it.
Objects are immutable, and a valid name never points at data that a crash could
lose or tear.  Alone, each new object is written to a temp file, fsynced and
renamed into place.  Inside a transaction (many objects at once, as a commit
writes), new objects go unsynced into a staging directory; when it ends, one
syncfs(2) makes them all durable before any is renamed into objects/, then the
directories renamed into are fsynced, all before the caller moves a ref (OSTree's
pattern: one flush instead of thousands of fsyncs).  A crash leaves staged
files in tmp/, which nothing names.  The staging directory itself is the record
of what was staged, so forked workers can add objects too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator

from ..util.errors import HostError
from ..util.fsutil import copy_fd, fsync_dir, remove_tree, syncfs
from . import fsverity

PathLike = str | bytes | os.PathLike[str]

# What a copy's failure means about its destination, not its source.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


class ObjectWriteError(HostError):
    """The store could not write an object: a full or read-only disk, say."""


def _write_error(directory: str, e: OSError) -> ObjectWriteError:
    return ObjectWriteError(f"cannot write an object in {directory}: {e.strerror or e}")


class ObjectStore:
    def __init__(self, path: PathLike, tmpdir: PathLike | None = None) -> None:
        self.path = os.fsdecode(path)
        self.tmpdir = os.fsdecode(tmpdir) if tmpdir is not None else self.path
        self._staging: str | None = None

    def path_of(self, digest: bytes) -> str:
        h = digest.hex()  # as tree.digest_to_path, without the bytes round trip (hot)
        return f"{self.path}/{h[:2]}/{h[2:]}"

    def has(self, digest: bytes) -> bool:
        """Present, or staged in the current transaction."""
        return os.path.exists(self.path_of(digest)) or (
            self._staging is not None and os.path.exists(os.path.join(self._staging, digest.hex())))

    def find(self, digest: bytes) -> str | None:
        """Where the object is: staged in the current transaction (not yet under its
        name), or present; None if neither."""
        if self._staging is not None:
            staged = os.path.join(self._staging, digest.hex())
            if os.path.exists(staged):
                return staged
        path = self.path_of(digest)
        return path if os.path.exists(path) else None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Stage the objects added inside; publish them durably when the block ends
        normally, drop them if it raises."""
        if self._staging is not None:
            raise RuntimeError("an object store transaction is already open")
        self._staging = tempfile.mkdtemp(prefix="staging-", dir=self.tmpdir)
        try:
            yield
            self._publish()
        finally:
            remove_tree(self._staging, ignore_errors=True)
            self._staging = None

    def _publish(self) -> None:
        assert self._staging is not None
        staged = [(os.path.join(self._staging, name), self.path_of(bytes.fromhex(name)))
                  for name in os.listdir(self._staging) if not name.startswith(".")]
        if not staged:
            return  # nothing to flush: a syncfs would only wait for others' writes
        for src, _ in staged:
            _enable_verity(src)
        syncfs(self._staging)
        parents: set[str] = set()
        created = False
        for src, dest in staged:
            parent = os.path.dirname(dest)
            if parent not in parents:
                parents.add(parent)
                try:
                    os.mkdir(parent)
                    created = True
                except FileExistsError:
                    pass
            os.rename(src, dest)
        # The renames (and new XX/ directories) durable too; fsyncs of just these
        # directories, not a second syncfs that would wait for others' writes.
        for parent in sorted(parents) + ([self.path] if created else []):
            fsync_dir(parent)

    def add_fd(self, src: int, digest: bytes) -> bool:
        """Store the content of `src` (whose digest the caller computed) unless present.

        Returns True if a new object was written."""
        if self.has(digest):
            return False
        return self._place(self._write_temp(lambda fd: copy_fd(src, fd)), digest)

    def add_bytes(self, data: bytes) -> fsverity.Digest:
        """Store a buffer (e.g. an image) and return its digest."""
        digest = fsverity.digest_bytes(data)
        if not self.has(digest):

            def fill(fd: int) -> None:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]

            self._place(self._write_temp(fill), digest)
        return digest

    def add_stream(self, read: Callable[[int], bytes], size: int) -> fsverity.Digest:
        """Store `size` bytes from `read` (hashed as they are written); return the digest."""
        hasher = fsverity.Hasher()

        def fill(fd: int) -> None:
            left = size
            while left:
                chunk = read(min(1 << 20, left))
                if not chunk:
                    raise EOFError("input ended early")
                hasher.update(chunk)
                os.write(fd, chunk)
                left -= len(chunk)

        tmp = self._write_temp(fill)
        digest = hasher.digest()
        self._place(tmp, digest)
        return digest

    def _write_temp(self, fill: Callable[[int], None]) -> str:
        """A new temp file (in the staging directory during a transaction) filled by
        `fill`, read-only for everyone, fsynced unless staged."""
        # The dot keeps temp files apart from staged objects (named by digest).
        directory = self._staging or self.tmpdir
        try:
            try:
                fd, tmp = tempfile.mkstemp(prefix=".obj-", dir=directory)
            except FileNotFoundError:  # a new store: its directory comes with the first object
                os.makedirs(directory, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".obj-", dir=directory)
        except OSError as e:
            raise _write_error(directory, e) from None
        try:
            try:
                try:
                    fill(fd)
                except OSError as e:
                    # The rest (a source that cannot be read) is the caller's to name.
                    if e.errno in _WRITE_ERRNOS:
                        raise _write_error(directory, e) from None
                    raise
                try:
                    os.fchmod(fd, 0o644)
                    if self._staging is None:
                        os.fsync(fd)
                except OSError as e:
                    raise _write_error(directory, e) from None
            finally:
                os.close(fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return tmp

    def _place(self, tmp: str, digest: bytes) -> bool:
        """Give the temp file its name (staged, or in objects/); False, and the temp
        file removed, if that object already exists."""
        try:
            if self.has(digest):
                os.unlink(tmp)
                return False
            if self._staging is None:
                return self.adopt(tmp, digest)
            try:  # link, not rename: exactly one of two writers of the same object wins
                os.link(tmp, os.path.join(self._staging, digest.hex()))
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            return True
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def adopt(self, path: str, digest: bytes, *, sync_dir: bool = True) -> bool:
        """Move a complete file, already durable on the store's filesystem and checked
        to be object `digest`, into place (or drop it if that object exists).  Without
        sync_dir the caller makes the rename durable.  True if a new object was added."""
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


def _enable_verity(path: str) -> None:
    # fs-verity needs a file with no writers; enable it before the object is visible.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fsverity.try_enable_verity(fd)
    finally:
        os.close(fd)
