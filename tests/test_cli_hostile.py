"""Hostile values to every option and argument of every command, and of every
config.toml key: a run that fails ends with exit 1 or 2 and one line on stderr,
never a traceback, and leaves the sysroot and its repository as they were.

The commands are read from the click tree, so a new command or option is covered
without touching this file; a value it needs to get past the others is in BASE.
Each run gets one hostile value, the other parameters sensible ones: a hostile
value that is a legitimate one (a subject with quotes in it) may succeed, and
then the sysroot is put back for the next run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfsdeploy.cli import main
from cfsdeploy.remote.remotes import add as add_remote
from cfsdeploy.sysroot.deploy import deploy
from cfsdeploy.sysroot.layout import Sysroot

from .sysroots import BRANCH, OS, ROOT_KARGS, commit_tree, make_os_tree


@dataclass(frozen=True)
class Param:
    command: tuple[str, ...]
    name: str
    flag: str | None  # the option's longest flag; None for an argument

    def __str__(self) -> str:
        return f"{' '.join(self.command)} {self.flag or self.name.upper()}"


def leaf_commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from leaf_commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def params_of(cmd: click.Command) -> list[click.Parameter]:
    return [p for p in cmd.params if not getattr(p, "is_flag", False) and p.name != "help"]


COMMANDS = dict(leaf_commands(main))
PARAMS = [Param(path, p.name or "", max(p.opts, key=len) if isinstance(p, click.Option) else None)
          for path, cmd in COMMANDS.items() for p in params_of(cmd)]


def base_values(top: Path) -> dict[str, list[str]]:
    """Values of required parameters that get a command past them, by parameter
    name, or by "command param" where a command needs another."""
    repo = str(top / "sysroot/cfsdeploy/repo")
    return {
        "repo_path": [repo], "sysroot_path": [str(top / "sysroot")], "os_name": [OS], "rev": [BRANCH],
        "rev1": [BRANCH], "rev2": [BRANCH], "path": ["/etc/hostname"], "dest": ["checkout"],
        "tree": [str(top / "tree")], "branch": [BRANCH], "subject": ["s"], "name": ["origin"],
        "url": [str(top / "server")], "index": ["0"], "refspec": [f"origin:{BRANCH}"],
        "files": [str(top / "tree/etc/hostname")], "image_path": [str(top / "image")],
        "mountpoint": [str(top / "nowhere")], "basedir": [f"{repo}/objects"],
        "args": [str(top / "tree"), "image.out"],
        "tag name": ["t1"], "remote add name": ["new"], "pull branch": [],
    }


def argv(param: Param, value: str, base: dict[str, list[str]]) -> list[str]:
    """The command with `value` for `param` and base values for the others it needs."""
    out = list(param.command)
    cmd = COMMANDS[param.command]
    key = " ".join(param.command)
    arguments: list[str] = []
    for p in params_of(cmd):
        if p.name == param.name:
            given_ = [value]
        elif p.required or isinstance(p, click.Argument):
            given_ = base.get(f"{key} {p.name}", base.get(p.name or "", []))
        else:
            continue
        if isinstance(p, click.Option):
            for v in given_:
                out += [max(p.opts, key=len), v]
        else:
            arguments += given_
    # "--" so an argument that looks like an option is still read as the argument
    return out + ["--", *arguments] if arguments else out


def snapshot(top: Path) -> dict[str, tuple[Any, ...]]:
    """Every path under top: type and mode, size, mtime, and content or target.
    Not a directory's mtime: a temporary file made and removed again changes it; nor
    a git object's, which libgit2 touches when it writes one that exists."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    what: Any = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                what = os.readlink(path)
            else:
                what = None
            mtime = None if stat.S_ISDIR(st.st_mode) or "/git/objects/" in path else st.st_mtime_ns
            out[os.path.relpath(path, top)] = (st.st_mode, st.st_size, mtime, what)
    return out


class Machine:
    """A sysroot with one deployment, its repository with a remote, a tree to
    commit and an image: made once, put back after a run that changed it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.pristine = tmp / "pristine"
        self.top = tmp / "machine"
        self.cwd = tmp / "cwd"
        p = self.pristine
        s = Sysroot.init(str(p / "sysroot"), OS, karg_list=ROOT_KARGS)
        tree = make_os_tree(p / "tree", files=3)
        commit_tree(s, tree)
        deploy(s, BRANCH, os_name=OS)
        server = p / "server"
        shutil.copytree(s.repo.path, server, symlinks=True)
        add_remote(s.repo, "origin", str(server), gpg_verify=False, branch=BRANCH)
        shutil.copy(s.repo.objects.path_of(bytes.fromhex(s.state(OS).deployments[0].image_digest)), p / "image")
        (tmp / "cmdline").write_text("quiet\n")
        self.env = {"CFSDEPLOY_CMDLINE": str(tmp / "cmdline"), "CFSDEPLOY_REPO": None, "CFSDEPLOY_SYSROOT": None,
                    "CFSDEPLOY_BOOTED": str(tmp / "no-record")}
        self.reset()
        self.before = snapshot(self.top)

    def reset(self) -> None:
        # A legitimate `image mount IMAGE ..` mounted over a directory of this test.
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4].encode().decode("unicode_escape") for line in f]
        for point in sorted((p for p in points if p == str(self.tmp) or p.startswith(f"{self.tmp}/")), reverse=True):
            subprocess.run(["umount", "-l", point], check=True)
        shutil.rmtree(self.top, ignore_errors=True)
        shutil.copytree(self.pristine, self.top, symlinks=True)
        shutil.rmtree(self.cwd, ignore_errors=True)
        self.cwd.mkdir()

    def run(self, args: list[str]) -> Any:
        old = os.getcwd()
        os.chdir(self.cwd)  # where hostile relative paths land
        try:
            return CliRunner().invoke(main, args, env=self.env, catch_exceptions=True)
        finally:
            os.chdir(old)

    def check(self, args: list[str]) -> None:
        r = self.run(args)
        short = [a if len(a) < 100 else f"{a[:40]}...({len(a)})" for a in args]
        shown = f"{short!r} -> {r.exit_code}\n{r.stderr[:500]}"
        assert r.exception is None or isinstance(r.exception, SystemExit), shown + "".join(
            traceback.format_exception(*r.exc_info))
        if r.exit_code == 0:
            self.reset()  # a legitimate value did its job: back to the machine as it was
            self.before = snapshot(self.top)
            return
        assert 1 <= r.exit_code <= 6, shown
        assert r.stderr.startswith("cfsdeploy: ") and r.stderr.count("\n") == 1, shown
        after = snapshot(self.top)
        changed = {k for k in set(after) | set(self.before) if after.get(k) != self.before.get(k)}
        assert not changed, f"{shown}changed: {sorted(changed)}"
        shutil.rmtree(self.cwd)
        self.cwd.mkdir()


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Machine:
    return Machine(tmp_path_factory.mktemp("hostile"))


# Characters an attacker reaches argv with: controls, quotes, shell and TOML
# specials, and the lone surrogates Python makes of bytes that are not UTF-8.
# No "/" and no NUL: a path to somewhere real is not hostile, and argv cannot hold NUL.
SPECIAL = ([chr(c) for c in range(1, 32)]
           + ["\x7f", "'", '"', "\\", "`", "$", "=", ":", " ", "#", "[", "]", "{", "%", "*", "\u2028", "\u00e9"]
           + [chr(c) for c in range(0xdc80, 0xdd00, 7)])
chars = st.one_of(st.sampled_from(SPECIAL), st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="/"))
hostile = st.one_of(
    st.sampled_from(["", "-", "-1", "1e999", "nan", "-inf", "0x10", "..", "\udcff", "a\nb", "origin:", ":x"]),
    st.text(chars, min_size=1, max_size=24),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "\x01", "\udcff", "\"", "é"]), st.integers(4000, 10_000)),
)


def test_every_parameter_is_covered() -> None:
    # The click tree really was walked: the commands and options the README shows.
    names = {str(p) for p in PARAMS}
    assert {"commit --subject", "remote add URL", "pull --url", "deploy --karg", "sysroot init --boot-dir",
            "status --sysroot"} <= names


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(param=st.sampled_from(PARAMS), value=hostile)
def test_hostile_value_to_any_parameter_fails_cleanly(machine: Machine, param: Param, value: str) -> None:
    machine.check(argv(param, value, base_values(machine.top)))


# --- config.toml ----------------------------------------------------------------------

CONFIG_KEYS = {("sysroot", "default-os"): str, ("sysroot", "boot-dir"): str, ("boot", "kargs"): list,
               ("boot", "verity"): str, ("boot", "tries"): int, ("deploy", "keep-rollback"): bool,
               ("deploy", "keep-extra"): int}
TOML_VALUES = {str: ['"x"', '"\\u001b"', '"' + "y" * 5000 + '"'], int: ["5", "-1", "99999999999999999999"],
               bool: ["true"], list: ["[1]", '["a", 2]', "[[]]"], dict: ["{a = 1}"], float: ["1.5", "nan"]}
SYSROOT_COMMANDS = [["status"], ["kargs"], ["cleanup"], ["rollback"], ["deploy", BRANCH], ["undeploy", "0"],
                    ["pin", "0"], ["finalize-staged"], ["upgrade"], ["verity", "enable"]]


def with_value(text: str, key: str, value: str) -> str:
    """config.toml text with `key = value` in place of the key's line (each key is
    written once, and is unique across the tables)."""
    lines = text.splitlines()
    (i,) = [i for i, line in enumerate(lines) if line.startswith(f"{key} = ")]
    lines[i] = f"{key} = {value}"
    return "\n".join(lines) + "\n"


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(sorted(CONFIG_KEYS)), kind=st.sampled_from(sorted(TOML_VALUES, key=str)),
       pick=st.integers(0, 2), command=st.sampled_from(SYSROOT_COMMANDS))
def test_config_key_of_the_wrong_type_stops_every_sysroot_command(machine: Machine, key: tuple[str, str],
                                                                  kind: type, pick: int,
                                                                  command: list[str]) -> None:
    if kind is CONFIG_KEYS[key]:
        kind = dict  # the right type is not what this test is about
    config = machine.top / "sysroot/cfsdeploy/config.toml"
    text = config.read_text()
    config.write_text(with_value(text, key[1], TOML_VALUES[kind][pick % len(TOML_VALUES[kind])]))
    machine.before = snapshot(machine.top)
    try:
        r = machine.run([*command, "--sysroot", str(machine.top / "sysroot")])
        assert r.exception is None or isinstance(r.exception, SystemExit), r.exc_info
        assert r.exit_code == 1, r.stderr
        assert r.stderr == f"cfsdeploy: {config}: {key[0]}.{key[1]} must be " + r.stderr.partition(" must be ")[2]
        assert r.stderr.count("\n") == 1, r.stderr
        assert snapshot(machine.top) == machine.before
    finally:
        config.write_text(text)
        machine.before = snapshot(machine.top)
