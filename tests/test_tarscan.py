"""Committing a tar archive of a root filesystem, streamed without unpacking."""

from __future__ import annotations

import os
import subprocess
import tarfile

import pytest

from cfsdeploy.composefs import dumpfile
from cfsdeploy.composefs.objects import ObjectStore
from cfsdeploy.composefs.scan import scan
from cfsdeploy.composefs.tarscan import scan_tar
from cfsdeploy.repo.repository import Repository, manifest_of
from cfsdeploy.util.errors import TreeError

from .fstree import tar_with


@pytest.fixture
def tree(tmp_path):
    top = tmp_path / "tree"
    (top / "etc").mkdir(parents=True)
    (top / "usr" / "bin").mkdir(parents=True)
    (top / "etc" / "hostname").write_text("box\n")
    (top / "usr" / "bin" / "tool").write_bytes(os.urandom(70_000))
    os.link(top / "usr" / "bin" / "tool", top / "usr" / "bin" / "tool2")
    os.symlink("../usr/bin/tool", top / "etc" / "tool-link")
    os.mkfifo(top / "etc" / "fifo")
    os.setxattr(top / "etc" / "hostname", "user.note", b"v=1\x00\xff")
    os.chmod(top / "usr" / "bin" / "tool", 0o4755)
    os.utime(top / "etc" / "hostname", ns=(1_700_000_000_123_456_789,) * 2)
    return top


def gnu_tar(tree, out) -> None:
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--format=posix", "--numeric-owner",
                    "-C", str(tree), "-cf", str(out), "."], check=True)


def test_tar_gives_the_same_manifest_as_the_directory(tree, tmp_path) -> None:
    archive = tmp_path / "root.tar"
    gnu_tar(tree, archive)
    from_tar, _ = scan_tar(str(archive))
    from_dir, _ = scan(tree)
    assert dumpfile.dumps(from_tar) == dumpfile.dumps(from_dir)


def test_times_before_1970_are_read_as_gnu_tar_writes_them(tree, tmp_path) -> None:
    # GNU tar writes the PAX mtime of (-6 s, 0.5 s) as "-5.5": 5.5 s before the epoch.
    os.utime(tree / "etc" / "hostname", ns=(-5_500_000_000,) * 2)
    os.utime(tree / "usr", ns=(-14_182_940 * 10**9,) * 2)
    archive = tmp_path / "root.tar"
    gnu_tar(tree, archive)
    from_tar, _ = scan_tar(str(archive))
    hostname = from_tar.children[b"etc"].children[b"hostname"]
    assert (hostname.mtime_sec, hostname.mtime_nsec) == (-6, 500_000_000)
    assert dumpfile.dumps(from_tar) == dumpfile.dumps(scan(tree)[0])


@pytest.mark.parametrize("text, sec, nsec", [
    ("-5.5", -6, 500_000_000), ("-1", -1, 0), ("12.000000001", 12, 1),
    # digits past the nanosecond round down, as GNU tar reads them
    ("1.9999999999", 1, 999_999_999), ("-1.0000000001", -2, 999_999_999),
])
def test_pax_mtime_is_decimal_seconds(tmp_path, text: str, sec: int, nsec: int) -> None:
    archive = tmp_path / "t.tar"
    archive.write_bytes(tar_with("f", pax={"mtime": text}))
    node = scan_tar(str(archive))[0].children[b"f"]
    assert (node.mtime_sec, node.mtime_nsec) == (sec, nsec)


def test_commit_accepts_tar_source_and_stores_objects(tree, tmp_path) -> None:
    archive = tmp_path / "root.tar"
    gnu_tar(tree, archive)
    repo = Repository.init(tmp_path / "repo")
    repo.commit(f"tar:{archive}", "b", "from tar")
    root = manifest_of(repo, "b")
    tool = root.children[b"usr"].children[b"bin"].children[b"tool"]
    with open(repo.objects.path_of(tool.digest), "rb") as f:
        assert f.read() == (tree / "usr" / "bin" / "tool").read_bytes()


@pytest.mark.parametrize("name, kind, linkname, problem", [
    ("/etc/passwd", tarfile.REGTYPE, "", "absolute path"),
    ("../evil", tarfile.REGTYPE, "", "climbs out"),
    ("a/../../evil", tarfile.REGTYPE, "", "climbs out"),
    ("link", tarfile.LNKTYPE, "../../etc/shadow", "climbs out"),
    ("link", tarfile.LNKTYPE, "missing", "no such file"),
    ("x/y", tarfile.REGTYPE, "", "parent directory missing"),
])
def test_hostile_archive_is_refused(tmp_path, name, kind, linkname, problem) -> None:
    archive = tmp_path / "bad.tar"
    archive.write_bytes(tar_with(name, kind=kind, linkname=linkname))
    store = ObjectStore(tmp_path / "objects")
    os.makedirs(store.path)
    with pytest.raises(TreeError, match=problem):
        scan_tar(str(archive), store=store)


def test_truncated_archive_moves_no_ref_and_leaves_no_temp_file(tree, tmp_path) -> None:
    archive = tmp_path / "root.tar"
    gnu_tar(tree, archive)
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    repo = Repository.init(tmp_path / "repo")
    with pytest.raises(TreeError):
        repo.commit(f"tar:{archive}", "b", "s")
    assert repo.branch_head("b") is None
    assert os.listdir(os.path.join(repo.path, "tmp")) == []
