"""Pulling a sealed commit from a real nginx: its UKI and loader come like any object,
checked against their digests and bounded in size (no manifest gives it), and a head
whose seal trailers are damaged is refused, however well signed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cfsdeploy.remote.pull import ObjectMismatchError, PullOptions, pull
from cfsdeploy.remote.transport import TransportError
from cfsdeploy.repo import fsck
from cfsdeploy.repo.repository import TRAILER_SEALED_UKI, CommitResult, Repository, TrailerError, manifest_data
from cfsdeploy.sysroot.seal import make_sealer, uki_problem

from . import secureboot
from .pullkit import builder_key, client, nginx, snapshot  # noqa: F401
from .sealing import sealable_tree
from .test_pull_hostile import forge

BRANCH = "os/stable"
REF = f"origin/{BRANCH}"


@pytest.fixture
def origin(tmp_path: Path, nginx, builder_key, request) -> tuple[Repository, CommitResult, str]:  # noqa: F811
    """A source repository under nginx with a signed sealed head; its URL."""
    keys = secureboot.make_key(tmp_path, "vendor")
    name = request.node.name
    src = Repository.init(nginx.root / name)
    sealer = make_sealer(src, str(keys.key), str(keys.cert), kargs=("console=ttyS0",))
    r = src.commit(sealable_tree(tmp_path / "tree"), BRANCH, "sealed", sealer=sealer, sign_key=builder_key.email,
                   gpg_homedir=builder_key.home)
    return src, r, nginx.url(name)


def test_pull_brings_a_sealed_heads_uki_and_loader(tmp_path, origin, builder_key) -> None:  # noqa: F811
    src, r, url = origin
    repo = client(tmp_path / "client", url, key=builder_key)
    pull(repo, "origin", BRANCH)
    assert r.sealed is not None
    for digest in r.sealed.objects():
        with open(repo.objects.path_of(digest), "rb") as got, open(src.objects.path_of(digest), "rb") as sent:
            assert got.read() == sent.read()
    report = fsck.fsck(repo, seal_check=uki_problem)
    assert report.ok, report.problems


def test_pull_refuses_a_sealed_object_that_is_not_its_digests(tmp_path, origin, builder_key) -> None:  # noqa: F811
    src, r, url = origin
    assert r.sealed is not None
    path = src.objects.path_of(r.sealed.uki)
    size = os.path.getsize(path)
    os.chmod(path, 0o644)
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    repo = client(tmp_path / "client", url, key=builder_key)
    with pytest.raises(ObjectMismatchError, match="does not match its fs-verity digest"):
        pull(repo, "origin", BRANCH)
    assert REF not in [name.removeprefix("refs/remotes/") for name in repo.git.references]
    assert not repo.objects.has(r.sealed.uki)


def test_pull_bounds_a_sealed_object_no_manifest_gives_the_size_of(tmp_path, origin, builder_key) -> None:  # noqa: F811
    src, r, url = origin
    repo = client(tmp_path / "client", url, key=builder_key)
    with pytest.raises(TransportError, match="larger than the 4096 bytes expected"):
        pull(repo, "origin", BRANCH, options=PullOptions(max_sealed=4096))
    assert r.sealed is not None and not repo.objects.has(r.sealed.uki)


def test_pull_refuses_a_signed_head_whose_seal_trailers_are_damaged(tmp_path, origin, builder_key) -> None:  # noqa: F811
    src, r, url = origin
    repo = client(tmp_path / "client", url, key=builder_key)
    forge(src, manifest_data(src.resolve(BRANCH)), builder_key, extra=f"{TRAILER_SEALED_UKI}: {'ab' * 32}\n")
    before = snapshot(repo)
    with pytest.raises(TrailerError, match="must name an object each"):
        pull(repo, "origin", BRANCH)
    assert not [p for p in snapshot(repo) - before if p.startswith("objects")]
