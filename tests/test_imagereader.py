"""The image reader: what it reads from real EROFS images, and how it meets broken ones.

Images come from Debian's mkfs.erofs, independent of our writer: plain images for the
EROFS side, and images of trees that carry composefs's overlay xattrs (plus a patched-in
composefs header) for the composefs conventions.  Corrupt and hostile images are made
from those by truncating, flipping bytes and aiming fields at the reader's weak spots.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfsdeploy.composefs import erofs as E
from cfsdeploy.composefs import imagereader
from cfsdeploy.composefs.tree import INLINE_MAX, Hardlink, Inode, resolve, walk
from cfsdeploy.util.errors import ImageError

MKFS = shutil.which("mkfs.erofs") or next(
    (p for p in ("/usr/sbin/mkfs.erofs", "/usr/bin/mkfs.erofs") if os.path.exists(p)), None)

SB = E.SUPER_OFFSET
SB_COMPAT = SB + 8
SB_BLKSZBITS = SB + 12
SB_ROOT_NID = SB + 14
SB_BLOCKS = SB + 36
SB_INCOMPAT = SB + 80

DIGEST = bytes(range(32))
METACOPY = bytes((0, 36, 0, 1)) + DIGEST
OBJECT_PATH = b"00/" + bytes(range(1, 32)).hex().encode()

HANG_SECONDS = 5
FUZZ = settings(max_examples=400, deadline=2000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------- helpers


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail a read that does not finish: hypothesis deadlines only judge reads that end."""
    def expire(signum: int, frame: object) -> None:
        raise Hang(f"the reader did not finish within {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def read_or_reject(data: bytes | bytearray) -> imagereader.Image | None:
    """Read an image that may be broken: a tree or an ImageError, nothing else, in time."""
    with time_limit(HANG_SECONDS):
        try:
            return imagereader.read_image(bytes(data))
        except ImageError:
            return None


def mkfs(src: Path, image: Path, *options: str) -> bytes:
    if MKFS is None:
        pytest.skip("mkfs.erofs (erofs-utils) is not installed")
    subprocess.run([MKFS, "--quiet", *options, str(image), str(src)], check=True,
                   stdout=subprocess.DEVNULL)
    return image.read_bytes()


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("building the source trees needs root (device nodes, chown, trusted.* xattrs)")


def composefs_header(image: bytes, version: int = 1, flags: int = 0, cfs_version: int = 1) -> bytes:
    """mkfs.erofs leaves the first 1024 bytes zero: room for the composefs header."""
    assert image[:32] == bytes(32)
    return E.COMPOSEFS_HEADER.pack(E.COMPOSEFS_MAGIC, version, flags, cfs_version) + image[32:]


def patched(image: bytes, offset: int, fmt: str, *values: int) -> bytes:
    data = bytearray(image)
    struct.pack_into(fmt, data, offset, *values)
    return bytes(data)


def set_all_mtimes(top: Path) -> None:
    """Give every path its own mtime, all different from the build time: extended inodes."""
    paths = [top] + sorted(top.rglob("*"))
    for i, p in enumerate(paths):
        ns = (1_000_000_000 + 1000 * i) * 10**9 + 7 * i + 1
        os.utime(p, ns=(ns, ns), follow_symlinks=False)


def tiny_image(names: list[bytes]) -> bytes:
    """A hand-made plain EROFS image for dirent shapes mkfs.erofs cannot make: the root
    directory (nid 36, data in block 1) lists names, all hard links to one empty file."""
    root_nid, file_nid = 36, 38  # the first slots after the superblock
    entries = sorted([b".", b".."] + names)
    heads, nameoff = b"", E.DIRENT.size * len(entries)
    for name in entries:
        nid, ftype = (root_nid, E.FT_DIR) if name in (b".", b"..") else (file_nid, E.FT_REG_FILE)
        heads += E.DIRENT.pack(nid, nameoff, ftype)
        nameoff += len(name)
    block = heads + b"".join(entries)
    image = bytearray(2 * E.BLKSIZ)
    E.SUPERBLOCK.pack_into(image, SB, E.SUPER_MAGIC_V1, 0, 0, E.BLKSIZ_BITS, 0, root_nid, 2, 0, 0,
                           2, 0, 0, bytes(16), bytes(16), 0)
    E.INODE_COMPACT.pack_into(image, root_nid * E.SLOTSIZE, 0, 0, stat.S_IFDIR | 0o755, 2, len(block),
                              0, 1, 0, 0, 0, 0)
    E.INODE_COMPACT.pack_into(image, file_nid * E.SLOTSIZE, 0, 0, stat.S_IFREG | 0o644, len(names), 0,
                              0, 0, 1, 0, 0, 0)
    image[E.BLKSIZ:E.BLKSIZ + len(block)] = block
    return bytes(image)


@dataclass
class Dirent:
    at: int  # image offset of the dirent
    name_at: int  # image offset of its name
    dir_nid: int
    name: bytes
    nid: int
    ftype: int


@dataclass
class Layout:
    """Where things sit in a valid image, found with the reader's own decoding."""

    meta: int
    inodes: dict[int, imagereader._Raw] = field(default_factory=dict)
    parents: dict[int, int] = field(default_factory=dict)
    dirents: list[Dirent] = field(default_factory=list)

    def inode_offset(self, nid: int) -> int:
        return self.meta + nid * E.SLOTSIZE

    def extended(self, nid: int) -> bool:
        return self.inodes[nid].xattr_start - self.inode_offset(nid) == E.INODE_EXTENDED.size

    def entry(self, name: bytes) -> Dirent:
        return next(d for d in self.dirents if d.name == name)


def locate(image: bytes) -> Layout:
    r = imagereader._Reader(image)
    out = Layout(r.meta)
    stack = [(r.root_nid, r.root_nid)]
    while stack:
        nid, parent = stack.pop()
        if nid in out.inodes:
            continue
        raw = out.inodes[nid] = r.inode(nid)
        if raw.type != stat.S_IFDIR:
            continue
        out.parents[nid] = parent
        start, head, tail = r._extent(raw)
        blocks = [start + k for k in range(0, head, E.BLKSIZ)] + ([raw.body] if tail else [])
        places = []
        for block in blocks:
            count = struct.unpack_from("<H", image, block + 8)[0] // E.DIRENT.size
            places += [(block + E.DIRENT.size * i,
                        block + struct.unpack_from("<H", image, block + E.DIRENT.size * i + 8)[0])
                       for i in range(count)]
        entries = r.dirents(raw)
        assert len(places) == len(entries)
        for (at, name_at), (name, child, ftype) in zip(places, entries, strict=True):
            out.dirents.append(Dirent(at, name_at, nid, name, child, ftype))
            if name not in (b".", b".."):
                stack.append((child, nid))
    return out


# ---------------------------------------------------------------- source trees


ACL = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in (
    (0x01, 6, 0xFFFFFFFF), (0x02, 4, 1000), (0x04, 4, 0xFFFFFFFF), (0x10, 4, 0xFFFFFFFF),
    (0x20, 4, 0xFFFFFFFF)))
# mkfs.erofs 1.5 fails on 255-byte names; tiny_image covers the 255 limit itself.
LONG_NAME = b"n" * 254
ODD_NAME = b"\xff\xfenot-utf8"
MANY = 2000


def build_plain_source(top: Path) -> None:
    """A tree touching every feature the reader maps: types, sizes, names, owners, xattrs."""
    top.mkdir()
    (top / "empty").write_bytes(b"")
    (top / "small").write_bytes(b"hello\n")
    (top / "inline-max").write_bytes(bytes(i % 251 for i in range(INLINE_MAX)))
    (top / "just-over").write_bytes(b"o" * (INLINE_MAX + 1))
    (top / "one-block").write_bytes(b"b" * E.BLKSIZ)
    (top / "big").write_bytes(bytes(i % 241 for i in range(3 * E.BLKSIZ + 100)))
    deep = top / "a" / "b" / "c" / "d"
    deep.mkdir(parents=True)
    (deep / "deep-file").write_bytes(b"deep")
    many = top / "many"
    many.mkdir()
    for i in range(MANY):
        (many / f"entry-{i:05d}").write_bytes(b"")
    for name in (b"!bang", b"-dash", ODD_NAME, LONG_NAME):
        (top / os.fsdecode(name)).write_bytes(name[:10])
    (top / "short-link").symlink_to("small")
    (top / "long-link").symlink_to("t" * 4000)
    os.mkfifo(top / "fifo")
    os.mknod(top / "socket", stat.S_IFSOCK | 0o600)
    os.mknod(top / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(top / "disk", stat.S_IFBLK | 0o660, os.makedev(8, 1))
    os.mknod(top / "bigdev", stat.S_IFCHR | 0o600, os.makedev(300, 70000))
    os.link(top / "small", top / "a" / "small-link")
    os.link(top / "big", top / "zz-big-link")
    os.link(top / "fifo", top / "a" / "b" / "fifo-link")
    (top / "owned").write_bytes(b"mine")
    os.lchown(top / "owned", 100000, 200000)
    os.lchown(top / "short-link", 70000, 70001)
    os.chmod(top / "a" / "b", 0o1777)
    os.chmod(top / "small", 0o4751)
    os.setxattr(top / "small", "user.comment", b"hi")
    os.setxattr(top / "big", "user.long", bytes(range(256)) * 8)
    os.setxattr(top / "big", "security.label", b"\xff\x00\x01")
    os.setxattr(top / "a", "trusted.dir", b"d")
    os.setxattr(top / "long-link", "trusted.on-a-link", b"l", follow_symlinks=False)
    os.setxattr(top / "owned", "system.posix_acl_access", ACL)
    for name in ("empty", "inline-max", "just-over", "one-block", "owned", "fifo"):
        # The same pair on many inodes: mkfs.erofs moves it to the shared table.
        os.setxattr(top / name, "trusted.shared", b"same value", follow_symlinks=False)
    set_all_mtimes(top)


def build_composefs_source(top: Path) -> None:
    """A tree as composefs's writer leaves it: overlay xattrs, escapes, whiteout stubs."""
    top.mkdir()
    os.setxattr(top, "trusted.overlay.opaque", b"y")
    for stub in ("00", "01"):
        os.mknod(top / stub, stat.S_IFCHR | 0o644, os.makedev(0, 0))
    (top / "ext").write_bytes(b"e" * 10000)
    os.setxattr(top / "ext", "trusted.overlay.metacopy", METACOPY)
    os.setxattr(top / "ext", "trusted.overlay.redirect", b"/" + OBJECT_PATH)
    (top / "ext-nodigest").write_bytes(b"f" * 100)
    os.setxattr(top / "ext-nodigest", "trusted.overlay.metacopy", b"")
    os.setxattr(top / "ext-nodigest", "trusted.overlay.redirect", b"/" + OBJECT_PATH)
    (top / "escaped").write_bytes(b"")
    os.setxattr(top / "escaped", "trusted.overlay.overlay.origin", b"o")
    os.setxattr(top / "escaped", "user.keep", b"1")
    wd = top / "wd"
    wd.mkdir()
    for key, value in ((b"trusted.overlay.overlay.whiteouts", b""), (b"user.overlay.whiteouts", b""),
                       (b"trusted.overlay.overlay.opaque", b"x"), (b"user.overlay.opaque", b"x"),
                       (b"user.other", b"kept")):
        os.setxattr(wd, key, value)
    (wd / "gone").write_bytes(b"")
    os.chmod(wd / "gone", 0o640)
    os.setxattr(wd / "gone", "trusted.overlay.overlay.whiteout", b"")
    os.setxattr(wd / "gone", "user.overlay.whiteout", b"")
    od = top / "od"
    od.mkdir()
    os.setxattr(od, "trusted.overlay.overlay.opaque", b"x")
    os.setxattr(od, "user.overlay.opaque", b"x")
    set_all_mtimes(top)


def build_fuzz_source(top: Path) -> None:
    """Small but varied, so each fuzzed read is quick and reaches every kind of structure."""
    top.mkdir()
    (top / "small").write_bytes(b"hello")
    (top / "tail").write_bytes(b"t" * (E.BLKSIZ + 300))
    (top / "link").symlink_to("small")
    (top / "far-link").symlink_to("f" * 3000)
    sub = top / "d" / "e"
    sub.mkdir(parents=True)
    (sub / "f").write_bytes(b"f")
    os.link(top / "small", sub / "hard")
    dense = top / "dense"
    dense.mkdir()
    for i in range(300):
        (dense / f"{i:03d}-{'x' * 10}").write_bytes(b"")
    os.mknod(top / "dev", stat.S_IFCHR | 0o600, os.makedev(4, 5))
    os.mkfifo(top / "fifo")
    for name in ("small", "tail", "d", "fifo"):
        os.setxattr(top / name, "trusted.shared", b"v")
    os.setxattr(top / "small", "trusted.overlay.metacopy", METACOPY)
    os.setxattr(top / "small", "trusted.overlay.redirect", b"/" + OBJECT_PATH)
    os.setxattr(top / "d", "trusted.overlay.overlay.x", b"1")
    set_all_mtimes(top)


@dataclass
class Built:
    variant: str
    src: Path
    data: bytes
    image: imagereader.Image


VARIANTS = {"default": (), "noinline": ("-Enoinline_data",), "chunked": ("--chunksize=4096",)}


@pytest.fixture(scope="module")
def plain_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_root()
    top = tmp_path_factory.mktemp("plain") / "src"
    build_plain_source(top)
    return top


@pytest.fixture(scope="module")
def images(plain_src: Path) -> dict[str, Built]:
    out = {}
    for variant, options in VARIANTS.items():
        data = mkfs(plain_src, plain_src.parent / f"{variant}.erofs", *options)
        out[variant] = Built(variant, plain_src, data, imagereader.read_image(data))
    return out


@pytest.fixture(params=sorted(VARIANTS))
def plain(request: pytest.FixtureRequest, images: dict[str, Built]) -> Built:
    return images[request.param]


@pytest.fixture(params=["default", "noinline"])
def flat(request: pytest.FixtureRequest, images: dict[str, Built]) -> Built:
    """Images whose regular files are flat (tail inline or not), not chunk-based."""
    return images[request.param]


@pytest.fixture
def default(images: dict[str, Built]) -> Built:
    return images["default"]


@pytest.fixture(scope="module")
def cfs(tmp_path_factory: pytest.TempPathFactory) -> Built:
    need_root()
    top = tmp_path_factory.mktemp("cfs") / "src"
    build_composefs_source(top)
    # composefs stores external files chunk-based; --chunksize makes mkfs.erofs do the same.
    data = composefs_header(mkfs(top, top.parent / "cfs.erofs", "--chunksize=4096"),
                            flags=E.COMPOSEFS_FLAGS_HAS_ACL)
    return Built("composefs", top, data, imagereader.read_image(data))


@pytest.fixture(scope="module")
def fuzz_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    need_root()
    top = tmp_path_factory.mktemp("fuzz") / "src"
    build_fuzz_source(top)
    data = composefs_header(mkfs(top, top.parent / "fuzz.erofs"))
    assert imagereader.read_image(data).root.children
    return data


@pytest.fixture(scope="module")
def fuzz_layout(fuzz_image: bytes) -> Layout:
    return locate(fuzz_image)


def source_paths(top: Path) -> list[bytes]:
    """Every path under top as the reader names it (b"/", b"/a", ...), in walk order."""
    out = [b"/"]
    stack = [(b"", sorted(os.listdir(os.fsencode(top))), 0)]
    while stack:
        prefix, names, i = stack.pop()
        if i == len(names):
            continue
        stack.append((prefix, names, i + 1))
        path = prefix + b"/" + names[i]
        out.append(path)
        full = os.fsencode(top) + path
        if stat.S_ISDIR(os.lstat(full).st_mode):
            stack.append((path, sorted(os.listdir(full)), 0))
    return out


def pairs(built: Built) -> Iterator[tuple[bytes, os.stat_result, Inode | Hardlink]]:
    """(source path, its lstat, the image's entry for it), in walk order."""
    entries = dict(walk(built.image.root))
    for path in source_paths(built.src):
        yield os.fsencode(built.src) + path, os.lstat(os.fsencode(built.src) + path), entries[path]


def source_xattrs(path: bytes) -> dict[bytes, bytes]:
    return {os.fsencode(k): os.getxattr(path, k, follow_symlinks=False)
            for k in sorted(os.listxattr(path, follow_symlinks=False))}


# ---------------------------------------------------------------- plain EROFS images


def test_every_source_path_is_in_the_image_and_nothing_else(plain: Built) -> None:
    assert [p for p, _ in walk(plain.image.root)] == source_paths(plain.src)


def test_non_utf8_and_254_byte_names_are_read_as_bytes(plain: Built) -> None:
    assert {ODD_NAME, LONG_NAME, b"!bang", b"-dash"} <= set(plain.image.root.children)


def test_directory_spread_over_many_blocks_lists_every_entry(plain: Built) -> None:
    many = plain.image.root.children[b"many"]
    assert sorted(many.children) == [b"entry-%05d" % i for i in range(MANY)]


def test_modes_match_the_source(plain: Built) -> None:
    for path, lst, entry in pairs(plain):
        assert resolve(entry).mode == lst.st_mode, path


def test_owners_match_the_source_including_ids_over_65535(plain: Built) -> None:
    for path, lst, entry in pairs(plain):
        assert (resolve(entry).uid, resolve(entry).gid) == (lst.st_uid, lst.st_gid), path
    assert plain.image.root.children[b"owned"].uid == 100000


def test_nlink_comes_from_the_image_for_files_and_directories(plain: Built) -> None:
    for path, lst, entry in pairs(plain):
        assert resolve(entry).nlink == lst.st_nlink, path


def test_mtimes_of_extended_inodes_match_the_source(plain: Built) -> None:
    for path, lst, entry in pairs(plain):
        node = resolve(entry)
        assert (node.mtime_sec, node.mtime_nsec) == divmod(lst.st_mtime_ns, 10**9), path


def test_device_numbers_match_the_source(plain: Built) -> None:
    for path, lst, entry in pairs(plain):
        if stat.S_ISCHR(lst.st_mode) or stat.S_ISBLK(lst.st_mode):
            assert resolve(entry).rdev == lst.st_rdev, path
    assert plain.image.root.children[b"bigdev"].rdev == os.makedev(300, 70000)


def test_symlink_targets_match_the_source_short_and_long(plain: Built) -> None:
    for path, lst, entry in pairs(plain):
        if stat.S_ISLNK(lst.st_mode):
            assert resolve(entry).payload == os.readlink(path), path
    assert len(plain.image.root.children[b"long-link"].payload) == 4000


def test_xattrs_match_the_source_sorted_by_name(plain: Built) -> None:
    for path, _, entry in pairs(plain):
        assert list(resolve(entry).xattrs.items()) == list(source_xattrs(path).items()), path


def test_sizes_of_regular_files_match_the_source(plain: Built) -> None:
    for path, lst, entry in pairs(plain):
        if stat.S_ISREG(lst.st_mode):
            assert resolve(entry).size == lst.st_size, path


def test_flat_files_up_to_5000_bytes_have_their_content(flat: Built) -> None:
    for path, lst, entry in pairs(flat):
        if stat.S_ISREG(lst.st_mode) and 0 < lst.st_size <= INLINE_MAX:
            assert resolve(entry).content == Path(os.fsdecode(path)).read_bytes(), path


def test_larger_flat_files_and_empty_files_have_no_content(plain: Built) -> None:
    for path, lst, entry in pairs(plain):
        if stat.S_ISREG(lst.st_mode) and not 0 < lst.st_size <= INLINE_MAX:
            assert resolve(entry).content is None, path


def test_chunk_based_files_have_a_size_and_no_content(images: dict[str, Built]) -> None:
    node = images["chunked"].image.root.children[b"inline-max"]
    assert (node.size, node.content) == (INLINE_MAX, None)


def test_first_name_in_sorted_preorder_is_the_inode_later_names_are_hardlinks(plain: Built) -> None:
    first: dict[int, Inode | Hardlink] = {}
    for path, lst, entry in pairs(plain):
        if lst.st_ino in first:
            assert isinstance(entry, Hardlink) and entry.target is first[lst.st_ino], path
        else:
            assert isinstance(entry, Inode), path
            first[lst.st_ino] = entry
    # "/a/small-link" comes before "/small" in a sorted pre-order walk.
    assert isinstance(plain.image.root.children[b"small"], Hardlink)


def test_plain_erofs_image_has_no_composefs_version(default: Built) -> None:
    img = default.image
    assert (img.composefs_version, img.has_acl_flag) == (None, False)
    assert img.blocks * E.BLKSIZ == len(default.data)
    assert img.inodes == len({os.lstat(p).st_ino for p, _, _ in pairs(default)})


def test_shared_xattrs_are_read(default: Built) -> None:
    layout = locate(default.data)
    r = imagereader._Reader(default.data)
    assert any(raw.xattr_size and r.data[raw.xattr_start + 4] for raw in layout.inodes.values())
    assert default.image.root.children[b"owned"].xattrs[b"trusted.shared"] == b"same value"


def test_compact_inodes_take_the_build_time(plain_src: Path) -> None:
    # -T gives every file the same mtime, the build time: all inodes that fit are compact.
    data = mkfs(plain_src, plain_src.parent / "fixed-time.erofs", "-T1234567")
    img = imagereader.read_image(data)
    assert img.build_time == (1234567, 0)
    assert {(resolve(e).mtime_sec, resolve(e).mtime_nsec) for _, e in walk(img.root)} == {(1234567, 0)}


def test_255_byte_names_are_read() -> None:
    assert list(imagereader.read_image(tiny_image([b"n" * 255])).root.children) == [b"n" * 255]


def test_read_image_file_reads_the_file(default: Built, tmp_path: Path) -> None:
    path = tmp_path / "copy.erofs"
    path.write_bytes(default.data)
    assert sorted(imagereader.read_image_file(path).root.children) == sorted(default.image.root.children)


def test_read_image_accepts_a_memoryview(default: Built) -> None:
    assert imagereader.read_image(memoryview(default.data)).inodes == default.image.inodes


def test_missing_image_file_is_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot read image"):
        imagereader.read_image_file(tmp_path / "nope")


# ---------------------------------------------------------------- composefs conventions


def test_composefs_header_gives_version_and_acl_flag(cfs: Built) -> None:
    assert (cfs.image.composefs_version, cfs.image.has_acl_flag) == (1, True)


def test_metacopy_becomes_the_raw_fs_verity_digest(cfs: Built) -> None:
    assert cfs.image.root.children[b"ext"].digest == DIGEST


def test_empty_metacopy_leaves_no_digest(cfs: Built) -> None:
    assert cfs.image.root.children[b"ext-nodigest"].digest is None


def test_redirect_becomes_the_payload_without_its_leading_slash(cfs: Built) -> None:
    assert cfs.image.root.children[b"ext"].payload == OBJECT_PATH


def test_external_files_keep_size_without_content_or_overlay_xattrs(cfs: Built) -> None:
    ext = cfs.image.root.children[b"ext"]
    assert (ext.size, ext.content, ext.xattrs) == (10000, None, {})


def test_escaped_overlay_xattrs_are_unescaped(cfs: Built) -> None:
    assert cfs.image.root.children[b"escaped"].xattrs == {
        b"trusted.overlay.origin": b"o", b"user.keep": b"1"}


def test_other_overlay_xattrs_are_dropped(cfs: Built) -> None:
    assert cfs.image.root.xattrs == {}


def test_writer_whiteout_stubs_are_skipped(cfs: Built) -> None:
    assert not {b"00", b"01"} & set(cfs.image.root.children)


def test_escaped_whiteout_becomes_a_whiteout_char_device(cfs: Built) -> None:
    gone = cfs.image.root.children[b"wd"].children[b"gone"]
    assert gone.is_whiteout() and gone.mode == stat.S_IFCHR | 0o640
    assert (gone.size, gone.rdev, gone.xattrs) == (0, 0, {})


def test_whiteout_markers_and_opaque_x_are_dropped_from_its_directory(cfs: Built) -> None:
    assert cfs.image.root.children[b"wd"].xattrs == {b"user.other": b"kept"}


def test_opaque_x_stays_on_a_directory_without_whiteouts(cfs: Built) -> None:
    assert cfs.image.root.children[b"od"].xattrs == {
        b"trusted.overlay.opaque": b"x", b"user.overlay.opaque": b"x"}


# ---------------------------------------------------------------- rejected images, one reason each


def test_directory_loop_is_reported(fuzz_image: bytes, fuzz_layout: Layout) -> None:
    e = fuzz_layout.entry(b"e")
    # /d/e now names /d itself.
    with pytest.raises(ImageError, match="loop"):
        imagereader.read_image(patched(fuzz_image, e.at, "<Q", e.dir_nid))


def test_hard_linked_directory_is_reported(fuzz_image: bytes, fuzz_layout: Layout) -> None:
    # /dense now names /d/e, already reached through /d.
    with pytest.raises(ImageError, match="loop"):
        imagereader.read_image(patched(fuzz_image, fuzz_layout.entry(b"dense").at, "<Q",
                                       fuzz_layout.entry(b"e").nid))


def test_dirent_file_type_must_match_the_inode(fuzz_image: bytes, fuzz_layout: Layout) -> None:
    with pytest.raises(ImageError, match=r"entry b'fifo': file type 1 does not match"):
        imagereader.read_image(patched(fuzz_image, fuzz_layout.entry(b"fifo").at + 10, "<B", E.FT_REG_FILE))


def test_unsorted_directory_is_rejected(fuzz_image: bytes, fuzz_layout: Layout) -> None:
    # "000-..." becomes "900-...", now before "001-...".
    with pytest.raises(ImageError, match="out of order"):
        imagereader.read_image(patched(fuzz_image, fuzz_layout.entry(b"000-xxxxxxxxxx").name_at, "<B", ord("9")))


def test_duplicate_names_are_rejected(fuzz_image: bytes, fuzz_layout: Layout) -> None:
    with pytest.raises(ImageError, match="duplicate entry b'001-xxxxxxxxxx'"):
        imagereader.read_image(patched(fuzz_image, fuzz_layout.entry(b"000-xxxxxxxxxx").name_at + 2, "<B", ord("1")))


def test_dot_dot_must_point_at_the_parent(fuzz_image: bytes, fuzz_layout: Layout) -> None:
    e = fuzz_layout.entry(b"e")
    dotdot = next(d for d in fuzz_layout.dirents if d.dir_nid == e.nid and d.name == b"..")
    with pytest.raises(ImageError,
                       match=f"directory nid {e.nid}: b'..' entry missing or not pointing at nid {e.dir_nid}"):
        imagereader.read_image(patched(fuzz_image, dotdot.at, "<Q", e.nid))


def test_name_longer_than_255_bytes_is_rejected() -> None:
    with pytest.raises(ImageError, match="file name longer than 255 bytes"):
        imagereader.read_image(tiny_image([b"n" * 256]))


def test_name_with_a_slash_is_rejected() -> None:
    with pytest.raises(ImageError, match=r"invalid file name b'a/b'"):
        imagereader.read_image(tiny_image([b"a/b"]))


def test_a_second_dot_entry_is_rejected() -> None:
    with pytest.raises(ImageError, match=r"duplicate entry b'\.'"):
        imagereader.read_image(tiny_image([b"."]))


def test_compressed_inode_is_rejected(fuzz_image: bytes, fuzz_layout: Layout) -> None:
    nid = fuzz_layout.entry(b"small").nid
    off = fuzz_layout.inode_offset(nid)
    fmt = struct.unpack_from("<H", fuzz_image, off)[0] & 1 | E.INODE_COMPRESSED_FULL << 1
    with pytest.raises(ImageError, match="compressed files are not supported"):
        imagereader.read_image(patched(fuzz_image, off, "<H", fmt))


def test_image_too_small_for_a_superblock_is_rejected() -> None:
    with pytest.raises(ImageError, match="too small"):
        imagereader.read_image(bytes(1100))


def test_block_size_other_than_4096_is_rejected(fuzz_image: bytes) -> None:
    with pytest.raises(ImageError, match="only 4096-byte blocks"):
        imagereader.read_image(patched(fuzz_image, SB_BLKSZBITS, "<B", 9))


def test_bad_superblock_magic_is_rejected(fuzz_image: bytes) -> None:
    with pytest.raises(ImageError, match="superblock magic"):
        imagereader.read_image(patched(fuzz_image, SB, "<I", 0x12345678))


def test_other_composefs_header_version_is_rejected(fuzz_image: bytes) -> None:
    with pytest.raises(ImageError, match="header version 2"):
        imagereader.read_image(patched(fuzz_image, 4, "<I", 2))


def test_unknown_composefs_version_is_rejected(fuzz_image: bytes) -> None:
    with pytest.raises(ImageError, match="composefs version 2"):
        imagereader.read_image(patched(fuzz_image, 12, "<I", 2))


def test_unknown_incompat_feature_is_rejected(fuzz_image: bytes) -> None:
    with pytest.raises(ImageError, match="incompat features 0x80"):
        imagereader.read_image(patched(fuzz_image, SB_INCOMPAT, "<I", 0x80))


def test_long_xattr_prefixes_are_rejected(fuzz_image: bytes) -> None:
    with pytest.raises(ImageError, match="long xattr name prefixes"):
        imagereader.read_image(patched(fuzz_image, SB + E.SB_XATTR_PREFIX_COUNT, "<B", 1))


def test_image_shorter_than_its_block_count_is_truncated(fuzz_image: bytes) -> None:
    with pytest.raises(ImageError, match="truncated"):
        imagereader.read_image(fuzz_image[:-1])


def test_root_nid_past_the_end_is_rejected(fuzz_image: bytes) -> None:
    with pytest.raises(ImageError, match="inode nid 65535 runs past the end of the image"):
        imagereader.read_image(patched(fuzz_image, SB_ROOT_NID, "<H", 0xFFFF))


def test_root_nid_on_the_superblock_is_rejected(fuzz_image: bytes) -> None:
    with pytest.raises(ImageError, match="overlaps the superblock"):
        imagereader.read_image(patched(fuzz_image, SB_ROOT_NID, "<H", 1))


def test_xattr_area_past_the_end_of_the_image_is_rejected(fuzz_image: bytes, fuzz_layout: Layout) -> None:
    nid = fuzz_layout.entry(b"small").nid
    with pytest.raises(ImageError, match=f"inode nid {nid}: xattr area .* runs past the end of the image"):
        imagereader.read_image(patched(fuzz_image, fuzz_layout.inode_offset(nid) + 2, "<H", 0xFFFF))


def test_shared_xattr_count_beyond_the_xattr_area_is_rejected(fuzz_image: bytes, fuzz_layout: Layout) -> None:
    nid = fuzz_layout.entry(b"small").nid
    with pytest.raises(ImageError, match=f"inode nid {nid}: 255 shared xattrs do not fit"):
        imagereader.read_image(patched(fuzz_image, fuzz_layout.inodes[nid].xattr_start + 4, "<B", 255))


def test_xattr_name_filter_hiding_a_present_xattr_is_rejected(fuzz_image: bytes, fuzz_layout: Layout) -> None:
    nid = fuzz_layout.entry(b"small").nid
    compat = struct.unpack_from("<I", fuzz_image, SB_COMPAT)[0] | E.FEATURE_COMPAT_XATTR_FILTER
    data = patched(fuzz_image, SB_COMPAT, "<I", compat)
    assert imagereader.read_image(data)  # mkfs.erofs leaves every filter 0: nothing hidden
    with pytest.raises(ImageError, match="filter hides"):
        imagereader.read_image(patched(data, fuzz_layout.inodes[nid].xattr_start, "<I", E.XATTR_FILTER_DEFAULT))


def test_huge_directory_size_is_rejected(fuzz_image: bytes, fuzz_layout: Layout) -> None:
    nid = fuzz_layout.entry(b"dense").nid
    off = fuzz_layout.inode_offset(nid)
    data = (patched(fuzz_image, off + 8, "<Q", 2**62) if fuzz_layout.extended(nid)
            else patched(fuzz_image, off + 8, "<I", 2**32 - 1))
    with pytest.raises(ImageError, match=f"nid {nid}"):
        imagereader.read_image(data)


def test_symlink_target_over_4095_bytes_is_rejected(fuzz_image: bytes, fuzz_layout: Layout) -> None:
    nid = fuzz_layout.entry(b"far-link").nid
    assert fuzz_layout.extended(nid)
    with pytest.raises(ImageError, match="symlink target of 4096 bytes"):
        imagereader.read_image(patched(fuzz_image, fuzz_layout.inode_offset(nid) + 8, "<Q", 4096))


def test_inodes_sharing_data_run_out_of_the_image_budget(tmp_path: Path) -> None:
    need_root()
    top = tmp_path / "src"
    top.mkdir()
    for i in range(400):
        (top / f"f{i:03d}").write_bytes(b"")
    data = bytearray(mkfs(top, tmp_path / "img.erofs", "-T0"))
    layout = locate(bytes(data))
    for nid, raw in layout.inodes.items():
        if raw.type == stat.S_IFREG:
            # Every empty file now claims INLINE_MAX bytes of block 0: 400 x 5000 > image.
            struct.pack_into("<I", data, layout.inode_offset(nid) + 8, INLINE_MAX)
    with pytest.raises(ImageError, match="more data than the image holds"):
        imagereader.read_image(bytes(data))


# ---------------------------------------------------------------- fuzzing


@FUZZ
@given(length=st.integers(0, 2**16))
def test_truncated_images_never_crash_the_reader(fuzz_image: bytes, length: int) -> None:
    read_or_reject(fuzz_image[:length])


@FUZZ
@given(length=st.integers(E.SUPER_OFFSET + E.SUPERBLOCK.size, 2**16))
def test_truncated_images_with_a_matching_block_count_never_crash_the_reader(
        fuzz_image: bytes, length: int) -> None:
    # Fixing the block count gets past the early truncation check, deep into the tree.
    read_or_reject(patched(fuzz_image[:length], SB_BLOCKS, "<I", length // E.BLKSIZ))


@settings(FUZZ, max_examples=1500)
@given(flips=st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), min_size=1, max_size=8))
def test_overwritten_bytes_never_crash_the_reader(fuzz_image: bytes, flips: list[tuple[int, int]]) -> None:
    data = bytearray(fuzz_image)
    for pos, value in flips:
        data[pos % len(data)] = value
    read_or_reject(data)


@settings(FUZZ, max_examples=1000)
@given(pos=st.integers(0, 2**14),
       value=st.sampled_from([0, 1, 0xFF, 0xFFFF, 0xFFFFFFFF, 2**31]) | st.integers(0, 2**32 - 1))
def test_overwritten_metadata_words_never_crash_the_reader(fuzz_image: bytes, pos: int, value: int) -> None:
    # The first blocks hold the superblock, the inodes, xattrs and inline tails.
    read_or_reject(patched(fuzz_image, pos % (len(fuzz_image) - 4), "<I", value))


@FUZZ
@given(data=st.data())
def test_subdirectory_pointed_at_an_ancestor_is_rejected(fuzz_image: bytes, fuzz_layout: Layout,
                                                         data: st.DataObject) -> None:
    subdirs = [d for d in fuzz_layout.dirents if d.ftype == E.FT_DIR and d.name not in (b".", b"..")]
    entry = data.draw(st.sampled_from(subdirs))
    ancestors = [entry.dir_nid]
    while ancestors[-1] != fuzz_layout.parents[ancestors[-1]]:
        ancestors.append(fuzz_layout.parents[ancestors[-1]])
    with time_limit(HANG_SECONDS), pytest.raises(ImageError):
        imagereader.read_image(patched(fuzz_image, entry.at, "<Q", data.draw(st.sampled_from(ancestors))))


@FUZZ
@given(data=st.data())
def test_dirents_pointed_at_any_slot_never_crash_the_reader(fuzz_image: bytes, fuzz_layout: Layout,
                                                            data: st.DataObject) -> None:
    off = data.draw(st.sampled_from(fuzz_layout.dirents)).at
    nid = data.draw(st.integers(0, len(fuzz_image) // 32 + 2) | st.sampled_from(sorted(fuzz_layout.inodes))
                    | st.integers(0, 2**64 - 1))
    read_or_reject(patched(fuzz_image, off, "<Q", nid))


@FUZZ
@given(data=st.data())
def test_huge_inode_sizes_never_crash_the_reader(fuzz_image: bytes, fuzz_layout: Layout,
                                                 data: st.DataObject) -> None:
    nid = data.draw(st.sampled_from(sorted(fuzz_layout.inodes)))
    off = fuzz_layout.inode_offset(nid)
    if fuzz_layout.extended(nid):
        image = patched(fuzz_image, off + 8, "<Q", data.draw(st.integers(2**12, 2**64 - 1)))
    else:
        image = patched(fuzz_image, off + 8, "<I", data.draw(st.integers(2**12, 2**32 - 1)))
    read_or_reject(image)


@FUZZ
@given(data=st.data())
def test_inode_header_fields_overwritten_never_crash_the_reader(fuzz_image: bytes, fuzz_layout: Layout,
                                                                data: st.DataObject) -> None:
    nid = data.draw(st.sampled_from(sorted(fuzz_layout.inodes)))
    # i_format, i_xattr_icount (65535 among them), i_mode, and the i_u word.
    field_at, fmt = data.draw(st.sampled_from([(0, "<H"), (2, "<H"), (4, "<H"), (16, "<I")]))
    value = data.draw(st.sampled_from([0xFFFF, 0]) | st.integers(0, 0xFFFF))
    read_or_reject(patched(fuzz_image, fuzz_layout.inode_offset(nid) + field_at, fmt, value))


@FUZZ
@given(data=st.data())
def test_shared_xattr_counts_and_ids_overwritten_never_crash_the_reader(fuzz_image: bytes, fuzz_layout: Layout,
                                                                        data: st.DataObject) -> None:
    with_xattrs = sorted(nid for nid, raw in fuzz_layout.inodes.items() if raw.xattr_size)
    raw = fuzz_layout.inodes[data.draw(st.sampled_from(with_xattrs))]
    image = patched(fuzz_image, raw.xattr_start + 4, "<B", data.draw(st.sampled_from([255, 1]) | st.integers(0, 255)))
    if raw.xattr_size >= 16 and data.draw(st.booleans()):
        image = patched(image, raw.xattr_start + 12, "<I", data.draw(st.integers(0, 2**32 - 1)))
    read_or_reject(image)


@FUZZ
@given(root_nid=st.integers(0, 0xFFFF))
def test_any_root_nid_never_crashes_the_reader(fuzz_image: bytes, root_nid: int) -> None:
    read_or_reject(patched(fuzz_image, SB_ROOT_NID, "<H", root_nid))


@FUZZ
@given(bits=st.integers(0, 255).filter(lambda b: b != E.BLKSIZ_BITS))
def test_every_other_block_size_is_rejected(fuzz_image: bytes, bits: int) -> None:
    with pytest.raises(ImageError, match="block size"):
        imagereader.read_image(patched(fuzz_image, SB_BLKSZBITS, "<B", bits))
