"""Bad input to commit: one clear line, a non-zero exit, no ref moved, nothing half-written."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tarfile

import pytest

from cfsdeploy.repo.repository import Repository, manifest_of
from cfsdeploy.util.errors import TreeError

from .fstree import tar_with

FILES = 40  # enough for the forked workers to share them


@pytest.fixture
def tree(tmp_path):
    top = tmp_path / "tree"
    (top / "a").mkdir(parents=True)
    for i in range(FILES):
        (top / "a" / f"f{i:02}").write_bytes(os.urandom(1000 + i))
    (top / "small").write_bytes(b"short")
    return top


@pytest.fixture
def repo(tmp_path, tree) -> Repository:
    repo = Repository.init(tmp_path / "repo")
    repo.commit(tree, "os/x", "base")
    return repo


def state(repo: Repository) -> tuple[str, list[str], list[str]]:
    """The branch head, every object file, and what tmp/ holds."""
    objects = sorted(os.path.join(d, f) for d, _, files in os.walk(repo.objects.path) for f in files)
    return str(repo.resolve("os/x").id), objects, os.listdir(os.path.join(repo.path, "tmp"))


def commit(repo: Repository, tree, *extra: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-m", "cfsdeploy.cli", "commit", "--repo", repo.path,
                           "--tree", str(tree), "-b", "os/x", "-m", "next", *extra],
                          capture_output=True, text=True)


def assert_failed_cleanly(result: subprocess.CompletedProcess[str], before, repo: Repository,
                          message: str) -> None:
    assert result.returncode == 1
    assert result.stderr.startswith("cfsdeploy: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert state(repo) == before


def without_root_powers() -> tuple[str, ...]:
    """A command prefix that runs as uid 0 without the capabilities that bypass
    file permissions (so a mode 000 file is unreadable)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to drop capabilities")
    return ("setpriv", "--inh-caps=-all", "--bounding-set=-all", "--")


@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("name", ["small", "a/f17"])
def test_unreadable_file(repo: Repository, tree, name: str, threads: str) -> None:
    prefix = without_root_powers()
    before = state(repo)
    (tree / "a" / "new").write_bytes(os.urandom(5000))  # something new to store first
    os.chmod(tree / name, 0)
    result = commit(repo, tree, "--threads", threads, prefix=prefix)
    assert_failed_cleanly(result, before, repo, f"cannot read {tree / name}: Permission denied")


def test_missing_tree(repo: Repository, tmp_path) -> None:
    before = state(repo)
    result = commit(repo, tmp_path / "nowhere")
    assert_failed_cleanly(result, before, repo, f"cannot read tree {tmp_path / 'nowhere'}: No such file")


def test_missing_archive(repo: Repository, tmp_path) -> None:
    before = state(repo)
    result = commit(repo, f"tar:{tmp_path / 'nowhere.tar'}")
    assert_failed_cleanly(result, before, repo, "cannot read archive")


@pytest.mark.parametrize("threads", [1, 2])
def test_file_changed_during_the_scan(repo: Repository, tree, threads: int) -> None:
    before = state(repo)
    victim = tree / "a" / "f00"  # the first file the walk meets

    def change_after_the_walk_saw_it(stats) -> None:
        if stats.files == 1 and victim.stat().st_size == 1000:
            with open(victim, "ab") as f:
                f.write(b"more")

    with pytest.raises(TreeError) as e:
        repo.commit(tree, "os/x", "next", threads=threads, progress=change_after_the_walk_saw_it)
    assert str(e.value) == f"{victim}: file changed while it was read"
    assert state(repo) == before


def test_socket_is_skipped_with_a_warning(repo: Repository, tree) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tree / "a" / "sock"))
        result = commit(repo, tree)
    assert result.returncode == 0, result.stderr
    assert f"warning: skipping socket {tree / 'a' / 'sock'}" in result.stderr
    assert b"sock" not in manifest_of(repo, "os/x").children[b"a"].children


@pytest.mark.parametrize("kind, linkname, pax, message", [
    (tarfile.SYMTYPE, "", {}, "evil: symlink with an empty target"),
    (tarfile.SYMTYPE, "t" * 4096, {}, "evil: symlink target longer than 4095 bytes"),
    (tarfile.REGTYPE, "", {"mtime": "abc"}, "evil: invalid PAX mtime 'abc'"),
    (tarfile.REGTYPE, "", {"mtime": "1e23"}, "evil: invalid PAX mtime '1e23'"),
    (tarfile.REGTYPE, "", {"mtime": "9" * 21}, "evil: mtime 999999999999999999999 out of range"),
    (tarfile.REGTYPE, "", {"uid": "99999999999"}, "evil: uid 99999999999 out of range"),
    (tarfile.REGTYPE, "", {"gid": "-1"}, "evil: invalid PAX gid '-1'"),
    (tarfile.REGTYPE, "", {"size": "abc"}, "evil: invalid PAX size 'abc'"),
    (tarfile.REGTYPE, "", {"GNU.sparse.size": "abc"}, "cannot read archive"),
])
def test_archive_entry_the_repository_could_not_read_back(repo: Repository, tmp_path, kind: bytes,
                                                          linkname: str, pax: dict[str, str],
                                                          message: str) -> None:
    before = state(repo)
    archive = tmp_path / "evil.tar"
    archive.write_bytes(tar_with("evil", kind=kind, linkname=linkname, pax=pax))
    assert_failed_cleanly(commit(repo, f"tar:{archive}"), before, repo, message)
