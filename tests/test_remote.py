"""Remotes: kept in config.toml for humans, each with its own keyring of trusted keys."""

from __future__ import annotations

import os
import subprocess
import tomllib

import pytest
from click.testing import CliRunner

from cfsdeploy.cli import main
from cfsdeploy.remote import keyring, remotes
from cfsdeploy.remote.remotes import Remote, RemoteError, RemoteNotFoundError, RemoteUsageError
from cfsdeploy.repo.repository import Repository
from cfsdeploy.repo.signing import SignatureError

from .pullkit import builder_key, publish, stranger_key, write_files  # noqa: F401


@pytest.fixture
def repo(tmp_path) -> Repository:
    return Repository.init(tmp_path / "repo")


def config(repo: Repository) -> dict:
    with open(os.path.join(repo.path, "config.toml"), "rb") as f:
        return tomllib.load(f)


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_add_writes_a_table_to_config_toml_and_keeps_the_rest(repo) -> None:
    remotes.add(repo, "origin", "https://example.com/os/repo/", gpg_verify=False, branch="os/stable")
    assert config(repo) == {"core": {"repo-version": 1},
                            "remote": {"origin": {"url": "https://example.com/os/repo", "gpg-verify": False,
                                                  "require-binding": True, "branch": "os/stable"}}}
    assert remotes.get(repo, "origin") == Remote("origin", "https://example.com/os/repo", False, "os/stable")


def test_a_plain_path_becomes_a_file_url(repo, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert remotes.add(repo, "local", "some dir", gpg_verify=False).url == f"file://{tmp_path}/some%20dir"


@pytest.mark.parametrize("url", ["ftp://example.com/r", "http:///nohost", "file://otherhost/r",
                                 "http://example.com/r?x=1"])
def test_add_refuses_urls_it_cannot_pull_from(repo, url) -> None:
    with pytest.raises(RemoteError):
        remotes.add(repo, "origin", url, gpg_verify=False)
    assert "remote" not in config(repo)


@pytest.mark.parametrize("name", ["", "-x", "a/b", "a..b", "x.lock", "a b", "é"])
def test_add_refuses_names_that_are_not_one_ref_component(repo, name) -> None:
    with pytest.raises(RemoteError, match="invalid remote name"):
        remotes.add(repo, name, "http://example.com", gpg_verify=False)


def test_add_refuses_an_existing_name(repo) -> None:
    remotes.add(repo, "origin", "http://a.example", gpg_verify=False)
    with pytest.raises(RemoteError, match="exists"):
        remotes.add(repo, "origin", "http://b.example", gpg_verify=False)
    assert remotes.get(repo, "origin").url == "http://a.example"


def test_signature_checks_need_trusted_keys(repo) -> None:
    with pytest.raises(RemoteUsageError, match="needs trusted keys") as info:
        remotes.add(repo, "origin", "http://example.com")
    assert "--gpg-import" in (info.value.hint or "")


def test_imported_keys_go_to_the_remote_keyring(repo, builder_key) -> None:  # noqa: F811
    remotes.add(repo, "origin", "http://example.com", key_files=[builder_key.public])
    path = remotes.keyring_path(repo, "origin")
    assert path == os.path.join(repo.path, "remotes", "origin", "trusted.gpg")
    [fpr] = remotes.trusted_keys(repo, "origin")
    listed = subprocess.run(["gpg", "--homedir", builder_key.home, "--with-colons", "--fingerprint",
                             builder_key.email], capture_output=True, text=True, check=True).stdout
    assert f"fpr:::::::::{fpr}:" in listed


def test_no_gpg_agent_or_trustdb_is_left_in_the_repository(repo, builder_key) -> None:  # noqa: F811
    remotes.add(repo, "origin", "http://example.com", key_files=[builder_key.public])
    assert os.listdir(os.path.join(repo.path, "remotes", "origin")) == ["trusted.gpg"]


@pytest.mark.parametrize("content", [b"not a key\n", b""])
def test_a_key_file_without_a_key_adds_no_remote(repo, tmp_path, content) -> None:
    bad = tmp_path / "bad.asc"
    bad.write_bytes(content)
    with pytest.raises(SignatureError, match="no OpenPGP public key"):
        remotes.add(repo, "origin", "http://example.com", key_files=[str(bad)])
    assert "remote" not in config(repo) and not os.path.exists(os.path.join(repo.path, "remotes", "origin"))


def test_a_secret_key_is_refused(repo, tmp_path, builder_key) -> None:  # noqa: F811
    secret = tmp_path / "secret.asc"
    secret.write_bytes(subprocess.run(
        ["gpg", "--homedir", builder_key.home, "--batch", "--pinentry-mode", "loopback", "--passphrase", "",
         "--armor", "--export-secret-keys", builder_key.email], capture_output=True, check=True).stdout)
    with pytest.raises(SignatureError, match="secret key"):
        remotes.add(repo, "origin", "http://example.com", key_files=[str(secret)])


def test_keyring_verify_names_the_signer_and_refuses_strangers(tmp_path, builder_key, stranger_key) -> None:  # noqa: F811
    ring = str(tmp_path / "trusted.gpg")
    keyring.import_keys(ring, [builder_key.public])
    data = b"payload\n"
    from cfsdeploy.repo.signing import sign

    signer = keyring.verify(ring, data, sign(data, builder_key.email, homedir=builder_key.home))
    assert signer.username == "Builder <builder@example.com>" and signer.fingerprint in keyring.fingerprints(ring)
    with pytest.raises(SignatureError, match="unknown key"):
        keyring.verify(ring, data, sign(data, stranger_key.email, homedir=stranger_key.home))
    with pytest.raises(SignatureError, match="bad signature"):
        keyring.verify(ring, b"other\n", sign(data, builder_key.email, homedir=builder_key.home))


def test_list_returns_remotes_by_name(repo) -> None:
    remotes.add(repo, "zeta", "http://z.example", gpg_verify=False)
    remotes.add(repo, "alpha", "http://a.example", gpg_verify=False)
    assert [r.name for r in remotes.list_remotes(repo)] == ["alpha", "zeta"]


def test_remove_forgets_settings_keys_and_remote_branches(repo, tmp_path, builder_key) -> None:  # noqa: F811
    tree = tmp_path / "tree"
    write_files(tree, {"f": b"x"})
    commit = repo.commit(tree, "b", "s").commit
    remotes.add(repo, "origin", "http://example.com", key_files=[builder_key.public])
    repo.git.references.create("refs/remotes/origin/b", commit)
    remotes.remove(repo, "origin")
    assert "origin" not in config(repo).get("remote", {})
    assert not os.path.exists(os.path.join(repo.path, "remotes", "origin"))
    assert "refs/remotes/origin/b" not in repo.git.references
    assert "refs/remotes/origin" not in open(os.path.join(repo.path, "git", "info", "refs")).read()
    with pytest.raises(RemoteNotFoundError, match="no remote named"):
        remotes.remove(repo, "origin")


def test_a_hand_edited_remote_with_wrong_types_is_a_clear_error(repo) -> None:
    with open(os.path.join(repo.path, "config.toml"), "a") as f:
        f.write('[remote.origin]\nurl = "http://x"\ngpg-verify = "yes"\n')
    with pytest.raises(RemoteError, match="gpg-verify \\(boolean\\)"):
        remotes.get(repo, "origin")


def test_a_hand_edited_require_binding_must_be_a_boolean(repo) -> None:
    with open(os.path.join(repo.path, "config.toml"), "a") as f:
        f.write('[remote.origin]\nurl = "http://x"\nrequire-binding = "no"\n')
    with pytest.raises(RemoteError, match="require-binding \\(boolean, optional\\)"):
        remotes.get(repo, "origin")


def test_a_remote_requires_bindings_unless_told_not_to(repo) -> None:
    assert remotes.add(repo, "new", "http://n.example", gpg_verify=False).require_binding
    assert not remotes.add(repo, "old", "http://o.example", gpg_verify=False, require_binding=False).require_binding
    assert config(repo)["remote"]["old"]["require-binding"] is False


def test_a_remote_written_before_bindings_does_not_require_them(repo) -> None:
    with open(os.path.join(repo.path, "config.toml"), "a") as f:
        f.write('[remote.origin]\nurl = "http://x"\ngpg-verify = false\n')
    assert remotes.get(repo, "origin") == Remote("origin", "http://x", False, None, require_binding=False)


def test_cli_remote_add_no_require_binding(repo) -> None:
    r = invoke("remote", "add", "--repo", repo.path, "old", "http://o.example", "--no-gpg-verify",
               "--no-require-binding")
    assert r.exit_code == 0, r.output
    assert invoke("remote", "list", "--repo", repo.path).output.endswith("no gpg-verify, no require-binding\n")


def test_cli_remote_add_list_remove(repo, builder_key) -> None:  # noqa: F811
    r = invoke("remote", "add", "--repo", repo.path, "origin", "http://example.com/r",
               "--gpg-import", builder_key.public, "--branch", "os/stable")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("added remote origin http://example.com/r, trusting ")
    r = invoke("remote", "add", "--repo", repo.path, "plain", "http://example.com/p", "--no-gpg-verify")
    assert r.exit_code == 0, r.output
    r = invoke("remote", "list", "--repo", repo.path)
    assert r.output == ("origin\thttp://example.com/r\tos/stable\tgpg-verify, trusted keys: 1, require-binding\n"
                        "plain\thttp://example.com/p\t-\tno gpg-verify, require-binding\n")
    r = invoke("remote", "remove", "--repo", repo.path, "plain")
    assert r.exit_code == 0 and r.output == "removed remote plain\n"
    assert [x.name for x in remotes.list_remotes(repo)] == ["origin"]


def test_cli_remote_errors_are_one_line(repo) -> None:
    r = invoke("remote", "add", "--repo", repo.path, "origin", "ftp://x")
    assert r.exit_code == 2 and r.output.count("\n") == 1 and r.output.startswith("cfsdeploy: ")
