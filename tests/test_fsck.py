"""fsck finds missing and corrupt objects and bad commits, and is clean otherwise."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from cfsdeploy.cli import main
from cfsdeploy.composefs import fsverity
from cfsdeploy.repo.fsck import Problem, ProblemKind, fsck
from cfsdeploy.repo.repository import Repository, image_digest_of


@pytest.fixture
def repo(tmp_path) -> tuple[Repository, bytes]:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big").write_bytes(os.urandom(10_000))
    (tree / "small").write_text("hi\n")
    repo = Repository.init(tmp_path / "repo")
    repo.commit(tree, "b", "one")
    return repo, fsverity.digest_file(tree / "big")


@pytest.mark.parametrize("quick", [True, False])
def test_fresh_repository_is_clean(repo, quick: bool) -> None:
    assert fsck(repo[0], quick=quick).problems == []


def test_missing_object_is_reported_even_in_quick_mode(repo) -> None:
    r, digest = repo
    os.unlink(r.objects.path_of(digest))
    problems = fsck(r, quick=True).problems
    assert problems == [Problem(ProblemKind.MISSING_OBJECT, commit=str(r.resolve("b").id), object=digest.hex())]


def test_corrupt_object_is_reported_by_the_full_check(repo) -> None:
    r, digest = repo
    with open(r.objects.path_of(digest), "r+b") as f:
        f.write(b"tampered")
    assert fsck(r, quick=True).ok
    assert Problem(ProblemKind.CORRUPT_OBJECT, object=digest.hex()) in fsck(r).problems


def test_missing_image_is_reported(repo) -> None:
    r, _ = repo
    image = image_digest_of(r.resolve("b"))
    os.unlink(r.objects.path_of(image))
    assert fsck(r, quick=True).problems == [
        Problem(ProblemKind.MISSING_OBJECT, commit=str(r.resolve("b").id), object=image.hex(), image=True)]


def test_cli_fsck_exits_non_zero_on_problems(repo) -> None:
    r, digest = repo
    ok = CliRunner().invoke(main, ["fsck", "--repo", r.path, "--json"])
    assert ok.exit_code == 0 and json.loads(ok.output)["ok"] is True
    os.unlink(r.objects.path_of(digest))
    bad = CliRunner().invoke(main, ["fsck", "--repo", r.path, "--quick"])
    assert bad.exit_code == 4 and "missing object" in bad.output


def test_a_commit_with_a_malformed_format_trailer_is_a_problem_not_a_crash(repo) -> None:
    r, _ = repo
    c = r.resolve("b")
    message = c.message.replace("Composefs-Format: 0", "Composefs-Format: zero")
    forged = r.git.create_commit(None, c.author, c.committer, message, c.tree_id, [c.id])
    r.git.references.create("refs/heads/b", forged, force=True)
    [problem] = fsck(r).problems
    assert problem == Problem(ProblemKind.BAD_COMMIT, commit=str(forged), detail="Composefs-Format: zero")
