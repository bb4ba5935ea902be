"""The image writer reproduces the reference mkcomposefs byte for byte."""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import pytest

from cfsdeploy.composefs import dumpfile, imagewriter
from cfsdeploy.composefs.tree import S_IFCHR, S_IFREG, Inode, new_dir
from cfsdeploy.util.errors import DumpfileError, ImageError

from .vectors import BEFORE_1970, BEFORE_1970_SHA256, SHOULD_FAIL, VALID, Vector


def build(v: Vector) -> imagewriter.BuildResult:
    kw = {"min_version": v.version, "max_version": v.version} if v.version is not None else {}
    return imagewriter.build(dumpfile.parse(v.data, strict=v.strict), **kw)


def test_vectors_are_present() -> None:
    assert len(VALID) >= 10 and len(SHOULD_FAIL) >= 10, "tests/vectors/composefs is missing"


@pytest.mark.parametrize("vector", VALID, ids=lambda v: v.name)
def test_image_matches_reference_digest(vector: Vector) -> None:
    assert hashlib.sha256(build(vector).image).hexdigest() == vector.sha256


@pytest.mark.parametrize("vector", SHOULD_FAIL, ids=lambda v: v.name)
def test_should_fail_vector_is_rejected(vector: Vector) -> None:
    # The reference checks these in lenient mode; they must fail for their own reason.
    error = ImageError if vector.name == "should-fail-too-big.dump" else DumpfileError
    with pytest.raises(error):
        imagewriter.build(dumpfile.parse(vector.data, strict=False))


@pytest.mark.skipif(shutil.which("fsck.erofs") is None, reason="fsck.erofs (erofs-utils) not installed")
@pytest.mark.parametrize("vector", VALID, ids=lambda v: v.name)
def test_fsck_erofs_accepts_image(vector: Vector, tmp_path) -> None:
    img = tmp_path / "img"
    img.write_bytes(build(vector).image)
    subprocess.run(["fsck.erofs", str(img)], check=True, capture_output=True)


def test_version_rises_to_1_only_for_whiteouts() -> None:
    root = new_dir()
    root.children[b"f"] = Inode(mode=S_IFREG | 0o644)
    assert imagewriter.build(root).version == 0
    root.children[b"w"] = Inode(mode=S_IFCHR | 0o644, rdev=0)
    assert imagewriter.build(root).version == 1
    assert imagewriter.build(root, max_version=0).version == 0


def test_build_does_not_modify_the_tree() -> None:
    root = dumpfile.parse(VALID[0].data, strict=VALID[0].strict)
    before = dumpfile.dumps(root)
    imagewriter.build(root)
    assert dumpfile.dumps(root) == before


def test_same_tree_gives_same_image_whatever_insertion_order() -> None:
    a, b = new_dir(), new_dir()
    names = [b"zeta", b"alpha", b"\xff\xfe", b"m i d"]
    for n in names:
        a.children[n] = Inode(mode=S_IFREG | 0o600, size=3, content=b"abc")
    for n in reversed(names):
        b.children[n] = Inode(mode=S_IFREG | 0o600, size=3, content=b"abc")
    assert imagewriter.build(a).image == imagewriter.build(b).image


def test_out_of_range_format_version_is_rejected() -> None:
    with pytest.raises(ImageError):
        imagewriter.build(new_dir(), min_version=2)


def test_times_before_1970_are_written_as_the_reference_writes_them() -> None:
    image = imagewriter.build(dumpfile.parse(BEFORE_1970)).image
    assert hashlib.sha256(image).hexdigest() == BEFORE_1970_SHA256
    # The superblock's build_time (u64 at 1024 + 24) and build_time_nsec: the least
    # mtime, -2**63, two's complement as the reference's (uint64_t) cast stores it.
    assert image[1048:1060] == bytes.fromhex("0000000000000080" "00000000")
    # The other times are in extended inodes: i_mtime (u64) then i_mtime_nsec (u32).
    for mtime in ("ffffffffffffffff" "00000000",  # -1.0
                  "e49527ffffffffff" "0065cd1d",  # -14182940.500000000
                  "ffffffffffffffff" "ffc99a3b"):  # -1.999999999
        assert image.count(bytes.fromhex(mtime)) == 1
