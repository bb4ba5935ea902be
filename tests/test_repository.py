"""The repository: init, and commits of trees as objects, manifest, image and git history."""

from __future__ import annotations

import os
import stat
import subprocess
import threading

import pytest
from click.testing import CliRunner

from cfsdeploy.cli import main
from cfsdeploy.composefs import dumpfile, fsverity
from cfsdeploy.composefs.scan import scan
from cfsdeploy.repo.repository import (
    ListedFile,
    Repository,
    RepositoryError,
    create_tag,
    history,
    image_digest_of,
    list_files,
    prune,
    trailers,
)
from cfsdeploy.util.errors import TreeError
from cfsdeploy.util.lockfile import LockedError


@pytest.fixture
def tree(tmp_path):
    top = tmp_path / "tree"
    (top / "usr" / "bin").mkdir(parents=True)
    (top / "etc").mkdir()
    (top / "etc" / "hostname").write_text("box\n")
    (top / "usr" / "bin" / "tool").write_bytes(os.urandom(100_000))
    return top


@pytest.fixture
def repo(tmp_path) -> Repository:
    return Repository.init(tmp_path / "repo")


def git(repo: Repository, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", os.path.join(repo.path, "git"), *args],
                          check=True, capture_output=True, text=True).stdout


def test_init_lays_out_the_repository(repo: Repository) -> None:
    assert sorted(os.listdir(repo.path)) == ["config.toml", "git", "lock", "objects", "tmp"]


def test_init_refuses_to_clobber(tmp_path, repo: Repository) -> None:
    with pytest.raises(RepositoryError, match="refusing"):
        Repository.init(repo.path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RepositoryError, match="refusing"):
        Repository.init(tmp_path / "file")


def test_opening_a_non_repository_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(RepositoryError, match="not a cfsdeploy repository"):
        Repository(tmp_path)


def test_commit_stores_manifest_image_and_trailers(repo: Repository, tree) -> None:
    result = repo.commit(tree, "os/stable", "First build", body="Details.", version="1.0")
    commit = repo.resolve("os/stable")
    assert str(commit.id) == result.commit
    manifest = commit.tree["manifest.dump"].data
    assert manifest == dumpfile.dumps(scan(tree)[0])
    t = trailers(commit.message)
    assert t["Composefs-Format"] == "0" and t["Cfsdeploy-Version"] == "1.0"
    digest = image_digest_of(commit)
    image = repo.objects.path_of(digest)
    assert fsverity.digest_file(image) == digest
    assert commit.message.startswith("First build\n\nDetails.\n\n")


def test_git_cli_reads_the_history(repo: Repository, tree) -> None:
    repo.commit(tree, "os/stable", "one")
    (tree / "etc" / "hostname").write_text("other\n")
    second = repo.commit(tree, "os/stable", "two").commit
    log = git(repo, "log", "--format=%H %s", "os/stable").splitlines()
    assert log[0] == f"{second} two" and log[1].endswith(" one")
    assert "Composefs-Digest:" in git(repo, "show", "-s", "os/stable")
    git(repo, "fsck", "--strict")


def test_every_file_object_is_in_the_store(repo: Repository, tree) -> None:
    repo.commit(tree, "b", "s")
    digest = fsverity.digest_file(tree / "usr" / "bin" / "tool")
    with open(repo.objects.path_of(digest), "rb") as f:
        assert f.read() == (tree / "usr" / "bin" / "tool").read_bytes()


def test_recommitting_an_unchanged_tree_writes_no_objects(repo: Repository, tree) -> None:
    repo.commit(tree, "b", "one")
    assert repo.commit(tree, "b", "two").stats.objects_written == 0


def test_same_tree_and_epoch_give_the_same_commit_id(tmp_path, tree, monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    a = Repository.init(tmp_path / "a").commit(tree, "b", "s").commit
    b = Repository.init(tmp_path / "b").commit(tree, "b", "s").commit
    assert a == b


def test_orphan_and_explicit_parent(repo: Repository, tree) -> None:
    first = repo.commit(tree, "b", "one").commit
    orphan = repo.commit(tree, "b", "two", orphan=True).commit
    assert repo.resolve(orphan).parents == []
    child = repo.commit(tree, "c", "three", parent=first).commit
    assert str(repo.resolve(child).parents[0].id) == first


def test_bad_branch_name_and_missing_tree_move_no_ref(repo: Repository, tree, tmp_path) -> None:
    with pytest.raises(RepositoryError, match="invalid branch"):
        repo.commit(tree, "bad..name", "s")
    with pytest.raises(TreeError, match="cannot read tree"):
        repo.commit(tmp_path / "missing", "b", "s")
    assert repo.branch_head("b") is None


def test_second_writer_fails_with_a_clear_message(repo: Repository) -> None:
    release, t = hold_elsewhere(repo)
    try:
        with pytest.raises(LockedError, match="locked by another"):
            with repo.lock(wait=0.2):
                pass
    finally:
        release.set()
        t.join()


def hold_elsewhere(repo: Repository) -> tuple[threading.Event, threading.Thread]:
    """The lock held by another holder until the returned event is set."""
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with Repository(repo.path).lock():
            held.set()
            release.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    return release, t


@pytest.mark.parametrize("operation", ["commit", "tag", "prune"])
def test_each_mutating_operation_takes_the_lock(repo: Repository, tree, operation: str) -> None:
    repo.commit(tree, "b", "one")
    release, t = hold_elsewhere(repo)
    try:
        with pytest.raises(LockedError):
            if operation == "commit":
                repo.commit(tree, "b", "two", lock_wait=0.1)
            elif operation == "tag":
                create_tag(repo, "v1", "b", lock_wait=0.1)
            else:
                prune(repo, lock_wait=0.1)
    finally:
        release.set()
        t.join()


def test_the_lock_is_reentrant_for_its_holder(repo: Repository, tree) -> None:
    with repo.lock():
        cid = repo.commit(tree, "b", "one").commit
        create_tag(repo, "v1", "b")
    assert str(repo.resolve("v1").id) == cid


def test_a_nested_hold_leaves_tmp_alone(repo: Repository) -> None:
    with repo.lock():
        staged = os.path.join(repo.path, "tmp", "in-progress")
        open(staged, "w").close()
        with repo.lock():
            pass
        assert os.path.exists(staged)


def test_lock_clears_stale_temp_files(repo: Repository) -> None:
    stale = os.path.join(repo.path, "tmp", ".obj-left-by-a-crash")
    open(stale, "w").close()
    with repo.lock():
        assert not os.path.exists(stale)


def test_cli_init_and_commit_print_the_commit_id(tmp_path, tree) -> None:
    runner = CliRunner()
    r = runner.invoke(main, ["init", "--repo", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["commit", "--repo", str(tmp_path / "r"), "--tree", str(tree),
                             "--branch", "os/x", "-m", "hello"])
    assert r.exit_code == 0, r.output
    assert str(Repository(tmp_path / "r").resolve("os/x").id) == r.output.strip()


def cli(*args: str):
    result = CliRunner().invoke(main, list(args))
    return result


@pytest.fixture
def history_repo(repo: Repository, tree, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    repo.commit(tree, "os/stable", "First", version="1.0")
    (tree / "etc" / "hostname").write_text("second\n")
    os.symlink("hostname", tree / "etc" / "name-link")
    repo.commit(tree, "os/stable", "Second", body="More text.", version="1.1")
    return repo


def test_log_json_lists_commits_newest_first(history_repo: Repository) -> None:
    import json
    r = cli("log", "--repo", history_repo.path, "os/stable", "--json")
    assert r.exit_code == 0, r.output
    entries = json.loads(r.output)["commits"]
    assert [e["subject"] for e in entries] == ["Second", "First"]
    assert [e["version"] for e in entries] == ["1.1", "1.0"]
    assert all(len(e["image_digest"]) == 64 for e in entries)
    assert entries[0]["parents"] == [entries[1]["commit"]]


def test_show_prints_body_version_and_image(history_repo: Repository) -> None:
    r = cli("show", "--repo", history_repo.path, "os/stable")
    assert r.exit_code == 0
    assert "More text." in r.output and "Version: 1.1" in r.output and "Image:" in r.output


def test_tag_and_refs(history_repo: Repository) -> None:
    first = history(history_repo, "os/stable")[1].id
    assert cli("tag", "--repo", history_repo.path, "v1", "os/stable~1").output.strip() == first
    out = cli("refs", "--repo", history_repo.path).output
    assert f"{first} refs/tags/v1" in out and "refs/heads/os/stable" in out
    again = cli("tag", "--repo", history_repo.path, "v1", "os/stable")
    assert again.exit_code == 2 and "already exists" in again.output


def test_ls_lists_a_directory_and_recursively(history_repo: Repository) -> None:
    r = cli("ls", "--repo", history_repo.path, "os/stable", "/etc")
    lines = r.output.splitlines()
    assert [line.split()[-1] for line in lines if "->" not in line] == ["/etc/hostname"]
    assert any(line.endswith("/etc/name-link -> hostname") for line in lines)
    rec = cli("ls", "--repo", history_repo.path, "os/stable", "-R").output
    assert "/usr/bin/tool" in rec


def test_cat_prints_inline_and_object_files(history_repo: Repository, tree) -> None:
    assert cli("cat", "--repo", history_repo.path, "os/stable~1", "/etc/hostname").output == "box\n"
    r = CliRunner().invoke(main, ["cat", "--repo", history_repo.path, "os/stable", "/usr/bin/tool"])
    assert r.stdout_bytes == (tree / "usr" / "bin" / "tool").read_bytes()


def test_cat_reports_a_corrupt_object(history_repo: Repository, tree) -> None:
    digest = fsverity.digest_file(tree / "usr" / "bin" / "tool")
    path = history_repo.objects.path_of(digest)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))  # a change whatever the random content was
    r = cli("cat", "--repo", history_repo.path, "os/stable", "/usr/bin/tool")
    assert r.exit_code == 4 and "corrupt" in r.output


def test_unknown_revision_is_a_clear_error(history_repo: Repository) -> None:
    r = cli("log", "--repo", history_repo.path, "nope")
    assert r.exit_code == 3 and "unknown revision" in r.output


def test_recommit_of_an_unchanged_tree_restores_a_missing_image(repo: Repository, tree) -> None:
    first = repo.commit(tree, "b", "one")
    os.unlink(repo.objects.path_of(first.image_digest))
    second = repo.commit(tree, "b", "two")
    assert second.image_digest == first.image_digest
    assert repo.objects.has(second.image_digest)


def test_list_files_gives_the_entries_of_a_directory(repo: Repository, tree) -> None:
    repo.commit(tree, "b", "one")
    [f] = list_files(repo, "b", "/etc")
    assert f == ListedFile(b"/etc/hostname", f.mode, f.uid, f.gid, 4, None) and stat.S_ISREG(f.mode)


def test_list_files_recursive_goes_below_subdirectories(repo: Repository, tree) -> None:
    repo.commit(tree, "b", "one")
    paths = [f.path for f in list_files(repo, "b", "/", recursive=True)]
    assert paths == [b"/etc", b"/etc/hostname", b"/usr", b"/usr/bin", b"/usr/bin/tool"]


def test_list_files_of_a_symlink_names_its_target(repo: Repository, tree) -> None:
    os.symlink("hostname", tree / "etc/link")
    repo.commit(tree, "b", "one")
    assert list_files(repo, "b", "/etc/link")[0].symlink_target == b"hostname"


def test_list_files_of_a_missing_path_is_an_error(repo: Repository, tree) -> None:
    repo.commit(tree, "b", "one")
    with pytest.raises(RepositoryError, match="no such file"):
        list_files(repo, "b", "/nope")
