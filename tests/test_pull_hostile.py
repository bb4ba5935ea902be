"""pull against hostile servers and forged commits: each attempt ends in one clear
line, the remote ref stays where it was, and nothing unverified enters objects/ or
git/objects/."""

from __future__ import annotations

import gzip
import os
import shutil
import time
import zlib
from pathlib import Path

import pygit2
import pytest

from cfsdeploy.composefs import fsverity, imagewriter
from cfsdeploy.composefs.dumpfile import dumps, parse
from cfsdeploy.composefs.tree import Inode, walk
from cfsdeploy.remote.gitfetch import GitObjectError
from cfsdeploy.remote.pull import DowngradeError, ManifestError, ObjectMismatchError, PullOptions, pull
from cfsdeploy.remote.transport import Limits, NotFoundError, TransportError
from cfsdeploy.repo import dumbhttp, signing
from cfsdeploy.repo.repository import MANIFEST, Repository, TrailerError, image_digest_of, manifest_of, objects_of
from cfsdeploy.util.errors import CfsError

from . import hostile
from .hostile import HostileServer
from .pullkit import (  # noqa: F401
    Key,
    assert_only_verified_additions,
    builder_key,
    client,
    publish,
    random_files,
    snapshot,
    stranger_key,
    write_files,
)

BRANCH = "os/stable"
REF = f"refs/remotes/origin/{BRANCH}"
FAST = PullOptions(jobs=4, limits=Limits(timeout=2.0, total=20.0, retries=0), lock_wait=0)


@pytest.fixture(scope="module")
def template(tmp_path_factory, builder_key):  # noqa: F811
    """A signed source repository behind a hostile server, a client that pulled its
    first commit, and a second commit on top; each test works on a copy."""
    top = tmp_path_factory.mktemp("origin")
    tree = top / "tree"
    write_files(tree, random_files(6, seed=3) | {"etc/config": b"text\n" * 1000})
    publish(top / "src", tree, key=builder_key)
    server = HostileServer(top / "src")
    pull(client(top / "client", server.url, key=builder_key), "origin", BRANCH, options=FAST)
    write_files(tree, random_files(2, seed=4))
    publish(top / "src", tree, subject="second", key=builder_key)
    yield top, server
    server.close()


@pytest.fixture
def origin(template, tmp_path):
    """(source repository, its server, client repository), fresh copies."""
    top, server = template
    for part in ("src", "client", "tree"):
        shutil.copytree(top / part, tmp_path / part, symlinks=True)
    server.root = tmp_path / "src"
    server.hooks.clear()
    server.log.clear()
    return Repository(tmp_path / "src"), server, Repository(tmp_path / "client")


def attempt(repo: Repository, error: type[CfsError], match: str, options: PullOptions = FAST) -> str:
    """Pull, expecting `error`; check what a failed pull must leave behind."""
    before = snapshot(repo)
    ref = repo.git.references[REF].target
    with pytest.raises(error, match=match) as info:
        pull(repo, "origin", BRANCH, options=options)
    message = str(info.value)
    assert "\n" not in message and len(message) < 300, message
    assert repo.git.references[REF].target == ref
    assert_only_verified_additions(repo, before)
    return message


def new_objects(src: Repository) -> list[bytes]:
    """The objects the second commit needs that the first did not."""
    head = objects_of(manifest_of(src, BRANCH))
    return sorted(head - objects_of(manifest_of(src, f"{BRANCH}~1")))


def object_path(digest: bytes) -> str:
    return f"*/objects/{digest[:1].hex()}/{digest[1:].hex()}"


def git_path(oid: str | pygit2.Oid) -> str:
    oid = str(oid)
    return f"*/git/objects/{oid[:2]}/{oid[2:]}"


def forge(src: Repository, manifest: bytes, key: Key | None, *, digest: str | None = None,
          extra: str = "") -> str:
    """A commit of `manifest` on the branch, its Composefs-Digest given or computed,
    `extra` trailer lines after the others."""
    if digest is None:
        digest = fsverity.digest_bytes(imagewriter.build(parse(manifest)).image).hex()
    builder = src.git.TreeBuilder()
    builder.insert(MANIFEST, src.git.create_blob(manifest), pygit2.enums.FileMode.BLOB)
    sig = pygit2.Signature("Mallory", "m@example.com", int(time.time()), 0)
    message = f"forged\n\nComposefs-Digest: {digest}\nComposefs-Format: 0\nCfsdeploy-Branch: {BRANCH}\n{extra}"
    parents = [src.resolve(BRANCH).id]
    content = src.git.create_commit_string(sig, sig, message, builder.write(), parents)
    if key is None:
        oid = src.git.create_commit(None, sig, sig, message, builder.write(), parents)
    else:
        oid = src.git.create_commit_with_signature(content, signing.sign(content.encode(), key.email,
                                                                          homedir=key.home))
    src.git.references.create(f"refs/heads/{BRANCH}", oid, force=True)
    dumbhttp.update_server_info(src)
    return str(oid)


# --- wrong content ------------------------------------------------------------------


def test_wrong_bytes_for_an_object(origin) -> None:
    src, server, repo = origin
    server.hooks[object_path(new_objects(src)[0])] = hostile.wrong_bytes
    attempt(repo, ObjectMismatchError, "does not match its fs-verity digest")


def test_a_truncated_object(origin) -> None:
    src, server, repo = origin
    server.hooks[object_path(new_objects(src)[0])] = hostile.truncated
    attempt(repo, TransportError, "ended early")


def test_an_object_larger_than_its_manifest_says(origin) -> None:
    src, server, repo = origin
    server.hooks[object_path(new_objects(src)[0])] = lambda h, data: h.send(200, data + b"more")
    attempt(repo, TransportError, "larger than the")


def test_a_gzip_bomb_is_cut_off_at_the_expected_size(origin) -> None:
    src, server, repo = origin
    bomb = gzip.compress(bytes(64 << 20))
    server.hooks[object_path(new_objects(src)[0])] = lambda h, data: h.send(
        200, bomb, {"Content-Encoding": "gzip"})
    attempt(repo, TransportError, "larger than the")


def test_wrong_bytes_for_a_git_object(origin) -> None:
    src, server, repo = origin
    other = zlib.compress(b"blob 5\0hello")
    server.hooks[git_path(src.resolve(BRANCH).tree.id)] = lambda h, data: h.send(200, other)
    attempt(repo, GitObjectError, "does not match its id")


def test_a_tampered_manifest_is_caught_by_its_id(origin) -> None:
    src, server, repo = origin
    blob = src.resolve(BRANCH).tree[MANIFEST]
    evil = blob.data.replace(b" 100644 ", b" 100600 ", 1)
    assert evil != blob.data
    server.hooks[git_path(blob.id)] = lambda h, data: h.send(
        200, zlib.compress(b"blob %d\0" % len(evil) + evil))
    attempt(repo, GitObjectError, "does not match its id")


def test_a_signed_manifest_that_does_not_give_its_image(origin, builder_key) -> None:  # noqa: F811
    src, server, repo = origin
    honest = manifest_of(src, BRANCH)
    forge(src, dumps(honest).replace(b" 100644 ", b" 100600 ", 1), builder_key,
          digest=image_digest_of(src.resolve(BRANCH)).hex())
    attempt(repo, ManifestError, "does not give the image")


def test_a_signed_commit_with_a_second_digest_trailer(origin, builder_key) -> None:  # noqa: F811
    src, server, repo = origin
    # What an injected version gave before text was checked: the digest of another image last.
    forge(src, dumps(manifest_of(src, BRANCH)), builder_key, extra=f"Composefs-Digest: {'00' * 32}\n")
    attempt(repo, TrailerError, "the trailer Composefs-Digest appears 2 times")


# --- signatures ---------------------------------------------------------------------


def test_a_commit_signed_by_an_unknown_key(origin, tmp_path, stranger_key) -> None:  # noqa: F811
    src, server, repo = origin
    publish(Path(src.path), tmp_path / "tree", subject="strange", key=stranger_key)
    attempt(repo, signing.SignatureIntegrityError, "unknown key")
    assert server.log[-1][0].startswith("/git/objects/")  # nothing fetched after the commit


def test_an_unsigned_commit(origin, tmp_path) -> None:
    src, server, repo = origin
    publish(Path(src.path), tmp_path / "tree", subject="unsigned")
    attempt(repo, signing.SignatureIntegrityError, "is not signed")


# --- unsafe manifests ---------------------------------------------------------------


@pytest.mark.parametrize("payload", [b"../../../etc/shadow", b"/etc/shadow", b"00/" + b"0" * 62])
def test_a_signed_manifest_whose_payload_escapes(origin, builder_key, payload) -> None:  # noqa: F811
    src, server, repo = origin
    root = manifest_of(src, BRANCH)
    text = dumps(root)
    victim = next(e for _, e in walk(root) if isinstance(e, Inode) and e.is_reg() and e.payload)
    forge(src, text.replace(os.fsencode(victim.payload), payload, 1), builder_key)
    attempt(repo, ManifestError, "is not the path of its digest")


def test_a_signed_manifest_with_a_climbing_path(origin, builder_key) -> None:  # noqa: F811
    src, server, repo = origin
    text = dumps(manifest_of(src, BRANCH)) + b"/../escape 0 100644 1 0 0 0 0.0 - - -\n"
    forge(src, text, builder_key, digest="00" * 32)
    attempt(repo, ManifestError, "malformed manifest")


# --- misbehaving servers ------------------------------------------------------------


def test_an_endless_refs_list(origin) -> None:
    src, server, repo = origin
    server.hooks["/git/info/refs"] = hostile.endless
    attempt(repo, TransportError, "larger than",
            PullOptions(max_refs=1 << 20, limits=Limits(timeout=2, retries=0), lock_wait=0))


def test_an_endless_object(origin) -> None:
    src, server, repo = origin
    server.hooks[object_path(new_objects(src)[0])] = hostile.endless
    attempt(repo, TransportError, "larger than the")


def test_a_server_dribbling_forever_meets_the_time_limit(origin) -> None:
    src, server, repo = origin
    server.hooks["/git/info/refs"] = hostile.dribble
    start = time.monotonic()
    attempt(repo, TransportError, "time limit",
            PullOptions(limits=Limits(timeout=2, total=3, retries=0), lock_wait=0))
    assert time.monotonic() - start < 6


def test_a_server_dribbling_forever_meets_the_lowest_rate(origin) -> None:
    src, server, repo = origin
    server.hooks["/git/info/refs"] = hostile.dribble
    attempt(repo, TransportError, "slower than 1000 bytes/s",
            PullOptions(limits=Limits(timeout=2, low_speed_time=1.5, retries=0), lock_wait=0))


def test_a_server_that_stalls_mid_transfer(origin) -> None:
    src, server, repo = origin
    server.hooks[object_path(new_objects(src)[0])] = hostile.stall_midway
    start = time.monotonic()
    attempt(repo, TransportError, "timed out")
    assert time.monotonic() - start < 6


@pytest.mark.parametrize("code, where, error, match", [
    (404, "/git/info/refs", NotFoundError, "HTTP 404"), (500, "/git/info/refs", TransportError, "HTTP 500"),
    (404, "object", NotFoundError, "HTTP 404"), (500, "object", TransportError, "HTTP 500"),
    (404, "commit", NotFoundError, "not found, loose or in a pack")])
def test_http_errors(origin, code, where, error, match) -> None:
    src, server, repo = origin
    path = {"object": object_path(new_objects(src)[0]) if where == "object" else "",
            "commit": git_path(src.resolve(BRANCH).id)}.get(where, where)
    server.hooks[path] = hostile.status(code)
    attempt(repo, error, match)


def test_a_redirect_loop(origin) -> None:
    src, server, repo = origin
    server.hooks["/git/info/refs"] = hostile.redirect_to_itself
    attempt(repo, TransportError, "more than 5 redirects")


def test_an_older_signed_commit_is_refused_as_a_downgrade(origin) -> None:
    src, server, repo = origin
    pull(repo, "origin", BRANCH, options=FAST)
    src.git.references.create(f"refs/heads/{BRANCH}", src.resolve(f"{BRANCH}~1").id, force=True)
    dumbhttp.update_server_info(src)
    attempt(repo, DowngradeError, "refusing a downgrade")
    back = pull(repo, "origin", BRANCH, allow_downgrade=True, options=FAST)
    assert back.commit == str(src.resolve(BRANCH).id)


def test_a_commit_dated_before_the_current_one_is_refused(origin, builder_key) -> None:  # noqa: F811
    src, server, repo = origin
    builder = src.git.TreeBuilder()
    builder.insert(MANIFEST, src.resolve(BRANCH).tree[MANIFEST].id, pygit2.enums.FileMode.BLOB)
    old = pygit2.Signature("Builder", builder_key.email, 1_000_000_000, 0)
    content = src.git.create_commit_string(old, old, src.resolve(BRANCH).message, builder.write(), [])
    oid = src.git.create_commit_with_signature(
        content, signing.sign(content.encode(), builder_key.email, homedir=builder_key.home))
    src.git.references.create(f"refs/heads/{BRANCH}", oid, force=True)
    dumbhttp.update_server_info(src)
    attempt(repo, DowngradeError, "older than")


def test_a_server_error_is_retried(origin) -> None:
    src, server, repo = origin
    failures = []

    def flaky(h, data: bytes) -> None:
        if not failures:
            failures.append(1)
            h.send(503, b"busy")
        else:
            h.send_file(data)

    server.hooks["/git/info/refs"] = flaky
    result = pull(repo, "origin", BRANCH, options=PullOptions(limits=Limits(timeout=2, retries=1)))
    assert result.updated and failures


def test_a_partial_object_from_an_earlier_server_is_fetched_again_if_wrong(origin) -> None:
    src, server, repo = origin
    digest = new_objects(src)[0]
    resume = os.path.join(repo.path, "tmp", "resume")
    os.makedirs(resume, exist_ok=True)
    with open(os.path.join(resume, digest.hex()), "wb") as f:
        f.write(b"garbage from a bad mirror")
    result = pull(repo, "origin", BRANCH, options=FAST)
    assert result.updated and repo.objects.has(digest)
    ranges = [rng for path, rng, _ in server.log if digest.hex()[2:] in path]
    assert ranges == ["bytes=25-", None]
