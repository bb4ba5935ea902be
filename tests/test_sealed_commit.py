"""Sealed commits in the repository: what seals a commit is named by trailers the
commit's signature covers, and the objects they name are the commit's own."""

from __future__ import annotations

import os

import pygit2
import pytest

from cfsdeploy.composefs.fsverity import Digest
from cfsdeploy.composefs.tree import Inode
from cfsdeploy.repo.repository import (
    TRAILER_SEALED_LOADER,
    TRAILER_SEALED_UKI,
    Repository,
    Sealed,
    TrailerError,
    commit_info,
    commit_objects,
    prune,
    sealed_of,
    trailers,
)


@pytest.fixture
def tree(tmp_path):
    top = tmp_path / "tree"
    (top / "etc").mkdir(parents=True)
    (top / "etc/hostname").write_text("box\n")
    return top


@pytest.fixture
def repo(tmp_path) -> Repository:
    return Repository.init(tmp_path / "repo")


def sealer_storing(repo: Repository, seen: list[Digest]):
    def seal(root: Inode, image: Digest) -> Sealed:
        seen.append(image)
        return Sealed(repo.objects.add_bytes(b"uki for " + image.hex().encode()),
                      repo.objects.add_bytes(b"signed loader"))
    return seal


def test_a_sealed_commit_names_what_the_sealer_stored_in_its_trailers(repo, tree) -> None:
    seen: list[Digest] = []
    r = repo.commit(tree, "os", "sealed", sealer=sealer_storing(repo, seen))
    commit = repo.resolve(r.commit)
    assert seen == [r.image_digest]
    assert sealed_of(commit) == r.sealed
    assert trailers(commit.message)[TRAILER_SEALED_UKI] == r.sealed.uki.hex()


def test_the_sealer_sees_the_image_digest_the_commit_names(repo, tree) -> None:
    seen: list[Digest] = []
    r = repo.commit(tree, "os", "sealed", sealer=sealer_storing(repo, seen))
    assert commit_info(repo.resolve(r.commit)).image_digest == seen[0]


def test_an_unsealed_commit_is_not_sealed(repo, tree) -> None:
    r = repo.commit(tree, "os", "plain")
    assert r.sealed is None and sealed_of(repo.resolve(r.commit)) is None


def test_what_seals_a_commit_is_among_its_objects_and_survives_prune(repo, tree) -> None:
    r = repo.commit(tree, "os", "sealed", sealer=sealer_storing(repo, []))
    assert r.sealed is not None and r.sealed.objects() <= commit_objects(repo.resolve(r.commit))
    prune(repo)
    assert all(repo.objects.has(d) for d in r.sealed.objects())


def test_a_commit_sealed_by_halves_is_damaged(repo, tree) -> None:
    r = repo.commit(tree, "os", "plain")
    c = repo.resolve(r.commit)
    message = c.message.rstrip("\n") + f"\n{TRAILER_SEALED_UKI}: {os.urandom(32).hex()}\n"
    half = repo.git.create_commit(None, c.author, c.committer, message, c.tree_id, [])
    with pytest.raises(TrailerError):
        sealed_of(repo.git[half].peel(pygit2.Commit))


def test_a_seal_trailer_that_names_no_digest_is_damaged(repo, tree) -> None:
    r = repo.commit(tree, "os", "plain")
    c = repo.resolve(r.commit)
    message = (c.message.rstrip("\n") + f"\n{TRAILER_SEALED_UKI}: {'0' * 64}\n"
               f"{TRAILER_SEALED_LOADER}: ../../etc/passwd\n")
    bad = repo.git.create_commit(None, c.author, c.committer, message, c.tree_id, [])
    with pytest.raises(TrailerError):
        sealed_of(repo.git[bad].peel(pygit2.Commit))
    assert commit_info(repo.git[bad].peel(pygit2.Commit)).sealed is None
