"""Serving a repository as-is from a static HTTP server: git's dumb-HTTP index files,
written as `git update-server-info` writes them, enough for git itself to clone."""

from __future__ import annotations

import os
import subprocess

from cfsdeploy.repo import dumbhttp
from cfsdeploy.repo.repository import Repository, create_tag

from .pullkit import nginx, publish, write_files  # noqa: F401


def git(git_dir: str, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", git_dir, *args], check=True, capture_output=True, text=True).stdout


def read(repo: Repository, rel: str) -> bytes:
    with open(os.path.join(repo.path, "git", rel), "rb") as f:
        return f.read()


def test_info_files_are_what_git_update_server_info_writes(tmp_path) -> None:
    write_files(tmp_path / "tree", {"f": b"x" * 100})
    publish(tmp_path / "src", tmp_path / "tree", branch="os/stable")
    publish(tmp_path / "src", tmp_path / "tree", branch="os/testing")
    repo = Repository(tmp_path / "src")
    git(os.path.join(repo.path, "git"), "tag", "-a", "-m", "release", "v1", "os/stable")
    git(os.path.join(repo.path, "git"), "gc", "-q")
    dumbhttp.update_server_info(repo)
    ours = read(repo, "info/refs"), read(repo, "objects/info/packs")
    git(os.path.join(repo.path, "git"), "update-server-info", "--force")
    assert ours == (read(repo, "info/refs"), read(repo, "objects/info/packs"))
    assert b"refs/tags/v1^{}" in ours[0] and ours[1].startswith(b"P pack-")


def test_update_leaves_unchanged_files_alone(tmp_path) -> None:
    write_files(tmp_path / "tree", {"f": b"x"})
    publish(tmp_path / "src", tmp_path / "tree")
    repo = Repository(tmp_path / "src")
    path = os.path.join(repo.path, "git", "info", "refs")
    before = os.stat(path).st_ino
    dumbhttp.update_server_info(repo)
    assert os.stat(path).st_ino == before


def test_git_clones_a_repository_served_by_nginx(tmp_path, nginx) -> None:  # noqa: F811
    write_files(tmp_path / "tree", {"f": b"x" * 100})
    head = publish(nginx.root / "cloneme", tmp_path / "tree")
    subprocess.run(["git", "clone", "-q", "--bare", "--no-checkout", nginx.url("cloneme/git"),
                    str(tmp_path / "clone")], check=True, capture_output=True)
    assert git(str(tmp_path / "clone"), "rev-parse", "os/stable").strip() == head


def test_a_new_repository_is_servable(tmp_path) -> None:
    repo = Repository.init(tmp_path / "r")
    assert (read(repo, "info/refs"), read(repo, "objects/info/packs")) == (b"", b"\n")


def test_commit_keeps_the_index_current(tmp_path) -> None:
    write_files(tmp_path / "tree", {"f": b"x"})
    repo = Repository.init(tmp_path / "r")
    cid = repo.commit(tmp_path / "tree", "os/stable", "one").commit
    assert read(repo, "info/refs") == f"{cid}\trefs/heads/os/stable\n".encode()


def test_tag_keeps_the_index_current(tmp_path) -> None:
    write_files(tmp_path / "tree", {"f": b"x"})
    repo = Repository.init(tmp_path / "r")
    cid = repo.commit(tmp_path / "tree", "os/stable", "one").commit
    create_tag(repo, "v1", "os/stable")
    assert f"{cid}\trefs/tags/v1\n".encode() in read(repo, "info/refs")
