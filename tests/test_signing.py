"""Signed commits: real gpg, the standard gpgsig header, accepted by git itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest

from cfsdeploy.repository import Repository, verify_commit
from cfsdeploy.signing import SignatureError

pytestmark = pytest.mark.skipif(shutil.which("gpg") is None, reason="gpg is not installed")


def _keyring(name: str) -> str:
    # Short path: gpg-agent's socket path must fit in a sockaddr_un.
    home = tempfile.mkdtemp(prefix="cfsgpg-", dir="/tmp")
    os.chmod(home, 0o700)
    subprocess.run(["gpg", "--homedir", home, "--batch", "--pinentry-mode", "loopback",
                    "--passphrase", "", "--quick-gen-key", f"{name} <{name.lower()}@example.com>",
                    "ed25519", "sign", "never"], check=True, capture_output=True)
    return home


def _drop(home: str) -> None:
    subprocess.run(["gpgconf", "--homedir", home, "--kill", "all"], capture_output=True)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def signer_home():
    home = _keyring("Builder")
    yield home
    _drop(home)


@pytest.fixture(scope="module")
def stranger_home():
    home = _keyring("Stranger")
    yield home
    _drop(home)


@pytest.fixture
def signed(tmp_path, signer_home):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").write_bytes(os.urandom(1000))
    repo = Repository.init(tmp_path / "repo")
    repo.commit(tree, "os/stable", "Signed build", sign_key="builder@example.com", gpg_homedir=signer_home)
    return repo


def git(repo: Repository, home: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "--git-dir", os.path.join(repo.path, "git"), *args],
                          capture_output=True, text=True, env=os.environ | {"GNUPGHOME": home})


def test_git_verify_commit_accepts_the_signature(signed, signer_home) -> None:
    result = git(signed, signer_home, "verify-commit", "os/stable")
    assert result.returncode == 0, result.stderr
    assert "Good signature" in git(signed, signer_home, "log", "--show-signature", "-1", "os/stable").stdout


def test_verify_names_the_signer(signed, signer_home) -> None:
    signer = verify_commit(signed, "os/stable", gpg_homedir=signer_home)
    assert "Builder" in signer.username and len(signer.fingerprint) == 40


def test_verify_fails_for_an_unknown_key(signed, stranger_home) -> None:
    with pytest.raises(SignatureError, match="unknown key"):
        verify_commit(signed, "os/stable", gpg_homedir=stranger_home)


def test_verify_fails_for_a_tampered_commit(signed, signer_home) -> None:
    commit = signed.resolve("os/stable")
    signature, payload = commit.gpg_signature
    tampered = payload.decode().replace("Signed build", "Evil build")
    oid = signed.git.create_commit_with_signature(tampered, signature.decode())
    signed.git.references.create("refs/heads/evil", oid)
    with pytest.raises(SignatureError, match="bad signature"):
        verify_commit(signed, "evil", gpg_homedir=signer_home)
    assert git(signed, signer_home, "verify-commit", "evil").returncode != 0


def test_verify_fails_for_an_unsigned_commit(tmp_path, signer_home) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    repo = Repository.init(tmp_path / "r")
    repo.commit(tree, "b", "unsigned")
    with pytest.raises(SignatureError, match="not signed"):
        verify_commit(repo, "b", gpg_homedir=signer_home)


def test_signing_with_a_missing_key_moves_no_ref(tmp_path, signer_home) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    repo = Repository.init(tmp_path / "r")
    with pytest.raises(SignatureError, match="signing with key"):
        repo.commit(tree, "b", "s", sign_key="nobody@example.com", gpg_homedir=signer_home)
    assert repo.branch_head("b") is None
