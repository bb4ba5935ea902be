"""The two ways into trees others can write: remove_tree and open_beneath."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cfsdeploy.util.fsutil import UnsafePathError, open_beneath, open_beneath_walk, remove_tree
from cfsdeploy.util.run import run


def target(tmp_path: Path) -> Path:
    """A directory outside the tree, as /tmp is: sticky, world-writable, with a file."""
    t = tmp_path / "outside"
    t.mkdir()
    t.chmod(0o1777)
    (t / "file").write_bytes(b"keep\n")
    (t / "file").chmod(0o640)
    return t


def modes(top: Path) -> dict[str, int]:
    return {p: os.lstat(os.path.join(d, p)).st_mode for d, dirs, files in os.walk(top) for p in ["", *dirs, *files]}


# remove_tree

def test_remove_tree_unlinks_a_symlink_to_a_directory_and_leaves_the_target(tmp_path: Path) -> None:
    outside = target(tmp_path)
    before = modes(outside)
    (tmp_path / "link").symlink_to(outside)
    remove_tree(tmp_path / "link")
    assert not os.path.lexists(tmp_path / "link")
    assert modes(outside) == before and (outside / "file").read_bytes() == b"keep\n"


def test_remove_tree_never_chmods_or_enters_what_a_symlink_inside_points_to(tmp_path: Path) -> None:
    outside = target(tmp_path)
    before = modes(outside)
    tree = tmp_path / "tree"
    (tree / "ro").mkdir(parents=True)
    (tree / "ro" / "to-outside").symlink_to(outside)
    (tree / "ro" / "to-file").symlink_to(outside / "file")
    (tree / "ro").chmod(0o555)
    tree.chmod(0o500)
    remove_tree(tree)
    assert not os.path.lexists(tree)
    assert modes(outside) == before and (outside / "file").read_bytes() == b"keep\n"


def test_remove_tree_racing_a_directory_swapped_for_a_symlink_never_touches_the_target(tmp_path: Path) -> None:
    outside = target(tmp_path)
    before = modes(outside)
    tree, link = tmp_path / "tree", tmp_path / "link"
    link.symlink_to(outside)
    # The attacker, in a process of its own: swap tree/sub and the symlink, endlessly.
    swapper = subprocess.Popen([sys.executable, "-c",
                                "import sys\nfrom cfsdeploy.util.fsutil import exchange\nwhile True:\n"
                                "    try: exchange(sys.argv[1], sys.argv[2])\n    except OSError: pass",
                                tree / "sub", link])
    try:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            build = tmp_path / "build"
            (build / "sub" / "deeper").mkdir(parents=True)
            (build / "sub").chmod(0o500)
            build.rename(tree)
            # A lost race may fail a removal (it is tried again); it must never follow.
            while os.path.lexists(tree):
                with contextlib.suppress(OSError):
                    remove_tree(tree)
            if not link.is_symlink():  # the directory was swapped out there: the link back
                with contextlib.suppress(OSError):
                    remove_tree(link)
                    link.symlink_to(outside)
    finally:
        swapper.kill()
        swapper.wait()
    assert modes(outside) == before and (outside / "file").read_bytes() == b"keep\n"


def test_remove_tree_refuses_a_path_whose_directory_is_a_symlink(tmp_path: Path) -> None:
    outside = target(tmp_path)
    (tmp_path / "link").symlink_to(outside)
    with pytest.raises(UnsafePathError):
        remove_tree(tmp_path / "link" / "file")
    assert (outside / "file").read_bytes() == b"keep\n"


def test_remove_tree_of_a_missing_path_does_nothing(tmp_path: Path) -> None:
    remove_tree(tmp_path / "absent")
    assert os.listdir(tmp_path) == []


def test_remove_tree_removes_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    remove_tree(tmp_path / "f")
    assert os.listdir(tmp_path) == []


def test_remove_tree_without_dac_capabilities_removes_a_directory_of_mode_0000(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to drop capabilities")
    tree = tmp_path / "tree"
    (tree / "closed" / "inner").mkdir(parents=True)
    (tree / "closed" / "inner" / "f").write_bytes(b"x")
    (tree / "closed" / "inner").chmod(0o000)
    (tree / "closed").chmod(0o000)
    # Root without DAC_OVERRIDE/DAC_READ_SEARCH is refused like the directory's owner.
    run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search",
         sys.executable, "-c", "import sys\nfrom cfsdeploy.util.fsutil import remove_tree\nremove_tree(sys.argv[1])",
         str(tree)])
    assert not os.path.lexists(tree)


def test_remove_tree_does_not_cross_a_mount_point(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount")
    mnt = tmp_path / "tree" / "mnt"
    mnt.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "canary", str(mnt)], check=True)
    try:
        (mnt / "file").write_bytes(b"keep\n")
        with pytest.raises(OSError) as e:
            remove_tree(tmp_path / "tree")
        assert e.value.errno == errno.EXDEV
        assert (mnt / "file").read_bytes() == b"keep\n"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# open_beneath, with openat2 and with the walk kernels without it get

OPENERS: dict[str, Callable[[int, bytes, int], int]] = {"openat2": open_beneath, "walk": open_beneath_walk}


@pytest.fixture
def top(tmp_path: Path) -> Iterator[int]:
    (tmp_path / "top" / "dir").mkdir(parents=True)
    (tmp_path / "top" / "dir" / "file").write_bytes(b"inside\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "file").write_bytes(b"outside\n")
    (tmp_path / "top" / "link").symlink_to(outside)
    (tmp_path / "top" / "dir" / "filelink").symlink_to(outside / "file")
    fd = os.open(tmp_path / "top", os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


@pytest.mark.parametrize("opener", OPENERS)
def test_open_beneath_opens_a_path_of_directories(top: int, opener: str) -> None:
    fd = OPENERS[opener](top, b"dir/file", os.O_RDONLY)
    try:
        assert os.read(fd, 100) == b"inside\n"
    finally:
        os.close(fd)


@pytest.mark.parametrize("opener", OPENERS)
def test_open_beneath_refuses_a_symlink_on_the_way(top: int, opener: str) -> None:
    with pytest.raises(UnsafePathError) as e:
        OPENERS[opener](top, b"link/file", os.O_RDONLY)
    assert e.value.errno == errno.ELOOP


@pytest.mark.parametrize("opener", OPENERS)
def test_open_beneath_refuses_a_symlink_at_the_end(top: int, opener: str) -> None:
    with pytest.raises(UnsafePathError):
        OPENERS[opener](top, b"dir/filelink", os.O_RDONLY)


@pytest.mark.parametrize("opener", OPENERS)
def test_open_beneath_with_o_path_gives_a_trailing_symlink_itself(top: int, opener: str) -> None:
    fd = OPENERS[opener](top, b"dir/filelink", os.O_PATH)
    try:
        assert stat.S_ISLNK(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


@pytest.mark.parametrize("opener", OPENERS)
@pytest.mark.parametrize("rel", [b"../outside/file", b"dir/../dir/file", b"/dir/file/..", b""])
def test_open_beneath_refuses_anything_but_plain_names(top: int, opener: str, rel: bytes) -> None:
    with pytest.raises(UnsafePathError):
        OPENERS[opener](top, rel, os.O_RDONLY)
