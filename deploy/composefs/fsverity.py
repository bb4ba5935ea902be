"""fs-verity SHA-256 digests (4096-byte blocks, no salt), exactly as `fsverity digest`
and the kernel compute them, and the ioctls that enable and measure fs-verity.

The Merkle tree: level 0 hashes each data block (the last one zero-padded); each
higher level hashes 4096-byte blocks of 128 hashes of the level below (the last
block zero-padded) until one hash remains, the root.  A file of one block has its
block's hash as root, an empty file an all-zero root.  The file digest is the
SHA-256 of a 256-byte descriptor holding the root hash and the file size.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import os
import signal
import stat
import string
import struct
import threading
from collections.abc import Callable, Generator
from typing import BinaryIO

from ..util.errors import CfsError, VerityError, VerityHostError, VerityUsageError
from ..util.fsutil import data_extents

BLOCK = 4096
HASH_SIZE = 32


class DigestError(CfsError, ValueError):
    """Text or bytes that are not a SHA-256 fs-verity digest."""


class Digest(bytes):
    """An fs-verity SHA-256 digest: exactly 32 bytes.  It is its bytes (equal to,
    hashed as, and usable wherever raw bytes are), with the hex form digests take
    in trailers, JSON and kernel arguments, and the object path they name."""

    __slots__ = ()

    def __new__(cls, raw: bytes | bytearray | memoryview) -> Digest:
        if len(raw) != HASH_SIZE:
            raise DigestError(f"a digest is {HASH_SIZE} bytes, not {len(raw)}")
        return super().__new__(cls, raw)

    @classmethod
    def from_hex(cls, text: str) -> Digest:
        """The digest of 64 hex digits (written lowercase, read in either case)."""
        if len(text) != 2 * HASH_SIZE or not all(c in string.hexdigits for c in text):
            raise DigestError(f"not a digest: {text[:80]!r} (64 hex digits)")
        return cls(bytes.fromhex(text))

    def object_path(self) -> str:
        """Its path in an object store: 'ab/cdef...' (the first byte, '/', the other 31)."""
        h = self.hex()
        return f"{h[:2]}/{h[2:]}"
HASHES_PER_BLOCK = BLOCK // HASH_SIZE
FS_VERITY_HASH_ALG_SHA256 = 1

_sha256 = hashlib.sha256
_digest_of = type(_sha256()).digest
# Reads go through a buffer this big: large enough that syscalls cost nothing,
# small enough to stay in cache while it is hashed.
_CHUNK = 1 << 20
# Unit of work shared out between workers; a pipe holds two pieces' hashes.
_PIECE = 4 << 20
# Below this much data a worker process costs more than it saves (measured).
_PARALLEL_MIN = 16 << 20
# Default worker cap: each is a process, and the gain past 2 is unmeasured.
_MAX_WORKERS = 4



def _zero_subtree_hashes(heights: int) -> list[bytes]:
    hashes = [_sha256(bytes(BLOCK)).digest()]
    while len(hashes) < heights:
        hashes.append(_sha256(hashes[-1] * HASHES_PER_BLOCK).digest())
    return hashes


# Root hashes of all-zero subtrees, by height, so holes are neither read nor hashed.
# Eight heights cover the largest possible file (2**63 bytes, 128**7.3 blocks).
_ZERO_HASHES = _zero_subtree_hashes(8)

# struct fsverity_descriptor, the input of the file digest.
_DESCRIPTOR = struct.Struct("<BBBBIQ64s32s144x")
# struct fsverity_enable_arg (native byte order): version, hash_algorithm,
# block_size, salt_size, salt_ptr, sig_size, __reserved1, sig_ptr, __reserved2[11].
_ENABLE_ARG = struct.Struct("=IIIIQIIQ88x")
# struct fsverity_digest header: digest_algorithm, digest_size; digest[] follows.
_DIGEST_HEADER = struct.Struct("=HH")


def _ioc(direction: int, nr: int, size: int) -> int:
    # The asm-generic _IOC layout (x86, arm, riscv...): dir:2 size:14 type:8 nr:8.
    return direction << 30 | size << 16 | ord("f") << 8 | nr


_IOC_WRITE, _IOC_READ = 1, 2
FS_IOC_ENABLE_VERITY = _ioc(_IOC_WRITE, 133, _ENABLE_ARG.size)  # 0x40806685
FS_IOC_MEASURE_VERITY = _ioc(_IOC_READ | _IOC_WRITE, 134, _DIGEST_HEADER.size)  # 0xc0046686


def _hash_blocks(view: memoryview) -> bytes:
    """The SHA-256 of each 4096-byte block of `view` (a whole number of blocks), joined."""
    # map() over C functions: no bytecode runs per block.
    blocks = [view[i:i + BLOCK] for i in range(0, len(view), BLOCK)]
    return b"".join(map(_digest_of, map(_sha256, blocks)))


class _Tree:
    """The Merkle tree above level 0, fed level-0 hashes in order.  Each level keeps
    only its unfinished hash block, so memory stays a few KiB whatever the size."""

    def __init__(self) -> None:
        self._pending: list[bytearray] = []
        self._counts: list[int] = []  # hashes ever added, per level

    def _level(self, level: int) -> bytearray:
        if level == len(self._pending):
            self._pending.append(bytearray())
            self._counts.append(0)
        return self._pending[level]

    def add(self, hashes: bytes, level: int = 0) -> None:
        pending = self._level(level)
        self._counts[level] += len(hashes) // HASH_SIZE
        pending += hashes
        full = len(pending) - len(pending) % BLOCK
        if full:
            with memoryview(pending) as view:
                parents = _hash_blocks(view[:full])
            del pending[:full]
            self.add(parents, level + 1)

    def add_zeros(self, n: int, level: int = 0) -> None:
        """Add the root hashes of `n` all-zero subtrees of height `level`."""
        pending = self._level(level)
        if pending:  # complete the unfinished block, if n is enough to
            first = min(n, (BLOCK - len(pending)) // HASH_SIZE)
            self.add(_ZERO_HASHES[level] * first, level)
            n -= first
        # Whole blocks of zero hashes are zero subtrees one level up: no hashing.
        blocks, rest = divmod(n, HASHES_PER_BLOCK)
        if blocks:
            self._counts[level] += blocks * HASHES_PER_BLOCK
            self.add_zeros(blocks, level + 1)
        if rest:
            self.add(_ZERO_HASHES[level] * rest, level)

    def root(self, last: bytes = b"") -> bytes:
        """The root hash once `last` (a final level-0 hash, or nothing) is added;
        the tree itself is left unchanged."""
        carry = last
        for pending, count in zip(self._pending, self._counts, strict=True):
            hashes = bytes(pending) + carry
            if count + len(carry) // HASH_SIZE == 1:
                return hashes
            carry = _sha256(hashes.ljust(BLOCK, b"\0")).digest() if hashes else b""
        return carry or bytes(HASH_SIZE)


def _file_digest(root: bytes, size: int) -> Digest:
    log_blocksize = BLOCK.bit_length() - 1
    descriptor = _DESCRIPTOR.pack(1, FS_VERITY_HASH_ALG_SHA256, log_blocksize, 0, 0, size,
                                  root, b"")
    return Digest(_sha256(descriptor).digest())


class Hasher:
    """Streaming fs-verity digest of content fed in pieces of any size, e.g. a file
    as it is written; update() may follow digest()."""

    def __init__(self) -> None:
        self._tree = _Tree()
        self._partial = bytearray()  # the unfinished last block
        self._size = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._size += len(view)
        if self._partial:
            take = min(len(view), BLOCK - len(self._partial))
            self._partial += view[:take]
            view = view[take:]
            if len(self._partial) < BLOCK:
                return
            self._tree.add(_sha256(self._partial).digest())
            self._partial.clear()
        full = len(view) - len(view) % BLOCK
        # A chunk at a time, so the list of block views stays small.
        for i in range(0, full, _CHUNK):
            self._tree.add(_hash_blocks(view[i:min(i + _CHUNK, full)]))
        self._partial += view[full:]

    def digest(self) -> Digest:
        """The raw 32-byte digest of everything fed so far."""
        last = _sha256(self._partial.ljust(BLOCK, b"\0")).digest() if self._partial else b""
        return _file_digest(self._tree.root(last), self._size)


def digest_bytes(data: bytes | bytearray | memoryview) -> Digest:
    """The raw 32-byte fs-verity digest of a buffer."""
    hasher = Hasher()
    hasher.update(data)
    return hasher.digest()


def _pread_exactly(fd: int, view: memoryview, offset: int) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise VerityError("the file shrank while its fs-verity digest was computed")
        got += n


class _RangeHasher:
    """Level-0 hashes of block-aligned byte ranges of a file, read through one
    reused buffer (one per worker)."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self._size = size
        self._view = memoryview(bytearray(_CHUNK))
        self._blocks = [self._view[i:i + BLOCK] for i in range(0, _CHUNK, BLOCK)]

    def __call__(self, start: int, end: int) -> bytes:
        end = min(end, self._size)
        out = []
        for offset in range(start, end, _CHUNK):
            n = min(_CHUNK, end - offset)
            _pread_exactly(self._fd, self._view[:n], offset)
            nblocks = -(-n // BLOCK)
            self._view[n:nblocks * BLOCK] = bytes(nblocks * BLOCK - n)  # pad the file's last block
            out.append(b"".join(map(_digest_of, map(_sha256, self._blocks[:nblocks]))))
        return b"".join(out)


def _plan(fd: int, size: int) -> list[tuple[int, int, bool]]:
    """Block-aligned (start, end, is_data) runs covering the file; data runs are cut
    into pieces of at most _PIECE bytes, holes are left whole."""
    runs: list[tuple[int, int, bool]] = []
    covered = 0
    total = -(-size // BLOCK) * BLOCK
    for start, end in data_extents(fd, size):
        start = max(start - start % BLOCK, covered)
        end = min(-(-end // BLOCK) * BLOCK, total)
        if start >= end:
            continue
        if start > covered:
            runs.append((covered, start, False))
        runs.extend((s, min(s + _PIECE, end), True) for s in range(start, end, _PIECE))
        covered = end
    if covered < total:
        runs.append((covered, total, False))
    return runs


def _produce(hasher: _RangeHasher, pieces: list[tuple[int, int]], out: BinaryIO) -> None:
    """A worker: write the level-0 hashes of `pieces`, in order, into the pipe `out`."""
    # On any error just stop: the reader hashes the missing pieces itself, and so
    # meets the error (if it is real) where it can be raised.
    with contextlib.suppress(Exception), out:
        for start, end in pieces:
            out.write(hasher(start, end))


def can_fork() -> bool:
    # Forking a process that has other threads can deadlock the child on a lock
    # one of them held.
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def _kill_and_reap(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):  # SIGCHLD ignored: already reaped
        os.waitpid(pid, 0)


def _level0(fd: int, size: int, pieces: list[tuple[int, int]], workers: int) -> Generator[bytes]:
    """The level-0 hashes of each piece, in order.

    Worker k of n hashes pieces k, k+n, k+2n... into its own pipe; the caller is
    worker 0 and reads the others' pipes in turn.  Extra workers are forked
    processes, which scale with cores (hashlib holds the GIL for about 1 µs of
    each block's 4, so two threads reach 1.5x, two processes 1.9x), or threads
    when this process has other threads and so cannot fork safely."""
    hasher = _RangeHasher(fd, size)
    fork = workers > 1 and can_fork()
    pipes: list[BinaryIO] = []
    stops: list[Callable[[], None]] = []
    try:
        for k in range(1, workers):
            r, w = os.pipe()
            pipes.append(open(r, "rb"))
            out = open(w, "wb")
            mine = pieces[k::workers]
            if fork:
                pid = os.fork()
                if pid == 0:
                    try:  # the child's copy of `hasher` is its own
                        _produce(hasher, mine, out)
                    finally:
                        os._exit(0)
                out.close()
                stops.append(functools.partial(_kill_and_reap, pid))
            else:
                thread = threading.Thread(target=_produce, daemon=True,
                                          args=(_RangeHasher(fd, size), mine, out))
                thread.start()
                stops.append(thread.join)
        for i, (start, end) in enumerate(pieces):
            k = i % workers
            if k == 0:
                yield hasher(start, end)
                continue
            want = (end - start) // BLOCK * HASH_SIZE
            hashes = pipes[k - 1].read(want)
            # A short read means the worker stopped (an error, or killed): do its share.
            yield hashes if len(hashes) == want else hasher(start, end)
    finally:
        for pipe in pipes:  # a thread still writing now fails with EPIPE and ends
            pipe.close()
        for stop in stops:
            stop()


def _worker_count(threads: int | None, data_size: int, pieces: int) -> int:
    if threads is None:
        threads = (min(_MAX_WORKERS, len(os.sched_getaffinity(0)))
                   if data_size >= _PARALLEL_MIN else 1)
    return max(1, min(threads, pieces))


def digest_fd(fd: int, *, threads: int | None = None) -> Digest:
    """The raw 32-byte fs-verity digest of a regular file's whole content.

    Reads with pread from offset 0 (the fd's offset is left as it was) and skips
    holes.  `threads` is how many CPUs to use; by default all available (up to 4)
    for files with at least 16 MiB of data, else one."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise VerityUsageError("fs-verity digests exist only for regular files")
    size = st.st_size
    if size <= _CHUNK:  # most files: no extent map, no buffers to set up
        content = bytearray(size)
        _pread_exactly(fd, memoryview(content), 0)
        return digest_bytes(content)
    offset = os.lseek(fd, 0, os.SEEK_CUR)
    try:
        runs = _plan(fd, size)
    finally:  # SEEK_DATA/SEEK_HOLE moved it
        os.lseek(fd, offset, os.SEEK_SET)
    pieces = [(start, end) for start, end, is_data in runs if is_data]
    workers = _worker_count(threads, sum(end - start for start, end in pieces), len(pieces))
    tree = _Tree()
    with contextlib.closing(_level0(fd, size, pieces, workers)) as hashes:
        for start, end, is_data in runs:
            if is_data:
                tree.add(next(hashes))
            else:
                tree.add_zeros((end - start) // BLOCK)
    return _file_digest(tree.root(), size)


def digest_file(path: str | bytes | os.PathLike[str] | os.PathLike[bytes], *,
                threads: int | None = None) -> Digest:
    """The raw 32-byte fs-verity digest of the file at `path` (see digest_fd)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return digest_fd(fd, threads=threads)
    finally:
        os.close(fd)


def format_digest(raw: bytes) -> str:
    """A raw digest as `fsverity digest` prints it: "sha256:<lowercase hex>"."""
    return "sha256:" + raw.hex()


def _explain(e: OSError, action: str) -> str:
    name = errno.errorcode.get(e.errno or 0, str(e.errno))
    if e.errno == errno.ENOTTY:
        return f"cannot {action}: this filesystem does not implement fs-verity (ENOTTY)"
    if e.errno == errno.EOPNOTSUPP:
        return (f"cannot {action}: fs-verity is not supported here (EOPNOTSUPP): the kernel "
                "needs CONFIG_FS_VERITY, and ext4/f2fs need the verity feature "
                "(mkfs.ext4 -O verity, or tune2fs -O verity)")
    if e.errno == errno.EINVAL:
        return (f"cannot {action}: SHA-256 with 4096-byte blocks was rejected (EINVAL); "
                "ext4 needs 4096-byte filesystem blocks as well as the verity feature")
    if e.errno == errno.ETXTBSY:
        return (f"cannot {action}: the file is open for writing (ETXTBSY); fs-verity needs "
                "a read-only fd and no writable fd or shared writable mapping of the file")
    if e.errno == errno.EACCES:
        return f"cannot {action}: enabling fs-verity needs write permission on the file (EACCES)"
    return f"cannot {action}: {e.strerror} ({name})"


def enable_verity(fd: int) -> None:
    """Enable fs-verity (SHA-256, 4096-byte blocks, no salt) on a file opened
    read-only, with no writable fd open anywhere; already enabled counts as done."""
    arg = _ENABLE_ARG.pack(1, FS_VERITY_HASH_ALG_SHA256, BLOCK, 0, 0, 0, 0, 0)
    try:
        fcntl.ioctl(fd, FS_IOC_ENABLE_VERITY, arg)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise VerityHostError(_explain(e, "enable fs-verity")) from None


def try_enable_verity(fd: int) -> bool:
    """Enable fs-verity where possible; False (instead of an error) where not."""
    try:
        enable_verity(fd)
    except VerityError:
        return False
    return True


def measure_verity(fd: int) -> bytes:
    """The raw digest the kernel holds for a file with fs-verity enabled."""
    buf = bytearray(_DIGEST_HEADER.pack(0, 64) + bytes(64))  # 64: room for any algorithm
    try:
        fcntl.ioctl(fd, FS_IOC_MEASURE_VERITY, buf)
    except OSError as e:
        if e.errno == errno.ENODATA:
            raise VerityHostError("cannot measure fs-verity: it is not enabled on this file "
                                  "(ENODATA)") from None
        raise VerityHostError(_explain(e, "measure fs-verity")) from None
    algorithm, size = _DIGEST_HEADER.unpack_from(buf)
    if algorithm != FS_VERITY_HASH_ALG_SHA256:
        raise VerityError(f"the file's fs-verity uses hash algorithm {algorithm}, not SHA-256")
    return bytes(buf[_DIGEST_HEADER.size:_DIGEST_HEADER.size + size])
