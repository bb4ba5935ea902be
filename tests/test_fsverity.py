"""fs-verity digests equal what Debian's `fsverity digest` prints, however they are computed."""

from __future__ import annotations

import errno
import fcntl
import os
import random
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cfsdeploy.composefs import fsverity
from cfsdeploy.util.errors import VerityError

FSVERITY = shutil.which("fsverity")
needs_tool = pytest.mark.skipif(
    FSVERITY is None, reason="the fsverity tool (Debian package fsverity) is not installed")

BLOCK = 4096
MIB = 1 << 20
LEVEL_SIZES = [0, 1, 4095, 4096, 4097,
               128 * BLOCK,            # exactly one full hash block
               128 * BLOCK + 1,        # two levels
               128 * 128 * BLOCK + 1]  # three levels


def tool_output(path: Path) -> str:
    assert FSVERITY is not None
    return subprocess.run([FSVERITY, "digest", str(path)], check=True, capture_output=True,
                          text=True).stdout


def tool_digest(path: Path) -> bytes:
    algorithm, hex_digest = tool_output(path).split()[0].split(":")
    assert algorithm == "sha256"
    return bytes.fromhex(hex_digest)


def random_bytes(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def write_sparse(path: Path, size: int, writes: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in writes:
            f.seek(offset)
            f.write(data)


@pytest.fixture
def big_file(tmp_path: Path) -> Path:
    """Random content spanning several work pieces and a partial last block."""
    path = tmp_path / "big"
    path.write_bytes(random_bytes(20 * MIB + 17))
    return path


@pytest.fixture
def other_thread() -> Iterator[None]:
    """A second thread in this process while the test runs."""
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    yield
    stop.set()
    thread.join()


# --- digests ---------------------------------------------------------------------------

def test_ioctl_numbers_match_the_linux_uapi_header() -> None:
    assert fsverity.FS_IOC_ENABLE_VERITY == 0x40806685
    assert fsverity.FS_IOC_MEASURE_VERITY == 0xC0046686


@needs_tool
@pytest.mark.parametrize("size", LEVEL_SIZES)
def test_digest_file_matches_fsverity_tool(size: int, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(random_bytes(size))
    assert fsverity.digest_file(path) == tool_digest(path)


@needs_tool
@pytest.mark.parametrize("size", LEVEL_SIZES)
def test_digest_bytes_matches_fsverity_tool(size: int, tmp_path: Path) -> None:
    data = random_bytes(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    assert fsverity.digest_bytes(data) == tool_digest(path)


@needs_tool
def test_format_digest_is_the_fsverity_tool_format(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"hello")
    formatted = fsverity.format_digest(fsverity.digest_file(path))
    assert tool_output(path) == f"{formatted} {path}\n"
    assert formatted == formatted.lower()


@needs_tool
def test_sparse_file_over_4_gib_matches_fsverity_tool(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    write_sparse(path, (4 << 30) + 12345, [(0, b"head"), (5000, b"x" * 9000),
                                            ((2 << 30) + 3, b"y" * 5000),
                                            ((4 << 30) + 100, b"tail")])
    assert fsverity.digest_file(path) == tool_digest(path)


@needs_tool
@pytest.mark.parametrize("size, writes", [
    pytest.param(3 * MIB + 1, [], id="all-hole"),
    pytest.param(3 * MIB + 1, [(3 * MIB - 10, b"z" * 11)], id="hole-then-partial-last-block"),
    pytest.param(2 * MIB, [(0, b"a"), (MIB + 4095, b"bb")], id="data-straddling-a-block-edge"),
    pytest.param(2 * 128 * 128 * BLOCK + 77, [(5, b"c" * 70000), (128 * 128 * BLOCK + 1, b"d")],
                 id="holes-spanning-whole-subtrees"),
])
def test_sparse_file_matches_fsverity_tool(size: int, writes: list[tuple[int, bytes]],
                                           tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    write_sparse(path, size, writes)
    assert fsverity.digest_file(path) == tool_digest(path)


def test_skipping_holes_gives_the_digest_of_reading_them(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "sparse"
    write_sparse(path, 40 * MIB + 3, [(7, b"a" * 100), (17 * MIB, b"b" * 3 * MIB)])
    skipping = fsverity.digest_file(path)
    # As on filesystems without SEEK_DATA: the whole file is data.
    monkeypatch.setattr(fsverity, "data_extents", lambda fd, size: [(0, size)])
    assert fsverity.digest_file(path) == skipping


def test_huge_sparse_file_is_digested_without_reading_its_holes(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    write_sparse(path, 64 << 30, [(0, b"a"), (40 << 30, b"b" * 8 * MIB)])
    started = time.monotonic()
    fsverity.digest_file(path)
    assert time.monotonic() - started < 5  # reading 64 GiB of zeros would take a minute


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_streaming_hasher_equals_digest_bytes_for_any_split(data: st.DataObject) -> None:
    content = random_bytes(3 * 128 * BLOCK + 5)  # up to two levels above the data
    content = content[:data.draw(st.integers(0, len(content)), label="size")]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(content)), max_size=10), label="cuts"))
    hasher = fsverity.Hasher()
    for start, end in zip([0] + cuts, cuts + [len(content)], strict=True):
        hasher.update(content[start:end])
    assert hasher.digest() == fsverity.digest_bytes(content)


def test_hasher_digest_can_be_taken_midway() -> None:
    first, second = random_bytes(5000), random_bytes(130 * BLOCK)
    hasher = fsverity.Hasher()
    hasher.update(first)
    assert hasher.digest() == fsverity.digest_bytes(first)
    hasher.update(second)
    assert hasher.digest() == fsverity.digest_bytes(first + second)


@pytest.mark.parametrize("size", [10000, 3 * MIB + 1])
def test_digest_fd_ignores_and_keeps_the_file_offset(size: int, tmp_path: Path) -> None:
    data = random_bytes(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 777, os.SEEK_SET)
        assert fsverity.digest_fd(fd) == fsverity.digest_bytes(data)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 777
    finally:
        os.close(fd)


@pytest.mark.parametrize("threads", [2, 3])
def test_thread_count_does_not_change_the_digest(threads: int, big_file: Path) -> None:
    assert fsverity.digest_file(big_file, threads=threads) == fsverity.digest_file(big_file,
                                                                                  threads=1)


def test_parallel_digest_in_a_multithreaded_process_is_the_same(other_thread: None,
                                                                 big_file: Path) -> None:
    assert fsverity.digest_file(big_file, threads=2) == fsverity.digest_file(big_file,
                                                                            threads=1)


@pytest.mark.parametrize("multithreaded", [False, True], ids=["forked", "threaded"])
def test_work_of_a_failed_worker_is_done_by_the_caller(multithreaded: bool, big_file: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       request: pytest.FixtureRequest) -> None:
    expected = fsverity.digest_file(big_file, threads=1)
    if multithreaded:  # workers are threads, not processes
        request.getfixturevalue("other_thread")
    caller = (os.getpid(), threading.get_ident())
    real_call = fsverity._RangeHasher.__call__

    def failing_in_workers(self: fsverity._RangeHasher, start: int, end: int) -> bytes:
        if (os.getpid(), threading.get_ident()) != caller:
            raise OSError(errno.EIO, "worker failure")
        return real_call(self, start, end)

    monkeypatch.setattr(fsverity._RangeHasher, "__call__", failing_in_workers)
    assert fsverity.digest_file(big_file, threads=2) == expected


@pytest.mark.parametrize("size", [5000, 3 * MIB + 1])
def test_file_that_shrinks_while_hashed_is_an_error(size: int, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f"
    path.write_bytes(random_bytes(size))
    real_fstat = os.fstat

    def fstat_from_before_it_shrank(fd: int) -> os.stat_result:
        fields = list(real_fstat(fd)[:10])
        fields[6] += 3 * BLOCK  # st_size
        return os.stat_result(fields)

    monkeypatch.setattr(fsverity.os, "fstat", fstat_from_before_it_shrank)
    with pytest.raises(VerityError, match="shrank"):
        fsverity.digest_file(path)


def test_directory_has_no_digest(tmp_path: Path) -> None:
    with pytest.raises(VerityError):
        fsverity.digest_file(tmp_path)


def test_zero_threads_is_rejected(big_file: Path) -> None:
    with pytest.raises(ValueError):
        fsverity.digest_file(big_file, threads=0)


# --- ioctls ----------------------------------------------------------------------------

@pytest.fixture
def read_only_fd(tmp_path: Path) -> Iterator[int]:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    yield fd
    os.close(fd)


def test_enable_verity_works_and_measures_or_says_why_not(read_only_fd: int) -> None:
    # Both outcomes are checked, whichever this filesystem gives: no skip either way.
    try:
        fsverity.enable_verity(read_only_fd)
    except VerityError as e:
        assert "fs-verity" in str(e)
        assert fsverity.try_enable_verity(read_only_fd) is False
    else:
        assert fsverity.measure_verity(read_only_fd) == fsverity.digest_bytes(b"x")


def test_measure_verity_of_a_file_without_verity_raises_verity_error(tmp_path: Path) -> None:
    path = tmp_path / "plain"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(VerityError, match="fs-verity"):
            fsverity.measure_verity(fd)
    finally:
        os.close(fd)


def test_enable_verity_asks_for_sha256_4096_byte_blocks_and_no_salt(
        read_only_fd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(fcntl, "ioctl", lambda fd, request, arg: calls.append((request, arg)))
    fsverity.enable_verity(read_only_fd)
    [(request, arg)] = calls
    assert request == fsverity.FS_IOC_ENABLE_VERITY
    assert len(arg) == 128
    # version, hash_algorithm, block_size, salt_size, salt_ptr, sig_size
    assert struct.unpack_from("=IIIIQI", arg) == (1, 1, 4096, 0, 0, 0)
    assert not any(arg[28:])


def test_enabling_verity_twice_is_not_an_error(read_only_fd: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def already_enabled(fd: int, request: int, arg: bytes) -> None:
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))

    monkeypatch.setattr(fcntl, "ioctl", already_enabled)
    fsverity.enable_verity(read_only_fd)


@pytest.mark.parametrize("code", ["ENOTTY", "EOPNOTSUPP", "EINVAL", "ETXTBSY", "EACCES", "EROFS"])
def test_enable_verity_errors_name_their_cause(code: str, read_only_fd: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(fd: int, request: int, arg: bytes) -> None:
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(fcntl, "ioctl", failing)
    with pytest.raises(VerityError, match=code):
        fsverity.enable_verity(read_only_fd)


def test_measure_verity_returns_the_digest_the_kernel_writes(
        read_only_fd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    digest = bytes(range(32))

    def kernel(fd: int, request: int, buf: bytearray) -> None:
        assert request == fsverity.FS_IOC_MEASURE_VERITY
        assert struct.unpack_from("=HH", buf)[1] >= 32  # room for the digest
        buf[:4 + 32] = struct.pack("=HH", 1, 32) + digest

    monkeypatch.setattr(fcntl, "ioctl", kernel)
    assert fsverity.measure_verity(read_only_fd) == digest


def test_a_digest_is_its_bytes() -> None:
    d = fsverity.digest_bytes(b"x")
    assert isinstance(d, fsverity.Digest) and d == bytes(d) and {bytes(d): 1}[d] == 1


def test_a_digest_reads_its_hex_in_either_case() -> None:
    d = fsverity.digest_bytes(b"x")
    assert fsverity.Digest.from_hex(d.hex()) == d == fsverity.Digest.from_hex(d.hex().upper())


@pytest.mark.parametrize("text", ["", "ab", "g" * 64, "a" * 63 + " ", "a" * 66, "ab " * 32])
def test_text_that_is_not_64_hex_digits_is_no_digest(text: str) -> None:
    with pytest.raises(fsverity.DigestError):
        fsverity.Digest.from_hex(text)


def test_a_digest_is_32_bytes() -> None:
    with pytest.raises(fsverity.DigestError):
        fsverity.Digest(b"\0" * 31)


def test_a_digest_names_its_object_path() -> None:
    d = fsverity.Digest(bytes(range(32)))
    assert d.object_path() == "00/" + bytes(range(1, 32)).hex()
