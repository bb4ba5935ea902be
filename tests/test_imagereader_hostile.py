"""The image reader meets corrupt and hostile images with ImageError: no crash, no hang."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfsdeploy.composefs import dumpfile, erofs, imagereader, imagewriter
from cfsdeploy.util.errors import ImageError

from .vectors import VALID

SPECIAL = next(v for v in VALID if v.name == "special.dump")
IMAGE = imagewriter.build(dumpfile.parse(SPECIAL.data)).image
ROOT_NID = struct.unpack_from("<H", IMAGE, erofs.SUPER_OFFSET + 14)[0]
FAST = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


def read_or_reject(data: bytes) -> None:
    try:
        imagereader.read_image(data)
    except ImageError:
        pass


@FAST
@given(st.integers(0, len(IMAGE) - 1))
def test_truncated_image_is_rejected_or_read(length: int) -> None:
    read_or_reject(IMAGE[:length])


@FAST
@given(st.lists(st.tuples(st.integers(0, len(IMAGE) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_flipped_bytes_never_crash_the_reader(flips) -> None:
    data = bytearray(IMAGE)
    for pos, value in flips:
        data[pos] = value
    read_or_reject(bytes(data))


@FAST
@given(st.integers(1024 + 128, min(len(IMAGE), 8192) - 4), st.integers(0, 2**32 - 1))
def test_overwritten_words_in_metadata_never_crash_the_reader(pos: int, value: int) -> None:
    data = bytearray(IMAGE)
    struct.pack_into("<I", data, pos, value)
    read_or_reject(bytes(data))


def test_directory_loop_is_reported() -> None:
    root = dumpfile.parse(b"/ 0 40755 2 0 0 0 0.0 - - -\n/d 0 40755 2 0 0 0 0.0 - - -\n"
                          b"/d/e 0 40755 2 0 0 0 0.0 - - -\n")
    image = bytearray(imagewriter.build(root).image)
    reader = imagereader._Reader(bytes(image))
    d_nid = next(nid for name, nid, _ in reader.dirents(reader.inode(ROOT_NID)) if name == b"d")
    d_raw = reader.inode(d_nid)
    e_nid = next(nid for name, nid, _ in reader.dirents(d_raw) if name == b"e")
    # Point /d/e at /d itself: the directory now contains itself.
    at = bytes(image).index(struct.pack("<Q", e_nid), d_raw.body)
    image[at:at + 8] = struct.pack("<Q", d_nid)
    with pytest.raises(ImageError, match="loop"):
        imagereader.read_image(bytes(image))


def test_bad_magic_is_rejected() -> None:
    data = bytearray(IMAGE)
    data[erofs.SUPER_OFFSET] ^= 0xFF
    with pytest.raises(ImageError, match="superblock magic"):
        imagereader.read_image(bytes(data))


def test_other_block_size_is_rejected() -> None:
    data = bytearray(IMAGE)
    data[erofs.SUPER_OFFSET + 12] = 9
    with pytest.raises(ImageError, match="block size"):
        imagereader.read_image(bytes(data))


def test_root_nid_out_of_range_is_rejected() -> None:
    data = bytearray(IMAGE)
    struct.pack_into("<H", data, erofs.SUPER_OFFSET + 14, 0xFFFF)
    with pytest.raises(ImageError):
        imagereader.read_image(bytes(data))


def test_huge_directory_size_is_rejected_without_allocating() -> None:
    data = bytearray(IMAGE)
    off = ROOT_NID * 32
    fmt = struct.unpack_from("<H", data, off)[0]
    if fmt & 1:
        struct.pack_into("<Q", data, off + 8, 2**62)
    else:
        struct.pack_into("<I", data, off + 8, 2**32 - 1)
    with pytest.raises(ImageError):
        imagereader.read_image(bytes(data))
