"""The names an initramfs holds: cpio "newc" archives, concatenated, each plain or
compressed (the early microcode archive is plain, a compressed one follows), as the
kernel unpacks them.  gzip and xz are read with the standard library, zstd with the
`zstd` command (a host requirement: Python 3.11 has no zstd module).

An initramfs is input from a tree: sizes are bounded, and whatever does not parse
is an InitramfsDamaged naming why, never a traceback."""

from __future__ import annotations

import lzma
import re
import zlib
from enum import Enum

from ..util.errors import IntegrityError
from ..util.run import run

# What is unpacked in all, and how deep compressed archives may nest.
MAX_UNPACKED = 1 << 30
MAX_DEPTH = 4
_HEADER = 110
_CPIO_MAGIC = (b"070701", b"070702")
_TRAILER = b"TRAILER!!!"
_GZIP = b"\x1f\x8b"
_XZ = b"\xfd7zXZ\x00"
_LZMA = b"\x5d\x00\x00"
_ZSTD = b"\x28\xb5\x2f\xfd"
_HEX = re.compile(rb"[0-9A-Fa-f]{8}")


class Damage(Enum):
    TRUNCATED = "truncated"                # an archive or a compressed stream ends early
    BAD_HEADER = "bad_header"              # a cpio header that is not newc
    BAD_COMPRESSION = "bad_compression"    # a compressed stream does not decompress
    TOO_LARGE = "too_large"                # more than MAX_UNPACKED, or nested deeper than MAX_DEPTH
    UNKNOWN_FORMAT = "unknown_format"      # neither cpio nor gzip, xz, lzma or zstd


class InitramfsDamaged(IntegrityError):
    def __init__(self, damage: Damage) -> None:
        super().__init__(f"initramfs: {damage.value}")
        self.damage = damage


def names(data: bytes) -> set[str]:
    """Every path in the initramfs, relative ("usr/lib/modules/..."), as the kernel
    would unpack it."""
    out: set[str] = set()
    _Reader(out).segments(data, 0)
    return out


class _Reader:
    def __init__(self, out: set[str]) -> None:
        self.out = out
        self.unpacked = 0

    def segments(self, data: bytes, depth: int) -> None:
        """Archives one after the other, NUL padding between them."""
        if depth > MAX_DEPTH:
            raise InitramfsDamaged(Damage.TOO_LARGE)
        pos = 0
        while True:
            while pos < len(data) and data[pos] == 0:
                pos += 1
            if pos == len(data):
                return
            if data[pos:pos + 6] in _CPIO_MAGIC:
                pos = self.cpio(data, pos)
            elif data.startswith(_GZIP, pos):
                unpacked, rest = self.inflate(zlib.decompressobj(wbits=31), data[pos:])
                self.segments(unpacked, depth + 1)
                data, pos = rest, 0
            elif data.startswith(_XZ, pos) or data.startswith(_LZMA, pos):
                unpacked, rest = self.inflate(lzma.LZMADecompressor(), data[pos:])
                self.segments(unpacked, depth + 1)
                data, pos = rest, 0
            elif data.startswith(_ZSTD, pos):
                self.segments(self.unzstd(data[pos:]), depth + 1)
                return  # zstd reads to the end: the last archive, as initramfs builders make it
            else:
                raise InitramfsDamaged(Damage.UNKNOWN_FORMAT)

    def cpio(self, data: bytes, pos: int) -> int:
        """Read one newc archive from pos; return where it ends."""
        while True:
            header = data[pos:pos + _HEADER]
            if len(header) < _HEADER:
                raise InitramfsDamaged(Damage.TRUNCATED)
            if header[:6] not in _CPIO_MAGIC:
                raise InitramfsDamaged(Damage.BAD_HEADER)
            fields = [header[6 + 8 * i:14 + 8 * i] for i in range(13)]
            if not all(_HEX.fullmatch(f) for f in fields):
                raise InitramfsDamaged(Damage.BAD_HEADER)
            size, namesize = int(fields[6], 16), int(fields[11], 16)
            if namesize == 0:
                raise InitramfsDamaged(Damage.BAD_HEADER)
            name_end = pos + _HEADER + namesize
            if name_end > len(data):
                raise InitramfsDamaged(Damage.TRUNCATED)
            name = data[pos + _HEADER:name_end - 1]
            data_start = (name_end + 3) & ~3
            pos = (data_start + size + 3) & ~3
            if data_start + size > len(data):
                raise InitramfsDamaged(Damage.TRUNCATED)
            if name == _TRAILER:
                return min(pos, len(data))
            self.out.add(name.decode(errors="surrogateescape").lstrip("/").removeprefix("./"))

    def inflate(self, d: zlib._Decompress | lzma.LZMADecompressor, data: bytes) -> tuple[bytes, bytes]:
        """One compressed stream: its content, and the bytes after it."""
        left = MAX_UNPACKED - self.unpacked
        try:
            unpacked = d.decompress(data, left + 1)
        except (zlib.error, lzma.LZMAError):
            raise InitramfsDamaged(Damage.BAD_COMPRESSION) from None
        self.unpacked += len(unpacked)
        if len(unpacked) > left:
            raise InitramfsDamaged(Damage.TOO_LARGE)
        if not d.eof:
            raise InitramfsDamaged(Damage.TRUNCATED)
        return unpacked, d.unused_data

    def unzstd(self, data: bytes) -> bytes:
        # The frame header's content size is not always there, so the bound is checked after.
        p = run(["zstd", "-d", "-c", "-q"], input=data, capture=True, check=False, timeout=300)
        if p.returncode != 0:
            raise InitramfsDamaged(Damage.BAD_COMPRESSION)
        self.unpacked += len(p.stdout)
        if self.unpacked > MAX_UNPACKED:
            raise InitramfsDamaged(Damage.TOO_LARGE)
        return p.stdout
