"""The same tree gives the same manifest, image and commit id, however it is scanned:
with one reader or several, and whatever order its files were created in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cfsdeploy.composefs import dumpfile, fsverity, imagewriter
from cfsdeploy.composefs.scan import scan
from cfsdeploy.repo.repository import Repository

MTIME = 1_700_000_000


def entries() -> list[tuple[str, str, bytes]]:
    """(kind, path, content): enough files that several workers share them."""
    out = [("dir", f"d{i}", b"") for i in range(5)] + [("dir", "d0/sub", b"")]
    for i in range(120):
        size = 40 if i % 7 == 0 else 100 + 997 * i  # some inline, most objects
        out.append(("file", f"d{i % 5}/f{i:03}", bytes([i]) * size))
    out += [("file", "d0/sub/same-a", b"x" * 5000), ("file", "d1/same-b", b"x" * 5000),
            ("link", "d2/link", b"../d0/f000"), ("hardlink", "d3/again", b"d1/f001"),
            ("fifo", "d4/pipe", b""), ("file", "d4/empty", b"")]
    return out


def make_tree(top: Path, reverse: bool) -> Path:
    """The tree of entries(), created in order or in reverse (parents first)."""
    top.mkdir()
    todo = entries()
    dirs = [e for e in todo if e[0] == "dir"]
    others = [e for e in todo if e[0] not in ("dir", "hardlink")]
    hardlinks = [e for e in todo if e[0] == "hardlink"]  # after their targets
    for kind, path, data in dirs + (others[::-1] if reverse else others) + hardlinks:
        p = top / path
        if kind == "dir":
            p.mkdir()
        elif kind == "file":
            p.write_bytes(data)
            os.setxattr(p, "user.origin", b"test")
        elif kind == "link":
            p.symlink_to(data.decode())
        elif kind == "hardlink":
            os.link(top / data.decode(), p)
        elif kind == "fifo":
            os.mkfifo(p)
    for root, subdirs, files in os.walk(top, topdown=False):
        for name in files + subdirs:
            os.utime(os.path.join(root, name), ns=(MTIME * 10**9,) * 2, follow_symlinks=False)
    os.utime(top, ns=(MTIME * 10**9,) * 2)
    return top


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("determinism")
    return make_tree(base / "forward", reverse=False), make_tree(base / "backward", reverse=True)


@pytest.mark.parametrize("threads", [2, 4])
def test_manifest_and_image_depend_only_on_the_tree(trees, threads: int) -> None:
    forward, backward = trees
    one, _ = scan(forward, threads=1)
    many, _ = scan(backward, threads=threads)
    assert dumpfile.dumps(one) == dumpfile.dumps(many)
    assert fsverity.digest_bytes(imagewriter.build(one).image) == \
        fsverity.digest_bytes(imagewriter.build(many).image)


def test_commit_id_depends_only_on_the_tree(trees, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    forward, backward = trees
    a = Repository.init(tmp_path / "a").commit(forward, "os/x", "build", threads=1)
    b = Repository.init(tmp_path / "b").commit(backward, "os/x", "build", threads=4)
    assert (a.commit, a.image_digest) == (b.commit, b.image_digest)
    assert a.stats.objects_written == b.stats.objects_written > 50


def test_links_from_outside_the_tree_are_not_counted(tmp_path) -> None:
    top = tmp_path / "tree"
    top.mkdir()
    (top / "file").write_bytes(b"z" * 100)
    before = dumpfile.dumps(scan(top)[0])
    os.link(top / "file", tmp_path / "outside")
    root, _ = scan(top)
    assert root.children[b"file"].nlink == 1
    assert dumpfile.dumps(root) == before
