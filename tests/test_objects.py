"""The object store: objects named by digest, written alone or in one transaction."""

from __future__ import annotations

import io
import os

import pytest

from cfsdeploy.composefs import fsverity
from cfsdeploy.composefs.objects import ObjectStore


@pytest.fixture
def store(tmp_path) -> ObjectStore:
    for sub in ("objects", "tmp"):
        (tmp_path / sub).mkdir()
    return ObjectStore(tmp_path / "objects", tmp_path / "tmp")


def stored(store: ObjectStore) -> list[str]:
    return sorted(f for _, _, files in os.walk(store.path) for f in files)


def test_an_object_alone_is_named_by_its_digest_at_once(store: ObjectStore) -> None:
    digest = store.add_bytes(b"a" * 100)
    with open(store.path_of(digest), "rb") as f:
        assert f.read() == b"a" * 100
    assert digest == fsverity.digest_bytes(b"a" * 100)


def test_a_transaction_names_its_objects_only_when_it_ends(store: ObjectStore) -> None:
    data = os.urandom(5000)
    with store.transaction():
        digest = store.add_stream(io.BytesIO(data).read, len(data))
        assert store.has(digest) and not os.path.exists(store.path_of(digest))
        assert store.add_bytes(data) == digest  # already staged: stored once
    with open(store.path_of(digest), "rb") as f:
        assert f.read() == data
    assert os.listdir(store.tmpdir) == []


def test_find_gives_a_staged_objects_content_before_it_has_its_name(store: ObjectStore) -> None:
    data = os.urandom(5000)
    with store.transaction():
        digest = store.add_bytes(data)
        staged = store.find(digest)
        assert staged is not None and staged != store.path_of(digest)
        with open(staged, "rb") as f:
            assert f.read() == data
    assert store.find(digest) == store.path_of(digest)
    assert store.find(fsverity.digest_bytes(b"absent")) is None


def test_a_failed_transaction_names_nothing_and_leaves_no_temp_files(store: ObjectStore) -> None:
    kept = store.add_bytes(b"k" * 100)
    with pytest.raises(RuntimeError), store.transaction():
        store.add_bytes(b"n" * 100)
        raise RuntimeError("the commit failed")
    assert stored(store) == [os.path.basename(store.path_of(kept))]
    assert os.listdir(store.tmpdir) == []


def test_add_fd_inside_a_transaction_reports_new_objects_once(store: ObjectStore, tmp_path) -> None:
    src = tmp_path / "src"
    src.write_bytes(os.urandom(70_000))
    digest = fsverity.digest_file(src)
    fd = os.open(src, os.O_RDONLY)
    try:
        with store.transaction():
            assert store.add_fd(fd, digest) is True
            assert store.add_fd(fd, digest) is False
    finally:
        os.close(fd)
    assert fsverity.digest_file(store.path_of(digest)) == digest
