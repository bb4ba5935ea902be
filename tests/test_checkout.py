"""Commit a tree, check it out again: everything a root filesystem holds is kept."""

from __future__ import annotations

import pytest

from cfsdeploy.checkout import CheckoutError, checkout
from cfsdeploy.mounts import mounted_composefs
from cfsdeploy.repository import Repository, image_digest_of, manifest_of

from .fstree import compare_trees

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("requires_mount")]


@pytest.fixture(scope="module")
def committed(tmp_path_factory, everything_tree):
    work = tmp_path_factory.mktemp("checkout")
    tree = everything_tree
    repo = Repository.init(work / "repo")
    repo.commit(tree, "os/test", "everything", warn=lambda m: None)
    return work, tree, repo


def test_checkout_equals_the_committed_tree(committed) -> None:
    work, tree, repo = committed
    out = work / "out"
    checkout(manifest_of(repo, "os/test"), repo.objects, out)
    # Sockets are skipped at commit time.
    assert compare_trees(tree, out) == ["/special/socket: missing"]


def test_mounted_commit_image_equals_the_committed_tree(committed) -> None:
    _, tree, repo = committed
    image = repo.objects.path_of(image_digest_of(repo.resolve("os/test")))
    with mounted_composefs(image, repo.objects.path) as mnt:
        assert compare_trees(tree, mnt) == ["/special/socket: missing"]


def test_checkout_refuses_an_existing_destination(committed) -> None:
    work, tree, repo = committed
    with pytest.raises(CheckoutError, match="refusing"):
        checkout(manifest_of(repo, "os/test"), repo.objects, tree)
