"""Mounting with the real kernel, proven with images from Debian's mkfs.erofs.

mkfs.erofs 1.5 keeps everything make_everything_tree creates (owners up to
4000000000, nanosecond mtimes of files, directories and symlinks, devices with
major > 255, hardlink counts, user/trusted/security xattrs with binary values,
POSIX ACLs, non-UTF-8 names) with one exception: it fails outright
("Could not format the device : [Error 2] No such file or directory") on a
255-byte name, so the mkfs tree drops that one entry.  It also writes holes out
as data (the 3 GiB sparse file makes a 3 GiB image); content still matches.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from cfsdeploy.composefs import mounts
from cfsdeploy.composefs.erofs import COMPOSEFS_FLAGS_HAS_ACL, COMPOSEFS_HEADER, COMPOSEFS_MAGIC
from cfsdeploy.composefs.mounts import (
    attach_loop,
    can_mount,
    detach_loop,
    mount_composefs,
    mount_erofs,
    mounted_composefs,
    unmount,
)
from cfsdeploy.util.errors import MountError
from cfsdeploy.util.run import run

from .fstree import DEPTH, MANY_ENTRIES, SPARSE_SIZE, compare_trees, make_everything_tree

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("requires_mount")]

LONG_NAME = b"n" * 255
# overlayfs hides its own xattrs from listxattr, so trees seen through it lack them.
OVERLAY_XATTRS = (b"trusted.overlay.",)


def mkfs_erofs(image: Path, tree: Path) -> None:
    run(["mkfs.erofs", "--quiet", image, tree], capture=True)


def loops_backed_by(image: Path) -> list[str]:
    """Names of the loop devices whose backing file is image."""
    found = []
    for f in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            backing = f.read_text().rstrip("\n").removesuffix(" (deleted)")
        except FileNotFoundError:  # detached while we looked
            continue
        if backing == str(image.resolve()):
            found.append(f.parent.parent.name)
    return found


def mounts_under(path: Path) -> list[tuple[str, str, str]]:
    """(mount point, fstype, super options) of every mount at or below path."""
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields, _, rest = line.partition(" - ")
            target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields.split()[4])
            fstype, _source, options = rest.split()
            if target == prefix or target.startswith(prefix + "/"):
                found.append((target, fstype, options))
    return found


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory, requires_mount: None) -> Path:
    """The everything-tree minus the 255-byte name that mkfs.erofs 1.5 cannot handle."""
    root = tmp_path_factory.mktemp("tree") / "root"
    make_everything_tree(root)
    names = os.fsencode(root / "names")
    st = os.stat(names)
    os.unlink(os.path.join(names, LONG_NAME))
    os.utime(names, ns=(st.st_atime_ns, st.st_mtime_ns))
    return root


@pytest.fixture(scope="module")
def image(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("image") / "tree.erofs"
    mkfs_erofs(path, tree)
    yield path
    path.unlink()  # 3 GiB: pytest keeps old temp dirs, so do not leave it there


@pytest.fixture(scope="module")
def small_image(tmp_path_factory: pytest.TempPathFactory, requires_mount: None) -> Path:
    """A quick image for tests about mounting rather than content."""
    top = tmp_path_factory.mktemp("small")
    (top / "tree").mkdir()
    (top / "tree" / "file").write_bytes(b"hello\n")
    path = top / "small.erofs"
    mkfs_erofs(path, top / "tree")
    return path


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point tempfile at an empty directory, so stray temp dirs can be seen."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    for target, _, _ in reversed(mounts_under(path)):
        unmount(target, lazy=True)


def test_everything_tree_holds_what_it_promises(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_everything_tree(root)
    sparse = os.stat(root / "regular" / "sparse")
    assert sparse.st_size == SPARSE_SIZE and sparse.st_blocks * 512 < 1 << 20
    assert os.stat(root / "hardlinks" / "b" / "second").st_nlink == 3
    assert stat.S_ISBLK(os.stat(root / "special" / "block-nvme").st_mode)
    assert os.major(os.stat(root / "special" / "char-major-511").st_rdev) == 511
    assert len(os.listdir(root / "many")) == MANY_ENTRIES
    assert len(os.readlink(root / "symlinks" / "long")) == 4000
    assert os.stat(root / "owners" / "file-4000000000").st_uid == 4000000000
    assert b"system.posix_acl_default" in map(os.fsencode, os.listxattr(root / "acl" / "dir"))
    assert {b"\xff\xfe", LONG_NAME, b"new\nline"} <= set(os.listdir(os.fsencode(root / "names")))
    assert (root / "deep").joinpath(*(f"d{i:02d}" for i in range(DEPTH)), "bottom").read_bytes() == b"deep"
    assert os.stat(root / "regular" / "one").st_mtime_ns % 1_000_000_000 != 0


def test_compare_trees_reports_every_kind_of_difference(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    make_everything_tree(a)
    make_everything_tree(b)
    assert compare_trees(a, b) == []

    os.chmod(b / "modes" / "setuid", 0o755)
    os.chown(b / "owners" / "file-1000", 1001, 65535)
    os.utime(b / "symlinks" / "relative", ns=(0, 1), follow_symlinks=False)
    os.unlink(b / "special" / "block-sda")
    os.mknod(b / "special" / "block-sda", stat.S_IFBLK | 0o640, os.makedev(8, 1))
    os.link(b / "regular" / "one", b / "regular" / "extra")
    (b / "regular" / "page").write_bytes(b"\0" * 4096)
    (b / "regular" / "sixty-five").write_bytes(b"short")
    os.unlink(b / "symlinks" / "dangling")
    os.symlink("elsewhere", b / "symlinks" / "dangling")
    os.removexattr(b / "xattrs" / "file", b"user.binary")
    os.setxattr(b / "xattrs" / "file", b"user.plain", b"other")
    os.unlink(b / "special" / "fifo")
    with open(b / "regular" / "sparse", "r+b") as f:
        f.seek(SPARSE_SIZE // 2)
        f.write(b"x")  # in a hole of a

    diffs = "\n".join(compare_trees(a, b, ignore_xattr_prefixes=(b"user.binary",)))
    for expected in (
        "/modes/setuid: mode 0o104755 != 0o100755",
        "/owners/file-1000: uid 1000 != 1001",
        "/symlinks/relative: mtime_ns",
        "/special/block-sda: rdev 8:0 != 8:1",
        "/regular/one: nlink 1 != 2",
        "/regular/extra: unexpected",
        "/regular/page: content differs",
        "/regular/sixty-five: size 65 != 5",
        "/symlinks/dangling: symlink target b'nowhere/at/all' != b'elsewhere'",
        "/xattrs/file: xattr b'user.plain' b'value' != b'other'",
        "/special/fifo: missing",
        "/regular/sparse: content differs",
    ):
        assert expected in diffs
    assert "/owners/file-1000: gid" not in diffs  # equal fields are not reported
    assert "user.binary" not in diffs  # ignored prefix


def test_mount_erofs_shows_the_tree_exactly(image: Path, tree: Path, mnt: Path) -> None:
    mount_erofs(image, mnt)
    try:
        assert compare_trees(tree, mnt) == []
    finally:
        unmount(mnt)


def test_mounted_composefs_with_empty_basedir_shows_the_tree(image: Path, tree: Path, tmp_path: Path) -> None:
    # mkfs.erofs files are not metacopy, so overlayfs serves them from the image itself.
    basedir = tmp_path / "objects"
    basedir.mkdir()
    with mounted_composefs(image, basedir) as root:
        assert compare_trees(tree, root, ignore_xattr_prefixes=OVERLAY_XATTRS) == []


def test_mounted_composefs_is_a_readonly_overlay(small_image: Path, tmp_path: Path) -> None:
    with mounted_composefs(small_image, tmp_path) as root:
        [(target, fstype, options)] = mounts_under(root)
        assert (target, fstype) == (str(root), "overlay")
        assert "ro" in options.split(",")
        assert (root / "file").read_bytes() == b"hello\n"
        with pytest.raises(OSError) as e:
            (root / "new").write_bytes(b"")
        assert e.value.errno == errno.EROFS


def test_mounted_composefs_with_verity_passes_verity_require(small_image: Path, tmp_path: Path) -> None:
    with mounted_composefs(small_image, tmp_path, verity=True) as root:
        assert "verity=require" in mounts_under(root)[0][2].split(",")
        assert (root / "file").read_bytes() == b"hello\n"


def test_basedir_with_comma_colon_backslash_is_escaped(small_image: Path, tmp_path: Path) -> None:
    basedir = tmp_path / "odd,dir:name\\x"
    basedir.mkdir()
    with mounted_composefs(small_image, basedir) as root:
        assert (root / "file").read_bytes() == b"hello\n"


def test_mounted_composefs_leaves_nothing_behind(small_image: Path, tmp_path: Path, private_tmp: Path) -> None:
    with mounted_composefs(small_image, tmp_path) as root:
        assert loops_backed_by(small_image)
    assert not root.exists()
    assert_nothing_left(small_image, private_tmp)


def assert_nothing_left(image: Path, private_tmp: Path) -> None:
    assert mounts_under(private_tmp) == []
    assert loops_backed_by(image) == []
    assert list(private_tmp.iterdir()) == []


def test_mounted_composefs_cleans_up_when_the_body_raises(
    small_image: Path, tmp_path: Path, private_tmp: Path
) -> None:
    with pytest.raises(RuntimeError), mounted_composefs(small_image, tmp_path):
        raise RuntimeError("boom")
    assert_nothing_left(small_image, private_tmp)


def test_mounted_composefs_detaches_lazily_while_a_file_is_open(
    small_image: Path, tmp_path: Path, private_tmp: Path
) -> None:
    with mounted_composefs(small_image, tmp_path) as root:
        f = open(root / "file", "rb")
    try:
        assert not root.exists() and mounts_under(private_tmp) == []
        assert f.read() == b"hello\n"
        assert loops_backed_by(small_image)  # the open file keeps the image alive
    finally:
        f.close()
    assert loops_backed_by(small_image) == []


def test_loop_device_is_freed_after_unmount(small_image: Path, mnt: Path) -> None:
    mount_erofs(small_image, mnt)
    assert len(loops_backed_by(small_image)) == 1
    unmount(mnt)
    assert loops_backed_by(small_image) == []


def assert_readonly_autoclear_4k(device: str, image: Path) -> None:
    sysfs = Path("/sys/block") / Path(device).name
    assert (sysfs / "loop" / "backing_file").read_text().strip() == str(image.resolve())
    assert (sysfs / "ro").read_text().strip() == "1"
    assert (sysfs / "loop" / "autoclear").read_text().strip() == "1"
    assert (sysfs / "queue" / "logical_block_size").read_text().strip() == "4096"


def test_attach_loop_configures_readonly_autoclear_4k(small_image: Path) -> None:
    with attach_loop(small_image) as loop:
        assert_readonly_autoclear_4k(loop.path, small_image)
    assert loops_backed_by(small_image) == []  # closing an unmounted device frees it


def test_attach_loop_falls_back_without_loop_configure(small_image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mounts, "LOOP_CONFIGURE", 0x4CFF)  # unknown to the kernel: EINVAL
    with attach_loop(small_image) as loop:
        assert_readonly_autoclear_4k(loop.path, small_image)
    assert loops_backed_by(small_image) == []


def test_detach_loop_frees_the_device_once_released(small_image: Path) -> None:
    loop = attach_loop(small_image)
    try:
        detach_loop(loop.path)
        assert loops_backed_by(small_image)  # still open by us
    finally:
        loop.close()
    assert loops_backed_by(small_image) == []


def test_mount_erofs_of_garbage_fails_without_leaking_a_loop(tmp_path: Path, mnt: Path) -> None:
    garbage = tmp_path / "garbage.img"
    garbage.write_bytes(os.urandom(1 << 16))
    with pytest.raises(MountError, match=r"EINVAL .*not an EROFS image") as e:
        mount_erofs(garbage, mnt)
    assert "\n" not in str(e.value)
    assert loops_backed_by(garbage) == []
    assert mounts_under(mnt) == []


def test_mount_composefs_failure_leaves_no_mount_loop_or_temp_dir(
    small_image: Path, mnt: Path, tmp_path: Path, private_tmp: Path
) -> None:
    with pytest.raises(MountError, match="ENOENT") as e:
        mount_composefs(small_image, mnt, tmp_path / "no-such-basedir")
    assert "\n" not in str(e.value)
    assert mounts_under(mnt) == [] and mounts_under(private_tmp) == []
    assert loops_backed_by(small_image) == []
    assert list(private_tmp.iterdir()) == []


def test_overlay_einval_on_old_kernel_hints_at_linux_6_5(
    small_image: Path, mnt: Path, tmp_path: Path, private_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_mount = mounts._mount

    def refuse_overlay(source: object, target: object, fstype: str, flags: int, data: bytes) -> int:
        return errno.EINVAL if fstype == "overlay" else real_mount(source, target, fstype, flags, data)

    monkeypatch.setattr(mounts, "_mount", refuse_overlay)
    monkeypatch.setattr(mounts.os, "uname", lambda: SimpleNamespace(release="6.1.0-13-amd64"))
    with pytest.raises(MountError, match=r"EINVAL .*needs Linux 6\.5\+"):
        mount_composefs(small_image, mnt, tmp_path)
    assert loops_backed_by(small_image) == []
    assert list(private_tmp.iterdir()) == []


@pytest.mark.parametrize(
    ("header", "noacl"),
    [
        (COMPOSEFS_HEADER.pack(COMPOSEFS_MAGIC, 1, 0, 0), True),
        (COMPOSEFS_HEADER.pack(COMPOSEFS_MAGIC, 1, COMPOSEFS_FLAGS_HAS_ACL, 0), False),
        (None, False),
    ],
    ids=["composefs-without-acls", "composefs-with-acls", "plain-erofs"],
)
def test_mount_erofs_passes_noacl_only_for_composefs_images_without_acls(
    small_image: Path, tmp_path: Path, mnt: Path, header: bytes | None, noacl: bool
) -> None:
    image = tmp_path / "image.erofs"
    data = bytearray(small_image.read_bytes())
    if header is not None:
        data[: len(header)] = header  # EROFS leaves the first 1024 bytes to us
    image.write_bytes(data)
    mount_erofs(image, mnt)
    try:
        options = mounts_under(mnt)[0][2].split(",")
        assert ("noacl" in options) == noacl
    finally:
        unmount(mnt)


def test_can_mount_here() -> None:
    assert can_mount() == (True, "root with loop devices, erofs and overlayfs")


def test_can_mount_says_why_not_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mounts.os, "geteuid", lambda: 1000)
    assert can_mount() == (False, "not running as root")


def test_mount_erofs_of_missing_image_raises_mount_error(tmp_path: Path, mnt: Path) -> None:
    with pytest.raises(MountError, match=r"cannot read .*missing\.img: ENOENT"):
        mount_erofs(tmp_path / "missing.img", mnt)
