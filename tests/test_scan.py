"""Reading a directory tree into the model, and storing its files by digest."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from cfsdeploy.composefs import dumpfile, imagewriter
from cfsdeploy.composefs.objects import ObjectStore
from cfsdeploy.composefs.scan import scan
from cfsdeploy.composefs.tree import Hardlink, digest_to_path
from cfsdeploy.util.errors import TreeError


def fsverity_digest(path) -> bytes:
    out = subprocess.run(["fsverity", "digest", str(path)], check=True, capture_output=True, text=True)
    return bytes.fromhex(out.stdout.split()[0].removeprefix("sha256:"))


@pytest.fixture
def tree(tmp_path):
    top = tmp_path / "tree"
    (top / "d").mkdir(parents=True)
    (top / "small").write_bytes(b"x" * 64)
    (top / "big").write_bytes(b"y" * 65)
    (top / "empty").write_bytes(b"")
    (top / "d" / "link").symlink_to("../big")
    os.link(top / "big", top / "d" / "big-again")
    os.setxattr(top / "small", "user.note", b"a=b c")
    return top


def test_small_files_are_inlined_and_larger_ones_named_by_digest(tree) -> None:
    root, _ = scan(tree)
    small, big = root.children[b"small"], root.children[b"big"]
    assert small.content == b"x" * 64 and small.payload is None and small.digest is None
    assert big.content is None
    assert big.digest == fsverity_digest(tree / "big")
    assert big.payload == digest_to_path(big.digest)
    assert root.children[b"empty"].content is None and root.children[b"empty"].size == 0


def test_hardlinks_share_the_primary_inode_first_in_sorted_order(tree) -> None:
    root, _ = scan(tree)
    again = root.children[b"d"].children[b"big-again"]
    # "/big" sorts before "/d/big-again" in pre-order, so it is the primary name.
    assert isinstance(again, Hardlink) and again.target is root.children[b"big"]
    assert again.target.nlink == 2


def test_metadata_is_kept(tree) -> None:
    root, _ = scan(tree)
    st = os.lstat(tree / "small")
    small = root.children[b"small"]
    assert (small.mode, small.uid, small.gid) == (st.st_mode, st.st_uid, st.st_gid)
    assert small.mtime_sec * 10**9 + small.mtime_nsec == st.st_mtime_ns
    assert small.xattrs == {b"user.note": b"a=b c"}
    assert root.children[b"d"].children[b"link"].payload == b"../big"


def test_digest_store_receives_each_object_once(tree, tmp_path) -> None:
    store = ObjectStore(tmp_path / "objects")
    os.makedirs(store.path)
    root, stats = scan(tree, store=store)
    digest = root.children[b"big"].digest
    assert stats.objects_written == 1
    assert open(store.path_of(digest), "rb").read() == b"y" * 65
    _, again = scan(tree, store=store)
    assert again.objects_written == 0


def test_socket_is_skipped_with_a_warning(tree) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tree / "sock"))
    warnings: list[str] = []
    root, stats = scan(tree, warn=warnings.append)
    s.close()
    assert b"sock" not in root.children and stats.skipped
    assert "socket" in warnings[0]


def test_missing_tree_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(TreeError, match="cannot read tree"):
        scan(tmp_path / "nope")


def test_scan_gives_the_same_manifest_and_image_twice(tree) -> None:
    a, _ = scan(tree)
    b, _ = scan(tree)
    assert dumpfile.dumps(a) == dumpfile.dumps(b)
    assert imagewriter.build(a).image == imagewriter.build(b).image


def test_hardlink_primary_is_first_in_preorder_not_first_listed(tmp_path) -> None:
    top = tmp_path / "t"
    (top / "h" / "a").mkdir(parents=True)
    (top / "h" / "third").write_bytes(b"z" * 100)
    os.link(top / "h" / "third", top / "h" / "a" / "first")
    root, _ = scan(top)
    h = root.children[b"h"]
    # Pre-order visits /h/a/first before /h/third.
    assert isinstance(h.children[b"third"], Hardlink)
    assert h.children[b"third"].target is h.children[b"a"].children[b"first"]


def test_files_older_than_1970_keep_their_times_through_the_image(tmp_path) -> None:
    from cfsdeploy.composefs import imagereader

    top = tmp_path / "t"
    (top / "d").mkdir(parents=True)
    (top / "f").write_bytes(b"x")
    os.symlink("f", top / "l")
    os.utime(top / "f", ns=(-5_500_000_000,) * 2)  # touch -d @-5.5
    os.utime(top / "l", ns=(-10**9,) * 2, follow_symlinks=False)  # touch -h -d @-1
    os.utime(top / "d", ns=(-14_182_940 * 10**9,) * 2)  # 1969-07-20 20:17:40 UTC
    root, _ = scan(top)
    times = {name: (root.children[name].mtime_sec, root.children[name].mtime_nsec)
             for name in (b"f", b"l", b"d")}
    assert times == {b"f": (-6, 500_000_000), b"l": (-1, 0), b"d": (-14_182_940, 0)}
    back = imagereader.read_image(imagewriter.build(root).image).root
    assert {name: (back.children[name].mtime_sec, back.children[name].mtime_nsec)
            for name in times} == times
