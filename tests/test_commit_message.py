"""The commit message: user text is checked where it enters (no control characters,
single lines where one line is expected), and trailers are read strictly from the
final block, so no text can add, hide or replace a trailer."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cfsdeploy.repo.repository import (
    CommitTextError,
    Repository,
    TrailerError,
    bindings,
    commit_info,
    image_digest_of,
    trailers,
)

from .pullkit import write_files

FORGED_DIGEST = "0" * 64
DIGEST = "ab" * 32


@pytest.fixture
def repo(tmp_path) -> Repository:
    repo = Repository.init(tmp_path / "repo")
    write_files(tmp_path / "tree", {"etc/hostname": b"box\n", "usr/bin/tool": bytes(range(256)) * 40})
    repo.commit(tmp_path / "tree", "os/x", "base")
    return repo


def cli_commit(repo: Repository, *args: str) -> subprocess.CompletedProcess[str]:
    tree = f"{repo.path}/../tree"
    return subprocess.run([sys.executable, "-m", "cfsdeploy.cli", "commit", "--repo", repo.path,
                           "--tree", tree, "-b", "os/x", *args], capture_output=True, text=True)


def assert_refused(result: subprocess.CompletedProcess[str], repo: Repository, head: str, what: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"cfsdeploy: {what} contains the control character U+")
    assert result.stderr.count("\n") == 1, result.stderr
    assert str(repo.resolve("os/x").id) == head


# --- what commit writes ---------------------------------------------------------------


def test_commit_binds_the_commit_to_its_branch(repo: Repository) -> None:
    assert bindings(repo.resolve("os/x").message) == ["os/x"]


def test_commit_bind_adds_branches_once_each(repo: Repository, tmp_path) -> None:
    repo.commit(tmp_path / "tree", "os/x", "next", bind=["os/y", "os/x", "os/y"])
    assert bindings(repo.resolve("os/x").message) == ["os/x", "os/y"]


def test_show_json_lists_the_branches(repo: Repository) -> None:
    assert commit_info(repo.resolve("os/x")).to_json()["branches"] == ["os/x"]


def test_commit_refuses_to_bind_an_invalid_branch_name(repo: Repository, tmp_path) -> None:
    head = str(repo.resolve("os/x").id)
    with pytest.raises(CommitTextError, match="U\\+2028"):
        repo.commit(tmp_path / "tree", "os/x", "next", bind=["os/a\u2028b"])
    assert str(repo.resolve("os/x").id) == head


# --- user text ------------------------------------------------------------------------


@pytest.mark.parametrize("newline", ["\n", "\r", "\r\n"])
def test_a_version_cannot_inject_a_digest_trailer(repo: Repository, newline: str) -> None:
    head = str(repo.resolve("os/x").id)
    result = cli_commit(repo, "-m", "next", "--version", f"1{newline}Composefs-Digest: {FORGED_DIGEST}")
    assert_refused(result, repo, head, "the version")


@pytest.mark.parametrize("char", ["\x00", "\x01", "\t", "\x1b", "\x1e", "\x7f", "\x85", "\u2028"])
def test_a_version_with_a_control_character_is_refused(repo: Repository, tmp_path, char: str) -> None:
    # Through the library: NUL cannot travel in argv.
    with pytest.raises(CommitTextError, match=f"U\\+{ord(char):04X}: it must be one line of text"):
        repo.commit(tmp_path / "tree", "os/x", "next", version=f"1.0{char}")


@pytest.mark.parametrize("char", ["\n", "\r", "\x1b", "\x7f"])
def test_a_subject_with_a_control_character_is_refused(repo: Repository, char: str) -> None:
    head = str(repo.resolve("os/x").id)
    assert_refused(cli_commit(repo, "-m", f"next{char}Composefs-Format: 1"), repo, head, "the subject")


@pytest.mark.parametrize("char", ["\r", "\x00", "\x0b", "\x0c", "\x1b", "\x7f", "\x9b", "\u2029"])
def test_a_body_with_a_control_character_other_than_newline_and_tab_is_refused(
        repo: Repository, tmp_path, char: str) -> None:
    with pytest.raises(CommitTextError, match="only newlines and tabs are allowed"):
        repo.commit(tmp_path / "tree", "os/x", "next", body=f"line{char}Composefs-Digest: {FORGED_DIGEST}")


def test_a_body_keeps_its_lines_and_tabs(repo: Repository, tmp_path) -> None:
    repo.commit(tmp_path / "tree", "os/x", "next", body="first\tline\n\nsecond paragraph")
    assert commit_info(repo.resolve("os/x")).body == "first\tline\n\nsecond paragraph"


def test_a_trailer_in_the_body_does_not_count(repo: Repository, tmp_path) -> None:
    real = repo.commit(tmp_path / "tree", "os/x", "next", version="2",
                       body=f"notes\n\nComposefs-Digest: {FORGED_DIGEST}\nCfsdeploy-Branch: os/debug").image_digest
    commit = repo.resolve("os/x")
    assert image_digest_of(commit) == real
    assert bindings(commit.message) == ["os/x"]
    assert commit_info(commit).body.endswith(f"Composefs-Digest: {FORGED_DIGEST}\nCfsdeploy-Branch: os/debug")


def test_an_empty_subject_is_refused(repo: Repository, tmp_path) -> None:
    with pytest.raises(CommitTextError, match="one non-empty line"):
        repo.commit(tmp_path / "tree", "os/x", " ")


# --- reading trailers -----------------------------------------------------------------


def test_trailers_are_read_from_the_last_paragraph() -> None:
    message = f"subject\n\nbody\n\nComposefs-Digest: {DIGEST}\nComposefs-Format: 0\n"
    assert trailers(message) == {"Composefs-Digest": DIGEST, "Composefs-Format": "0"}


def test_a_subject_alone_is_never_a_trailer_block() -> None:
    assert trailers(f"Composefs-Digest: {DIGEST}\n") == {}


def test_a_last_paragraph_with_a_line_that_is_no_trailer_has_no_trailers() -> None:
    assert trailers(f"subject\n\nComposefs-Digest: {DIGEST}\nsome words\n") == {}


@pytest.mark.parametrize("line", [f"Composefs-Digest:  {DIGEST}", f"Composefs-Digest: {DIGEST} ",
                                  f"Composefs-Digest: {DIGEST}\r", "Composefs Digest: x", "Key:", " Key: x"])
def test_a_malformed_trailer_line_voids_the_block(line: str) -> None:
    assert trailers(f"subject\n\nComposefs-Format: 0\n{line}\n") == {}


def test_a_key_given_twice_is_refused() -> None:
    message = f"subject\n\nComposefs-Digest: {DIGEST}\nComposefs-Digest: {FORGED_DIGEST}\n"
    with pytest.raises(TrailerError, match="Composefs-Digest appears 2 times"):
        trailers(message)


def test_the_branch_trailer_may_repeat_and_is_not_a_single_trailer() -> None:
    message = "subject\n\nComposefs-Format: 0\nCfsdeploy-Branch: os/a\nCfsdeploy-Branch: os/b\n"
    assert bindings(message) == ["os/a", "os/b"]
    assert trailers(message) == {"Composefs-Format": "0"}


def test_a_commit_with_two_digest_trailers_has_no_image_digest(repo: Repository) -> None:
    c = repo.resolve("os/x")
    message = c.message + f"Composefs-Digest: {FORGED_DIGEST}\n"
    forged = repo.git[repo.git.create_commit(None, c.author, c.committer, message, c.tree_id, [])]
    with pytest.raises(TrailerError):
        image_digest_of(forged)
