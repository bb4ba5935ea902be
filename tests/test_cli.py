"""The command line: thin, with one-line errors and exit codes."""

from __future__ import annotations

import hashlib
import os

import pytest
from click.testing import CliRunner

from cfsdeploy.cli import main

from .vectors import SHOULD_FAIL, VALID

REMOTE_COMMANDS = ["pull", "remote add", "remote list", "remote remove", "upgrade", "switch"]
SYSROOT_COMMANDS = ["sysroot init", "deploy", "finalize-staged", "status", "rollback", "undeploy", "pin",
                    "cleanup", "kargs", "verity enable"]


def invoke(*args: str, input: bytes | None = None):
    return CliRunner().invoke(main, list(args), input=input)


@pytest.mark.parametrize("command", REMOTE_COMMANDS + SYSROOT_COMMANDS + [
    "digest", "init", "commit", "log", "show", "ls", "cat", "refs", "tag", "checkout", "fsck", "verify", "diff",
    "prune", "image build", "image dump", "image digest", "image mount", "install to-disk", "install to-filesystem"])
def test_every_command_has_help(command: str) -> None:
    result = invoke(*command.split(), "--help")
    assert result.exit_code == 0 and "Usage:" in result.output


def test_image_build_from_stdin_writes_reference_image(tmp_path) -> None:
    vector = next(v for v in VALID if v.name == "config.dump.gz")
    out = tmp_path / "img"
    result = invoke("image", "build", "--from-file", "-", str(out), input=vector.data)
    assert result.exit_code == 0, result.output
    assert hashlib.sha256(out.read_bytes()).hexdigest() == vector.sha256


@pytest.mark.parametrize("vector", SHOULD_FAIL, ids=lambda v: v.name)
def test_rejected_dumpfile_gives_one_line_error_and_no_image(vector, tmp_path) -> None:
    src = tmp_path / "in.dump"
    src.write_bytes(vector.data)
    result = invoke("image", "build", "--lenient", "--from-file", str(src), str(tmp_path / "img"))
    assert result.exit_code == 1
    assert result.output.startswith("cfsdeploy: ") and result.output.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.dump"]


def test_missing_input_file_is_a_clear_error(tmp_path) -> None:
    result = invoke("image", "build", "--from-file", str(tmp_path / "nope"), str(tmp_path / "img"))
    assert result.exit_code == 3 and "No such file" in result.output


def test_image_of_a_tree_older_than_1970_dumps_its_times(tmp_path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"old")
    os.utime(tree / "f", ns=(-10**9,) * 2)  # touch -d @-1
    image = tmp_path / "img"
    built = invoke("image", "build", str(tree), str(image), "--digest-store", str(tmp_path / "objects"))
    assert built.exit_code == 0, built.output
    dumped = invoke("image", "dump", str(image))
    assert dumped.exit_code == 0 and b" 0 -1.0 - old -\n" in dumped.stdout_bytes  # rdev, mtime
