"""fs-verity SHA-256 digests (4096-byte blocks, no salt), as `fsverity digest` and the
kernel compute them, and the ioctls that enable and measure fs-verity on a file.

The Merkle tree: level 0 hashes each data block (the last one zero-padded); each
higher level hashes 4096-byte groups of 128 hashes of the level below, until one
hash remains, the root (a file of at most one block has its block's hash as root,
an empty file an all-zero root).  The digest is the SHA-256 of a 256-byte
descriptor holding the root hash and the file size.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
from concurrent.futures import ThreadPoolExecutor

from .errors import VerityError
from .fsutil import data_extents

BLOCK = 4096
HASH_SIZE = 32
_ZERO_HASH = hashlib.sha256(bytes(BLOCK)).digest()
_CHUNK = 1 << 20
# Below this, a second thread costs more than it saves.
_PARALLEL_MIN = 64 << 20

FS_IOC_ENABLE_VERITY = 0x40806685
FS_IOC_MEASURE_VERITY = 0xC0046686
FS_VERITY_HASH_ALG_SHA256 = 1
# struct fsverity_enable_arg: version, hash_algorithm, block_size, salt_size,
# salt_ptr, sig_size, reserved, sig_ptr, reserved[11]
_ENABLE_ARG = struct.Struct("<IIIIQIIQ88x")
_DESCRIPTOR = struct.Struct("<BBBBIQ64s32s144x")


def _root_hash(level: bytes, size: int) -> bytes:
    if size == 0:
        return bytes(HASH_SIZE)
    while len(level) > HASH_SIZE:
        sha = hashlib.sha256
        view = memoryview(level)
        out = []
        for i in range(0, len(level), BLOCK):
            block = view[i:i + BLOCK]
            out.append(sha(block).digest() if len(block) == BLOCK
                       else sha(bytes(block) + bytes(BLOCK - len(block))).digest())
        level = b"".join(out)
    return level


def _digest(level0: bytes, size: int) -> bytes:
    desc = _DESCRIPTOR.pack(1, FS_VERITY_HASH_ALG_SHA256, 12, 0, 0, size,
                            _root_hash(level0, size), b"")
    return hashlib.sha256(desc).digest()


def _hash_blocks(data: bytes | bytearray | memoryview) -> bytes:
    """Level-0 hashes of a buffer; its last block is zero-padded."""
    sha = hashlib.sha256
    view = memoryview(data)
    n = len(view)
    full = n - n % BLOCK
    out = [sha(view[i:i + BLOCK]).digest() for i in range(0, full, BLOCK)]
    if full < n:
        out.append(sha(bytes(view[full:]) + bytes(BLOCK - (n - full))).digest())
    return b"".join(out)


def digest_bytes(data: bytes | bytearray | memoryview) -> bytes:
    """The raw 32-byte fs-verity digest of a buffer."""
    return _digest(_hash_blocks(data), len(data))


class Hasher:
    """Streaming digest, for content being written: update() in any pieces."""

    def __init__(self) -> None:
        self._pending = bytearray()
        self._level0: list[bytes] = []
        self._size = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._size += len(data)
        self._pending += data
        full = len(self._pending) - len(self._pending) % BLOCK
        if full:
            self._level0.append(_hash_blocks(memoryview(self._pending)[:full]))
            del self._pending[:full]

    def digest(self) -> bytes:
        tail = _hash_blocks(self._pending) if self._pending else b""
        return _digest(b"".join(self._level0) + tail, self._size)


def _level0_range(fd: int, start: int, end: int, size: int) -> bytes:
    """Level-0 hashes of blocks [start, end) (byte offsets, block-aligned), reading
    only data extents: holes hash as zero blocks without being read."""
    out = []
    pos = start
    buf = bytearray(_CHUNK)
    for ext_start, ext_end in data_extents(fd, size):
        ext_start = max(ext_start - ext_start % BLOCK, pos)
        ext_end = min(ext_end + -ext_end % BLOCK, end)
        if ext_start >= ext_end:
            continue
        out.append(_ZERO_HASH * ((ext_start - pos) // BLOCK))
        off = ext_start
        while off < ext_end:
            want = min(_CHUNK, ext_end - off)
            n = os.preadv(fd, [memoryview(buf)[:want]], off)
            if n <= 0:
                break
            out.append(_hash_blocks(memoryview(buf)[:n]))
            off += n
            if n < want:
                break
        pos = ext_end
    if pos < end:
        out.append(_ZERO_HASH * ((end - pos) // BLOCK))
    return b"".join(out)


def digest_fd(fd: int, *, threads: int | None = None) -> bytes:
    """The raw fs-verity digest of a file's whole content (the fd offset is unused)."""
    size = os.fstat(fd).st_size
    nblocks = -(-size // BLOCK)
    if threads is None:
        threads = min(2, os.cpu_count() or 1) if size >= _PARALLEL_MIN else 1
    if threads <= 1 or nblocks < 2 * threads:
        return _digest(_level0_range(fd, 0, nblocks * BLOCK, size), size)
    # hashlib releases the GIL on each block, so threads hash in parallel.
    per = -(-nblocks // threads) * BLOCK
    bounds = [(i, min(i + per, nblocks * BLOCK)) for i in range(0, nblocks * BLOCK, per)]
    with ThreadPoolExecutor(threads) as pool:
        parts = pool.map(lambda b: _level0_range(fd, b[0], b[1], size), bounds)
        return _digest(b"".join(parts), size)


def digest_file(path: str | bytes | os.PathLike[str], *, threads: int | None = None) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return digest_fd(fd, threads=threads)
    finally:
        os.close(fd)


def format_digest(raw: bytes) -> str:
    return "sha256:" + raw.hex()


def _unsupported(e: OSError) -> str:
    name = errno.errorcode.get(e.errno or 0, str(e.errno))
    if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP):
        return f"fs-verity is not supported by this filesystem or kernel ({name})"
    if e.errno == errno.EINVAL:
        return ("fs-verity cannot be enabled here (EINVAL): ext4 needs `mkfs.ext4 -O verity` "
                "and a 4096-byte block size")
    if e.errno == errno.ETXTBSY:
        return "fs-verity cannot be enabled while the file is open for writing (ETXTBSY)"
    return f"fs-verity failed: {e.strerror} ({name})"


def enable_verity(fd: int) -> None:
    """Enable fs-verity (SHA-256, 4096-byte blocks) on a file opened read-only."""
    arg = _ENABLE_ARG.pack(1, FS_VERITY_HASH_ALG_SHA256, BLOCK, 0, 0, 0, 0, 0)
    try:
        fcntl.ioctl(fd, FS_IOC_ENABLE_VERITY, arg)
    except OSError as e:
        if e.errno == errno.EEXIST:  # already enabled
            return
        raise VerityError(_unsupported(e)) from None


def try_enable_verity(fd: int) -> bool:
    """Enable fs-verity where the filesystem supports it; False where it does not."""
    try:
        enable_verity(fd)
        return True
    except VerityError:
        return False


def measure_verity(fd: int) -> bytes:
    """The kernel's fs-verity digest of a file with fs-verity enabled."""
    buf = bytearray(struct.pack("<HH", 0, 64) + bytes(64))
    try:
        fcntl.ioctl(fd, FS_IOC_MEASURE_VERITY, buf)
    except OSError as e:
        if e.errno == errno.ENODATA:
            raise VerityError("fs-verity is not enabled on this file") from None
        raise VerityError(_unsupported(e)) from None
    alg, size = struct.unpack_from("<HH", buf)
    if alg != FS_VERITY_HASH_ALG_SHA256 or size != HASH_SIZE:
        raise VerityError(f"unexpected fs-verity hash algorithm {alg}")
    return bytes(buf[4:4 + size])
