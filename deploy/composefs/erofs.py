"""The EROFS on-disk format as composefs uses it: constants, struct layouts, helpers.

All integers are little-endian.  Blocks are 4096 bytes.  The composefs header sits
at offset 0, the EROFS superblock at 1024, inodes follow in 32-byte slots.
"""

from __future__ import annotations

import struct

BLKSIZ_BITS = 12
BLKSIZ = 1 << BLKSIZ_BITS
SLOTSIZE = 32
ISLOTBITS = 5
SUPER_OFFSET = 1024
SUPER_MAGIC_V1 = 0xE0F5E1E2

# composefs header at offset 0
COMPOSEFS_MAGIC = 0xD078629A
COMPOSEFS_HEADER_VERSION = 1
COMPOSEFS_FLAGS_HAS_ACL = 1
# Highest composefs_version whose overlay conventions are known.
COMPOSEFS_VERSION_MAX = 1
COMPOSEFS_HEADER = struct.Struct("<IIII16x")  # magic, version, flags, composefs_version

FEATURE_COMPAT_SB_CHKSUM = 0x1
FEATURE_COMPAT_MTIME = 0x2
FEATURE_COMPAT_XATTR_FILTER = 0x4

FEATURE_INCOMPAT_XATTR_PREFIXES = 0x40
# Every incompat feature of this format revision; any other bit changes the layout.
FEATURE_INCOMPAT_ALL = 0x7F

# magic, checksum, feature_compat, blkszbits, sb_extslots, root_nid, inos,
# build_time, build_time_nsec, blocks, meta_blkaddr, xattr_blkaddr, uuid,
# volume_name, feature_incompat, then the rest (zero for composefs).
# build_time and an extended inode's mtime are u64 on disk, but the reference keeps
# times as int64_t and casts: a time before 1970 is stored two's complement and read
# back negative (mkcomposefs writes -1 as 0xffffffffffffffff), so they are signed here.
SUPERBLOCK = struct.Struct("<IIIBBHQqIIII16s16sI44x")
assert SUPERBLOCK.size == 128
SB_EXTSLOT_SIZE = 16
# Offset inside the superblock of u8 xattr_prefix_count (in the part SUPERBLOCK skips).
SB_XATTR_PREFIX_COUNT = 91

# i_format: bit 0 = version (0 compact, 1 extended), bits 1-3 = data layout
I_VERSION_BIT = 0
I_DATALAYOUT_BIT = 1
I_ALL = 0xF  # every defined i_format bit
INODE_FLAT_PLAIN = 0
INODE_COMPRESSED_FULL = 1
INODE_FLAT_INLINE = 2
INODE_COMPRESSED_COMPACT = 3
INODE_CHUNK_BASED = 4

# format, xattr_icount, mode, nlink, size, reserved, i_u, ino, uid, gid, reserved2
INODE_COMPACT = struct.Struct("<HHHHIIIIHHI")
# format, xattr_icount, mode, reserved, size, i_u, ino, uid, gid, mtime,
# mtime_nsec, nlink, reserved2[16]
INODE_EXTENDED = struct.Struct("<HHHHQIIIIqII16x")
assert INODE_COMPACT.size == 32 and INODE_EXTENDED.size == 64

CHUNK_FORMAT_BLKBITS_MASK = 0x1F
CHUNK_FORMAT_INDEXES = 0x20
NULL_ADDR = 0xFFFFFFFF

# nid, nameoff, file_type, reserved
DIRENT = struct.Struct("<QHBx")
assert DIRENT.size == 12

FT_UNKNOWN = 0
FT_REG_FILE = 1
FT_DIR = 2
FT_CHRDEV = 3
FT_BLKDEV = 4
FT_FIFO = 5
FT_SOCK = 6
FT_SYMLINK = 7

# The dirent file type of each inode type (the S_IFMT bits of a mode).
FILE_TYPE_OF_MODE = {0o100000: FT_REG_FILE, 0o040000: FT_DIR, 0o020000: FT_CHRDEV,
                     0o060000: FT_BLKDEV, 0o010000: FT_FIFO, 0o140000: FT_SOCK,
                     0o120000: FT_SYMLINK}

# h_name_filter, h_shared_count, reserved[7]
XATTR_IBODY_HEADER = struct.Struct("<IB7x")
# e_name_len, e_name_index, e_value_size
XATTR_ENTRY = struct.Struct("<BBH")
XATTR_LONG_PREFIX = 0x80
XATTR_FILTER_BITS = 32
XATTR_FILTER_DEFAULT = 0xFFFFFFFF
XATTR_FILTER_SEED = 0x25BBE08F

XATTR_INDEX_USER = 1
XATTR_INDEX_POSIX_ACL_ACCESS = 2
XATTR_INDEX_POSIX_ACL_DEFAULT = 3
XATTR_INDEX_TRUSTED = 4
XATTR_INDEX_LUSTRE = 5
XATTR_INDEX_SECURITY = 6

# Prefixes by index, in the order the writer tries them.
XATTR_PREFIXES: tuple[tuple[bytes, int], ...] = (
    (b"user.", XATTR_INDEX_USER),
    (b"system.posix_acl_access", XATTR_INDEX_POSIX_ACL_ACCESS),
    (b"system.posix_acl_default", XATTR_INDEX_POSIX_ACL_DEFAULT),
    (b"trusted.", XATTR_INDEX_TRUSTED),
    (b"security.", XATTR_INDEX_SECURITY),
)
XATTR_PREFIX_BY_INDEX: dict[int, bytes] = {i: p for p, i in XATTR_PREFIXES}
XATTR_PREFIX_BY_INDEX[XATTR_INDEX_LUSTRE] = b"lustre."


def xattr_split(key: bytes) -> tuple[int, bytes]:
    """Split an xattr name into (prefix index, suffix) as EROFS stores it."""
    for prefix, index in XATTR_PREFIXES:
        if key.startswith(prefix):
            return index, key[len(prefix):]
    return 0, key


_P1 = 2654435761
_P2 = 2246822519
_P3 = 3266489917
_P4 = 668265263
_P5 = 374761393
_M = 0xFFFFFFFF


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _M


def xxh32(data: bytes, seed: int) -> int:
    """xxHash32, as the kernel uses for the EROFS xattr name filter."""
    n = len(data)
    p = 0
    seed &= _M
    if n >= 16:
        v1 = (seed + _P1 + _P2) & _M
        v2 = (seed + _P2) & _M
        v3 = seed
        v4 = (seed - _P1) & _M
        limit = n - 16
        while p <= limit:
            a, b, c, d = struct.unpack_from("<IIII", data, p)
            v1 = (_rotl((v1 + a * _P2) & _M, 13) * _P1) & _M
            v2 = (_rotl((v2 + b * _P2) & _M, 13) * _P1) & _M
            v3 = (_rotl((v3 + c * _P2) & _M, 13) * _P1) & _M
            v4 = (_rotl((v4 + d * _P2) & _M, 13) * _P1) & _M
            p += 16
        h = (_rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)) & _M
    else:
        h = (seed + _P5) & _M
    h = (h + n) & _M
    while p + 4 <= n:
        (w,) = struct.unpack_from("<I", data, p)
        h = (_rotl((h + w * _P3) & _M, 17) * _P4) & _M
        p += 4
    while p < n:
        h = (_rotl((h + data[p] * _P5) & _M, 11) * _P1) & _M
        p += 1
    h ^= h >> 15
    h = (h * _P2) & _M
    h ^= h >> 13
    h = (h * _P3) & _M
    h ^= h >> 16
    return h


def xattr_filter_bit(index: int, suffix: bytes) -> int:
    return xxh32(suffix, XATTR_FILTER_SEED + index) & (XATTR_FILTER_BITS - 1)


def round_up(x: int, y: int) -> int:
    return (x + y - 1) // y * y


def chunk_bits(size: int) -> int:
    """Chunk size (log2) for a chunk-based file of this size: as few chunks as possible."""
    bits = (size - 1).bit_length() if size > 1 else 0
    bits = max(bits, BLKSIZ_BITS)
    return min(bits, BLKSIZ_BITS + CHUNK_FORMAT_BLKBITS_MASK)
