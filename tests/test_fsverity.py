"""fs-verity digests equal what Debian's `fsverity digest` prints."""

from __future__ import annotations

import os
import random
import shutil
import subprocess

import pytest
from hypothesis import given, settings, strategies as st

from cfsdeploy import fsverity
from cfsdeploy.errors import VerityError

needs_tool = pytest.mark.skipif(shutil.which("fsverity") is None,
                                reason="the fsverity tool (Debian package fsverity) is not installed")


def reference(path) -> str:
    out = subprocess.run(["fsverity", "digest", str(path)], check=True, capture_output=True, text=True)
    return out.stdout.split()[0]


@needs_tool
@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 128 * 4096, 128 * 4096 + 1,
                                  128 * 128 * 4096 + 1])
def test_digest_matches_fsverity_tool(size: int, tmp_path) -> None:
    path = tmp_path / "f"
    path.write_bytes(random.Random(size).randbytes(size))
    assert fsverity.format_digest(fsverity.digest_file(path)) == reference(path)


@needs_tool
def test_sparse_file_over_4_gib_matches_fsverity_tool(tmp_path) -> None:
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate((4 << 30) + 12345)
        for off in (0, 5000, 1 << 31, (4 << 30) + 100):
            f.seek(off)
            f.write(b"data" * 300)
    assert fsverity.format_digest(fsverity.digest_file(path)) == reference(path)


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=3 * 4096 + 7), st.lists(st.integers(1, 5000), max_size=8))
def test_streaming_hasher_equals_one_shot_digest(data: bytes, cuts: list[int]) -> None:
    h = fsverity.Hasher()
    pos = 0
    for cut in cuts:
        h.update(data[pos:pos + cut])
        pos += cut
    h.update(data[pos:])
    assert h.digest() == fsverity.digest_bytes(data)


def test_thread_count_does_not_change_the_digest(tmp_path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    assert fsverity.digest_file(path, threads=1) == fsverity.digest_file(path, threads=2)


def test_digest_ignores_the_file_offset(tmp_path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10000)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 777, os.SEEK_SET)
        assert fsverity.digest_fd(fd) == fsverity.digest_bytes(b"x" * 10000)
    finally:
        os.close(fd)


@pytest.fixture
def one_byte_fd(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    yield fd
    os.close(fd)


def test_enable_verity_reports_a_filesystem_without_support(one_byte_fd: int) -> None:
    try:
        fsverity.enable_verity(one_byte_fd)
    except VerityError as e:
        assert "fs-verity" in str(e)
        assert fsverity.try_enable_verity(one_byte_fd) is False
    else:  # a filesystem with fs-verity: the kernel's measurement must agree
        assert fsverity.measure_verity(one_byte_fd) == fsverity.digest_bytes(b"x")


def test_measure_without_verity_is_a_clear_error(one_byte_fd: int) -> None:
    with pytest.raises(VerityError, match="fs-verity"):
        fsverity.measure_verity(one_byte_fd)
