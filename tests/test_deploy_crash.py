"""A deploy killed at any step leaves a machine that boots the old set of entries or the
new one, every file they name in place, and a rerun that succeeds.

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
from pathlib import Path

import pytest

from cfsdeploy.fsck import fsck
from cfsdeploy.repository import Repository
from cfsdeploy.sysroot import Sysroot

from .sysroots import BRANCH, OS, ROOT_KARGS, commit_tree, make_os_tree

CHANGING = ("fsync", "fdatasync", "syncfs", "write", "pwrite64", "rename", "renameat", "renameat2",
            "mkdir", "mkdirat", "unlink", "unlinkat", "rmdir", "symlink", "symlinkat", "link",
            "linkat", "fchmod", "fchown", "fsetxattr", "lsetxattr", "utimensat", "ftruncate")
OPEN_SAMPLES = 20


def deploy_cmd(root: Path) -> list[str]:
    return [sys.executable, "-m", "cfsdeploy.cli", "deploy", BRANCH, "--os", OS, "--sysroot", str(root)]


def entries_of(root: Path) -> dict[str, bytes]:
    d = root / "boot/loader/entries"
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d))} if d.is_dir() else {}


def check_bootable(root: Path) -> None:
    """Every entry names a kernel, initramfs, image and deployment that exist."""
    for name, data in entries_of(root).items():
        fields = dict(line.split(" ", 1) for line in data.decode().splitlines())
        assert (root / "boot" / fields["linux"][1:]).is_file(), name
        assert (root / "boot" / fields["initrd"][1:]).is_file(), name
        opts = dict(w.split("=", 1) for w in fields["options"].split() if "=" in w)
        dep = root / opts["cfsdeploy"][1:]
        assert (dep / "deployment.json").is_file() and (dep / "etc/hostname").is_file(), name
        digest = opts["cfsdeploy.digest"]
        assert (root / "cfsdeploy/repo/objects" / digest[:2] / digest[2:]).is_file(), name


def syscall_counts(template: Path, work: Path) -> Counter[str]:
    shutil.copytree(template, work, symlinks=True)
    log = work.parent / "strace.log"
    subprocess.run(["strace", "-f", "-qq", "-o", str(log), "-e", "trace=" + ",".join(CHANGING + ("openat",)),
                    *deploy_cmd(work)], check=True, capture_output=True)
    counts: Counter[str] = Counter()
    for line in log.read_text().splitlines():
        m = re.match(r"\d+\s+(\w+)\(", line)
        if m:
            counts[m[1]] += 1
    shutil.rmtree(work)
    return counts


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> tuple[Path, dict[str, bytes], dict[str, bytes]]:
    if shutil.which("strace") is None:
        pytest.skip("strace missing (Debian package strace): it injects the kills")
    top = tmp_path_factory.mktemp("crash")
    root = top / "template"
    s = Sysroot.init(str(root), OS, karg_list=ROOT_KARGS)
    tree = make_os_tree(top / "tree")
    commit_tree(s, tree)
    subprocess.run(deploy_cmd(root), check=True, capture_output=True)
    old = entries_of(root)
    # The next commit changes files, the kernel and /etc, and a local /etc edit is merged.
    make_os_tree(tree, version="2", kernel_seed=b"k2")
    commit_tree(s, tree, version="2")
    dep = s.state(OS).deployments[0]
    (root / "cfsdeploy/deploy" / OS / dep.name / "etc/hostname").write_text("edited\n")
    reference = top / "reference"
    shutil.copytree(root, reference, symlinks=True)
    subprocess.run(deploy_cmd(reference), check=True, capture_output=True)
    new = entries_of(reference)
    shutil.rmtree(reference)
    assert old != new
    return root, old, new


def kill_points(template_root: Path, work: Path) -> list[tuple[str, int]]:
    counts = syscall_counts(template_root, work)
    points = [(name, n) for name in CHANGING for n in range(1, counts[name] + 1)]
    opens = counts["openat"]
    points += [("openat", 1 + i * opens // OPEN_SAMPLES) for i in range(OPEN_SAMPLES)]
    return points


def test_deploy_killed_at_every_step_leaves_old_or_new_entries(template, tmp_path) -> None:
    root, old, new = template
    points = kill_points(root, tmp_path / "count")
    assert len(points) >= 50, points
    outcomes: Counter[str] = Counter()
    for syscall, n in points:
        work = tmp_path / f"{syscall}-{n}"
        shutil.copytree(root, work, symlinks=True)
        proc = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null",
                               "-e", f"inject={syscall}:signal=SIGKILL:when={n}", *deploy_cmd(work)],
                              capture_output=True)
        now = entries_of(work)
        assert now in (old, new), (syscall, n, sorted(now))
        outcomes["old" if now == old else "new"] += 1
        check_bootable(work)
        assert fsck(Repository(work / "cfsdeploy/repo"), quick=True).ok, (syscall, n)
        # The next run (a deploy again, or a cleanup when the new set is in place)
        # finishes the job and leaves nothing of the killed run behind.
        after = deploy_cmd(work) if now == old else [*deploy_cmd(work)[:3], "cleanup", "--no-prune",
                                                     "--os", OS, "--sysroot", str(work)]
        rerun = subprocess.run(after, capture_output=True, text=True)
        assert rerun.returncode == 0, (syscall, n, rerun.stderr)
        assert entries_of(work) == new, (syscall, n)
        check_bootable(work)
        assert sorted(os.listdir(work / "boot/loader")) == ["entries"], (syscall, n)
        assert not [p for p in (work / "cfsdeploy/deploy" / OS).iterdir() if p.name.startswith(".")], (syscall, n)
        assert proc.returncode != 0 or now == new
        shutil.rmtree(work)
    assert outcomes["old"] and outcomes["new"], outcomes
