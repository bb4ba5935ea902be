"""Commit a tree, check it out again: everything a root filesystem holds is kept."""

from __future__ import annotations

import os

import pytest

from cfsdeploy.composefs import dumpfile
from cfsdeploy.composefs.mounts import mounted_composefs
from cfsdeploy.composefs.objects import ObjectStore
from cfsdeploy.repo.checkout import CheckoutError, checkout
from cfsdeploy.repo.repository import Repository, image_digest_of, manifest_of

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


def test_subtree_hardlinked_outside_itself_gets_the_file_once(tmp_path) -> None:
    root = dumpfile.parse(b"/ 0 40755 4 0 0 0 0.0 - - -\n"
                          b"/etc 0 40755 2 0 0 0 0.0 - - -\n"
                          b"/etc/a 5 @100640 3 0 0 0 0.0 /usr/z - -\n"
                          b"/etc/b 5 @100640 3 0 0 0 0.0 /usr/z - -\n"
                          b"/usr 0 40755 2 0 0 0 0.0 - - -\n"
                          b"/usr/z 5 100640 3 7 8 0 1234.5 - hello - user.k=v\n")
    out = tmp_path / "etc"
    checkout(root.children[b"etc"], ObjectStore(tmp_path / "objects"), out)
    a, b = (out / "a").stat(), (out / "b").stat()
    assert (out / "a").read_bytes() == b"hello"
    assert (a.st_ino, a.st_nlink) == (b.st_ino, 2)
    assert (a.st_mode, a.st_uid, a.st_gid, a.st_mtime_ns) == (0o100640, 7, 8, 1234 * 10**9 + 5)
    assert os.getxattr(out / "a", "user.k") == b"v"
