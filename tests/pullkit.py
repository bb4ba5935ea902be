"""What the remote and pull tests share: signing keys, trees, served repositories,
and the check that a failed pull left nothing unverified behind."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from cfsdeploy.composefs import fsverity
from cfsdeploy.remote import remotes
from cfsdeploy.repo import dumbhttp
from cfsdeploy.repo.repository import Repository

from .nginx import Nginx, missing_reason


@dataclass(frozen=True)
class Key:
    home: str          # gpg home holding the secret key
    email: str
    public: str        # file with the exported public key (armored)


def make_key(name: str) -> Key:
    # Short path: gpg-agent's socket path must fit in a sockaddr_un.
    home = tempfile.mkdtemp(prefix="cfsgpg-", dir="/tmp")
    os.chmod(home, 0o700)
    email = f"{name.lower()}@example.com"
    subprocess.run(["gpg", "--homedir", home, "--batch", "--pinentry-mode", "loopback", "--passphrase", "",
                    "--quick-gen-key", f"{name} <{email}>", "ed25519", "sign", "never"],
                   check=True, capture_output=True)
    public = os.path.join(home, "public.asc")
    with open(public, "wb") as f:
        f.write(subprocess.run(["gpg", "--homedir", home, "--armor", "--export", email],
                               check=True, capture_output=True).stdout)
    return Key(home, email, public)


def drop_key(key: Key) -> None:
    subprocess.run(["gpgconf", "--homedir", key.home, "--kill", "all"], capture_output=True)
    shutil.rmtree(key.home, ignore_errors=True)


@pytest.fixture(scope="module")
def builder_key():
    if shutil.which("gpg") is None:
        pytest.skip("gpg is not installed")
    key = make_key("Builder")
    yield key
    drop_key(key)


@pytest.fixture(scope="module")
def stranger_key():
    key = make_key("Stranger")
    yield key
    drop_key(key)


@pytest.fixture(scope="module")
def nginx(tmp_path_factory):
    """A real nginx serving its `root` directory, gzip on (level 1, as repo/dumbhttp.py advises)."""
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    top = tmp_path_factory.mktemp("nginx")
    (top / "root").mkdir()
    server = Nginx(top / "root", top / "work")
    yield server
    server.stop()


def write_files(top: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = top / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def random_files(count: int, *, seed: int = 1, text: bool = False, max_size: int = 40_000) -> dict[str, bytes]:
    """count files in a few directories: random bytes (incompressible) or text lines."""
    rng = random.Random(seed)
    files = {}
    for i in range(count):
        size = rng.randrange(100, max_size)
        if text:
            data = b"".join(b"line %d of file %d: %s\n" % (j, i, b"abc" * rng.randrange(1, 9))
                            for j in range(size // 40))
        else:
            data = rng.randbytes(size)
        files[f"usr/d{i % 17}/f{i}"] = data
    return files


def publish(repo_dir: Path, tree: Path, branch: str = "os/stable", subject: str = "build",
            key: Key | None = None) -> str:
    """Commit `tree` to a repository at repo_dir (created if needed), kept servable."""
    repo = Repository(repo_dir) if (repo_dir / "git").exists() else Repository.init(repo_dir)
    with repo.lock():
        result = repo.commit(tree, branch, subject, sign_key=key.email if key else None,
                             gpg_homedir=key.home if key else None)
        dumbhttp.update_server_info(repo)
    return result.commit


def client(path: Path, url: str, *, key: Key | None = None, branch: str | None = None,
           require_binding: bool = True) -> Repository:
    repo = Repository.init(path)
    remotes.add(repo, "origin", url, key_files=[key.public] if key else [], gpg_verify=key is not None,
               branch=branch, require_binding=require_binding)
    return repo


def snapshot(repo: Repository) -> set[str]:
    """Every file under objects/ and git/objects/, relative to the repository."""
    out = set()
    for sub in ("objects", os.path.join("git", "objects")):
        for top, _, files in os.walk(os.path.join(repo.path, sub)):
            out |= {os.path.relpath(os.path.join(top, f), repo.path) for f in files}
    return out


def assert_only_verified_additions(repo: Repository, before: set[str]) -> None:
    """Files added since `before` are objects whose content matches their names."""
    for rel in snapshot(repo) - before:
        path = os.path.join(repo.path, rel)
        parts = rel.split(os.sep)
        if parts[0] == "objects":
            assert fsverity.digest_file(path).hex() == parts[1] + parts[2], f"unverified object {rel}"
        elif parts[2] not in ("pack", "info"):
            with open(path, "rb") as f:
                assert hashlib.sha1(zlib.decompress(f.read())).hexdigest() == parts[2] + parts[3], rel


def serve_branch_as(repo_dir: Path, branch: str, commit: str) -> None:
    """What a hostile server does: its git/info/refs names `commit` as the head of `branch`."""
    refs = repo_dir / "git" / "info" / "refs"
    kept = [line for line in refs.read_text().splitlines() if not line.endswith(f"\trefs/heads/{branch}")]
    refs.write_text("".join(f"{line}\n" for line in [*kept, f"{commit}\trefs/heads/{branch}"]))
