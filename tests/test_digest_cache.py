"""Re-commits take digests from the repository's cache, only where that is safe."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from cfsdeploy.composefs import fsverity
from cfsdeploy.composefs.digestcache import SETTLE_NS
from cfsdeploy.repo.fsck import fsck
from cfsdeploy.repo.repository import DIGEST_CACHE, Repository, manifest_of

BIG = 10


def make_files(top) -> None:
    (top / "dir").mkdir(parents=True)
    for i in range(BIG):
        (top / "dir" / f"f{i}").write_bytes(os.urandom(3000 + i))
    (top / "small").write_bytes(b"tiny")


@pytest.fixture(scope="module")
def settled_trees(tmp_path_factory):
    """Two trees whose files last changed longer ago than the cache's settle time."""
    base = tmp_path_factory.mktemp("settled")
    for name in ("tree", "spare"):
        make_files(base / name)
    time.sleep(SETTLE_NS / 1e9 + 0.2)
    return base / "tree", base / "spare"


@pytest.fixture
def settled(settled_trees):
    return settled_trees[0]  # never changed by a test


@pytest.fixture
def repo(tmp_path) -> Repository:
    return Repository.init(tmp_path / "repo")


def test_recommitting_a_settled_tree_reads_no_file(repo: Repository, settled) -> None:
    first = repo.commit(settled, "b", "one")
    second = repo.commit(settled, "b", "two")
    assert first.stats.cache_hits == 0
    assert second.stats.cache_hits == BIG and second.stats.objects_written == 0
    assert second.image_digest == first.image_digest


def test_a_rewritten_file_is_read_again_even_with_its_mtime_put_back(repo: Repository, settled_trees) -> None:
    tree = settled_trees[1]
    repo.commit(tree, "b", "one")
    victim = tree / "dir" / "f3"
    st = os.stat(victim)
    victim.write_bytes(os.urandom(st.st_size))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = repo.commit(tree, "b", "two")
    assert second.stats.cache_hits == BIG - 1
    node = manifest_of(repo, "b").children[b"dir"].children[b"f3"]
    assert node.digest == fsverity.digest_file(victim)


def test_a_cached_digest_whose_object_is_gone_is_not_used(repo: Repository, settled) -> None:
    repo.commit(settled, "b", "one")
    os.unlink(repo.objects.path_of(fsverity.digest_file(settled / "dir" / "f0")))
    second = repo.commit(settled, "b", "two")
    assert second.stats.cache_hits == BIG - 1 and second.stats.objects_written == 1
    assert fsck(repo).ok


def test_files_changed_just_before_the_scan_are_not_cached(repo: Repository, tmp_path) -> None:
    fresh = tmp_path / "fresh"
    make_files(fresh)
    repo.commit(fresh, "b", "one")
    assert repo.commit(fresh, "b", "two").stats.cache_hits == 0


def test_a_damaged_cache_counts_as_empty(repo: Repository, settled) -> None:
    first = repo.commit(settled, "b", "one")
    path = os.path.join(repo.path, DIGEST_CACHE)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 5)
    second = repo.commit(settled, "b", "two")
    assert second.stats.cache_hits == 0 and second.image_digest == first.image_digest


def test_archives_do_not_use_the_cache(repo: Repository, settled, tmp_path) -> None:
    archive = tmp_path / "tree.tar"
    subprocess.run(["tar", "-cf", archive, "-C", settled, "."], check=True)
    repo.commit(f"tar:{archive}", "b", "one")
    assert not os.path.exists(os.path.join(repo.path, DIGEST_CACHE))
