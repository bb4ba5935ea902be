"""pull: a branch, its history and the objects its manifest needs, from a real nginx
or a file:// URL; checked, resumable, parallel, compressed on the wire."""

from __future__ import annotations

import os
import subprocess
import threading

import pytest
from click.testing import CliRunner

from cfsdeploy.cli import main
from cfsdeploy.composefs import fsverity
from cfsdeploy.remote import remotes
from cfsdeploy.remote.pull import PullError, PullIntegrityError, PullNotFoundError, PullOptions, PullUsageError, pull
from cfsdeploy.remote.transport import TransportError
from cfsdeploy.repo import dumbhttp, fsck
from cfsdeploy.repo.repository import (
    RESUME_DIR,
    Repository,
    history,
    image_digest_of,
    manifest_of,
    objects_of,
    read_file,
)
from cfsdeploy.util.lockfile import LockedError

from .hostile import HostileServer
from .nginx import Nginx
from .pullkit import builder_key, client, nginx, publish, random_files, write_files  # noqa: F401

BRANCH = "os/stable"
REF = "origin/os/stable"


@pytest.fixture
def served(nginx, request):  # noqa: F811
    """A directory under nginx's root for this test's source repository, and its URL."""
    name = request.node.name.replace("[", "_").replace("]", "_")
    path = nginx.root / name
    nginx.clear_log()
    return path, nginx.url(name)


def tree_of(tmp_path, files: dict[str, bytes], name: str = "tree"):
    top = tmp_path / name
    write_files(top, files)
    return top


def git(repo: Repository, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "--git-dir", os.path.join(repo.path, "git"), *args],
                          capture_output=True, text=True)


def test_pull_over_nginx_fetches_the_signed_head_and_everything_it_needs(tmp_path, served, builder_key) -> None:  # noqa: F811
    files = random_files(40)
    src, url = served
    head = publish(src, tree_of(tmp_path, files), key=builder_key)
    repo = client(tmp_path / "client", url, key=builder_key)
    result = pull(repo, "origin", BRANCH)
    assert result.commit == head and result.previous is None and result.updated
    assert "Builder" in result.signer.username
    assert str(repo.resolve(REF).id) == head
    assert read_file(repo, REF, "/usr/d3/f3") == files["usr/d3/f3"]
    report = fsck.fsck(repo)
    assert report.ok, report.problems


def test_the_image_is_built_locally_not_downloaded(tmp_path, served, nginx) -> None:  # noqa: F811
    src, url = served
    publish(src, tree_of(tmp_path, random_files(5)))
    repo = client(tmp_path / "client", url)
    pull(repo, "origin", BRANCH)
    image = image_digest_of(repo.resolve(REF)).hex()
    assert repo.objects.has(bytes.fromhex(image))
    assert not [r for r in nginx.requests() if image[2:] in r.uri]


def test_a_second_pull_of_the_same_head_transfers_only_the_refs(tmp_path, served, nginx) -> None:  # noqa: F811
    src, url = served
    publish(src, tree_of(tmp_path, random_files(30)))
    repo = client(tmp_path / "client", url)
    pull(repo, "origin", BRANCH)
    nginx.clear_log()
    again = pull(repo, "origin", BRANCH)
    assert not again.updated and again.objects_fetched == 0 and again.requests == 1
    assert [r.uri for r in nginx.requests()] == [f"/{src.name}/git/info/refs"]


def test_an_upgrade_changing_1_percent_of_files_fetches_little_more_than_them(tmp_path, served, nginx) -> None:  # noqa: F811
    files = random_files(500, seed=7)
    src, url = served
    tree = tree_of(tmp_path, files)
    publish(src, tree)
    repo = client(tmp_path / "client", url)
    pull(repo, "origin", BRANCH)
    changed = {rel: os.urandom(len(data)) for rel, data in list(files.items())[::100]}
    write_files(tree, changed)
    publish(src, tree, subject="upgrade")
    nginx.clear_log()
    result = pull(repo, "origin", BRANCH)
    changed_bytes = sum(map(len, changed.values()))
    assert result.objects_fetched == len(changed) and result.bytes_fetched == changed_bytes
    # Metadata: info/refs, the new commit, its tree and manifest as the server stores them.
    git_requests = [r for r in nginx.requests() if "/git/" in r.uri]
    assert len(git_requests) == 4
    metadata = sum(r.body_bytes for r in git_requests)
    on_wire = sum(r.body_bytes for r in nginx.requests())
    assert abs(result.wire_bytes - on_wire) < 0.01 * on_wire  # nginx adds the chunk framing
    assert on_wire <= 1.10 * (changed_bytes + metadata)


def test_compressible_objects_travel_gzip_compressed(tmp_path, served, nginx) -> None:  # noqa: F811
    src, url = served
    publish(src, tree_of(tmp_path, random_files(20, text=True)))
    repo = client(tmp_path / "client", url)
    result = pull(repo, "origin", BRANCH)
    assert result.wire_bytes < result.bytes_fetched / 3
    object_requests = [r for r in nginx.requests() if "/objects/" in r.uri and "/git/" not in r.uri]
    assert object_requests and all(r.encoding == "gzip" for r in object_requests)


def test_git_objects_are_not_compressed_twice(tmp_path, served, nginx) -> None:  # noqa: F811
    src, url = served
    publish(src, tree_of(tmp_path, random_files(3, text=True)))
    pull(client(tmp_path / "client", url), "origin", BRANCH)
    git_objects = [r for r in nginx.requests() if "/git/objects/" in r.uri]
    assert len(git_objects) == 3 and not any(r.encoding for r in git_objects)


def test_a_partial_object_is_resumed_with_a_range_request(tmp_path, served, nginx) -> None:  # noqa: F811
    files = {"big": os.urandom(300_000)}
    src, url = served
    publish(src, tree_of(tmp_path, files))
    repo = client(tmp_path / "client", url)
    digest = next(iter(objects_of(manifest_of(Repository(src), BRANCH))))
    # What an interrupted transfer leaves: the first bytes, under the object's name.
    os.makedirs(os.path.join(repo.path, "tmp", RESUME_DIR))
    with open(os.path.join(repo.path, "tmp", RESUME_DIR, digest.hex()), "wb") as f:
        f.write(files["big"][:100_000])
    result = pull(repo, "origin", BRANCH)
    assert result.bytes_fetched == 200_000
    [req] = [r for r in nginx.requests() if digest.hex()[2:] in r.uri]
    assert (req.status, req.range, req.body_bytes) == (206, "bytes=100000-", 200_000)
    assert read_file(repo, REF, "/big") == files["big"]
    assert not os.path.exists(os.path.join(repo.path, "tmp", RESUME_DIR))


def test_a_failed_pull_keeps_complete_objects_and_the_next_fetches_only_the_rest(tmp_path, served, nginx) -> None:  # noqa: F811
    files = random_files(20)
    src, url = served
    publish(src, tree_of(tmp_path, files))
    repo = client(tmp_path / "client", url)
    # The smallest object goes last (largest first): with one job, all others are in before it fails.
    smallest = min(files.values(), key=len)
    missing = Repository(src).objects.path_of(fsverity.digest_bytes(smallest))
    os.rename(missing, missing + ".away")
    with pytest.raises(TransportError, match="404"):
        pull(repo, "origin", BRANCH, options=PullOptions(jobs=1))
    assert repo.git.references.get(f"refs/remotes/{REF}") is None
    os.rename(missing + ".away", missing)
    nginx.clear_log()
    result = pull(repo, "origin", BRANCH)
    assert result.objects_fetched == 1
    assert [r.uri for r in nginx.requests() if "/git/" not in r.uri] == [missing[len(str(nginx.root)):]]


def test_depth_1_fetches_the_head_alone_and_marks_it_shallow(tmp_path, served) -> None:
    src, url = served
    tree = tree_of(tmp_path, {"f": b"1" * 100})
    for n in range(3):
        (tree / "f").write_bytes(b"%d" % n * 100)
        head = publish(src, tree, subject=f"build {n}")
    repo = client(tmp_path / "client", url)
    result = pull(repo, "origin", BRANCH, depth=1)
    assert result.commits_fetched == 1
    assert [c.id for c in history(repo, REF)] == [head]
    assert open(os.path.join(repo.path, "git", "shallow")).read() == head + "\n"
    assert git(repo, "fsck", "--strict").returncode == 0
    assert fsck.fsck(repo).ok


def test_a_damaged_shallow_file_is_reported_and_kept(tmp_path, served) -> None:
    src, url = served
    publish(src, tree_of(tmp_path, {"f": b"1" * 100}))
    repo = client(tmp_path / "client", url)
    shallow = os.path.join(repo.path, "git", "shallow")
    with open(shallow, "wb") as f:
        f.write(b"\xff not a commit id\n")
    with pytest.raises(PullIntegrityError, match="shallow is damaged"):
        pull(repo, "origin", BRANCH, depth=1)
    assert open(shallow, "rb").read() == b"\xff not a commit id\n"


def test_a_later_full_pull_fetches_the_rest_of_the_history(tmp_path, served) -> None:
    src, url = served
    tree = tree_of(tmp_path, {"f": b"x" * 100})
    for n in range(3):
        (tree / "f").write_bytes(b"%d" % n * 100)
        publish(src, tree, subject=f"build {n}")
    repo = client(tmp_path / "client", url)
    pull(repo, "origin", BRANCH, depth=1)
    result = pull(repo, "origin", BRANCH)
    assert result.commits_fetched == 2 and not result.updated
    assert [c.subject for c in history(repo, REF)] == ["build 2", "build 1", "build 0"]
    assert not os.path.exists(os.path.join(repo.path, "git", "shallow"))
    assert git(repo, "fsck", "--strict").returncode == 0
    # The older commits came for their history: fsck knows they have no objects.
    report = fsck.fsck(repo)
    assert report.ok and report.history_only == 2, report.problems


def test_by_default_the_whole_history_comes_with_the_head(tmp_path, served) -> None:
    src, url = served
    tree = tree_of(tmp_path, {"f": b"x"})
    for n in range(4):
        (tree / "f").write_bytes(b"%d" % n)
        publish(src, tree, subject=f"build {n}")
    repo = client(tmp_path / "client", url)
    assert pull(repo, "origin", BRANCH).commits_fetched == 4
    assert len(history(repo, REF)) == 4


def test_pull_over_https_trusts_only_certificates_it_can_verify(tmp_path, nginx, monkeypatch) -> None:  # noqa: F811
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    publish(tmp_path / "www" / "src", tree_of(tmp_path, random_files(3)))
    server = Nginx(tmp_path / "www", tmp_path / "nginx", tls=(cert, key))
    try:
        repo = client(tmp_path / "client", server.url("src"))
        with pytest.raises(TransportError, match="TLS certificate not trusted: self.signed certificate"):
            pull(repo, "origin", BRANCH)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # OpenSSL's own way to name trusted CAs
        assert pull(repo, "origin", BRANCH).objects_fetched == 3
    finally:
        server.stop()


def test_pull_from_a_path_or_a_file_url(tmp_path) -> None:
    files = random_files(10)
    publish(tmp_path / "src", tree_of(tmp_path, files))
    for n, url in enumerate([str(tmp_path / "src"), f"file://{tmp_path}/src"]):
        repo = client(tmp_path / f"client{n}", url)
        result = pull(repo, "origin", BRANCH)
        assert result.objects_fetched == 10
        assert read_file(repo, REF, "/usr/d2/f2") == files["usr/d2/f2"]


def test_pull_url_fetches_from_elsewhere_this_once_and_keeps_the_remote(tmp_path) -> None:
    files = random_files(3)
    publish(tmp_path / "mirror", tree_of(tmp_path, files))
    repo = client(tmp_path / "client", "file:///nonexistent/where/the/machine/finds/it")
    result = pull(repo, "origin", BRANCH, url=str(tmp_path / "mirror"))
    assert result.objects_fetched == 3 and read_file(repo, REF, "/usr/d0/f0") == files["usr/d0/f0"]
    assert remotes.get(repo, "origin").url == "file:///nonexistent/where/the/machine/finds/it"


def test_cli_pull_url_names_the_mirror(tmp_path) -> None:
    head = publish(tmp_path / "mirror", tree_of(tmp_path, random_files(2)))
    client(tmp_path / "client", "file:///nonexistent")
    result = CliRunner().invoke(main, ["pull", "--repo", str(tmp_path / "client"), "--url",
                                       f"file://{tmp_path}/mirror", "origin", BRANCH])
    assert result.exit_code == 0, result.output
    assert f"origin/{BRANCH}: new {head[:12]}" in result.output


def test_pull_from_a_repository_packed_by_git_gc(tmp_path) -> None:
    tree = tree_of(tmp_path, random_files(5))
    src = tmp_path / "src"
    publish(src, tree)
    subprocess.run(["git", "--git-dir", str(src / "git"), "gc", "-q"], check=True)
    dumbhttp.update_server_info(Repository(src))
    assert not [d for d in os.listdir(src / "git" / "objects") if len(d) == 2]
    repo = client(tmp_path / "client", str(src))
    result = pull(repo, "origin", BRANCH)
    assert result.objects_fetched == 5 and fsck.fsck(repo).ok


def test_the_pulled_ref_is_served_by_the_client_too(tmp_path) -> None:
    publish(tmp_path / "src", tree_of(tmp_path, {"f": b"x"}))
    repo = client(tmp_path / "client", str(tmp_path / "src"))
    head = pull(repo, "origin", BRANCH).commit
    refs = open(os.path.join(repo.path, "git", "info", "refs")).read()
    assert refs == f"{head}\trefs/remotes/origin/os/stable\n"


def test_objects_are_fetched_in_parallel(tmp_path) -> None:
    publish(tmp_path / "src", tree_of(tmp_path, random_files(8)))
    server = HostileServer(tmp_path / "src")
    try:
        server.delay = 0.3
        pull(client(tmp_path / "client", server.url), "origin", BRANCH, options=PullOptions(jobs=4))
        assert server.max_in_flight == 4
    finally:
        server.close()


def test_pull_of_a_missing_branch_names_it(tmp_path) -> None:
    publish(tmp_path / "src", tree_of(tmp_path, {"f": b"x"}))
    repo = client(tmp_path / "client", str(tmp_path / "src"))
    with pytest.raises(PullNotFoundError, match="has no branch os/testing"):
        pull(repo, "origin", "os/testing")


def test_pull_uses_the_remote_default_branch(tmp_path) -> None:
    publish(tmp_path / "src", tree_of(tmp_path, {"f": b"x"}))
    repo = client(tmp_path / "client", str(tmp_path / "src"), branch=BRANCH)
    assert pull(repo, "origin").branch == BRANCH
    bare = client(tmp_path / "client2", str(tmp_path / "src"))
    with pytest.raises(PullUsageError, match="no default branch"):
        pull(bare, "origin")


def test_pull_waits_for_the_repository_lock(tmp_path) -> None:
    publish(tmp_path / "src", tree_of(tmp_path, {"f": b"x"}))
    repo = client(tmp_path / "client", str(tmp_path / "src"))
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with Repository(repo.path).lock():
            held.set()
            release.wait(5)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(5)
    try:
        with pytest.raises(LockedError):
            pull(repo, "origin", BRANCH, options=PullOptions(lock_wait=0))
    finally:
        release.set()
        thread.join()
    assert pull(repo, "origin", BRANCH).updated


def test_cli_pull_reports_what_it_fetched(tmp_path) -> None:
    head = publish(tmp_path / "src", tree_of(tmp_path, random_files(3)))
    client(tmp_path / "client", str(tmp_path / "src"))
    args = ["pull", "--repo", str(tmp_path / "client"), "origin", BRANCH]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"origin/{BRANCH}: new {head[:12]}" in result.output and "3 objects" in result.output
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "up to date" in again.output


def test_cli_pull_failure_is_one_line(tmp_path) -> None:
    publish(tmp_path / "src", tree_of(tmp_path, {"f": b"x"}))
    client(tmp_path / "client", str(tmp_path / "src"))
    result = CliRunner().invoke(main, ["pull", "--repo", str(tmp_path / "client"), "origin", "nope"])
    assert result.exit_code == 3
    assert result.output == "cfsdeploy: remote origin has no branch nope\n"


def test_remote_refs_survive_remote_add_of_another(tmp_path) -> None:
    publish(tmp_path / "src", tree_of(tmp_path, {"f": b"x"}))
    repo = client(tmp_path / "client", str(tmp_path / "src"))
    pull(repo, "origin", BRANCH)
    remotes.add(repo, "mirror", str(tmp_path / "src"), gpg_verify=False)
    assert repo.resolve(REF)
