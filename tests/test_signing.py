"""Signed commits: real gpg, the standard gpgsig header, accepted by git itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from cfsdeploy.repo.repository import Repository, verify_commit
from cfsdeploy.repo.signing import SignatureError, issuer

from .pullkit import drop_key, make_key

pytestmark = pytest.mark.skipif(shutil.which("gpg") is None, reason="gpg is not installed")


@pytest.fixture(scope="module")
def signer_home():
    key = make_key("Builder")
    yield key.home
    drop_key(key)


@pytest.fixture(scope="module")
def stranger_home():
    key = make_key("Stranger")
    yield key.home
    drop_key(key)


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


def fingerprint_of(home: str) -> str:
    out = subprocess.run(["gpg", "--homedir", home, "--with-colons", "--list-keys"],
                         check=True, capture_output=True, text=True).stdout
    return next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))


def log(repo: Repository, *args: str):
    from click.testing import CliRunner

    from cfsdeploy.cli import main

    return CliRunner().invoke(main, ["log", "--repo", repo.path, "os/stable", *args])


def test_issuer_is_read_from_the_signature_itself(signed, signer_home) -> None:
    signature, _ = signed.resolve("os/stable").gpg_signature
    who = issuer(signature.decode())
    assert who.fingerprint == fingerprint_of(signer_home) and who.key_id == who.fingerprint[-16:]


def test_an_unreadable_signature_is_a_signature_error() -> None:
    with pytest.raises(SignatureError, match="unreadable"):
        issuer("-----BEGIN PGP SIGNATURE-----\n\nAAAA\n-----END PGP SIGNATURE-----\n")


def test_log_names_the_signing_key_without_a_keyring(signed, signer_home) -> None:
    r = log(signed, "--json")
    assert r.exit_code == 0, r.output
    sig = json.loads(r.output)["commits"][0]["signature"]
    assert sig["fingerprint"] == fingerprint_of(signer_home) and sig["verified"] is None
    text = log(signed).output
    assert f"Signed:  key {fingerprint_of(signer_home)} (not verified)" in text


def test_log_with_a_keyring_shows_the_verified_signer(signed, signer_home) -> None:
    sig = json.loads(log(signed, "--json", "--gpg-homedir", signer_home).output)["commits"][0]["signature"]
    assert sig["verified"] is True and sig["signer"] == "Builder <builder@example.com>"
    text = log(signed, "--gpg-homedir", signer_home).output
    assert "Signed:  good signature from Builder <builder@example.com>" in text


def test_log_with_a_keyring_lacking_the_key_says_it_does_not_verify(signed, stranger_home) -> None:
    r = log(signed, "--json", "--gpg-homedir", stranger_home)
    assert r.exit_code == 0, r.output
    sig = json.loads(r.output)["commits"][0]["signature"]
    assert sig["verified"] is False and "unknown key" in sig["problem"] and sig["signer"] is None
    assert "NOT VERIFIED: signed by unknown key" in log(signed, "--gpg-homedir", stranger_home).output


def test_log_of_an_unsigned_commit_has_no_signature(tmp_path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    repo = Repository.init(tmp_path / "r")
    repo.commit(tree, "os/stable", "unsigned")
    assert json.loads(log(repo, "--json").output)["commits"][0]["signature"] is None
    assert "Signed:" not in log(repo).output
