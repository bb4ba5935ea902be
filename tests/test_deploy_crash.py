"""A deploy, or the finalizing of a staged one, killed at any step leaves a machine that
boots the old set of entries or the new one, every file they name in place, and a
rerun that succeeds.

The kill points are real: strace's fault injection sends SIGKILL at the Nth call of a
system call that changes the disk (every fsync, write, rename, mkdir, unlink, ... of a
deploy, and a sample of its opens), so every step of the deploy is interrupted once.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cfsdeploy.boot import kargs, uki
from cfsdeploy.repo.fsck import fsck
from cfsdeploy.repo.repository import Repository
from cfsdeploy.sysroot.layout import VERITY_PENDING, Sysroot

from .sealing import commit_sealed, vendor_key
from .sysroots import BRANCH, OS, ROOT_KARGS, commit_tree, make_os_tree

CHANGING = ("fsync", "fdatasync", "syncfs", "write", "pwrite64", "rename", "renameat", "renameat2",
            "mkdir", "mkdirat", "unlink", "unlinkat", "rmdir", "symlink", "symlinkat", "link",
            "linkat", "fchmod", "fchown", "fsetxattr", "lsetxattr", "utimensat", "ftruncate")
OPEN_SAMPLES = 20


def cfsdeploy(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "cfsdeploy.cli", *args, "--sysroot", str(root)]


def deploy_cmd(root: Path) -> list[str]:
    return cfsdeploy(root, "deploy", BRANCH, "--os", OS)


def finalize_cmd(root: Path) -> list[str]:
    return cfsdeploy(root, "finalize-staged")


def cleanup_cmd(root: Path) -> list[str]:
    return cfsdeploy(root, "cleanup", "--no-prune", "--os", OS)


def status_cmd(root: Path) -> list[str]:
    return cfsdeploy(root, "status", "--os", OS)


def default_of(entries: dict[str, bytes]) -> bytes:
    """The text of the entry that boots: the highest number of those a loader can use
    (one a kill left empty has no `linux` or `efi` line, and loaders skip it)."""
    usable = {n: d for n, d in entries.items() if re.search(rb"^(linux|efi) ", d, re.M)}
    return max(usable.items(), key=lambda kv: int(re.split(r"[-+.]", kv[0])[2]))[1]


def entries_of(root: Path) -> dict[str, bytes]:
    d = root / "boot/loader/entries"
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d))} if d.is_dir() else {}


def check_bootable(root: Path) -> None:
    """Every entry a loader can use names a kernel, initramfs, image and deployment
    that exist; a sealed one a complete UKI whose image's by-digest link names it."""
    for name, data in entries_of(root).items():
        fields = dict(line.split(" ", 1) for line in data.decode().splitlines())
        if "efi" in fields:
            efi = root / "boot" / fields["efi"][1:]
            assert (efi.parent / "complete").is_file(), name
            digest = kargs.value(kargs.split(uki.cmdline_of(efi)), kargs.DIGEST)
            assert digest is not None, name
            dep = root / "cfsdeploy/by-digest" / os.readlink(root / "cfsdeploy/by-digest" / digest)
        elif "linux" in fields:
            assert (root / "boot" / fields["linux"][1:]).is_file(), name
            assert (root / "boot" / fields["initrd"][1:]).is_file(), name
            opts = dict(w.split("=", 1) for w in fields["options"].split() if "=" in w)
            dep = root / opts["cfsdeploy"][1:]
            digest = opts["cfsdeploy.digest"]
        else:
            continue
        assert (dep / "deployment.json").is_file() and (dep / "etc/hostname").is_file(), name
        assert (root / "cfsdeploy/repo/objects" / digest[:2] / digest[2:]).is_file(), name


def syscall_counts(template: Path, work: Path, command: Callable[[Path], list[str]]) -> Counter[str]:
    shutil.copytree(template, work, symlinks=True)
    log = work.parent / "strace.log"
    subprocess.run(["strace", "-f", "-qq", "-o", str(log), "-e", "trace=" + ",".join(CHANGING + ("openat",)),
                    *command(work)], check=True, capture_output=True)
    counts: Counter[str] = Counter()
    for line in log.read_text().splitlines():
        m = re.match(r"\d+\s+(\w+)\(", line)
        if m:
            counts[m[1]] += 1
    shutil.rmtree(work)
    return counts


Template = tuple[Path, dict[str, bytes], dict[str, bytes]]


def crash_template(top: Path, command: Callable[[Path], list[str]], *, stage: bool,
                   sealed: bool = False) -> Template:
    """A machine running version 1 with version 2 committed (sealed, if `sealed`; and
    staged, if `stage`) and /etc edited since; its entries, and those after `command`
    runs on a copy."""
    if shutil.which("strace") is None:
        pytest.skip("strace missing (Debian package strace): it injects the kills")
    root = top / "template"
    s = Sysroot.init(str(root), OS, karg_list=ROOT_KARGS)
    tree = make_os_tree(top / "tree")
    commit_tree(s, tree)
    subprocess.run(deploy_cmd(root), check=True, capture_output=True)
    # The next commit changes files, the kernel and /etc, and a local /etc edit is merged.
    make_os_tree(tree, version="2", kernel_seed=b"k2")
    if sealed:
        (root / "cfsdeploy" / VERITY_PENDING).write_bytes(b"")  # this kernel gives objects no fs-verity
        commit_sealed(s, tree, vendor_key(top / "keys"), top, version="2")
    else:
        commit_tree(s, tree, version="2")
    if stage:
        subprocess.run([*deploy_cmd(root), "--stage"], check=True, capture_output=True)
    old = entries_of(root)
    dep = s.state(OS).deployments[0]
    (root / "cfsdeploy/deploy" / OS / dep.name / "etc/hostname").write_text("edited\n")
    reference = top / "reference"
    shutil.copytree(root, reference, symlinks=True)
    subprocess.run(command(reference), check=True, capture_output=True)
    new = entries_of(reference)
    shutil.rmtree(reference)
    assert old != new
    return root, old, new


@pytest.fixture(scope="module", params=[False, True], ids=["unsealed", "sealed"])
def template(tmp_path_factory, request) -> Template:
    return crash_template(tmp_path_factory.mktemp("crash"), deploy_cmd, stage=False, sealed=request.param)


def kill_points(template_root: Path, work: Path, command: Callable[[Path], list[str]]) -> list[tuple[str, int]]:
    counts = syscall_counts(template_root, work, command)
    points = [(name, n) for name in CHANGING for n in range(1, counts[name] + 1)]
    opens = counts["openat"]
    points += [("openat", 1 + i * opens // OPEN_SAMPLES) for i in range(OPEN_SAMPLES)]
    return points


Kill = tuple[Path, tuple[str, int], int, dict[str, bytes]]


def every_kill(template: Template, tmp_path: Path, command: Callable[[Path], list[str]],
               minimum: int) -> Iterator[Kill]:
    """Run the command on copies of the template, killed once at each kill point: the
    entries left boot the old default or the new one, every file they name is there,
    the repository is sound, and once the next command (status) has finished an
    interrupted switch they are the old set or the new one.  Yields the copy, the
    kill point, the exit status and the entries after that."""
    root, old, new = template
    points = kill_points(root, tmp_path / "count", command)
    assert len(points) >= minimum, points
    for syscall, n in points:
        work = tmp_path / f"{syscall}-{n}"
        shutil.copytree(root, work, symlinks=True)
        proc = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null",
                               "-e", f"inject={syscall}:signal=SIGKILL:when={n}", *command(work)],
                              capture_output=True)
        now = entries_of(work)
        assert default_of(now) in (default_of(old), default_of(new)), (syscall, n, sorted(now))
        check_bootable(work)
        assert proc.returncode != 0 or now == new
        assert fsck(Repository(work / "cfsdeploy/repo"), quick=True).ok, (syscall, n)
        repaired = subprocess.run(status_cmd(work), capture_output=True, text=True)
        assert repaired.returncode == 0, (syscall, n, repaired.stderr)
        now = entries_of(work)
        assert now in (old, new), (syscall, n, sorted(now))
        yield work, (syscall, n), proc.returncode, now
        shutil.rmtree(work)


def test_deploy_killed_at_every_step_leaves_old_or_new_entries(template, tmp_path) -> None:
    _, old, new = template
    outcomes: Counter[str] = Counter()
    for work, point, _status, now in every_kill(template, tmp_path, deploy_cmd, 50):
        outcomes["old" if now == old else "new"] += 1
        # The next run (a deploy again, or a cleanup when the new set is in place)
        # finishes the job and leaves nothing of the killed run behind.
        after = deploy_cmd(work) if now == old else cleanup_cmd(work)
        rerun = subprocess.run(after, capture_output=True, text=True)
        assert rerun.returncode == 0, (point, rerun.stderr)
        assert entries_of(work) == new, point
        check_bootable(work)
        assert sorted(os.listdir(work / "boot/loader")) == ["entries"], point
        assert not [p for p in (work / "cfsdeploy/deploy" / OS).iterdir() if p.name.startswith(".")], point
        deployments = Sysroot(str(work)).state(OS).deployments
        links = work / "cfsdeploy/by-digest"
        assert sorted(os.listdir(links) if links.exists() else []) == sorted(
            d.image_digest for d in deployments if d.sealed), point
    assert outcomes["old"] and outcomes["new"], outcomes


# --- finalizing a staged deployment -------------------------------------------------------------


@pytest.fixture(scope="module")
def staged_template(tmp_path_factory) -> Template:
    """Version 2 staged over version 1, and /etc edited after staging."""
    return crash_template(tmp_path_factory.mktemp("finalize"), finalize_cmd, stage=True)


def test_finalize_killed_at_every_step_leaves_old_or_new_entries(staged_template, tmp_path) -> None:
    _, old, new = staged_template
    outcomes: Counter[str] = Counter()
    for work, point, _status, _now in every_kill(staged_template, tmp_path, finalize_cmd, 30):
        still_staged = (work / "cfsdeploy/staged.json").exists()
        # A rerun finishes the job; only a kill between dropping the record and the
        # switch loses the staged deployment, which the cleanup then removes.
        for command in (finalize_cmd, cleanup_cmd):
            rerun = subprocess.run(command(work), capture_output=True, text=True)
            assert rerun.returncode == 0, (point, rerun.stderr)
        after = entries_of(work)
        assert after == new or (after == old and not still_staged), point
        outcomes["finished" if after == new else "discarded"] += 1
        check_bootable(work)
        state = Sysroot(str(work)).state(OS)
        if after == new:
            assert (work / "cfsdeploy/deploy" / OS / state.deployments[0].name / "etc/hostname"
                    ).read_text() == "edited\n", point
        assert not (work / "cfsdeploy/staged.json").exists()
        assert sorted(os.listdir(work / "cfsdeploy/deploy" / OS)) == sorted(
            [d.name for d in state.deployments] + ["var"]), point
        assert sorted(os.listdir(work / "boot/loader")) == ["entries"], point
    assert outcomes["finished"], outcomes
