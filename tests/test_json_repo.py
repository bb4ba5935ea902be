"""The --json output of the repository commands: schema 1, exactly the keys docs/json.md
lists, digests as lowercase hex, times in ISO 8601."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import pytest
from click.testing import CliRunner

from cfsdeploy.cli import main
from cfsdeploy.composefs import fsverity
from cfsdeploy.repo.repository import Repository

from .test_signing import signer_home  # noqa: F401  (a fixture)

COMMIT_KEYS = {"commit", "subject", "body", "version", "branches", "time", "author", "parents", "image_digest",
               "image_format", "sealed", "signature"}
SIGNATURE_KEYS = {"key_id", "fingerprint", "verified", "signer", "problem"}
FSCK_KEYS = {"schema", "ok", "commits", "history_only", "objects_checked", "problems"}
PROBLEM_KEYS = {"kind", "commit", "object_digest", "image", "sealed", "detail"}
HEX64 = re.compile(r"[0-9a-f]{64}")
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00")


@pytest.fixture
def repo(tmp_path, signer_home) -> Repository:  # noqa: F811
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/big").write_bytes(os.urandom(5000))
    r = Repository.init(tmp_path / "repo")
    r.commit(tree, "os/stable", "First", version="1.0")
    (tree / "etc/new").write_bytes(b"new")
    r.commit(tree, "os/stable", "Second", body="More.", sign_key="builder@example.com", gpg_homedir=signer_home)
    return r


def cli_json(*args: str) -> Any:
    r = CliRunner().invoke(main, [*args, "--json"])
    out = json.loads(r.output)
    assert out["schema"] == 1
    return out


def check_commit(c: dict[str, Any]) -> None:
    assert HEX64.fullmatch(c["image_digest"]) and ISO_UTC.fullmatch(c["time"])


def test_log_json_is_schema_1_with_a_list_of_commits(repo: Repository) -> None:
    out = cli_json("log", "--repo", repo.path, "os/stable")
    assert set(out) == {"schema", "commits"}
    assert [set(c) for c in out["commits"]] == [COMMIT_KEYS, COMMIT_KEYS]
    for c in out["commits"]:
        check_commit(c)
    assert set(out["commits"][0]["signature"]) == SIGNATURE_KEYS and out["commits"][1]["signature"] is None


def test_show_json_is_schema_1_with_the_keys_of_a_commit(repo: Repository) -> None:
    out = cli_json("show", "--repo", repo.path, "os/stable")
    assert set(out) == {"schema"} | COMMIT_KEYS
    check_commit(out)
    assert out["body"] == "More." and out["commit"] == str(repo.resolve("os/stable").id)


def test_refs_json_lists_ref_and_commit(repo: Repository) -> None:
    out = cli_json("refs", "--repo", repo.path)
    assert out == {"schema": 1, "refs": [{"ref": "refs/heads/os/stable", "commit": str(repo.resolve("os/stable").id)}]}


def test_diff_json_has_added_removed_modified(repo: Repository) -> None:
    out = cli_json("diff", "--repo", repo.path, "os/stable~1", "os/stable")
    assert out == {"schema": 1, "added": ["/etc/new"], "removed": [], "modified": {}}


def test_fsck_json_of_a_sound_repository(repo: Repository) -> None:
    out = cli_json("fsck", "--repo", repo.path, "--quick")
    assert set(out) == FSCK_KEYS and out["ok"] is True and out["problems"] == []


def test_fsck_json_problem_names_the_missing_object_by_digest(repo: Repository, tmp_path) -> None:
    digest = fsverity.digest_file(tmp_path / "tree/etc/big")
    os.unlink(repo.objects.path_of(digest))
    out = cli_json("fsck", "--repo", repo.path, "--quick")
    assert set(out) == FSCK_KEYS and out["ok"] is False
    [problem] = out["problems"]
    assert set(problem) == PROBLEM_KEYS
    assert problem["kind"] == "missing_object" and problem["object_digest"] == digest.hex()
    assert problem["commit"] == str(repo.resolve("os/stable").id)


def test_docs_list_every_key_of_the_repository_commands() -> None:
    docs = open(os.path.join(os.path.dirname(__file__), "..", "docs", "json.md")).read()
    section = docs[docs.index("## Repository commands"):]
    for key in COMMIT_KEYS | SIGNATURE_KEYS | FSCK_KEYS | PROBLEM_KEYS | {"commits", "refs", "ref", "added"}:
        assert f"`{key}`" in section, key
