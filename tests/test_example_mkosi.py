"""examples/mkosi: mkosi 14 builds a Debian 13 tree with the cfsdeploy package in it,
from the mirror apt uses here (tests/vm.py's mirror()), and that tree is what a
builder commits: lint finds nothing in it, `commit --lint` takes it, and the commit
has the kernel and initramfs where Debian puts them.

Slow (a minute or two: debootstrap and apt from the mirror) and root (mkosi 14
builds as root); .ci/setup installs mkosi.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cfsdeploy.composefs import dumpfile
from cfsdeploy.repo.repository import Repository
from cfsdeploy.sysroot.commit import kernels_of, manifest_data

from . import vm

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mkosi 14 builds as root"),
    pytest.mark.skipif(shutil.which("mkosi") is None, reason="mkosi not installed (.ci/setup installs it)"),
]

BUILD = Path(__file__).resolve().parent.parent / "examples" / "mkosi" / "build.sh"
BRANCH = "debian/13/x86_64/mkosi"


def cfsdeploy(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cfsdeploy.cli", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mkosi")
    p = subprocess.run(["bash", str(BUILD), str(out)], capture_output=True, text=True,
                       env=dict(os.environ, MIRROR=vm.mirror()))
    assert p.returncode == 0, (p.stdout[-4000:], p.stderr[-4000:])
    return out / "tree"


@pytest.fixture(scope="module")
def committed(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A new repository, and what `commit --lint` of the tree to BRANCH said."""
    repo = tmp_path_factory.mktemp("repo") / "repo"
    assert cfsdeploy("init", "--repo", repo).returncode == 0
    return repo, cfsdeploy("commit", "--repo", repo, "--tree", tree, "--branch", BRANCH, "--lint",
                           "-m", "Debian 13 built with mkosi")


def lint_findings(tree: Path) -> list[dict[str, object]]:
    p = cfsdeploy("lint", "--json", tree)
    findings: list[dict[str, object]] = json.loads(p.stdout)["findings"]
    return findings


def test_tree_lints_without_errors(tree: Path) -> None:
    assert [f for f in lint_findings(tree) if f["severity"] == "error"] == []


def test_tree_lints_without_warnings(tree: Path) -> None:
    assert [f for f in lint_findings(tree) if f["severity"] == "warning"] == []


def test_machine_id_is_empty_so_a_machine_boots_without_first_boot_setup(tree: Path) -> None:
    # mkosi 14 writes "uninitialized": systemd would apply the unit presets and run
    # systemd-firstboot at a machine's first boot.
    assert (tree / "etc/machine-id").read_bytes() == b""


def test_commit_with_lint_takes_the_tree(committed: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    repo, p = committed
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[-1] == str(Repository(repo).resolve(BRANCH).id)


def test_commit_has_the_kernel_and_initramfs_where_debian_puts_them(
        tree: Path, committed: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    repo, p = committed
    assert p.returncode == 0, p.stderr
    (kver,) = (d.name for d in (tree / "usr/lib/modules").iterdir())
    found = kernels_of(dumpfile.parse(manifest_data(Repository(repo), BRANCH))).found
    assert list(found) == [kver]
    assert found[kver].initramfs_path == f"/boot/initrd.img-{kver}".encode()
