"""diff says what changed between commits; prune removes only unneeded objects."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from cfsdeploy.cli import main
from cfsdeploy.repo.fsck import fsck
from cfsdeploy.repo.repository import Repository, prune


@pytest.fixture
def two_commits(tmp_path):
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "a").write_text("a\n")
    (tree / "etc" / "b").write_text("b\n")
    (tree / "etc" / "c").write_text("c\n")
    (tree / "old").write_bytes(os.urandom(5000))
    repo = Repository.init(tmp_path / "repo")
    repo.commit(tree, "b", "one")
    (tree / "etc" / "a").write_text("changed\n")
    os.chmod(tree / "etc" / "b", 0o600)
    os.setxattr(tree / "etc" / "c", "user.x", b"1")
    os.unlink(tree / "old")
    (tree / "new").write_bytes(os.urandom(5000))
    repo.commit(tree, "b", "two")
    return repo


def test_diff_reports_added_removed_and_what_was_modified(two_commits) -> None:
    r = CliRunner().invoke(main, ["diff", "--repo", two_commits.path, "b~1", "b", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["added"] == ["/new"] and d["removed"] == ["/old"]
    assert d["modified"]["/etc/a"] == ["content"]
    assert d["modified"]["/etc/b"] == ["mode"]
    assert d["modified"]["/etc/c"] == ["xattrs"]


def test_prune_keeps_what_refs_need(two_commits) -> None:
    assert prune(two_commits).removed == 0
    assert fsck(two_commits).ok


def test_prune_removes_objects_of_unreachable_commits(two_commits) -> None:
    repo = two_commits
    first = repo.resolve("b~1").id
    repo.git.references.create("refs/heads/b", first, force=True)
    # Now the second commit (its image and /new) is unreachable.
    assert prune(repo, dry_run=True).removed == 2
    result = prune(repo)
    assert result.removed == 2 and result.bytes_freed > 5000
    assert fsck(repo).ok
