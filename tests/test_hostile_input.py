"""Hostile settings, URLs and command lines: a typed error naming what is wrong, one
line and exit 1 from the command line, and nothing changed."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cfsdeploy.remote.remotes import RemoteError, list_remotes, normalize_url
from cfsdeploy.repo.repository import Repository
from cfsdeploy.sysroot.layout import Sysroot, SysrootError
from cfsdeploy.util import lockfile
from cfsdeploy.util.errors import HostError, UsageError

OS = "testos"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cfsdeploy.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})))


def assert_one_line_error(p: subprocess.CompletedProcess[str], message: str, code: int = 1) -> None:
    assert p.returncode == code, p.stderr
    assert p.stderr.startswith("cfsdeploy: ") and p.stderr.count("\n") == 1, p.stderr
    assert message in p.stderr


@pytest.fixture
def sysroot(tmp_path: Path) -> Path:
    Sysroot.init(str(tmp_path / "sysroot"), OS)
    return tmp_path / "sysroot"


def write_config(root: Path, text: str) -> Path:
    path = root / "cfsdeploy" / "config.toml"
    path.write_text(text)
    return path


# --- config.toml -------------------------------------------------------------------------

BAD_CONFIGS = [
    ("[boot]\nkargs = 5\n", "boot.kargs must be a list of strings"),
    ("[boot]\nkargs = [1]\n", "boot.kargs must be a list of strings"),
    ('[boot]\nkargs = ["a b"]\n', "boot.kargs: invalid kernel argument 'a b'"),
    ('[boot]\nkargs = ["cfsdeploy=/x"]\n', "boot.kargs: cfsdeploy= is set by cfsdeploy"),
    ("[sysroot]\nboot-dir = 5\n", "sysroot.boot-dir must be a path"),
    ('[sysroot]\nboot-dir = ""\n', "sysroot.boot-dir must be a path"),
    ('[sysroot]\nboot-dir = "a\\u0000b"\n', "sysroot.boot-dir must be a path"),
    ("[sysroot]\ndefault-os = 5\n", "sysroot.default-os must be an os name"),
    ('[sysroot]\ndefault-os = "../x"\n', "sysroot.default-os must be an os name"),
    ('[boot]\nverity = "maybe"\n', "boot.verity must be require or try or off"),
    ("[boot]\nverity = [1]\n", "boot.verity must be require or try or off"),
    ("[boot]\ntries = true\n", "boot.tries must be 0.."),
    ('[boot]\ntries = "3"\n', "boot.tries must be 0.."),
    ("[deploy]\nkeep-rollback = 1\n", "deploy.keep-rollback must be true or false"),
    ("[deploy]\nkeep-extra = -1\n", "deploy.keep-extra must be a number >= 0"),
    ("[deploy]\nkeep-extra = 1.5\n", "deploy.keep-extra must be a number >= 0"),
    ("boot = 5\n", "[boot] must be a table"),
    ("[boot\n", "config.toml: "),
]


@pytest.mark.parametrize(("text", "message"), BAD_CONFIGS, ids=[m for _, m in BAD_CONFIGS])
def test_bad_config_value_is_named_with_its_file(sysroot: Path, text: str, message: str) -> None:
    path = write_config(sysroot, text)
    with pytest.raises(SysrootError) as e:
        Sysroot(str(sysroot))
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_config_that_is_not_utf8_is_an_error(sysroot: Path) -> None:
    path = sysroot / "cfsdeploy" / "config.toml"
    path.write_bytes(b"[boot]\nverity = \"\xff\"\n")
    with pytest.raises(SysrootError, match="codec can't decode"):
        Sysroot(str(sysroot))


def test_bad_config_is_one_line_from_every_sysroot_command(sysroot: Path) -> None:
    write_config(sysroot, "[boot]\nkargs = 5\n")
    for command in (["status"], ["cleanup"], ["kargs"], ["rollback"]):
        assert_one_line_error(cli(*command, "--sysroot", str(sysroot)), "boot.kargs must be a list of strings")


def test_config_write_refuses_a_bad_value_and_keeps_the_file(sysroot: Path) -> None:
    s = Sysroot(str(sysroot))
    before = (sysroot / "cfsdeploy" / "config.toml").read_bytes()
    s.config.tries = -1
    with pytest.raises(SysrootError, match="boot.tries must be 0.."):
        s.save_config()
    assert (sysroot / "cfsdeploy" / "config.toml").read_bytes() == before


# --- URLs ----------------------------------------------------------------------------------

BAD_URLS = [
    ("http://[::1", "Invalid IPv6 URL"),
    ("http://x:99999", "Port out of range"),
    ("http://x:abc/", "Port could not be cast to integer"),
    ("http://x/a b", "blanks, control or non-ASCII"),
    ("http://x/\x1b[2J", "blanks, control or non-ASCII"),
    ("http://\u00e9.example/", "blanks, control or non-ASCII"),
    ("http://x/\udcff", "not UTF-8"),
]


@pytest.mark.parametrize(("url", "message"), BAD_URLS, ids=[m for _, m in BAD_URLS])
def test_bad_url_is_a_remote_error(url: str, message: str) -> None:
    with pytest.raises(RemoteError, match=message):
        normalize_url(url)


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo")


@pytest.mark.parametrize("url", ["http://[::1", "http://x:99999", "http://x:abc/"])
def test_remote_add_with_a_bad_url_fails_in_one_line_and_adds_nothing(repo: Repository, url: str) -> None:
    before = sorted(os.listdir(repo.path))
    p = cli("remote", "add", "--repo", repo.path, "--no-gpg-verify", "origin", url)
    assert_one_line_error(p, f"invalid URL {url!r}", UsageError.exit_code)
    assert sorted(os.listdir(repo.path)) == before and list_remotes(repo) == []


def test_pull_with_a_bad_url_fails_in_one_line(repo: Repository, tmp_path: Path) -> None:
    assert cli("remote", "add", "--repo", repo.path, "--no-gpg-verify", "--branch", "os/x", "origin",
               str(tmp_path)).returncode == 0
    assert_one_line_error(cli("pull", "--repo", repo.path, "--url", "http://x:abc/", "origin"),
                          "invalid URL 'http://x:abc/'", UsageError.exit_code)


def test_a_bad_url_in_the_repository_config_is_named(repo: Repository) -> None:
    path = Path(repo.path) / "config.toml"
    path.write_text('[remote.origin]\nurl = "http://x:99999"\ngpg-verify = false\n')
    with pytest.raises(RemoteError) as e:
        list_remotes(repo)
    assert str(e.value).startswith(f"{path}: remote 'origin': invalid URL")
    assert_one_line_error(cli("pull", "--repo", repo.path, "origin", "os/x"), "invalid URL 'http://x:99999'")


BAD_REMOTES = ['url = 5\n', 'url = "file:///x"\ngpg-verify = "yes"\n', 'url = "file:///x"\nbranch = [1]\n',
               'url = "file:///x"\nbranch = "a..b"\n', 'url = "file:///x"\ngpg-verify = false\nweight = 1.5\n']


@pytest.mark.parametrize("table", BAD_REMOTES)
def test_a_damaged_remote_stops_every_remote_command_but_its_removal(repo: Repository, table: str) -> None:
    path = Path(repo.path) / "config.toml"
    text = f"[remote.other]\n{table}"
    path.write_text(text)
    for command in (["remote", "list"], ["pull", "other", "os/x"], ["remote", "remove", "origin"],
                    ["remote", "add", "--no-gpg-verify", "origin", "file:///x"]):
        assert_one_line_error(cli(*command, "--repo", repo.path), f"{path}: remote 'other'")
    assert path.read_text() == text
    assert cli("remote", "remove", "--repo", repo.path, "other").returncode == 0
    assert list_remotes(repo) == []


def test_a_remote_section_that_is_no_table_is_named(repo: Repository) -> None:
    path = Path(repo.path) / "config.toml"
    path.write_text("remote = 5\n")
    for command in (["remote", "list"], ["remote", "remove", "origin"]):
        assert_one_line_error(cli(*command, "--repo", repo.path), f"{path}: [remote] must hold one table per remote")


def test_a_repository_config_that_is_not_utf8_is_named(repo: Repository) -> None:
    path = Path(repo.path) / "config.toml"
    path.write_bytes(b'[remote.origin]\nurl = "\xff"\n')
    with pytest.raises(RemoteError, match=f"^{path}: 'utf-8' codec can't decode"):
        list_remotes(repo)


# --- the kernel command line -----------------------------------------------------------------

def test_kernel_command_line_that_is_not_utf8_names_no_booted_deployment(sysroot: Path, tmp_path: Path) -> None:
    (tmp_path / "cmdline").write_bytes(b"quiet cfsdeploy=/cfsdeploy/deploy/\xff/x root=/dev/vda\n")
    p = cli("status", "--sysroot", str(sysroot), env={"CFSDEPLOY_CMDLINE": str(tmp_path / "cmdline")})
    assert p.returncode == 0 and p.stdout == f"os {OS}: no deployments\n", p.stderr


# --- a full disk ------------------------------------------------------------------------------


@pytest.fixture
def small_repo(tmp_path: Path) -> Iterator[Repository]:
    """A repository on a 1 MiB filesystem of its own."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    top = tmp_path / "small"
    top.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "small", str(top)], check=True)
    try:
        yield Repository.init(top / "repo")
    finally:
        subprocess.run(["umount", str(top)], check=True)


@pytest.mark.parametrize("threads", ["1", "2"])
def test_full_disk_during_commit_is_a_write_failure_of_the_repository(small_repo: Repository, tmp_path: Path,
                                                                      threads: str) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(40):
        (tree / f"f{i:02}").write_bytes(os.urandom(100_000))
    p = cli("commit", "--repo", small_repo.path, "--tree", str(tree), "-b", "os/x", "-m", "big",
            "--threads", threads)
    assert_one_line_error(p, f"cannot write an object in {small_repo.path}/tmp/", HostError.exit_code)
    assert p.stderr.endswith(": No space left on device\n") and "cannot read" not in p.stderr
    assert list(small_repo.git.references) == []


# --- the lock files ------------------------------------------------------------------------------


def test_lock_files_are_the_owners_alone(sysroot: Path) -> None:
    # flock needs only a read-only descriptor: a lock others could open, they could hold forever.
    for lock in (sysroot / "cfsdeploy/lock", sysroot / "cfsdeploy/repo/lock"):
        assert stat.S_IMODE(lock.stat().st_mode) == 0o600


def test_holding_a_lock_takes_it_back_from_others(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    lock.touch(mode=0o644)
    with lockfile.hold(str(lock), "busy"):
        assert stat.S_IMODE(lock.stat().st_mode) == 0o600
