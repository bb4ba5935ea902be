"""Each group of errors exits with its own code (README, "Exit codes") and one line on stderr."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import cfsdeploy
from cfsdeploy.composefs import fsverity
from cfsdeploy.remote import remotes
from cfsdeploy.repo.repository import Repository
from cfsdeploy.util import errors
from cfsdeploy.util.errors import BusyError, HostError, IntegrityError, NotFoundError, UsageError


def cfsdeploy_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cfsdeploy.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})))


def assert_fails(p: subprocess.CompletedProcess[str], code: int, line: str) -> None:
    assert (p.returncode, p.stderr) == (code, f"cfsdeploy: {line}\n")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    top = tmp_path / "tree"
    (top / "usr/bin").mkdir(parents=True)
    (top / "usr/bin/tool").write_bytes(os.urandom(10_000))
    return top


@pytest.fixture
def repo(tmp_path: Path, tree: Path) -> Repository:
    repo = Repository.init(tmp_path / "repo")
    repo.commit(tree, "os/x", "first")
    return repo


def test_a_bad_option_value_exits_2(repo: Repository, tree: Path) -> None:
    p = cfsdeploy_cli("commit", "--repo", repo.path, "--tree", str(tree), "-b", "os/x", "-m", "s", "--threads", "0")
    assert p.returncode == UsageError.exit_code == 2
    assert p.stderr.startswith("cfsdeploy: ") and p.stderr.count("\n") == 1 and "--threads" in p.stderr


def test_a_bad_name_exits_2(repo: Repository) -> None:
    p = cfsdeploy_cli("remote", "add", "--repo", repo.path, "--no-gpg-verify", "bad name", "file:///x")
    assert_fails(p, UsageError.exit_code, "invalid remote name 'bad name' (letters, digits, '_', '.' and '-')")


def test_an_unknown_commit_exits_3(repo: Repository) -> None:
    assert_fails(cfsdeploy_cli("log", "--repo", repo.path, "nope"), NotFoundError.exit_code,
                 "unknown revision 'nope'")
    assert NotFoundError.exit_code == 3


def test_a_hint_follows_the_message_on_the_same_line(tmp_path: Path) -> None:
    p = cfsdeploy_cli("status", "--sysroot", str(tmp_path))
    assert_fails(p, NotFoundError.exit_code,
                 f"not a cfsdeploy sysroot: {tmp_path} (run `cfsdeploy sysroot init`)")


def test_a_tampered_object_exits_4(repo: Repository, tree: Path) -> None:
    path = repo.objects.path_of(fsverity.digest_file(tree / "usr/bin/tool"))
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))
    digest = os.path.basename(os.path.dirname(path)) + os.path.basename(path)
    assert_fails(cfsdeploy_cli("cat", "--repo", repo.path, "os/x", "/usr/bin/tool"), IntegrityError.exit_code,
                 f"/usr/bin/tool: object {digest} is corrupt (run fsck)")
    assert IntegrityError.exit_code == 4


def test_a_held_lock_exits_5(repo: Repository, tree: Path) -> None:
    with repo.lock():
        p = cfsdeploy_cli("commit", "--repo", repo.path, "--tree", str(tree), "-b", "os/x", "-m", "s",
                          "--wait-lock", "0")
    assert_fails(p, BusyError.exit_code, f"repository {repo.path} is locked by another cfsdeploy process")
    assert BusyError.exit_code == 5


def test_a_missing_tool_exits_6(repo: Repository, tmp_path: Path) -> None:
    key = tmp_path / "key.asc"
    key.write_text("not a key, and gpg is not there to say so\n")
    p = cfsdeploy_cli("remote", "add", "--repo", repo.path, "--gpg-import", str(key), "origin", "file:///x",
                      env={"PATH": str(tmp_path / "empty")})
    assert_fails(p, HostError.exit_code, "gpg: command not found (install package gnupg?)")
    assert HostError.exit_code == 6
    assert remotes.list_remotes(repo) == []


def _error_classes() -> list[type[errors.CfsError]]:
    import pkgutil
    from importlib import import_module

    for info in pkgutil.walk_packages(cfsdeploy.__path__, "cfsdeploy."):
        import_module(info.name)
    found: set[type[errors.CfsError]] = set()
    todo: list[type[errors.CfsError]] = [errors.CfsError]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo += [c for c in cls.__subclasses__() if c not in found]
    return sorted(found, key=lambda c: f"{c.__module__}.{c.__qualname__}")


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda c: c.__qualname__)
def test_an_error_class_is_in_at_most_one_group(cls: type[errors.CfsError]) -> None:
    groups = [g for g in errors.GROUPS if issubclass(cls, g)]
    assert len(groups) <= 1, groups
    assert cls.exit_code == (groups[0].exit_code if groups else 1)
